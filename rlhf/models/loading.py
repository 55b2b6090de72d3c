"""Load Hugging Face causal LMs and tokenizers the same way for every trainer and role.

One path for every source: an HF folder, a hub id, an ``s3://`` URI (downloaded first) or
``embedded:NAME`` (a folder shipped in rlhf/assets). On top of the plain model: attention
implementation, dtype, QLoRA (4-bit base), LoRA adapters, gradient checkpointing and the MoE
router loss switch.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from rlhf.config import ModelConfig
from rlhf.errors import UserError


def frozen_model_config(model: ModelConfig, pretrain: Optional[str] = None) -> ModelConfig:
    """The config of a frozen model built like ``model`` (reference, reward model, rollout copy):
    same dtype and attention, no adapters, no 4-bit base, no activation recomputation, no router
    loss. ``pretrain`` replaces the model path when given."""
    return dataclasses.replace(
        model, pretrain=pretrain or model.pretrain, lora_rank=0, load_in_4bit=False, gradient_checkpointing=False, aux_loss_coef=0.0
    )


def resolve_model_path(pretrain: str, flag: str = "--pretrain") -> str:
    """embedded:/s3:// -> local folder; a local-looking path must exist; else a hub id.

    ``flag`` is the option that named the model (``--reward_pretrain``, ``--ref_pretrain`` ...):
    errors name it, since a job loads several models and the user must know which one is bad.
    """
    from rlhf.data.sources import resolve_uri

    path = resolve_uri(pretrain)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(f"{flag} {pretrain}: folder has no config.json, so it is not a Hugging Face model folder")
        return path
    if os.path.exists(path):
        raise UserError(f"{flag} {pretrain}: is a file; expected a Hugging Face model folder or hub id")
    # A hub id is 'name' or 'org/name'; anything path-like that does not exist is a typo.
    if path.startswith(("/", "./", "../", "~")) or path.count("/") > 1:
        raise UserError(f"{flag} {pretrain}: no such model folder")
    return path  # a hub id; loading reports if it cannot be fetched


def attention_implementation(cfg: ModelConfig) -> str:
    if cfg.flash_attn:
        if not torch.cuda.is_available():
            raise UserError("--flash_attn needs a CUDA GPU; drop the flag to use sdpa attention on this machine")
        if importlib.util.find_spec("flash_attn") is None:
            raise UserError("--flash_attn needs the flash-attn package (pip install 'rlhf[flash-attn]'); drop the flag to use sdpa")
        return "flash_attention_2"
    return "sdpa"


def model_dtype(cfg: ModelConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.bf16 else torch.float32


def load_tokenizer(cfg: ModelConfig, padding_side: str = "right") -> PreTrainedTokenizerBase:
    path = resolve_model_path(cfg.pretrain)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"--pretrain {cfg.pretrain}: cannot load the tokenizer ({_one_line(err)})") from None
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        # Many base models ship no pad token; padding is always masked, so eos is a safe filler.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_reward_model(cfg: ModelConfig, pad_token_id: int, flag: str = "--pretrain") -> PreTrainedModel:
    """A scalar-head model (reward model or critic): transformers' sequence classifier, 1 label.

    Using ``AutoModelForSequenceClassification`` itself means the saved model loads and scores
    the same in transformers, TRL or vLLM's reward serving: the score is the head applied to the
    last non-pad token. A causal-LM checkpoint gets a freshly initialised head. ``flag``: the
    option naming ``cfg.pretrain``, for error messages.
    """
    from transformers import AutoModelForSequenceClassification

    return _load(cfg, AutoModelForSequenceClassification, lora_task="SEQ_CLS", flag=flag, num_labels=1, pad_token_id=pad_token_id)


def load_causal_lm(cfg: ModelConfig, *, zero3_config: Optional[dict] = None, flag: str = "--pretrain") -> PreTrainedModel:
    """The model to train (or to freeze): HF weights, then 4-bit, LoRA, checkpointing as asked.

    ``zero3_config``: a DeepSpeed ZeRO-3 config; when given, weights are partitioned while
    loading (transformers' HfDeepSpeedConfig hook), so a model larger than one rank's memory
    loads at all. ``flag``: the option naming ``cfg.pretrain``, for error messages.
    """
    return _load(cfg, AutoModelForCausalLM, lora_task="CAUSAL_LM", flag=flag, zero3_config=zero3_config)


def _load(
    cfg: ModelConfig, auto_class: Any, *, lora_task: str, flag: str, zero3_config: Optional[dict] = None, **model_kwargs: Any
) -> PreTrainedModel:
    from safetensors import SafetensorError

    path = resolve_model_path(cfg.pretrain, flag)
    kwargs: dict[str, Any] = dict(
        **model_kwargs,
        dtype=model_dtype(cfg),
        attn_implementation=attention_implementation(cfg),
        trust_remote_code=cfg.trust_remote_code,
    )
    if cfg.load_in_4bit:
        kwargs["quantization_config"] = _bnb_4bit_config(model_dtype(cfg))
    if cfg.aux_loss_coef > 0:
        kwargs["output_router_logits"] = True
    keep_alive = None
    if zero3_config is not None and not cfg.load_in_4bit:
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(zero3_config)  # noqa: F841  (must live during from_pretrained)
    try:
        model = auto_class.from_pretrained(path, **kwargs)
    except SafetensorError as err:  # truncated download, disk full while saving, not a safetensors file
        folder = "" if path == cfg.pretrain else f" (in {path})"  # embedded: / s3:// resolve to a local folder
        raise UserError(
            f"{flag} {cfg.pretrain}: the model's weights{folder} are not a readable safetensors file ({_one_line(err)}); "
            "download or export the model again"
        ) from None
    except (OSError, ValueError) as err:
        raise UserError(f"{flag} {cfg.pretrain}: cannot load the model ({_one_line(err)})") from None
    del keep_alive
    model.config.use_cache = False  # training never reuses a KV cache; generation turns it on

    if cfg.load_in_4bit:
        _prepare_4bit_for_training(model, cfg)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_rank > 0:
        model = _add_lora(model, cfg, lora_task)
    return model


def _bnb_4bit_config(compute_dtype: torch.dtype):
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("--load_in_4bit needs bitsandbytes (pip install 'rlhf[qlora]')")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def _prepare_4bit_for_training(model: PreTrainedModel, cfg: ModelConfig) -> None:
    import bitsandbytes as bnb
    from peft import prepare_model_for_kbit_training

    # On CPUs with avx512_bf16 an eval-mode forward repacks Linear4bit weights in place, after
    # which training silently loses gradients; keep the portable kernel path.
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)


def _add_lora(model: PreTrainedModel, cfg: ModelConfig, task: str):
    from peft import LoraConfig, TaskType, get_peft_model

    targets: Any = list(cfg.target_modules)
    if targets == ["all-linear"]:
        targets = "all-linear"
    lora = LoraConfig(
        task_type=TaskType[task],  # SEQ_CLS also keeps the new score head trainable
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as err:
        raise UserError(f"--target_modules {' '.join(cfg.target_modules)}: {_one_line(err)}") from None
    if cfg.gradient_checkpointing:
        # With a frozen embedding no input requires grad and checkpointed blocks get no gradient.
        model.enable_input_require_grads()
    return model


def model_config(cfg: ModelConfig):
    return AutoConfig.from_pretrained(resolve_model_path(cfg.pretrain), trust_remote_code=cfg.trust_remote_code)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:400]
