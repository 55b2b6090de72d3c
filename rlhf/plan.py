"""Memory planner: will this job fit, and if not, which flags make it fit?

    python -m rlhf.plan --model 70B --gpu A100-80G --num_gpus_per_node 8 --num_nodes 2 --trainer ppo \\
        --reward_pretrain 70B --bf16 --zero_stage 3 --adam_offload --gradient_checkpointing \\
        --rollout_backend vllm --vllm_num_engines 4 --vllm_tensor_parallel_size 4
    python -m rlhf.plan --model 7B --gpu RTX4090 --num_gpus_per_node 4 --trainer ppo --reward_pretrain 7B --bf16
    python -m rlhf.plan --model ./my-model/config.json --gpu H100-80G --trainer dpo --bf16 --lora_rank 64
    python -m rlhf.plan --model 0.5B --num_gpus_per_node 2 --trainer ppo --config configs/grpo_tiny.yaml

The planner's own flags (``PlanOptions``) are the model's shape (--model), the machines (--gpu,
--gpu_memory_gb, --num_gpus_per_node, --num_nodes, --device, --cpu_memory_gb) and --trainer.
Every other flag is the trainer's, parsed by that trainer's own config (``PPOConfig``,
``DPOConfig``, ... in rlhf/config.py, presets and OpenRLHF spellings included) and checked by its
``validate()``, so a flag means here what it means to ``python -m rlhf.<trainer>``: no --bf16 is
fp32, no --reward_pretrain is no reward model, --vllm_num_engines alone is not vLLM. The roles
are the trainer's too: ``PPOConfig.roles()`` for rlhf.ppo, ``loads_reference`` for DPO / KTO
(LoRA without --ref_pretrain: the policy with its adapter off is the reference, no second model).

Prints, per role (actor, critic, reward, reference, rollout; DPO/KTO: policy and reference),
the memory each GPU holds for weights, gradients, optimizer states, activations and KV cache,
then, per group of GPUs that share roles, the peak against the GPU's memory and whether it fits,
and the CPU memory the offloaded states need. When the job does not fit it searches a small
space (ZeRO-3, Adam offload, gradient checkpointing, reference/reward offload, split placements
of the same GPUs, vLLM tensor parallelism) and prints the flags to add.

The arithmetic is in pure functions below (``model_states_bytes``, ``activation_bytes``,
``kv_cache_bytes`` ...): sizes in bytes, parameter counts in elements. ``tests/test_plan.py``
checks the model-state terms against DeepSpeed's own ZeRO estimators and the total against the
peak memory of a real training step on CPU (``--device cpu``: fp32, "GPU memory" = host RAM).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import itertools
import json
import logging
import os
import sys
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Sequence

import yaml

from rlhf.config import DPOConfig, KTOConfig, PlacementConfig, PPOConfig, RMConfig, SFTConfig, flag_names, loads_reference, parse_config
from rlhf.errors import UserError, exit_on_user_error

GiB = 1024**3

# ----------------------------------------------------------------------------------------------
# Models and GPUs


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer (Llama / Qwen2 / Mistral layout): RMSNorm, rotary attention
    with grouped KV heads, gated SiLU MLP."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = False
    qkv_bias: bool = False
    head_dim: Optional[int] = None
    mirrors: str = ""

    @property
    def dim(self) -> int:
        """Per-head size d."""
        return self.head_dim or self.hidden // self.heads

    @property
    def linear_params(self) -> int:
        """Parameters in the layers' linear projections (what LoRA adapts and 4-bit quantizes)."""
        h, kv = self.hidden, self.kv_heads * self.dim
        attn = h * self.heads * self.dim + 2 * h * kv + self.heads * self.dim * h  # q, k, v, o
        return self.layers * (attn + 3 * h * self.intermediate)  # + gate, up, down

    @property
    def params(self) -> int:
        """All parameters, a tied embedding counted once (as DeepSpeed's ``model_to_params``)."""
        h = self.hidden
        bias = self.layers * (self.heads + 2 * self.kv_heads) * self.dim if self.qkv_bias else 0
        norms = self.layers * 2 * h + h
        embeddings = self.vocab * h * (1 if self.tied_embeddings else 2)
        return self.linear_params + bias + norms + embeddings

    @property
    def scorer_params(self) -> int:
        """Parameters as a critic or reward model: no LM head, a hidden -> 1 value head instead."""
        return self.params - (0 if self.tied_embeddings else self.vocab * self.hidden) + self.hidden

    @property
    def largest_layer_params(self) -> int:
        """Parameters of the largest single module (DeepSpeed's ``largest_layer_params``): the
        embedding (vocab x hidden) for these models, else an MLP projection."""
        return max(self.vocab * self.hidden, self.hidden * self.intermediate)

    def lora_params(self, rank: int) -> int:
        """LoRA adapter parameters on every linear projection ('all-linear'): r x (in + out) each."""
        h, q, kv, i = self.hidden, self.heads * self.dim, self.kv_heads * self.dim, self.intermediate
        per_layer = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h)  # q, k, v, o, gate, up, down
        return self.layers * rank * per_layer


# Named sizes: the shapes of well-known open models (from their config.json files).
MODELS: dict[str, ModelShape] = {
    "0.5B": ModelShape(896, 24, 14, 2, 4864, 151936, tied_embeddings=True, qkv_bias=True, mirrors="Qwen2.5-0.5B"),
    "1.5B": ModelShape(1536, 28, 12, 2, 8960, 151936, tied_embeddings=True, qkv_bias=True, mirrors="Qwen2.5-1.5B"),
    "7B": ModelShape(4096, 32, 32, 32, 11008, 32000, mirrors="Llama-2-7B"),
    "8B": ModelShape(4096, 32, 32, 8, 14336, 128256, mirrors="Llama-3-8B"),
    "13B": ModelShape(5120, 40, 40, 40, 13824, 32000, mirrors="Llama-2-13B"),
    "34B": ModelShape(8192, 48, 64, 8, 22016, 32000, mirrors="CodeLlama-34B"),
    "70B": ModelShape(8192, 80, 64, 8, 28672, 32000, mirrors="Llama-2-70B"),
}

# Accelerator memory in GiB as the driver reports it to PyTorch (a card sold as "80 GB" shows
# about 79.3 GiB; we keep the round figure and leave the slack to RUNTIME_OVERHEAD_GPU).
GPUS: dict[str, float] = {
    "A100-40G": 40,
    "A100-80G": 80,
    "H100-80G": 80,
    "H100-94G": 94,
    "H200": 141,
    "B200": 180,
    "L40S": 48,
    "L4": 24,
    "A10G": 24,
    "A6000": 48,
    "RTX4090": 24,
    "RTX3090": 24,
    "V100-32G": 32,
}

