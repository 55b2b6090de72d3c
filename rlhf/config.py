"""Typed configuration, parsed by tyro, with OpenRLHF's flag names.

Each trainer's config is a dataclass made of sections (model, data, train, checkpoint, logging).
On the command line the sections disappear: every option is a flat, underscored flag named as
in OpenRLHF (``--pretrain``, ``--max_len``, ``--zero_stage`` ...), so a user's script ports by
changing only its launcher line. ``--config FILE.yaml`` loads a preset first (a flat mapping of
the same names); flags given after it override the preset.

``validate()`` checks every section and the combinations between them and raises ``UserError``
naming the flag and the allowed values; ``parse_config`` calls it, so a bad combination stops
the job at start-up, before any process group or model exists.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Sequence, TypeVar

import tyro
import tyro._errors as tyro_errors
import yaml

from rlhf.algos.estimators import discounted_estimators, estimator_traits
from rlhf.errors import UserError

C = TypeVar("C")


@dataclass
class ModelConfig:
    """The model to train and how it is built."""

    pretrain: str = "embedded:tiny-qwen2"
    """HF model folder, hub id, s3:// URI, or 'embedded:NAME' for a model shipped in rlhf/assets."""
    bf16: bool = False
    """Train in bfloat16 (DeepSpeed bf16 mode, fp32 master weights). fp32 otherwise."""
    flash_attn: bool = False
    """Use flash_attention_2 (GPU with the flash-attn package only); sdpa otherwise."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    lora_rank: int = 0
    """LoRA rank; 0 trains all weights."""
    lora_alpha: int = 16
    """LoRA scaling numerator (scale = lora_alpha / lora_rank)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch."""
    target_modules: tuple[str, ...] = ("all-linear",)
    """Modules that get LoRA adapters ('all-linear' or names such as q_proj v_proj)."""
    load_in_4bit: bool = False
    """QLoRA: load the frozen base in 4-bit NF4 with bitsandbytes (needs --lora_rank > 0)."""
    aux_loss_coef: float = 0.0
    """Weight of the MoE router load-balancing loss (Mixtral-style models); 0 disables it."""
    trust_remote_code: bool = False
    """Allow model code from the model folder or hub repo."""

    def validate(self) -> None:
        if self.lora_rank < 0:
            raise UserError(f"--lora_rank must be >= 0, got {self.lora_rank}")
        if self.load_in_4bit and self.lora_rank == 0:
            raise UserError("--load_in_4bit (QLoRA) needs --lora_rank > 0: a 4-bit base cannot be trained directly")
        if self.aux_loss_coef < 0:
            raise UserError(f"--aux_loss_coef must be >= 0, got {self.aux_loss_coef}")
        if self.flash_attn and not self.bf16:
            raise UserError("--flash_attn needs --bf16: flash_attention_2 has no fp32 kernels")


@dataclass
class DataConfig:
    """Where the data comes from and how rows become token sequences."""

    dataset: str = "embedded:arith/sft_train.jsonl"
    """Comma-separated sources: local json/jsonl/parquet/arrow file or folder, HF dataset name, s3:// URI, embedded:PATH."""
    dataset_probs: Optional[str] = None
    """Comma-separated mixing weights for the --dataset sources (default: equal)."""
    eval_dataset: Optional[str] = None
    """Evaluation source(s), same forms as --dataset. Default: hold out --eval_holdout_ratio of --dataset."""
    eval_holdout_ratio: float = 0.05
    """Fraction of the training rows held out for eval when --eval_dataset is not given (0 disables eval)."""
    train_split: str = "train"
    """Split to read from HF datasets / dataset folders."""
    eval_split: str = "test"
    """Split to read from --eval_dataset when it is an HF dataset with splits."""
    max_samples: int = 100_000_000
    """Use at most this many training rows (after mixing)."""
    input_key: str = "input"
    """Row field holding the prompt (or the chat messages list with --apply_chat_template)."""
    output_key: Optional[str] = "output"
    """Row field holding the response; None when --input_key holds a whole chat."""
    input_template: Optional[str] = None
    """Python format string applied to the prompt, e.g. 'User: {}\\nAssistant: '; '{field}' inserts that row field (alpaca: '{instruction}\\n\\n{}')."""
    apply_chat_template: bool = False
    """Render prompt/response or messages with the tokenizer's chat template."""
    tokenizer_chat_template: Optional[str] = None
    """Override the tokenizer's chat template (Jinja text)."""
    max_len: int = 2048
    """Maximum tokens per sample; longer samples are truncated (or rejected, see --truncate)."""
    truncate: bool = True
    """Truncate samples longer than --max_len; --no-truncate makes a too-long prompt an error."""
    packing_samples: bool = False
    """Pack the --micro_train_batch_size samples of a micro-batch into one row instead of padding them; attention stays within each sample, and --train_batch_size still counts samples (pairs for DPO)."""
    pretrain_mode: bool = False
    """Continued pre-training: raw text from --input_key, loss on every token."""
    preprocess_fn: Optional[str] = None
    """'module:function' mapping a raw row (dict) to a row with the configured keys."""
    score_key: Optional[str] = None
    """Conditional SFT: row field with a quality score that is written into the prompt."""
    score_template: str = "<rm_score>: {score:.1f}"
    """Conditional SFT: how the score is written (a system message with the chat template, else a prompt prefix line)."""

    def validate(self) -> None:
        if not 0.0 <= self.eval_holdout_ratio < 1.0:
            raise UserError(f"--eval_holdout_ratio must be in [0, 1), got {self.eval_holdout_ratio}")
        if self.max_len < 2:
            raise UserError(f"--max_len must be >= 2, got {self.max_len}")
        if self.max_samples < 1:
            raise UserError(f"--max_samples must be >= 1, got {self.max_samples}")
        if self.pretrain_mode and self.score_key:
            raise UserError("--pretrain_mode and --score_key cannot be combined: pre-training text has no prompt to condition")
        if self.preprocess_fn is not None and ":" not in self.preprocess_fn:
            raise UserError(f"--preprocess_fn must look like 'module:function', got {self.preprocess_fn!r}")
        if self.dataset_probs is not None:
            n_sources = len(self.dataset.split(","))
            probs = self.dataset_probs.split(",")
            if len(probs) != n_sources:
                raise UserError(f"--dataset_probs has {len(probs)} values for {n_sources} --dataset sources")
            try:
                values = [float(p) for p in probs]
            except ValueError:
                raise UserError(f"--dataset_probs must be comma-separated numbers, got {self.dataset_probs!r}") from None
            if any(v < 0 for v in values) or sum(values) <= 0:
                raise UserError(f"--dataset_probs must be >= 0 with a positive sum, got {self.dataset_probs!r}")