# Memory a process holds whatever the model: on a GPU the CUDA context, NCCL buffers and the
# caching allocator's slack (a conventional 1.5 GiB); on CPU, measured here with DeepSpeed 0.19
# (tests/test_plan.py): about 10 MiB that one engine allocates beyond the model's tensors.
RUNTIME_OVERHEAD_GPU = int(1.5 * GiB)
RUNTIME_OVERHEAD_CPU = 10 * 1024**2
# vLLM's own working memory beyond weights and KV cache (CUDA graphs, sampler, profile run).
VLLM_RUNTIME_OVERHEAD = 1 * GiB
# NF4 (bitsandbytes, QLoRA): 4 bits per weight + an 8-bit absmax per 64 weights + (double
# quantization) an fp32 constant per 256 blocks.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)


def find_shape(model: str, flag: str = "--model") -> Optional[ModelShape]:
    """A named size (``7B``), ``embedded:NAME``, or the path of an HF ``config.json`` / model
    folder -> its shape; None when ``model`` is none of these here (a hub id, an s3:// URI, a
    folder on another machine). A local file that is not a decoder config is a ``UserError``."""
    if model.upper() in MODELS:
        return MODELS[model.upper()]
    path = Path(model)
    if model.startswith("embedded:"):
        path = Path(__file__).parent / "assets" / model.split(":", 1)[1]
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
        cfg = cfg.get("text_config", cfg)  # multimodal wrappers keep the LM's shape here
        heads = int(cfg["num_attention_heads"])
        return ModelShape(
            hidden=int(cfg["hidden_size"]),
            layers=int(cfg["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            intermediate=int(cfg["intermediate_size"]),
            vocab=int(cfg["vocab_size"]),
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
            head_dim=cfg.get("head_dim"),
            mirrors=str(path),
        )
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{flag} {model}: {path} is not a decoder config this planner reads ({type(err).__name__}: {err})") from None


def load_shape(model: str, flag: str = "--model") -> ModelShape:
    """``find_shape``, where a model that is not found is a ``UserError`` naming ``flag``."""
    shape = find_shape(model, flag)
    if shape is None:
        raise UserError(f"{flag} {model}: not a named size ({', '.join(MODELS)}) nor an HF config.json or model folder")
    return shape


# ----------------------------------------------------------------------------------------------
# The terms (pure functions; bytes)


@dataclass
class States:
    """Bytes of one model's states: per GPU (``weights``, ``grads``, ``optimizer``) and per node
    in CPU memory (``cpu``: what offload moved there)."""

    weights: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    cpu: float = 0.0

    @property
    def gpu(self) -> float:
        return self.weights + self.grads + self.optimizer

    def __add__(self, other: "States") -> "States":
        return States(self.weights + other.weights, self.grads + other.grads, self.optimizer + other.optimizer, self.cpu + other.cpu)


def model_states_bytes(
    params: float,
    largest_layer_params: float,
    *,
    zero_stage: int,
    dp: int,
    num_nodes: int = 1,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    dtype_bytes: int = 2,
) -> States:
    """Weights, gradients and Adam states of ``params`` trainable parameters under ZeRO.

    params, largest_layer_params: element counts; dp: data-parallel ranks the states are
    partitioned over, on ``num_nodes`` nodes; dtype_bytes: 2 (bf16 training) or 4 (fp32).
    Returns per-GPU bytes and per-node CPU bytes. With dtype_bytes=2 this is DeepSpeed's
    estimator's accounting exactly (2 + 18 bytes per parameter, see tests/test_plan.py).
    """
    w = dtype_bytes
    # Weights in the training dtype: what forward and backward read. Replicated below ZeRO-3.
    weights = params * w
    # Gradients: one in the training dtype (reduced across ranks), plus, in mixed precision,
    # the fp32 copy the optimizer steps with (DeepSpeed's "4_grads_32bit"); in fp32 they are one.
    grad16, grad32 = params * w, (params * 4 if w != 4 else 0)
    # Adam: an fp32 master copy of the weights (DeepSpeed keeps it even when training in fp32),
    # and the first and second moments: 4 + 4 + 4 bytes per parameter.
    optim = params * 12
    s = States()
    s.weights = weights / dp if zero_stage >= 3 else weights  # stage 3 partitions the weights
    s.grads = grad16 / dp if zero_stage >= 2 else grad16  # stage 2 partitions the gradients
    s.grads += grad32 / dp if zero_stage >= 1 else grad32  # the fp32 grads live with the optimizer partition
    s.optimizer = optim / dp if zero_stage >= 1 else optim  # stage 1 partitions the optimizer states
    if zero_stage >= 3:
        # A gathered layer and its full gradient before the reduce-scatter: 2 x dtype bytes per
        # parameter of the largest layer (DeepSpeed's "largest_layer_memory" = 4 x params in 16 bit).
        s.grads += largest_layer_params * w
        s.weights += largest_layer_params * w
    if offload_optimizer:
        # CPU-Adam: the fp32 grads, master weights and moments (16 bytes) move to CPU memory, and
        # the 16-bit gradient partition is reduced straight into the CPU buffer.
        s.cpu += (grad32 + optim + (grad16 if w == 4 else 0)) / num_nodes
        s.grads = largest_layer_params * w if zero_stage >= 3 else 0.0
        s.optimizer = 0.0
    if offload_params and zero_stage >= 3:
        # ZeRO-3 parameter offload: the weight partitions live on the CPU, fetched layer by layer.
        s.cpu += weights / num_nodes
        s.weights = largest_layer_params * w
    return s


def frozen_states_bytes(
    params: float, largest_layer_params: float, *, zero3: bool, dp: int, num_nodes: int = 1, offload: bool = False, dtype_bytes: int = 2
) -> States:
    """A frozen model's weights (reference, reward): no gradients, no optimizer.

    Frozen engines run ZeRO-0 (a full replica per GPU) or ZeRO-3 (partitioned, plus one
    gathered layer); ``offload`` (``--ref_reward_offload``) keeps the partitions on the CPU.
    """
    full = params * dtype_bytes
    if offload:
        return States(weights=largest_layer_params * dtype_bytes, cpu=full / num_nodes)
    if zero3:
        return States(weights=full / dp + largest_layer_params * dtype_bytes)
    return States(weights=full)


def layer_activation_bytes(shape: ModelShape, tokens: int, dtype_bytes: int) -> float:
    """Bytes one decoder layer saves for backward over ``tokens`` (= batch x seq) positions.

    Counted from the tensors autograd keeps in HF's Llama/Qwen2 layer (sdpa or flash attention,
    no dropout), checked against a measured CPU step in tests/test_plan.py.
    """
    h, i, w = shape.hidden, shape.intermediate, dtype_bytes
    kv, q = shape.kv_heads * shape.dim, shape.heads * shape.dim
    # Two RMSNorms: each keeps its input upcast to fp32 (4 B) and its normalised output in the
    # model dtype (which the q/k/v or gate/up projections read); fp32 models keep both in fp32.
    norms = 2 * h * (4 + w)
    # Attention: rotated q and k, v, the attention output (kept by sdpa/flash for backward), its
    # re-laid-out copy that o_proj reads, plus the fp32 log-sum-exp per head.
    attn = (2 * q + 2 * kv + h) * w + 4 * shape.heads
    # Gated MLP: gate and up projections, silu(gate), and silu(gate) * up that down_proj reads.
    mlp = 4 * i * w
    return tokens * (norms + attn + mlp)


def logits_bytes(tokens: int, vocab: int) -> float:
    """Peak bytes of the language-model head's output in training, for ``tokens`` positions.

    The loss works in fp32 (``rlhf.algos.losses``): the log-softmax output is kept for backward
    (4 B per logit) and the backward pass holds two more fp32 [tokens, vocab] buffers at once
    (the gradient of the log-probs and of the logits). For small models this is the peak.
    """
    return tokens * vocab * 4 * 3


def activation_bytes(
    shape: ModelShape,
    batch: int,
    seq: int,
    *,
    checkpointing: bool,
    dtype_bytes: int,
    lm_head: bool = True,
    training: bool = True,
) -> float:
    """Peak activation bytes of one micro-batch [batch, seq] on one GPU.

    training: what the forward saves for backward (every layer's tensors, or only each layer's
    input with gradient checkpointing, plus the final norm), and the largest transient of the
    backward (the fp32 logits buffers, or one layer's recomputed tensors and its gradients).
    Forward-only (frozen roles, scoring): one layer's tensors live at a time plus the output.
    lm_head: the role outputs vocab logits (actor, policy, reference); a critic or reward model
    outputs one value per token instead.
    """
    tokens = batch * seq
    h, w = shape.hidden, dtype_bytes
    layer = layer_activation_bytes(shape, tokens, w)
    if not training:
        # Logits in the model dtype, their fp32 copy and the fp32 log-softmax (reference log-probs).
        out = tokens * shape.vocab * (w + 8) if lm_head else 0.0
        return layer + out
    saved_per_layer = tokens * h * w if checkpointing else layer  # checkpointing keeps the layer input only
    saved = shape.layers * saved_per_layer + tokens * h * (4 + w)  # + the final RMSNorm
    # Backward of one layer: the gradient of the residual stream, of the MLP's three
    # intermediate tensors and of the normalised input, in the model dtype.
    layer_backward = tokens * (2 * h + 3 * shape.intermediate) * w
    transient = layer_backward + (layer if checkpointing else 0.0)  # recomputation rebuilds one layer
    if lm_head:
        saved += logits_bytes(tokens, shape.vocab) / 3  # the kept fp32 log-probs
        transient = max(transient, logits_bytes(tokens, shape.vocab) * 2 / 3)
    return saved + transient


def kv_cache_bytes(shape: ModelShape, tokens: int, dtype_bytes: int, tensor_parallel: int = 1) -> float:
    """KV cache for ``tokens`` cached positions (sequences x length): a key and a value vector
    per layer per KV head = 2 x layers x kv_heads x head_dim x bytes x tokens; tensor
    parallelism splits the KV heads over its GPUs (never below one head per GPU)."""
    heads_per_gpu = max(shape.kv_heads / tensor_parallel, 1)
    return 2 * shape.layers * heads_per_gpu * shape.dim * dtype_bytes * tokens


# ----------------------------------------------------------------------------------------------
# Configuration: the planner's own flags, and the trainer's config exactly as the trainer reads it

# The trainer whose flags each --trainer reads: its own config class parses them, so every flag
# means here what it means to ``python -m rlhf.<trainer>``. grpo is rlhf.ppo with a group baseline.
TRAINERS: dict[str, type] = {"sft": SFTConfig, "rm": RMConfig, "dpo": DPOConfig, "kto": KTOConfig, "ppo": PPOConfig, "grpo": PPOConfig}
GRPO_DEFAULTS: dict[str, Any] = {"advantage_estimator": "group_norm", "n_samples_per_prompt": 8}
"""--trainer grpo: rlhf.ppo's flags with these defaults (a flag or --config preset that sets them wins)."""
PROG = "python -m rlhf.plan"


def entry_point(trainer: str) -> str:
    """The module that runs a --trainer job: rlhf.ppo for grpo, else rlhf.<trainer>."""
    return "rlhf.ppo" if trainer == "grpo" else f"rlhf.{trainer}"


@dataclass
class PlanOptions:
    """Plan the memory of an rlhf job: per role and per GPU, and whether it fits.

    These are the planner's own flags. Every other flag is the trainer's (--trainer), parsed by
    that trainer's own config with its names, defaults and checks, so
    `python -m rlhf.plan --trainer ppo <the flags of an rlhf.ppo command>` plans that very job."""

    trainer: Literal["sft", "rm", "dpo", "kto", "ppo", "grpo"] = "sft"
    """The job: python -m rlhf.sft, rlhf.rm, rlhf.dpo, rlhf.kto or rlhf.ppo, whose flags the others are; grpo: rlhf.ppo with --advantage_estimator group_norm --n_samples_per_prompt 8 unless given."""
    model: Optional[str] = None
    """The policy's shape: a named size (0.5B 1.5B 7B 8B 13B 34B 70B; mirrors Qwen2.5 / Llama-2 / Llama-3 / CodeLlama),
    an HF config.json or model folder, or embedded:NAME (default: --pretrain, when it is one of these). --reward_pretrain,
    --critic_pretrain and --ref_pretrain take these forms too; a model not found here (a hub id) is planned with the policy's shape."""
    gpu: str = "A100-80G"
    """GPU type: A100-40G A100-80G H100-80G H100-94G H200 B200 L40S L4 A10G A6000 RTX4090 RTX3090 V100-32G."""
    gpu_memory_gb: Optional[float] = None
    """Memory per GPU in GiB, overriding --gpu (with --device cpu: the host's RAM, shared by its --num_gpus_per_node ranks; default this machine's)."""
    num_gpus_per_node: int = 8
    """GPUs (ranks) per node: torchrun's --nproc_per_node."""
    num_nodes: int = 1
    """Nodes: torchrun's --nnodes."""
    device: Literal["gpu", "cpu"] = "gpu"
    """gpu: ranks on --gpu; cpu: ranks in host RAM (--num_gpus_per_node = ranks per host; the tests measure fp32 steps this way). Precision is the trainer's: --bf16, else fp32."""
    cpu_memory_gb: Optional[float] = None
    """CPU memory per node in GiB; when given, offloaded states must fit in it too."""
    search: bool = True
    """When it does not fit, search for flags that make it fit (--no-search to skip)."""

    @property
    def world(self) -> int:
        return self.num_gpus_per_node * self.num_nodes

    def gpu_bytes(self) -> float:
        """Memory of one GPU; on CPU, one rank's share of the host's memory."""
        if self.device == "cpu":
            host = self.gpu_memory_gb * GiB if self.gpu_memory_gb is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            return host / self.num_gpus_per_node
        if self.gpu_memory_gb is not None:
            return self.gpu_memory_gb * GiB
        return GPUS[self.gpu_key()] * GiB

    def gpu_key(self) -> str:
        norm = {k.replace("-", "").upper(): k for k in GPUS}
        return norm.get(self.gpu.replace("-", "").replace("_", "").upper(), self.gpu)

    def validate(self) -> None:
        if self.gpu_key() not in GPUS and self.gpu_memory_gb is None:
            raise UserError(f"--gpu {self.gpu}: unknown GPU type; use one of {', '.join(GPUS)} or give --gpu_memory_gb")
        for flag in ("num_gpus_per_node", "num_nodes"):
            if getattr(self, flag) < 1:
                raise UserError(f"--{flag} must be >= 1, got {getattr(self, flag)}")
        for flag in ("gpu_memory_gb", "cpu_memory_gb"):
            if getattr(self, flag) is not None and getattr(self, flag) <= 0:
                raise UserError(f"--{flag} must be > 0, got {getattr(self, flag)}")
        if self.model is not None:
            load_shape(self.model)


def _owner(job: Any, name: str) -> Any:
    """The object holding trainer option ``name`` in ``job``: the job itself for a top-level
    option or a section's name, else the section that has it; None if the trainer has no such flag."""
    if name in {f.name for f in fields(job)}:
        return job
    for f in fields(job):
        section = getattr(job, f.name)
        if is_dataclass(section) and name in {sub.name for sub in fields(section)}:
            return section
    return None


def set_flags(job: Any, flags: dict[str, Any], trainer: str) -> None:
    """Set trainer options by their flag names (``zero_stage=3``) or whole sections by theirs
    (``placement=PlacementConfig(...)``), as the command line would."""
    for name, value in flags.items():
        owner = _owner(job, name)
        if owner is None:
            raise UserError(
                f"--{name} is not a flag of python -m {entry_point(trainer)} (see python -m rlhf.plan --trainer {trainer} --help)"
            )
        setattr(owner, name, value)


def default_job(trainer: str) -> Any:
    """The trainer's config with its own defaults (grpo: rlhf.ppo's with ``GRPO_DEFAULTS``)."""
    job = TRAINERS[trainer]()
    if trainer == "grpo":
        set_flags(job, GRPO_DEFAULTS, trainer)
    return job


def trainer_roles(job: Any) -> tuple[str, ...]:
    """The roles a trainer's job places: ``PPOConfig.roles()`` for rlhf.ppo (the actor; rollout
    ranks of their own when asked; a critic when the estimator needs one; a reward role with
    --reward_pretrain; a reference unless LoRA); DPO / KTO the policy ('actor') and, when
    ``loads_reference``, the reference; SFT / RM the trained model alone."""
    if isinstance(job, PPOConfig):
        return job.roles()
    if isinstance(job, (DPOConfig, KTOConfig)):
        return ("actor", "reference") if loads_reference(job) else ("actor",)
    return ("actor",)


@dataclass(init=False)
class PlanConfig(PlanOptions):
    """A job to plan: the planner's options and ``job``, the trainer's own config (``PPOConfig``,
    ``DPOConfig`` ...), which holds every trainer flag. It reads like the command line:
    ``cfg.zero_stage`` is the job's --zero_stage, whichever section holds it, and
    ``PlanConfig(trainer="dpo", lora_rank=8, zero_stage=3)`` or ``dataclasses.replace(cfg,
    zero_stage=3)`` set trainer flags by their names (a copy of ``job``, then the flags)."""

    job: Any = None

    def __init__(self, *, job: Any = None, **flags: Any) -> None:
        PlanOptions.__init__(self, **{f.name: flags.pop(f.name) for f in fields(PlanOptions) if f.name in flags})
        cls = TRAINERS.get(self.trainer)
        if cls is None:
            raise UserError(f"--trainer {self.trainer}: use one of {', '.join(TRAINERS)}")
        if job is not None and not isinstance(job, cls):
            raise UserError(f"--trainer {self.trainer} plans a {cls.__name__}, not a {type(job).__name__}")
        self.job = default_job(self.trainer) if job is None else copy.deepcopy(job)
        set_flags(self.job, flags, self.trainer)

    def __getattr__(self, name: str) -> Any:
        job = self.__dict__.get("job")
        owner = None if job is None or name.startswith("_") else _owner(job, name)
        if owner is None:
            raise AttributeError(f"{type(self).__name__} (--trainer {self.__dict__.get('trainer')}) has no {name!r}")
        return getattr(owner, name)

    @property
    def rl(self) -> bool:
        """An rlhf.ppo job (ppo, grpo): generation, scoring and training take turns."""
        return isinstance(self.job, PPOConfig)

    @property
    def dtype_bytes(self) -> int:
        return 2 if self.job.model.bf16 else 4

    @property
    def uses_vllm(self) -> bool:
        return self.rl and self.job.rollout.rollout_backend == "vllm"

    @property
    def is_split(self) -> bool:
        return self.rl and self.job.placement.is_split

    @property
    def actor_gpus(self) -> int:
        return split_sizes(self)["actor"] if self.is_split else self.world

    @property
    def model_name(self) -> str:
        return self.model or self.job.model.pretrain

    def roles(self) -> list[str]:
        """The plan's rows: the roles the trainer places (``trainer_roles``) in the order actor,
        critic, reward, reference, then for rlhf.ppo the generation, 'rollout': on GPUs of its own
        when ``PPOConfig.roles()`` places that role, else on the actor's GPUs."""
        placed = trainer_roles(self.job)
        return [r for r in ("actor", "critic", "reward", "reference") if r in placed] + (["rollout"] if self.rl else [])

    def policy_shape(self) -> ModelShape:
        """--model's shape, else --pretrain's when the planner can read it here."""
        if self.model is not None:
            return load_shape(self.model)
        pretrain = self.job.model.pretrain
        shape = find_shape(pretrain, "--pretrain")
        if shape is None:
            raise UserError(
                f"--pretrain {pretrain}: not a model folder, config.json or embedded:NAME here, so the planner cannot read "
                f"its shape; give --model (a named size: {', '.join(MODELS)}; or a config.json)"
            )
        return shape

    def role_shapes(self) -> tuple[dict[str, list[ModelShape]], list[str]]:
        """The models each role loads, as the trainer picks them (rlhf.ppo: the reference is
        --pretrain, the reward role every --reward_pretrain model, the critic --critic_pretrain,
        else the first reward model, else --pretrain; DPO / KTO: the reference is --ref_pretrain,
        else --pretrain), and a note for each model not found here (planned with the policy's shape)."""
        policy = self.policy_shape()
        notes: list[str] = []

        def other(path: str, flag: str) -> ModelShape:
            shape = find_shape(path, flag)
            if shape is None:
                note = f"{flag} {path}: not a named size nor a config.json here; planned with the policy's shape"
                notes.extend([] if note in notes else [note])
                return policy
            return shape

        shapes = {"actor": [policy], "reference": [policy]}
        job = self.job
        if self.rl:
            rewards = [other(p, "--reward_pretrain") for p in job.algo.reward_pretrain.split(",")] if job.algo.reward_pretrain else []
            shapes["reward"] = rewards
            shapes["critic"] = [
                other(job.algo.critic_pretrain, "--critic_pretrain") if job.algo.critic_pretrain else rewards[0] if rewards else policy
            ]
        elif getattr(job, "ref_pretrain", None):
            shapes["reference"] = [other(job.ref_pretrain, "--ref_pretrain")]
        return shapes, notes

    def notes(self) -> list[str]:
        """What the plan assumes that a reader might not expect from the flags."""
        _, notes = self.role_shapes()
        if self.device == "gpu" and not self.job.model.bf16:
            notes.append(f"no --bf16: planned in fp32, as python -m {entry_point(self.trainer)} trains without it")
        if self.rl and self.job.rollout.vllm_num_engines is not None and not self.uses_vllm:
            notes.append(
                "--vllm_num_engines without --rollout_backend vllm: rlhf.ppo generates with transformers (hf); add "
                "--rollout_backend vllm to plan vLLM"
            )
        return notes

    def validate(self) -> None:
        """The planner's checks and the trainer's own ``validate()``: a job the trainer refuses
        at start-up, the planner refuses with the same message."""
        PlanOptions.validate(self)
        self.job.validate()
        if self.rl and any(p.strip().lower() == "none" for p in (self.job.algo.reward_pretrain or "").split(",")):
            raise UserError(
                "--reward_pretrain none: rlhf.ppo loads every --reward_pretrain as a reward model; for a job without one "
                "leave the flag out (rewards from --reward_func or --remote_rm_url)"
            )
        self.role_shapes()
        if self.is_split:
            sizes = split_sizes(self)
            used = sum(sizes[group[0]] for group in gpu_groups(self))
            if used > self.world:
                raise UserError(
                    f"split placement: the roles take {used} GPUs ({', '.join(f'{r} {n}' for r, n in sizes.items())}) but "
                    f"there are {self.world}"
                )
        if self.uses_vllm:
            tp = self.vllm_tensor_parallel_size
            engines = self.actor_gpus // tp
            if self.actor_gpus % tp or tp > self.num_gpus_per_node:
                raise UserError(
                    f"--vllm_tensor_parallel_size {tp} must divide the actor's {self.actor_gpus} GPUs and fit in a node of "
                    f"{self.num_gpus_per_node}"
                )
            if self.vllm_num_engines is not None and self.vllm_num_engines != engines:
                raise UserError(
                    f"--vllm_num_engines {self.vllm_num_engines}: the engines sit on the actor's GPUs, so it must be "
                    f"{self.actor_gpus} / --vllm_tensor_parallel_size {tp} = {engines}"
                )


def split_sizes(cfg: PlanConfig) -> dict[str, int]:
    """GPUs per role in a split placement (rollout: its own GPUs, or the actor's)."""
    model_roles = [r for r in cfg.roles() if r != "rollout"]
    sizes = cfg.placement.role_sizes(model_roles)
    sizes["rollout"] = cfg.placement.role_sizes(["rollout"])["rollout"] if cfg.placement.separate_rollout else sizes["actor"]
    return sizes


def gpu_groups(cfg: PlanConfig) -> list[list[str]]:
    """Roles that share GPUs: all of them when colocated; in a split, the rollout with the actor
    (unless it has GPUs of its own) and the pairs joined by --colocate_actor_ref and friends."""
    roles = cfg.roles()
    if not cfg.is_split:
        return [roles]
    groups = [[r] for r in roles if r != "rollout"]
    if "rollout" in roles:
        groups.append(["rollout"]) if cfg.placement.separate_rollout else groups[0].append("rollout")
    for pair in cfg.placement.shared_roles([r for r in roles if r != "rollout"]):
        first, second = (next(g for g in groups if r in g) for r in pair)
        if first is not second:
            first.extend(second)
            groups.remove(second)
    return groups


# ----------------------------------------------------------------------------------------------
# The plan


@dataclass
class RoleMemory:
    """One role's bytes per GPU (and per node on the CPU)."""

    role: str
    gpus: int
    states: States
    activations: float = 0.0  # peak of this role's own phase (training, scoring, generation)
    kv_cache: float = 0.0
    reserved: float = 0.0  # vLLM: the share it takes up front (weights and KV cache inside it)
    resident: bool = True  # False: vLLM with sleep mode, present only while generating
    note: str = ""

    @property
    def total(self) -> float:
        return self.reserved or (self.states.gpu + self.activations + self.kv_cache)


@dataclass
class GroupPeak:
    """GPUs holding the same roles, and their peak: every role's resident states plus the
    largest transient (roles take turns: generate, score, train)."""

    roles: list[str]
    gpus: int
    peak: float
    capacity: float

    @property
    def fits(self) -> bool:
        return self.peak <= self.capacity


@dataclass
class Plan:
    cfg: PlanConfig
    shape: ModelShape
    roles: list[RoleMemory]
    groups: list[GroupPeak]
    cpu_per_node: float
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        cpu_ok = self.cfg.cpu_memory_gb is None or self.cpu_per_node <= self.cfg.cpu_memory_gb * GiB
        return all(g.fits for g in self.groups) and cpu_ok and not self.problems


def _trainable(cfg: PlanConfig, shape: ModelShape, dp: int, nodes: int) -> States:
    """States of a trainable role: all weights, or a frozen (maybe 4-bit) base + LoRA adapters."""
    w = cfg.dtype_bytes
    if not cfg.lora_rank:
        return model_states_bytes(
            shape.params,
            shape.largest_layer_params,
            zero_stage=cfg.zero_stage,
            dp=dp,
            num_nodes=nodes,
            offload_optimizer=cfg.adam_offload,
            dtype_bytes=w,
        )
    lora = shape.lora_params(cfg.lora_rank)
    adapters = model_states_bytes(
        lora, 0, zero_stage=cfg.zero_stage, dp=dp, num_nodes=nodes, offload_optimizer=cfg.adam_offload, dtype_bytes=w
    )
    if cfg.load_in_4bit:  # the linear layers in NF4, the rest (embeddings, norms) in the model dtype
        base = States(weights=shape.linear_params * NF4_BYTES_PER_PARAM + (shape.params - shape.linear_params) * w)
    else:
        base = frozen_states_bytes(
            shape.params, shape.largest_layer_params, zero3=cfg.zero_stage == 3, dp=dp, num_nodes=nodes, dtype_bytes=w
        )
    return base + adapters


def plan(cfg: PlanConfig) -> Plan:
    """Every role's memory per GPU, the peak of each group of GPUs and the CPU memory per node."""
    shapes, _ = cfg.role_shapes()
    shape = shapes["actor"][0]
    w = cfg.dtype_bytes
    roles = cfg.roles()
    sizes = split_sizes(cfg) if cfg.is_split else {r: cfg.world for r in roles}
    nodes = {r: max(1, -(-n // cfg.num_gpus_per_node)) for r, n in sizes.items()}
    rl = cfg.rl
    seq = cfg.prompt_max_len + cfg.generate_max_len if rl else cfg.max_len
    pairs = 2 if cfg.trainer in ("rm", "dpo", "kto") else 1  # chosen + rejected (KTO: + its KL batch) in one forward
    batch = cfg.micro_train_batch_size * pairs
    score_batch = cfg.micro_rollout_batch_size if rl else batch
    train_seq = score_seq = seq
    if rl and cfg.use_dynamic_batch:
        # Token-budget micro-batches hold at most the budget's tokens, or one sample longer than it.
        batch, train_seq = 1, max(cfg.train_max_tokens_per_gpu, seq)
        score_batch, score_seq = 1, max(cfg.rollout_max_tokens_per_gpu or cfg.train_max_tokens_per_gpu, seq)
    ckpt = cfg.gradient_checkpointing
    # Frozen models' weights in CPU memory: rlhf.ppo's --ref_reward_offload, DPO / KTO's --ref_offload.
    frozen_offload = cfg.ref_reward_offload if rl else getattr(cfg, "ref_offload", False)
    out: list[RoleMemory] = []
    problems: list[str] = []
    for role in roles:
        n, nn = sizes[role], nodes[role]
        if role == "actor":
            states = _trainable(cfg, shape, n, nn)
            act = activation_bytes(shape, batch, train_seq, checkpointing=ckpt, dtype_bytes=w, lm_head=cfg.trainer != "rm")
            out.append(RoleMemory("policy" if cfg.trainer in ("dpo", "kto") else role, n, states, act))
        elif role == "critic":
            critic_shape = shapes["critic"][0]
            states = model_states_bytes(
                critic_shape.scorer_params,
                critic_shape.largest_layer_params,
                zero_stage=cfg.zero_stage,
                dp=n,
                num_nodes=nn,
                offload_optimizer=cfg.adam_offload,
                dtype_bytes=w,
            )
            train = activation_bytes(critic_shape, batch, train_seq, checkpointing=ckpt, dtype_bytes=w, lm_head=False)
            out.append(RoleMemory(role, n, states, train))
        elif role in ("reward", "reference"):
            # Every model of the role sits on its GPUs (rlhf.ppo: all reward models on the reward
            # ranks); they score one after the other, so the largest activation is the peak.
            states, act = States(), 0.0
            for s in shapes[role]:
                params = s.params if role == "reference" else s.scorer_params
                states = states + frozen_states_bytes(
                    params, s.largest_layer_params, zero3=cfg.zero_stage == 3, dp=n, num_nodes=nn, offload=frozen_offload, dtype_bytes=w
                )
                act = max(
                    act,
                    activation_bytes(
                        s, score_batch, score_seq, checkpointing=False, dtype_bytes=w, lm_head=role == "reference", training=False
                    ),
                )
            note = f"{len(shapes[role])} reward models" if len(shapes[role]) > 1 else ""
            out.append(RoleMemory(role, n, states, act, note=note))
        elif role == "rollout":
            tp = cfg.vllm_tensor_parallel_size
            if cfg.uses_vllm:
                weights = shape.params * w / tp
                # KV for --micro_rollout_batch_size full-length sequences decoding at once per engine.
                kv = kv_cache_bytes(shape, cfg.micro_rollout_batch_size * seq, w, tp)
                reserved = cfg.vllm_gpu_memory_utilization * cfg.gpu_bytes()
                need = weights + kv + VLLM_RUNTIME_OVERHEAD
                note = f"vLLM TP{tp}, takes {cfg.vllm_gpu_memory_utilization:g} of the GPU"
                if need > reserved:
                    problems.append(
                        f"vLLM needs {need / GiB:.1f} GiB per GPU (weights {weights / GiB:.1f} + KV {kv / GiB:.1f} + runtime "
                        f"{VLLM_RUNTIME_OVERHEAD / GiB:.0f}) but --vllm_gpu_memory_utilization "
                        f"{cfg.vllm_gpu_memory_utilization:g} gives it {reserved / GiB:.1f}"
                    )
                out.append(
                    RoleMemory(
                        "rollout", n, States(weights=weights), 0.0, kv, reserved=reserved, resident=not cfg.vllm_enable_sleep, note=note
                    )
                )
            else:
                kv = kv_cache_bytes(shape, cfg.micro_rollout_batch_size * seq, w)
                logits = cfg.micro_rollout_batch_size * shape.vocab * 4 * 2  # one step's logits and probabilities
                if cfg.placement.separate_rollout:
                    # Rollout ranks of their own hold a plain copy of the policy, refreshed by broadcast.
                    out.append(
                        RoleMemory("rollout", n, States(weights=shape.params * w), logits, kv, note="HF generate, a policy copy of its own")
                    )
                else:
                    # HF generate on the actor's weights, gathered whole when ZeRO-3 partitions them.
                    gathered = shape.params * w if cfg.zero_stage == 3 and not cfg.lora_rank else 0.0
                    out.append(RoleMemory("rollout", n, States(weights=gathered), logits, kv, resident=False, note="HF generate"))
    sets = gpu_groups(cfg)
    overhead = RUNTIME_OVERHEAD_CPU if cfg.device == "cpu" else RUNTIME_OVERHEAD_GPU
    by_name = {("actor" if m.role == "policy" else m.role): m for m in out}
    groups = []
    for members in sets:
        ms = [by_name[r] for r in members if r in by_name]
        resident = sum(m.reserved if m.reserved else m.states.gpu for m in ms if m.resident)
        transient = max([m.activations + m.kv_cache for m in ms if m.resident] + [m.total for m in ms if not m.resident] + [0.0])
        groups.append(GroupPeak([m.role for m in ms], sizes[members[0]], resident + transient + overhead, cfg.gpu_bytes()))
    # CPU per node: each role's per-node share, its nodes' worth spread over the job's nodes.
    cpu = sum(m.states.cpu * nodes.get(m.role if m.role != "policy" else "actor", 1) for m in out) / cfg.num_nodes
    return Plan(cfg, shape, out, groups, cpu, problems, cfg.notes())


# ----------------------------------------------------------------------------------------------
# Search: the fewest, cheapest changes that make it fit


def _placements(cfg: PlanConfig) -> list[dict[str, Optional[int]]]:
    """Colocated, then splits of the job's GPUs among the model roles (powers of two per role,
    whole nodes for roles larger than a node), most GPUs to the actor first. rlhf.ppo runs vLLM
    in the colocated placement only (``PPOConfig.validate``), so with vLLM there are no splits."""
    if not cfg.rl or cfg.uses_vllm:
        return [{}]
    model_roles = [r for r in cfg.roles() if r != "rollout"]
    g = cfg.num_gpus_per_node
    counts = sorted({c for c in [2**k for k in range(12)] if c <= cfg.world and (c <= g and g % c == 0 or c % g == 0)})
    options: list[dict[str, Optional[int]]] = [{}]
    splits = [combo for combo in itertools.product(counts, repeat=len(model_roles)) if sum(combo) == cfg.world]
    splits.sort(key=lambda combo: (-combo[0], combo))
    for combo in splits:
        option: dict[str, Optional[int]] = {}
        for role, c in zip(model_roles, combo):
            p = PlacementConfig.FLAG_PREFIX[role]
            option[f"{p}_num_gpus_per_node"] = min(c, g)
            option[f"{p}_num_nodes"] = max(1, c // g)
        options.append(option)
    return options


def candidates(cfg: PlanConfig) -> list[tuple[PlanConfig, list[str]]]:
    """Configurations near ``cfg``, with the flags that differ, in the order we prefer them:
    memory-saving switches that cost least speed first (ZeRO-3, checkpointing, vLLM sleep and
    tensor parallelism, then the offloads), and the given placement before splits. Each one
    passes the planner's and the trainer's checks (``PlanConfig.validate``)."""
    rl = cfg.rl
    stages = sorted({cfg.zero_stage, 3}) if cfg.zero_stage >= 2 else [cfg.zero_stage, 2, 3]
    tps: list[Optional[int]] = [None]  # rlhf.ppo's generation flags; other trainers have none
    sleeps: list[Optional[bool]] = [None]
    offloads: list[Optional[bool]] = [None]
    if rl:
        tps = (
            [t for t in (1, 2, 4, 8) if t >= cfg.vllm_tensor_parallel_size and t <= cfg.num_gpus_per_node]
            if cfg.uses_vllm
            else [cfg.vllm_tensor_parallel_size]
        )
        sleeps = sorted({cfg.vllm_enable_sleep, True}) if cfg.uses_vllm and cfg.device == "gpu" else [cfg.vllm_enable_sleep]
        offloads = sorted({cfg.ref_reward_offload, True})
    out = []
    with _quiet_trainer_warnings():
        for stage, ckpt, tp, sleep, adam, rro in itertools.product(
            stages, sorted({cfg.gradient_checkpointing, True}), tps, sleeps, sorted({cfg.adam_offload, True}), offloads
        ):
            for placement in _placements(cfg) if not cfg.is_split else [{}]:
                changes: dict[str, Any] = dict(zero_stage=stage, gradient_checkpointing=ckpt, adam_offload=adam)
                if rl:
                    changes.update(vllm_tensor_parallel_size=tp, vllm_enable_sleep=sleep)
                    changes["placement"] = replace(
                        cfg.placement, ref_reward_offload=rro, **(dict(placement, colocate_all_models=False) if placement else {})
                    )
                    if cfg.uses_vllm:
                        changes["vllm_num_engines"] = None  # engines = actor GPUs / TP
                new = replace(cfg, **changes)
                try:
                    new.validate()
                except UserError:
                    continue
                out.append((new, _flag_diff(cfg, new)))
    out.sort(key=lambda item: (sum(SEARCH_COST.get(f.split()[0][2:].replace("no-", ""), 4) for f in item[1]), len(item[1])))
    return out


@contextlib.contextmanager
def _quiet_trainer_warnings() -> Iterator[None]:
    """The trainer's validate() warns once per job (``--normalize_reward`` without a reward
    model); the search validates hundreds of variants of the same job."""
    log = logging.getLogger("rlhf")
    was = log.disabled
    log.disabled = True
    try:
        yield
    finally:
        log.disabled = was


# What a change costs in speed, roughly: the search prefers the cheapest set of changes.
SEARCH_COST = {
    "zero_stage": 1,
    "gradient_checkpointing": 1,
    "vllm_tensor_parallel_size": 1,
    "vllm_num_engines": 0,
    "vllm_enable_sleep": 1,
    "ref_reward_offload": 2,
    "adam_offload": 3,
}


def smaller_batches(cfg: PlanConfig) -> list[PlanConfig]:
    """The last resort of the search: halve the micro-batches (training, then scoring) down to 1;
    with --use_dynamic_batch, the token budgets, down to one sample's length."""
    out = []
    if cfg.rl and cfg.use_dynamic_batch:
        seq = cfg.prompt_max_len + cfg.generate_max_len
        train, score = cfg.train_max_tokens_per_gpu, cfg.rollout_max_tokens_per_gpu or cfg.train_max_tokens_per_gpu
        while train > seq or score > seq:
            train, score = max(seq, train // 2), max(seq, score // 2)
            out.append(replace(cfg, train_max_tokens_per_gpu=train, rollout_max_tokens_per_gpu=score))
        return out
    train, rollout = cfg.micro_train_batch_size, cfg.micro_rollout_batch_size if cfg.rl else 1
    while train > 1 or rollout > 1:
        train, rollout = max(1, train // 2), max(1, rollout // 2)
        out.append(replace(cfg, micro_train_batch_size=train, **({"micro_rollout_batch_size": rollout} if cfg.rl else {})))
    return out


def _flag_diff(old: PlanConfig, new: PlanConfig) -> list[str]:
    """The flags that turn ``old`` into ``new``, as a user adds them to the command line."""
    flags = []
    names = [
        "zero_stage",
        "gradient_checkpointing",
        "adam_offload",
        "ref_reward_offload",
        "vllm_tensor_parallel_size",
        "vllm_enable_sleep",
        "micro_train_batch_size",
        "micro_rollout_batch_size",
        "train_max_tokens_per_gpu",
        "rollout_max_tokens_per_gpu",
    ]
    names += [f"{p}_num_{what}" for p in PlacementConfig.FLAG_PREFIX.values() for what in ("nodes", "gpus_per_node")]
    for name in names:
        a, b = getattr(old, name, None), getattr(new, name, None)  # None: not a flag of this trainer
        if a == b:
            continue
        if isinstance(b, bool):
            flags.append(f"--{name}" if b else f"--no-{name}")
        elif b is not None:
            flags.append(f"--{name} {b}")
    if new.uses_vllm:
        engines = new.actor_gpus // new.vllm_tensor_parallel_size
        if engines != (old.vllm_num_engines or old.actor_gpus // old.vllm_tensor_parallel_size):
            flags.append(f"--vllm_num_engines {engines}")
    return flags


def suggest(cfg: PlanConfig) -> Optional[tuple[Plan, list[str]]]:
    """The first candidate (cheapest changes) that fits, with the flags to add; None if none does.
    Smaller micro-batches are tried only when no switch makes the given ones fit."""
    cfg.validate()  # an invalid job would make every candidate invalid: say why instead of "none fits"
    for base in [cfg] + smaller_batches(cfg):
        for new, flags in candidates(base):
            p = plan(new)
            if p.fits:
                return p, _flag_diff(cfg, new)
    return None


# ----------------------------------------------------------------------------------------------
# Report


def _gib(x: float) -> str:
    return f"{x / GiB:7.2f}" if x else "      -"


def describe(cfg: PlanConfig) -> str:
    shape = cfg.policy_shape()
    name = f"{cfg.model_name} ({shape.mirrors}, {shape.params / 1e9:.2f}B params)" if shape.mirrors else cfg.model_name
    where = (
        f"{cfg.num_nodes} x {cfg.num_gpus_per_node} {cfg.gpu_key()}"
        if cfg.device == "gpu"
        else f"{cfg.num_nodes} x {cfg.num_gpus_per_node} CPU ranks"
    )
    precision = "bf16" if cfg.dtype_bytes == 2 else "fp32"
    opts = [f"ZeRO-{cfg.zero_stage}"] + [
        o
        for o, on in (
            ("adam offload", cfg.adam_offload),
            ("ref/reward offload", getattr(cfg, "ref_reward_offload", False)),
            ("ref offload", getattr(cfg, "ref_offload", False)),
            ("grad ckpt", cfg.gradient_checkpointing),
            (f"LoRA r{cfg.lora_rank}", cfg.lora_rank),
            ("4-bit", cfg.load_in_4bit),
        )
        if on
    ]
    if cfg.uses_vllm:
        opts.append(
            f"vLLM TP{cfg.vllm_tensor_parallel_size} x{cfg.vllm_gpu_memory_utilization:g}" + (" sleep" if cfg.vllm_enable_sleep else "")
        )
    return f"{cfg.trainer}: {name} on {where} ({cfg.gpu_bytes() / GiB:.0f} GiB each), {precision}, {', '.join(opts)}, {'split' if cfg.is_split else 'colocated'}"


def render(p: Plan) -> str:
    lines = [
        describe(p.cfg),
        "",
        f"{'role':<10} {'GPUs':>4} {'weights':>7} {'grads':>7} {'optim':>7} {'activ':>7} {'KV':>7} {'total':>7}  GiB per GPU",
    ]
    for m in p.roles:
        lines.append(
            f"{m.role:<10} {m.gpus:>4} {_gib(m.states.weights)} {_gib(m.states.grads)} {_gib(m.states.optimizer)} "
            f"{_gib(m.activations)} {_gib(m.kv_cache)} {_gib(m.total)}  {m.note}".rstrip()
        )
    lines.append("")
    for g in p.groups:
        verdict = "fits" if g.fits else "DOES NOT FIT"
        lines.append(f"GPUs of {'+'.join(g.roles)} ({g.gpus}): peak {g.peak / GiB:.1f} GiB of {g.capacity / GiB:.0f} GiB: {verdict}")
    cpu_limit = f" of {p.cfg.cpu_memory_gb:g} GiB" if p.cfg.cpu_memory_gb is not None else ""
    lines.append(f"CPU memory per node for offloaded states: {p.cpu_per_node / GiB:.1f} GiB{cpu_limit} (DeepSpeed advises 1.5x this)")
    lines += [f"problem: {x}" for x in p.problems]
    lines += [f"note: {x}" for x in p.notes]
    lines.append("verdict: fits" if p.fits else "verdict: does not fit")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line: the planner's flags, then the trainer's, each parsed by its own config


def _flag_kinds() -> tuple[set[str], set[str]]:
    """The planner's flags that take a value, and its switches (--search, --no-search, --no_search)."""
    switches = {f"--{prefix}{f.name}" for f in fields(PlanOptions) if f.type == "bool" for prefix in ("", "no-", "no_")}
    return {f"--{f.name}" for f in fields(PlanOptions)} - switches, switches


def split_args(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """``args`` -> (the planner's flags with their values, the trainer's flags as given)."""
    valued, switches = _flag_kinds()
    own: list[str] = []
    theirs: list[str] = []
    i = 0
    while i < len(args):
        flag, eq, _ = args[i].partition("=")
        n = 2 if flag in valued and not eq else 1
        (own if flag in valued | switches else theirs).extend(args[i : i + n])
        i += n
    return own, theirs


def _with_grpo_defaults(args: list[str]) -> list[str]:
    """rlhf.ppo flags with ``GRPO_DEFAULTS`` for those neither given nor set by the --config preset."""
    given = {a.partition("=")[0] for a in args if a.startswith("--")}
    if "--config" in args and args.index("--config") + 1 < len(args):
        try:
            preset = yaml.safe_load(Path(args[args.index("--config") + 1]).read_text())
        except (OSError, yaml.YAMLError):
            preset = None  # parse_config reports the file itself
        given |= {f"--{key}" for key in preset} if isinstance(preset, dict) else set()
    return [t for key, value in GRPO_DEFAULTS.items() if f"--{key}" not in given for t in (f"--{key}", str(value))] + args


def _parse_job(trainer: str, args: list[str]) -> Any:
    """The trainer's flags parsed, preset loaded and validated by the trainer's own config."""
    cls = TRAINERS[trainer]
    try:
        return parse_config(cls, _with_grpo_defaults(args) if trainer == "grpo" else args, prog=f"{PROG} --trainer {trainer}")
    except UserError as err:
        # A misspelt planner flag lands among the trainer's: name the planner flag it resembles.
        valued, switches = _flag_kinds()
        planner, known = valued | switches, set(flag_names(cls))
        hints, planner_hit = [], False
        for flag in dict.fromkeys(a.partition("=")[0] for a in args if a.startswith("--")):
            negated = flag.startswith(("--no-", "--no_")) and f"--{flag[5:]}" in known  # a switch turned off
            close = [] if flag in known or negated else difflib.get_close_matches(flag, sorted(known | planner), n=1, cutoff=0.8)
            if close:
                planner_hit |= close[0] in planner
                hints.append(f"{flag}: did you mean {close[0]}{' (a planner flag)' if close[0] in planner else ''}?")
        if planner_hit and str(err).startswith("unknown option"):
            head = str(err).split(";")[0].replace(" (see --help for the options)", "")
            raise UserError(f"{head}; {'; '.join(hints)} (see --help for the options)") from None
        if cls is PPOConfig and str(err).startswith("PPO needs a reward"):
            raise UserError(
                f"{err} (to plan a reward model give its size or config, e.g. --reward_pretrain 70B; a --reward_func or "
                "--remote_rm_url takes no GPU memory)"
            ) from None
        raise


def print_help(own: list[str]) -> None:
    """The planner's flags, then the flags of the trainer --trainer names (rlhf.ppo's if none)."""
    trainer = "ppo"
    for i, token in enumerate(own):
        flag, eq, value = token.partition("=")
        if flag == "--trainer":
            value = value if eq else (own[i + 1] if i + 1 < len(own) else "")
            trainer = value if value in TRAINERS else trainer
    try:
        parse_config(PlanOptions, ["--help"], prog=PROG)
    except SystemExit:
        pass
    cls = TRAINERS[trainer]
    print(
        f"\nEvery other flag is the trainer's: for --trainer {trainer}, python -m {entry_point(trainer)}'s, parsed by its "
        f"{cls.__name__} with the same names, defaults and checks (below; --trainer NAME --help lists another trainer's).\n",
        flush=True,
    )
    parse_config(cls, ["--help"], prog=f"{PROG} --trainer {trainer}")  # prints and exits 0


def parse_plan(argv: Optional[Sequence[str]] = None) -> PlanConfig:
    """``[planner flags] [trainer flags]`` in any order -> a validated ``PlanConfig``."""
    args = list(sys.argv[1:] if argv is None else argv)
    own, theirs = split_args(args)
    if any(a in ("-h", "--help") for a in args):
        print_help(own)
    options = parse_config(PlanOptions, own, prog=PROG)
    job = _parse_job(options.trainer, theirs)
    cfg = PlanConfig(job=job, **{f.name: getattr(options, f.name) for f in fields(PlanOptions)})
    cfg.validate()
    return cfg


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg = parse_plan(argv)
    p = plan(cfg)
    print(render(p))
    if p.fits or not cfg.search:
        return
    found = suggest(cfg)
    if found is None:
        print(
            "\nno configuration in the search space fits (ZeRO-3, checkpointing, offloads, placements, vLLM TP and sleep, micro-batches "
            "down to 1): more or larger GPUs, LoRA, or shorter sequences"
        )
        return
    better, flags = found
    print(f"\nsuggested: add {' '.join(flags)}\n")
    print(render(better))


if __name__ == "__main__":
    main()