@dataclass
class TrainConfig:
    """Optimisation and DeepSpeed settings."""

    micro_train_batch_size: int = 8
    """Samples per rank per forward/backward."""
    train_batch_size: int = 32
    """Samples per optimizer step over all data-parallel ranks (gradient accumulation fills the gap)."""
    max_epochs: int = 1
    """Passes over the training data."""
    max_steps: Optional[int] = None
    """Stop after this many steps: optimizer steps, except in rlhf.ppo where a step is one rollout of --rollout_batch_size prompts and its updates (default: --max_epochs worth; rlhf.ppo: --num_episodes worth)."""
    learning_rate: float = 5e-6
    """Peak learning rate."""
    lr_warmup_ratio: float = 0.03
    """Fraction of the optimizer steps spent in linear warm-up."""
    lr_scheduler: Literal["cosine_with_min_lr", "constant_with_warmup", "constant", "linear"] = "cosine_with_min_lr"
    """Schedule after warm-up (cosine decays to 0.1 x the peak; constant ignores --lr_warmup_ratio)."""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas."""
    l2: float = 0.0
    """Weight decay."""
    max_norm: float = 1.0
    """Gradient clipping norm (0 disables clipping)."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage."""
    adam_offload: bool = False
    """Keep Adam states on the CPU (DeepSpeed CPU-Adam)."""
    ds_config: Optional[str] = None
    """JSON object (or path to a JSON file) merged over the generated DeepSpeed config, for expert settings."""
    seed: int = 42
    """Seed for model init, data order, hold-out split, mixing, dropout and sampling."""
    eval_steps: int = -1
    """Evaluate every N optimizer steps (-1: at the end of each epoch only)."""
    micro_eval_batch_size: Optional[int] = None
    """Samples per rank per eval forward (default: micro_train_batch_size)."""

    def validate(self) -> None:
        if self.micro_train_batch_size < 1:
            raise UserError(f"--micro_train_batch_size must be >= 1, got {self.micro_train_batch_size}")
        if self.train_batch_size < 1:
            raise UserError(f"--train_batch_size must be >= 1, got {self.train_batch_size}")
        if self.learning_rate <= 0:
            raise UserError(f"--learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.lr_warmup_ratio <= 1.0:
            raise UserError(f"--lr_warmup_ratio must be in [0, 1], got {self.lr_warmup_ratio}")
        if self.max_epochs < 1:
            raise UserError(f"--max_epochs must be >= 1, got {self.max_epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"--max_steps must be >= 1, got {self.max_steps}")

    def grad_accumulation_steps(self, dp_size: int) -> int:
        """Micro-batches per rank per optimizer step; raises if the batch sizes do not divide."""
        per_step = self.micro_train_batch_size * dp_size
        if self.train_batch_size % per_step != 0:
            raise UserError(
                f"--train_batch_size {self.train_batch_size} must be a multiple of "
                f"--micro_train_batch_size {self.micro_train_batch_size} x data-parallel size {dp_size} = {per_step}"
            )
        return self.train_batch_size // per_step


@dataclass
class CheckpointConfig:
    """Resumable checkpoints and the final export."""

    save_path: str = "./ckpt/model"
    """Folder for the final HF export (model + tokenizer, or the LoRA adapter)."""
    ckpt_path: str = "./ckpt/checkpoints"
    """Folder for resumable training checkpoints."""
    save_steps: int = -1
    """Write a resumable checkpoint every N optimizer steps (-1: never)."""
    max_ckpt_num: int = 3
    """Keep at most this many resumable checkpoints."""
    load_checkpoint: bool = False
    """Resume from the latest checkpoint in --ckpt_path if there is one."""
    s3_save_path: Optional[str] = None
    """s3://bucket/prefix to upload the final export to (boto3; endpoint from AWS_ENDPOINT_URL)."""

    def validate(self) -> None:
        if self.max_ckpt_num < 1:
            raise UserError(f"--max_ckpt_num must be >= 1, got {self.max_ckpt_num}")
        if self.s3_save_path is not None and not self.s3_save_path.startswith("s3://"):
            raise UserError(f"--s3_save_path must start with s3://, got {self.s3_save_path!r}")


@dataclass
class LoggingConfig:
    """Metrics: jsonl in the output folder, wandb, progress bar."""

    logging_steps: int = 1
    """Log metrics every N optimizer steps."""
    use_wandb: bool = False
    """Log to Weights & Biases (set WANDB_MODE=offline to log without a network)."""
    wandb_project: str = "rlhf"
    """wandb project."""
    wandb_org: Optional[str] = None
    """wandb entity (team or user)."""
    wandb_run_name: Optional[str] = None
    """wandb run name (default: trainer name and time)."""
    metrics_path: Optional[str] = None
    """Metrics jsonl file (default: <save_path>/metrics.jsonl)."""

    def validate(self) -> None:
        if self.logging_steps < 1:
            raise UserError(f"--logging_steps must be >= 1, got {self.logging_steps}")


Flat = tyro.conf.OmitArgPrefixes


def validate_sections(config: Any) -> None:
    """Run ``validate()`` of every section of a trainer config."""
    for f in dataclasses.fields(config):
        section = getattr(config, f.name)
        if dataclasses.is_dataclass(section):
            section.validate()
    model, train = getattr(config, "model", None), getattr(config, "train", None)
    if isinstance(model, ModelConfig) and isinstance(train, TrainConfig) and model.bf16 and train.zero_stage == 0:
        raise UserError(
            "--bf16 needs --zero_stage 1, 2 or 3: DeepSpeed keeps bf16 training's fp32 master weights and gradients in the "
            "ZeRO optimizer; use --zero_stage 1"
        )


@dataclass
class SFTConfig:
    """Supervised fine-tuning, continued pre-training (--pretrain_mode) and conditional SFT (--score_key)."""

    model: Annotated[ModelConfig, Flat] = field(default_factory=ModelConfig)
    data: Annotated[DataConfig, Flat] = field(default_factory=DataConfig)
    train: Annotated[TrainConfig, Flat] = field(default_factory=TrainConfig)
    ckpt: Annotated[CheckpointConfig, Flat] = field(default_factory=CheckpointConfig)
    log: Annotated[LoggingConfig, Flat] = field(default_factory=LoggingConfig)
    multiturn: bool = False
    """Chat rows: the loss covers every assistant turn of the messages list in --input_key (OpenRLHF's flag; the same as --output_key None, needs --apply_chat_template)."""

    def validate(self) -> None:
        validate_sections(self)
        if self.multiturn:
            if not self.data.apply_chat_template:
                raise UserError(
                    "--multiturn needs --apply_chat_template: the turns of the messages list are rendered with the "
                    "tokenizer's chat template"
                )
            self.data.output_key = None


@dataclass
class PreferenceDataConfig(DataConfig):
    """Paired (RM, DPO) and unpaired (KTO) preference data on top of the SFT data options."""

    dataset: str = "embedded:arith/prefs_train.jsonl"
    """Comma-separated sources (same forms as for SFT)."""
    prompt_key: Optional[str] = "prompt"
    """Row field with the prompt; None when chosen/rejected hold whole texts or whole chats (HH-RLHF shape)."""
    chosen_key: str = "chosen"
    """Row field with the preferred response (text, or a messages list as in UltraFeedback-binarized)."""
    rejected_key: str = "rejected"
    """Row field with the dispreferred response."""
    margin_key: Optional[str] = None
    """Row field with a per-pair margin for the pairwise reward loss (optional)."""
    label_key: str = "label"
    """KTO: row field with the boolean label (true = desirable)."""


@dataclass
class RMConfig:
    """Reward-model training: a causal-LM backbone with a scalar head, pairwise loss."""

    model: Annotated[ModelConfig, Flat] = field(default_factory=ModelConfig)
    data: Annotated[PreferenceDataConfig, Flat] = field(default_factory=PreferenceDataConfig)
    train: Annotated[TrainConfig, Flat] = field(default_factory=TrainConfig)
    ckpt: Annotated[CheckpointConfig, Flat] = field(default_factory=CheckpointConfig)
    log: Annotated[LoggingConfig, Flat] = field(default_factory=LoggingConfig)
    loss: Literal["sigmoid", "logexp"] = "sigmoid"
    """Pairwise loss: -log sigmoid(r_chosen - r_rejected - margin), or log(1 + exp(r_rejected - r_chosen))."""

    def validate(self) -> None:
        validate_sections(self)
        if self.loss == "logexp" and self.data.margin_key:
            raise UserError("--margin_key works with --loss sigmoid only (logexp has no margin term)")
        if self.data.packing_samples:
            raise UserError(
                "--packing_samples is not supported by rlhf.rm: the score is read at each sequence's last token of a padded batch"
            )


def loads_reference(cfg: Any) -> bool:
    """DPO / KTO: whether the job loads a reference model of its own. With LoRA and no
    --ref_pretrain the reference is the policy with its adapter switched off, no second model.
    The trainers (rlhf.engines.reference.load_reference) and the memory planner both ask here."""
    return not (cfg.model.lora_rank > 0 and cfg.ref_pretrain is None)


def check_ref_offload(cfg: Any) -> None:
    if cfg.ref_offload and not loads_reference(cfg):
        raise UserError(
            "--ref_offload: with --lora_rank the reference is the trained model with its adapter off, there is no separate "
            "copy to offload; drop --ref_offload (or give --ref_pretrain)"
        )


@dataclass
class DPOConfig:
    """Direct preference optimisation: DPO (sigmoid), IPO, cDPO (--label_smoothing)."""

    model: Annotated[ModelConfig, Flat] = field(default_factory=ModelConfig)
    data: Annotated[PreferenceDataConfig, Flat] = field(default_factory=PreferenceDataConfig)
    train: Annotated[TrainConfig, Flat] = field(default_factory=TrainConfig)
    ckpt: Annotated[CheckpointConfig, Flat] = field(default_factory=CheckpointConfig)
    log: Annotated[LoggingConfig, Flat] = field(default_factory=LoggingConfig)
    beta: float = 0.1
    """Strength of the implicit KL to the reference (DPO's beta; IPO's 1/(2 tau))."""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid = DPO (with --label_smoothing > 0: cDPO); ipo = IPO (squared loss)."""
    label_smoothing: float = 0.0
    """cDPO: probability that a preference label is flipped (0 <= eps < 0.5)."""
    nll_loss_coef: float = 0.0
    """Weight of an SFT (NLL) term on the chosen responses."""
    ref_pretrain: Optional[str] = None
    """Reference model (default: --pretrain). With LoRA the reference is the base with the adapter off."""
    ref_mode: Literal["engine", "precompute"] = "engine"
    """engine: a frozen reference model on the same ranks; precompute: reference log-probs computed once in a first pass and cached."""
    ref_offload: bool = False
    """Keep the reference model's weights in CPU memory between its forwards (DeepSpeed ZeRO-3 parameter offload)."""

    def validate(self) -> None:
        validate_sections(self)
        if self.beta <= 0:
            raise UserError(f"--beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise UserError(f"--label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.loss_type == "ipo" and self.label_smoothing > 0:
            raise UserError("--label_smoothing (cDPO) applies to --loss_type sigmoid only")
        if self.nll_loss_coef < 0:
            raise UserError(f"--nll_loss_coef must be >= 0, got {self.nll_loss_coef}")
        check_ref_offload(self)


@dataclass
class KTOConfig:
    """Kahneman-Tversky optimisation on unpaired, labelled completions."""

    model: Annotated[ModelConfig, Flat] = field(default_factory=ModelConfig)
    data: Annotated[PreferenceDataConfig, Flat] = field(
        default_factory=lambda: PreferenceDataConfig(dataset="embedded:arith/kto_train.jsonl", input_key="prompt", output_key="completion")
    )
    train: Annotated[TrainConfig, Flat] = field(default_factory=TrainConfig)
    ckpt: Annotated[CheckpointConfig, Flat] = field(default_factory=CheckpointConfig)
    log: Annotated[LoggingConfig, Flat] = field(default_factory=LoggingConfig)
    beta: float = 0.1
    """KTO's beta."""
    desirable_loss_weight: float = 1.0
    """Weight of desirable (label true) examples (lambda_D)."""
    undesirable_loss_weight: float = 1.0
    """Weight of undesirable (label false) examples (lambda_U)."""
    ref_pretrain: Optional[str] = None
    """Reference model (default: --pretrain)."""
    ref_offload: bool = False
    """Keep the reference model's weights in CPU memory between its forwards (DeepSpeed ZeRO-3 parameter offload)."""
    eval_pairs: Optional[str] = None
    """Preference pairs (prompt/chosen/rejected) on which to report the implicit reward's pair accuracy and margin during KTO eval"""

    def validate(self) -> None:
        validate_sections(self)
        if self.beta <= 0:
            raise UserError(f"--beta must be > 0, got {self.beta}")
        if self.desirable_loss_weight <= 0 or self.undesirable_loss_weight <= 0:
            raise UserError("--desirable_loss_weight and --undesirable_loss_weight must be > 0")
        check_ref_offload(self)


@dataclass
class PromptDataConfig:
    """Prompts for rollouts (and their labels for verifiable rewards)."""

    prompt_data: str = "embedded:arith/prompts_train.jsonl"
    """Comma-separated prompt sources (same forms as --dataset)."""
    prompt_data_probs: Optional[str] = None
    """Mixing weights for the --prompt_data sources."""
    eval_prompt_data: Optional[str] = None
    """Held-out prompts for the eval reward (greedy decoding). Default: none, so no eval unless --eval_holdout_ratio holds out some of --prompt_data."""
    eval_holdout_ratio: float = 0.0
    """Fraction of the --prompt_data prompts held out (not trained on) for the eval reward when --eval_prompt_data is not given; 0: no eval."""
    input_key: str = "input"
    """Row field with the prompt text (or a messages list with --apply_chat_template)."""
    label_key: Optional[str] = "label"
    """Row field passed to reward functions as the label (reference answer); None for none."""
    input_template: Optional[str] = None
    """Python format string applied to the prompt text ('{}'); '{field}' inserts that row field."""
    apply_chat_template: bool = False
    """Render prompts with the tokenizer's chat template (with the generation prompt)."""
    tokenizer_chat_template: Optional[str] = None
    """Override the tokenizer's chat template (Jinja text)."""
    prompt_max_len: int = 1024
    """Prompts longer than this many tokens are left-truncated."""
    max_samples: int = 100_000_000
    """Use at most this many prompts."""
    pretrain_data: Optional[str] = None
    """Pre-training text mixed into the actor loss (PPO-ptx, with --ptx_coef); same source forms as --dataset."""
    pretrain_data_probs: Optional[str] = None
    """Mixing weights for the --pretrain_data sources."""
    pretrain_input_key: str = "text"
    """Row field holding the --pretrain_data text."""
    pretrain_max_len: Optional[int] = None
    """Token chunk length of --pretrain_data (default: --prompt_max_len + --generate_max_len)."""

    def validate(self) -> None:
        if self.prompt_max_len < 1:
            raise UserError(f"--prompt_max_len must be >= 1, got {self.prompt_max_len}")
        if not 0.0 <= self.eval_holdout_ratio < 1.0:
            raise UserError(f"--eval_holdout_ratio must be in [0, 1), got {self.eval_holdout_ratio}")
        if self.eval_holdout_ratio > 0 and self.eval_prompt_data:
            raise UserError("--eval_holdout_ratio and --eval_prompt_data both choose the eval prompts: give one of them")
        if self.pretrain_max_len is not None and self.pretrain_max_len < 2:
            raise UserError(f"--pretrain_max_len must be >= 2, got {self.pretrain_max_len}")


@dataclass
class RolloutConfig:
    """Generation and experience collection."""

    rollout_batch_size: int = 64
    """Prompts per PPO step over all ranks."""
    n_samples_per_prompt: int = 1
    """Responses sampled per prompt (groups for rloo / group_norm / dr_grpo)."""
    micro_rollout_batch_size: int = 16
    """Sequences per rank per forward when scoring experience (reference, critic, reward)."""
    generate_max_len: int = 1024
    """Maximum new tokens per response."""
    temperature: float = 1.0
    """Sampling temperature (0: greedy decoding, batch inference only)."""
    top_p: float = 1.0
    """Nucleus sampling."""
    ignore_eos: bool = False
    """Never stop at EOS: every response is exactly --generate_max_len tokens (throughput benchmarks, vLLM's ignore_eos)."""
    rollout_backend: Literal["hf", "vllm"] = "hf"
    """Generation engine: hf (transformers generate) or vllm (vLLM inside the actor's ranks, colocated placement)."""
    weight_sync_bucket_mb: float = 64.0
    """Bucket size in which the actor's weights are gathered (ZeRO-3) and sent to the rollout engine each step."""
    vllm_num_engines: Optional[int] = None
    """vLLM engines (OpenRLHF's flag); here always world size / --vllm_tensor_parallel_size, one per tensor-parallel group of ranks. Checked if given."""
    vllm_tensor_parallel_size: int = 1
    """Ranks per vLLM engine (tensor parallel); consecutive ranks form a group and generate together."""
    vllm_gpu_memory_utilization: float = 0.5
    """GPU: share of accelerator memory vLLM may take (weights + KV cache)."""
    vllm_kv_cache_mb: float = 256.0
    """CPU: KV-cache size per engine in MiB (vLLM would otherwise take most of the RAM)."""
    vllm_enable_sleep: bool = False
    """GPU: free vLLM's memory while training and wake it for each rollout (a no-op on CPU)."""
    max_num_seqs: Optional[int] = None
    """vLLM: most sequences per engine step (vLLM's max_num_seqs; default vLLM's own, 256)."""
    vllm_is_truncation: Optional[float] = None
    """Truncated importance sampling: weight each token's policy loss by min(pi_actor / pi_vllm, C) for this C, correcting for the two engines' numerics."""

    def validate(self) -> None:
        for flag, value in (
            ("--rollout_batch_size", self.rollout_batch_size),
            ("--n_samples_per_prompt", self.n_samples_per_prompt),
            ("--micro_rollout_batch_size", self.micro_rollout_batch_size),
            ("--generate_max_len", self.generate_max_len),
        ):
            if value < 1:
                raise UserError(f"{flag} must be >= 1, got {value}")
        if self.temperature < 0:
            raise UserError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise UserError(f"--max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.weight_sync_bucket_mb <= 0:
            raise UserError(f"--weight_sync_bucket_mb must be > 0, got {self.weight_sync_bucket_mb}")
        if self.vllm_tensor_parallel_size < 1 or self.vllm_kv_cache_mb <= 0 or not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise UserError("--vllm_tensor_parallel_size must be >= 1, --vllm_kv_cache_mb > 0 and --vllm_gpu_memory_utilization in (0, 1]")
        if self.vllm_is_truncation is not None and (self.rollout_backend != "vllm" or self.vllm_is_truncation <= 0):
            raise UserError("--vllm_is_truncation needs --rollout_backend vllm and a value > 0")


@dataclass
class PPOAlgoConfig:
    """Rewards, KL, advantages and the PPO objective."""

    reward_func: Optional[str] = None
    """'module:function' or 'file.py:function' scoring (prompts, responses, labels) -> list of floats, e.g. rlhf.rewards:exact_match."""
    reward_pretrain: Optional[str] = None
    """Comma-separated reward models (folders saved by rlhf.rm, or any HF sequence classifier with 1 label)."""
    remote_rm_url: Optional[str] = None
    """HTTP endpoint scoring responses: POST {prompts, responses, labels, queries} -> {"rewards": [...]}; or, as in OpenRLHF, a .py file defining reward_func(queries, prompts, labels)."""
    remote_rm_timeout: float = 30.0
    """Seconds to wait for one --remote_rm_url call."""
    remote_rm_retries: int = 3
    """Retries of a failed --remote_rm_url call before the job stops (never a silent zero reward)."""
    reward_weights: Optional[str] = None
    """Comma-separated weights of the reward sources (reward models, then --remote_rm_url, then --reward_func); default 1 each. The reward is their weighted sum."""
    normalize_reward: bool = False
    """Normalise each reward model's score with the mean/std stored by rlhf.rm."""
    reward_clip_range: tuple[float, float] = (-10.0, 10.0)
    """Clip the combined sequence reward to this range."""
    overlong_penalty: float = 0.0
    """Subtracted from the reward of responses that hit --generate_max_len without EOS."""
    advantage_estimator: str = "gae"
    """gae | reinforce | rloo | reinforce_baseline | group_norm | dr_grpo."""
    gamma: float = 1.0
    """Discount factor."""
    lambd: float = 0.95
    """GAE lambda."""
    init_kl_coef: float = 0.01
    """KL coefficient (initial value with --kl_target)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """KL estimator (Schulman's k1 / k2 / k3)."""
    use_kl_loss: bool = False
    """Put the KL in the loss (GRPO style) instead of in the reward."""
    kl_target: Optional[float] = None
    """Adaptive KL: target KL per sequence (None = fixed coefficient)."""
    kl_horizon: int = 10000
    """Adaptive KL horizon."""
    eps_clip_low_high: tuple[float, float] = (0.2, 0.2)
    """PPO ratio clip range below / above 1."""
    dual_clip: Optional[float] = None
    """Dual-clip constant c > 1 for negative advantages (None disables)."""
    value_clip: Optional[float] = 0.2
    """Clip of the value update around the old values (None disables)."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient."""
    ppo_epochs: int = 1
    """Passes over each rollout batch (OpenRLHF's --max_epochs for PPO)."""
    num_episodes: int = 1
    """Passes over the prompt data."""
    actor_learning_rate: Optional[float] = None
    """Actor learning rate (default: --learning_rate)."""
    critic_learning_rate: Optional[float] = None
    """Critic learning rate (default: --learning_rate)."""
    critic_pretrain: Optional[str] = None
    """Critic initialisation (default: the first reward model, else --pretrain); used by gae only."""
    freezing_actor_steps: int = 0
    """Train only the critic for this many first steps."""
    ptx_coef: float = 0.05
    """Weight of the pre-training NLL (per --pretrain_data token) added to the actor loss."""
    enable_ema: bool = False
    """Keep an exponential moving average of the actor's weights and export it instead of the last weights."""
    ema_beta: float = 0.992
    """EMA decay per optimizer step: ema = beta * ema + (1 - beta) * weights."""
    eval_every: int = 5
    """Evaluate the greedy reward on --eval_prompt_data every N steps (and at the start and end)."""

    def validate(self) -> None:
        for flag, value in (
            ("--ppo_epochs", self.ppo_epochs),
            ("--num_episodes", self.num_episodes),
            ("--eval_every", self.eval_every),
            ("--kl_horizon", self.kl_horizon),
        ):
            if value < 1:
                raise UserError(f"{flag} must be >= 1, got {value}")
        low, high = self.eps_clip_low_high
        if not (0 < low < 1 and high > 0):
            raise UserError(f"--eps_clip_low_high must be two numbers with 0 < low < 1 and high > 0, got {low} {high}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise UserError(f"--dual_clip must be > 1, got {self.dual_clip}")
        if self.kl_target is not None and self.kl_target <= 0:
            raise UserError(f"--kl_target must be > 0, got {self.kl_target}")
        if self.remote_rm_retries < 0 or self.remote_rm_timeout <= 0:
            raise UserError(
                f"--remote_rm_retries must be >= 0 and --remote_rm_timeout > 0, got {self.remote_rm_retries} and {self.remote_rm_timeout}"
            )
        if not 0.0 <= self.ema_beta <= 1.0:
            raise UserError(f"--ema_beta must be in [0, 1], got {self.ema_beta}")
        if self.reward_clip_range[0] >= self.reward_clip_range[1]:
            raise UserError(f"--reward_clip_range must be low high with low < high, got {self.reward_clip_range}")


@dataclass
class PlacementConfig:
    """Which ranks run which role. Without per-role counts every role runs on every rank
    (colocated); with them, roles sit on consecutive rank ranges in the order actor, critic,
    reward, reference (split). Counts of roles the run does not use are ignored."""

    actor_num_nodes: int = 1
    """Nodes of the actor role (split placement: ranks = nodes x GPUs per node)."""
    actor_num_gpus_per_node: Optional[int] = None
    """GPUs (ranks) per node of the actor role; giving any role's count selects the split placement."""
    rollout_num_nodes: int = 1
    """Nodes of a generation role apart from the actor (split placement; the actor's weights are broadcast to it every step)."""
    rollout_num_gpus_per_node: Optional[int] = None
    """GPUs per node generating rollouts apart from the actor (default: the actor's ranks generate with its live weights)."""
    critic_num_nodes: int = 1
    """Nodes of the critic role (gae only)."""
    critic_num_gpus_per_node: Optional[int] = None
    """GPUs per node of the critic role."""
    reward_num_nodes: int = 1
    """Nodes of the reward-model role (with --reward_pretrain)."""
    reward_num_gpus_per_node: Optional[int] = None
    """GPUs per node of the reward-model role (all reward models share these ranks)."""
    ref_num_nodes: int = 1
    """Nodes of the reference role."""
    ref_num_gpus_per_node: Optional[int] = None
    """GPUs per node of the reference role (no reference with LoRA: the actor's base model is it)."""
    colocate_actor_ref: bool = False
    """Split placement: the reference shares the actor's ranks."""
    colocate_critic_reward: bool = False
    """Split placement: the reward models share the critic's ranks."""
    colocate_ref_reward: bool = False
    """Split placement: the reference and the reward models share ranks."""
    colocate_all_models: bool = False
    """Every role on every rank (the default when no per-role count is given)."""
    ref_reward_offload: bool = False
    """Keep the reference and reward models' weights in CPU memory between their forwards (DeepSpeed ZeRO-3 parameter offload), freeing accelerator memory for generation and training."""

    FLAG_PREFIX = {"actor": "actor", "rollout": "rollout", "critic": "critic", "reward": "reward", "reference": "ref"}

    def validate(self) -> None:
        for role, prefix in self.FLAG_PREFIX.items():
            nodes, gpus = getattr(self, f"{prefix}_num_nodes"), getattr(self, f"{prefix}_num_gpus_per_node")
            if nodes < 1 or (gpus is not None and gpus < 1):
                raise UserError(f"--{prefix}_num_nodes and --{prefix}_num_gpus_per_node must be >= 1, got {nodes} and {gpus}")

    @property
    def separate_rollout(self) -> bool:
        """Generation on ranks of its own (split placement with --rollout_num_gpus_per_node)."""
        return self.is_split and self.rollout_num_gpus_per_node is not None

    @property
    def is_split(self) -> bool:
        return not self.colocate_all_models and any(getattr(self, f"{p}_num_gpus_per_node") is not None for p in self.FLAG_PREFIX.values())

    def shared_roles(self, roles: Sequence[str]) -> list[tuple[str, ...]]:
        """Groups of roles in use that share ranks (--colocate_actor_ref and friends)."""
        pairs = [
            (self.colocate_actor_ref, ("actor", "reference")),
            (self.colocate_critic_reward, ("critic", "reward")),
            (self.colocate_ref_reward, ("reward", "reference")),
        ]
        return [pair for wanted, pair in pairs if wanted and all(r in roles for r in pair)]

    def role_sizes(self, roles: Sequence[str]) -> dict[str, int]:
        """Ranks per role in use (nodes x GPUs per node); a role sharing ranks may leave its count out."""
        sizes = {}
        for role in roles:
            prefix = self.FLAG_PREFIX[role]
            if (gpus := getattr(self, f"{prefix}_num_gpus_per_node")) is not None:
                sizes[role] = getattr(self, f"{prefix}_num_nodes") * gpus
        for role in roles:
            group = next((g for g in self.shared_roles(roles) if role in g), (role,))
            given = [sizes[r] for r in group if r in sizes]
            if not given:
                raise UserError(
                    f"split placement: this run uses roles {', '.join(roles)}; give "
                    f"--{self.FLAG_PREFIX[role]}_num_gpus_per_node (or --colocate_all_models)"
                )
            sizes.setdefault(role, given[0])  # a role sharing ranks takes its partner's count
        return sizes


@dataclass
class PPOTrainConfig(TrainConfig):
    """Optimisation and DeepSpeed settings; --max_epochs and --eval_steps as OpenRLHF's PPO reads them."""

    max_epochs: int = 1
    """Passes over each rollout batch (OpenRLHF's --max_epochs for PPO; the same as --ppo_epochs)."""
    eval_steps: int = -1
    """Evaluate every N PPO steps (the same as --eval_every); -1 keeps --eval_every."""
    use_dynamic_batch: bool = False
    """Cut micro-batches by a token budget instead of a sample count (--train_max_tokens_per_gpu in training,
    --rollout_max_tokens_per_gpu when scoring), each optimizer step's samples dealt over the data-parallel ranks with balanced
    token totals; --train_batch_size still counts samples and the update is the fixed split's. Unlike OpenRLHF it does not turn
    on --packing_samples: unpacked, a micro-batch's tokens are rows x its longest sample."""
    train_max_tokens_per_gpu: int = 16192
    """--use_dynamic_batch: most tokens per training micro-batch on one rank (a longer sample gets a micro-batch of its own)."""
    rollout_max_tokens_per_gpu: Optional[int] = None
    """--use_dynamic_batch: most tokens per scoring forward (behaviour, reference, critic, reward) on one rank; default --train_max_tokens_per_gpu."""
    packing_samples: bool = False
    """Pack each micro-batch's samples into one row (position ids restart per sample, attention kept within it) for the actor,
    critic and reference forwards, instead of padding them; log-probs, values and updates are the padded ones. Reward models
    always score padded rows."""


@dataclass
class PPOConfig:
    """PPO and its critic-free cousins (GRPO, RLOO, REINFORCE++); roles colocated on every rank or split over rank ranges."""

    model: Annotated[ModelConfig, Flat] = field(default_factory=ModelConfig)
    data: Annotated[PromptDataConfig, Flat] = field(default_factory=PromptDataConfig)
    rollout: Annotated[RolloutConfig, Flat] = field(default_factory=RolloutConfig)
    algo: Annotated[PPOAlgoConfig, Flat] = field(default_factory=PPOAlgoConfig)
    train: Annotated[PPOTrainConfig, Flat] = field(default_factory=PPOTrainConfig)
    placement: Annotated[PlacementConfig, Flat] = field(default_factory=PlacementConfig)
    ckpt: Annotated[CheckpointConfig, Flat] = field(default_factory=CheckpointConfig)
    log: Annotated[LoggingConfig, Flat] = field(default_factory=LoggingConfig)

    def validate(self) -> None:
        validate_sections(self)
        algo = self.algo
        if self.train.max_epochs != 1:  # OpenRLHF's name for the passes over each rollout batch
            if algo.ppo_epochs not in (1, self.train.max_epochs):
                raise UserError(
                    f"--max_epochs {self.train.max_epochs} and --ppo_epochs {algo.ppo_epochs} disagree: both count the passes "
                    "over each rollout batch; give one"
                )
            algo.ppo_epochs = self.train.max_epochs
        self.train.max_epochs = algo.ppo_epochs
        if self.train.eval_steps > 0:
            algo.eval_every = self.train.eval_steps
        if self.rollout.temperature <= 0:
            raise UserError(f"--temperature must be > 0 for RL rollouts, got {self.rollout.temperature}")
        if not (algo.reward_func or algo.reward_pretrain or algo.remote_rm_url):
            raise UserError("PPO needs a reward: give --reward_func module:function, --reward_pretrain MODEL and/or --remote_rm_url URL")
        if algo.normalize_reward and not algo.reward_pretrain and os.environ.get("RANK", "0") == "0":  # every rank validates: say it once
            # A warning, not an error: OpenRLHF's trainer ignores the flag without a reward model
            # too, and its own remote-RM example script passes it (the reward server normalises).
            logging.getLogger("rlhf").warning(
                "--normalize_reward has no effect without --reward_pretrain: the rewards of --remote_rm_url / --reward_func are used as "
                "they come (normalise them at the source)"
            )
        if self.rollout.vllm_num_engines is not None and self.rollout.rollout_backend != "vllm" and os.environ.get("RANK", "0") == "0":
            # Ported OpenRLHF scripts pass it with per-role GPU counts (Ray's vLLM actors); here vLLM
            # runs inside the colocated ranks, so the flag alone must not switch a split job to it.
            logging.getLogger("rlhf").warning(
                "--vllm_num_engines without --rollout_backend vllm: rollouts are generated with transformers; add --rollout_backend vllm "
                "(colocated placement) to generate with vLLM"
            )
        if algo.remote_rm_url and algo.remote_rm_url.endswith(".py") and not Path(algo.remote_rm_url).expanduser().is_file():
            raise UserError(f"--remote_rm_url {algo.remote_rm_url}: no such reward file")  # before any model is loaded
        traits = estimator_traits(algo.advantage_estimator)  # an unknown name fails here, before any work
        if traits.grouped and self.rollout.n_samples_per_prompt < 2:
            raise UserError(
                f"--advantage_estimator {algo.advantage_estimator} compares samples of one prompt: set --n_samples_per_prompt >= 2"
            )
        if algo.gamma != 1.0 and not traits.discounted:
            raise UserError(
                f"--gamma {algo.gamma}: --advantage_estimator {algo.advantage_estimator} needs gamma 1 (discounting works "
                f"with {', '.join(discounted_estimators())})"
            )
        per_step = self.rollout.rollout_batch_size * self.rollout.n_samples_per_prompt
        if per_step % self.train.train_batch_size != 0:
            raise UserError(
                f"--rollout_batch_size x --n_samples_per_prompt = {per_step} must be a multiple of --train_batch_size "
                f"{self.train.train_batch_size}"
            )
        train = self.train
        if train.train_max_tokens_per_gpu < 1 or (train.rollout_max_tokens_per_gpu is not None and train.rollout_max_tokens_per_gpu < 1):
            raise UserError("--train_max_tokens_per_gpu and --rollout_max_tokens_per_gpu must be >= 1")
        if train.use_dynamic_batch and self.data.pretrain_data:
            raise UserError(
                "--use_dynamic_batch with --pretrain_data: PPO-ptx pairs one pre-training micro-batch with each fixed-size "
                "micro-batch; drop --use_dynamic_batch (or --pretrain_data)"
            )
        if self.placement.separate_rollout and self.model.lora_rank > 0:
            raise UserError(
                "--rollout_num_gpus_per_node with --lora_rank: rollout ranks of their own need full weights; generate on the "
                "actor's ranks (drop --rollout_num_gpus_per_node)"
            )
        if self.rollout.rollout_backend == "vllm" and self.placement.is_split:
            raise UserError(
                "--rollout_backend vllm runs vLLM inside every rank: use the colocated placement (drop the per-role GPU counts)"
            )

    def roles(self) -> tuple[str, ...]:
        """The roles this job places: the actor always; rollout ranks of their own when asked; a
        critic when the estimator needs one; reward models when given; a reference model unless
        LoRA makes the actor's base the reference. The memory planner reads the same set."""
        needs_critic = estimator_traits(self.algo.advantage_estimator).needs_critic
        wanted = {
            "actor": True,
            "rollout": self.placement.separate_rollout,
            "critic": needs_critic,
            "reward": bool(self.algo.reward_pretrain),
            "reference": self.model.lora_rank == 0,
        }
        return tuple(role for role, used in wanted.items() if used)


@dataclass
class InferenceConfig:
    """What batch inference reads, does and writes."""

    eval_task: Literal["generate", "generate_vllm", "rm"] = "generate"
    """generate (transformers), generate_vllm (vLLM), or rm (score --input_key + --output_key pairs with reward models / a reward function)."""
    dataset: str = "embedded:arith/prompts_eval.jsonl"
    """Comma-separated sources (local files or folders, s3://, hub names)."""
    dataset_probs: Optional[str] = None
    """Mixing weights for the --dataset sources."""
    input_key: str = "input"
    """Row field with the prompt text (or a messages list with --apply_chat_template)."""
    output_key: Optional[str] = "output"
    """--eval_task rm: row field with the response to score."""
    label_key: Optional[str] = None
    """Row field passed to --reward_func as the label."""
    input_template: Optional[str] = None
    """Python format string applied to the prompt text ('{}'); '{field}' inserts that row field."""
    apply_chat_template: bool = False
    """Render prompts with the tokenizer's chat template (with the generation prompt)."""
    tokenizer_chat_template: Optional[str] = None
    """Override the tokenizer's chat template (Jinja text)."""
    prompt_max_len: int = 1024
    """Prompts longer than this many tokens are left-truncated."""
    max_samples: int = 100_000_000
    """Use at most this many rows."""
    best_of_n: int = 1
    """Responses generated per prompt (all are written; with a reward the best is marked)."""
    micro_batch_size: int = 16
    """Sequences per forward when scoring."""
    reward_pretrain: Optional[str] = None
    """Comma-separated reward models that score every response."""
    reward_func: Optional[str] = None
    """'module:function' scoring (prompts, responses, labels) -> list of floats."""
    reward_weights: Optional[str] = None
    """Weights of the reward sources (reward models, then --reward_func); the reward is their weighted sum."""
    normalize_reward: bool = False
    """Normalise reward-model scores with the mean/std stored by rlhf.rm."""
    output_path: str = "./outputs/generate.jsonl"
    """JSON-lines file written in input order: inputs, outputs and scores."""
    iter: Optional[int] = None
    """Round K of an iterative loop (OpenRLHF's flag): use only rows [K x --rollout_batch_size, (K+1) x --rollout_batch_size) of the dataset."""
    post_processor: Optional[Literal["rs", "csft", "ca", "iter_dpo"]] = None
    """Rewrite the scored rows before writing (OpenRLHF's processors): rs keeps each prompt's best response {input, output, reward};
    csft (ca) writes the score into the prompt '{input} <rm_score>: {reward:.2f} ' (z-scored over the rows with --normalize_reward);
    iter_dpo writes each prompt's best and worst response as a preference pair {prompt, chosen, rejected, chosen_reward, rejected_reward}."""

    def validate(self) -> None:
        if self.best_of_n < 1 or self.micro_batch_size < 1 or self.prompt_max_len < 1:
            raise UserError("--best_of_n, --micro_batch_size and --prompt_max_len must be >= 1")
        if self.iter is not None and self.iter < 0:
            raise UserError(f"--iter must be >= 0, got {self.iter}")
        if self.eval_task == "rm":
            if not self.output_key:
                raise UserError("--eval_task rm scores responses: give --output_key (the row field holding them)")
            if not (self.reward_pretrain or self.reward_func):
                raise UserError("--eval_task rm needs --reward_pretrain MODEL[,MODEL...] and/or --reward_func module:function")
        if self.post_processor and not (self.reward_pretrain or self.reward_func):
            raise UserError(
                f"--post_processor {self.post_processor} works on scored rows: give --reward_pretrain MODEL and/or "
                "--reward_func module:function (or --eval_task rm --pretrain RM)"
            )
        if self.normalize_reward and not self.reward_pretrain:
            raise UserError(
                "--normalize_reward normalises reward-model scores, but no --reward_pretrain is given: drop the flag or add a reward model"
            )

    def prompt_data(self) -> "PromptDataConfig":
        return PromptDataConfig(
            prompt_data=self.dataset,
            prompt_data_probs=self.dataset_probs,
            input_key=self.input_key,
            label_key=self.label_key,
            input_template=self.input_template,
            apply_chat_template=self.apply_chat_template,
            tokenizer_chat_template=self.tokenizer_chat_template,
            prompt_max_len=self.prompt_max_len,
            max_samples=self.max_samples,
        )


@dataclass
class GenerateConfig:
    """Batch inference: generate with transformers or vLLM, or score with reward models, over a dataset."""

    model: Annotated[ModelConfig, Flat] = field(default_factory=ModelConfig)
    task: Annotated[InferenceConfig, Flat] = field(default_factory=InferenceConfig)
    rollout: Annotated[RolloutConfig, Flat] = field(default_factory=RolloutConfig)
    seed: int = 42
    """Sampling seed."""
    max_len: Optional[int] = None
    """--eval_task rm: longest prompt + response in tokens; a longer response is cut to fit and keeps its final EOS (OpenRLHF's --max_len). Generation is bounded by --prompt_max_len and --generate_max_len."""
    zero_stage: int = 0
    """OpenRLHF's inference ZeRO stage: each rank here holds a full copy of each model, which is ZeRO stage 0 (the only value accepted)."""

    def validate(self) -> None:
        if self.zero_stage != 0:
            raise UserError(
                f"--zero_stage {self.zero_stage}: batch inference holds a full copy of each model per rank (ZeRO 0); sharded "
                "inference is not supported: use --zero_stage 0 (fit a large model with --bf16 or --eval_task generate_vllm "
                "--tp_size N)"
            )
        if self.max_len is not None and self.max_len < 2:
            raise UserError(f"--max_len must be >= 2, got {self.max_len}")
        if self.task.eval_task == "rm" and not (self.task.reward_pretrain or self.task.reward_func):
            self.task.reward_pretrain = self.model.pretrain  # OpenRLHF's rm task scores with the --pretrain model
        validate_sections(self)


@dataclass
class SelectionConfig:
    """Which samples rejection sampling keeps, and how many rounds it runs."""

    iterations: int = 1
    """Rounds of generate -> score -> keep -> SFT (0: generate, score and write the dataset only)."""
    keep: Literal["best", "threshold"] = "best"
    """best: the highest-reward response of each prompt; threshold: every response with reward >= --reward_threshold."""
    reward_threshold: float = 0.0
    """With --keep threshold: the minimum reward kept."""
    eval_dataset: Optional[str] = None
    """Held-out prompts: mean reward of greedy responses before and after each round."""
    output_dir: str = "./outputs/rejection_sampling"
    """Kept samples per round (round_K.jsonl), metrics, and the trained model in model/."""

    def validate(self) -> None:
        if self.iterations < 0:
            raise UserError(f"--iterations must be >= 0, got {self.iterations}")


@dataclass
class RejectionSamplingConfig:
    """Rejection sampling (best-of-n fine-tuning): generate n responses per prompt, score them, keep the best, SFT on them."""

    model: Annotated[ModelConfig, Flat] = field(default_factory=ModelConfig)
    task: Annotated[InferenceConfig, Flat] = field(default_factory=InferenceConfig)
    select: Annotated[SelectionConfig, Flat] = field(default_factory=SelectionConfig)
    rollout: Annotated[RolloutConfig, Flat] = field(default_factory=RolloutConfig)
    train: Annotated[TrainConfig, Flat] = field(default_factory=TrainConfig)
    log: Annotated[LoggingConfig, Flat] = field(default_factory=LoggingConfig)

    def validate(self) -> None:
        validate_sections(self)
        if self.task.eval_task == "rm":
            raise UserError("--eval_task rm: rejection sampling generates; use generate or generate_vllm")
        if self.task.iter is not None or self.task.post_processor:
            raise UserError(
                "--iter / --post_processor belong to rlhf.generate's loop of separate commands; rlhf.rejection_sampling runs "
                "its rounds itself (--iterations) and keeps the best itself (--keep)"
            )
        if not (self.task.reward_pretrain or self.task.reward_func):
            raise UserError("rejection sampling needs a reward: --reward_pretrain MODEL and/or --reward_func module:function")


# ----------------------------------------------------------------------------------------------
# Parsing


def _option_owners(config: Any) -> dict[str, Optional[str]]:
    """Flat option name -> the section attribute holding it (None for top-level options)."""
    owners: dict[str, Optional[str]] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            owners.update({sub.name: f.name for sub in dataclasses.fields(value)})
        else:
            owners[f.name] = None
    return owners


def load_preset(cls: type[C], path: str) -> C:
    """Build a config from a YAML preset: a flat mapping of option names to values."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--config {path}: file not found")
    try:
        values = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: a preset must be a mapping of option names to values")
    config = cls()
    owners = _option_owners(config)
    for key, value in values.items():
        if key not in owners:
            close = difflib.get_close_matches(str(key), list(owners), n=1, cutoff=0.8)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UserError(f"{path}: unknown option {key!r}{hint} (see --help for the options)")
        target = config if owners[key] is None else getattr(config, owners[key])
        current = getattr(target, key)
        if isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        elif isinstance(current, float) and isinstance(value, int):
            value = float(value)
        setattr(target, key, value)
    return config


# OpenRLHF's flags, read as OpenRLHF means them (issue 12). An OpenRLHF script ports by changing
# its launcher line: a flag spelled differently here is rewritten to our name before tyro parses
# the line; a flag whose behaviour is always on here is accepted and dropped; a flag we do not
# support stops the job with one line naming what to use. `--help` lists all three at its end.
# Keyed by the config class name; "*" applies to every command.

OPENRLHF_ALIASES: dict[str, dict[str, tuple[str, ...]]] = {
    "*": {"--wandb": ("--use_wandb",)},
    "DPOConfig": {"--ipo": ("--loss_type", "ipo")},
    "GenerateConfig": {
        "--max_new_tokens": ("--generate_max_len",),
        "--tp_size": ("--vllm_tensor_parallel_size",),
        "--greedy_sampling": ("--temperature", "0"),
    },
    "RejectionSamplingConfig": {"--max_new_tokens": ("--generate_max_len",), "--tp_size": ("--vllm_tensor_parallel_size",)},
    "ChatConfig": {"--greedy_sampling": ("--temperature", "0")},
}
"""OpenRLHF flag -> the tokens it stands for here (the flag's value, if any, follows them)."""

OPENRLHF_ALWAYS_ON: dict[str, dict[str, str]] = {
    "PPOConfig": {
        "--actor_init_on_gpu": "models are built on the CPU and moved to their device (ZeRO-3 partitions them as they load); "
        "the flag changes nothing"
    },
    "KTOConfig": {"--unpaired_preference": "rlhf.kto always reads unpaired rows (--input_key, --output_key, --label_key)"},
    "GenerateConfig": {"--enable_prefix_caching": "vLLM engines always run with prefix caching"},
    "RejectionSamplingConfig": {"--enable_prefix_caching": "vLLM engines always run with prefix caching"},
    "ChatConfig": {"--apply_chat_template": "rlhf.chat always renders the conversation with the tokenizer's chat template"},
}
"""OpenRLHF flags (no value) whose behaviour is always on here: accepted and dropped."""

OPENRLHF_REJECTED: dict[str, dict[str, str]] = {
    "DPOConfig": {
        "--ring_attn_size": "ring attention (sequence parallelism) is not implemented; fit long sequences with --gradient_checkpointing, "
        "--micro_train_batch_size 1 and a smaller --max_len",
        "--ring_head_stride": "ring attention (sequence parallelism) is not implemented; fit long sequences with "
        "--gradient_checkpointing, --micro_train_batch_size 1 and a smaller --max_len",
    },
    "KTOConfig": {
        "--vanilla_loss": "OpenRLHF 0.2's KTO variant on paired data (z0 from the batch's own log-ratios) is not implemented; rlhf.kto "
        "trains on unpaired rows {prompt, completion, label} with z0 from mismatched pairs (the KTO paper): write each "
        "pair as a desirable and an undesirable row and drop --vanilla_loss",
    },
}
"""OpenRLHF flags we do not support: flag -> what to do instead (the error names the flag)."""


def _compat_tables(cls: type) -> tuple[dict[str, tuple[str, ...]], dict[str, str], dict[str, str]]:
    name = cls.__name__
    aliases = {**OPENRLHF_ALIASES["*"], **OPENRLHF_ALIASES.get(name, {})}
    return aliases, OPENRLHF_ALWAYS_ON.get(name, {}), OPENRLHF_REJECTED.get(name, {})


def translate_openrlhf_flags(cls: type, args: Sequence[str]) -> list[str]:
    """Rewrite OpenRLHF spellings in ``args`` to ours; raise ``UserError`` on an unsupported flag.

    ``--use_wandb TOKEN`` (OpenRLHF takes the API key there) becomes ``--use_wandb`` with the key
    in ``WANDB_API_KEY``, as OpenRLHF's ``wandb.login(key=TOKEN)`` would use it.
    """
    aliases, always_on, rejected = _compat_tables(cls)
    out: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        flag, eq, value = token.partition("=")
        if flag in rejected:
            raise UserError(f"{flag} is not supported: {rejected[flag]}")
        if flag in always_on:
            i += 1
            continue
        if aliases.get(flag) == ("--use_wandb",):
            flag = "--use_wandb"  # OpenRLHF 0.2's --wandb [TOKEN]
        if flag in aliases:
            out.extend(aliases[flag])
            if eq:
                out.append(value)
            i += 1
            continue
        if flag == "--use_wandb":
            value = value if eq else (args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else None)
            if value is not None and not eq:
                i += 1
            if value is not None and value.lower() not in ("true", "1", ""):
                os.environ.setdefault("WANDB_API_KEY", value)
            out.append("--use_wandb")
            i += 1
            continue
        out.append(token)
        i += 1
    return out


def _compat_help(cls: type) -> str:
    aliases, always_on, rejected = _compat_tables(cls)
    lines = [f"  {old} = {' '.join(new)}" for old, new in aliases.items()]
    lines += [f"  {flag}: accepted, always on here ({why})" for flag, why in always_on.items()]
    lines += [f"  {flag}: not supported ({why})" for flag, why in rejected.items()]
    return "OpenRLHF flags read here:\n" + "\n".join(lines)


def flag_names(cls: type) -> list[str]:
    """Every ``--flag`` of a config class (sections flattened) and the OpenRLHF spellings it reads."""
    names: list[str] = []
    for f in dataclasses.fields(cls):
        section = f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        if dataclasses.is_dataclass(section):
            names += [f"--{sub.name}" for sub in dataclasses.fields(section)]
        elif "Positional" not in str(f.type):
            names.append(f"--{f.name}")
    aliases, always_on, _ = _compat_tables(cls)
    return names + list(aliases) + list(always_on)


def answer_help_early(cls: type, prog: str) -> None:
    """Print ``--help`` and exit before an entry point imports torch, DeepSpeed or vLLM.

    Entry points call this at the top of the module, ahead of their heavy imports, when run as
    ``__main__``: the help then takes a fraction of a second instead of the 10 s those imports cost.
    """
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        parse_config(cls, prog=prog)  # tyro prints the help and raises SystemExit(0)


def parse_config(cls: type[C], argv: Optional[Sequence[str]] = None, *, prog: Optional[str] = None) -> C:
    """Parse ``[--config FILE] [flags...]`` into a validated ``cls`` instance."""
    args = translate_openrlhf_flags(cls, list(sys.argv[1:] if argv is None else argv))
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    default = None if required else cls()  # a config with required fields (a positional MODEL) has no preset base
    if "--config" in args:
        if required:
            raise UserError(f"--config: not available for this command (it takes {', '.join(required)} on the command line)")
        i = args.index("--config")
        if i + 1 >= len(args):
            raise UserError("--config needs a YAML file path")
        default = load_preset(cls, args[i + 1])
        del args[i : i + 2]
    description = f"{cls.__doc__}\n\n{_compat_help(cls)}"
    with tyro_errors.on_parse_error(lambda event: _raise_one_line(event, cls)):
        config = tyro.cli(cls, args=args, default=default, use_underscores=True, prog=prog, description=description)
    config.validate()
    return config


def _raise_one_line(event: tyro_errors.ParseErrorEvent, cls: type) -> None:
    """tyro prints a multi-line box for a bad flag; we want the project's one-line UserError."""
    if isinstance(event, tyro_errors.UnrecognizedArgs):
        known = flag_names(cls)
        hints = []
        for token in event.tokens:
            flag = token.split("=")[0]
            close = difflib.get_close_matches(flag, known, n=1, cutoff=0.8) if flag.startswith("--") else []
            if close:
                hints.append(f"{flag}: did you mean {close[0]}?")
        hint = f"; {'; '.join(hints)}" if hints else ""
        raise UserError(f"unknown option(s) {' '.join(event.tokens)}{hint} (see --help for the options)")
    if isinstance(event, tyro_errors.InstantiationFailure):
        flag = f"--{event.argument.field.extern_name}: " if event.argument is not None else ""
        raise UserError(f"{flag}{event.message}")
    try:
        title, contents = tyro_errors._render(event)
    except KeyError:
        return  # an event this tyro version added: let tyro report it its own way
    text = " ".join(" ".join(str(c).split()) for c in contents)
    raise UserError(f"{title.lower()}: {text}")
