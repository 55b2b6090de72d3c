"""Memory planner: will this job fit, and if not, which flags make it fit?

    python -m rlhf.plan --model 70B --gpu A100-80G --num_gpus_per_node 8 --num_nodes 2 --trainer ppo \\
        --zero_stage 3 --adam_offload --gradient_checkpointing --vllm_num_engines 4 --vllm_tensor_parallel_size 4
    python -m rlhf.plan --model 7B --gpu RTX4090 --num_gpus_per_node 4 --trainer ppo
    python -m rlhf.plan --model ./my-model/config.json --gpu H100-80G --trainer dpo --lora_rank 64

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

import itertools
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Literal, Optional, Sequence

from rlhf.config import Flat, PlacementConfig
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
    "A100-40G": 40, "A100-80G": 80, "H100-80G": 80, "H100-94G": 94, "H200": 141, "B200": 180,
    "L40S": 48, "L4": 24, "A10G": 24, "A6000": 48, "RTX4090": 24, "RTX3090": 24, "V100-32G": 32,
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


def load_shape(model: str) -> ModelShape:
    """A named size (``7B``) or the path of an HF ``config.json`` / model folder -> its shape."""
    if model.upper() in MODELS:
        return MODELS[model.upper()]
    path = Path(model)
    if model.startswith("embedded:"):
        path = Path(__file__).parent / "assets" / model.split(":", 1)[1]
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise UserError(f"--model {model}: not a named size ({', '.join(MODELS)}) nor an HF config.json or model folder")
    try:
        cfg = json.loads(path.read_text())
        cfg = cfg.get("text_config", cfg)  # multimodal wrappers keep the LM's shape here
        heads = int(cfg["num_attention_heads"])
        return ModelShape(
            hidden=int(cfg["hidden_size"]), layers=int(cfg["num_hidden_layers"]), heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads), intermediate=int(cfg["intermediate_size"]),
            vocab=int(cfg["vocab_size"]), tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
            head_dim=cfg.get("head_dim"), mirrors=str(path),
        )
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"--model {model}: {path} is not a decoder config this planner reads ({type(err).__name__}: {err})") from None


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
# Configuration


@dataclass
class PlanConfig:
    """Plan the memory of an rlhf job: per role and per GPU, and whether it fits."""

    model: str = "7B"
    """A named size (0.5B 1.5B 7B 8B 13B 34B 70B; mirrors Qwen2.5 / Llama-2 / Llama-3 / CodeLlama), an HF config.json or model folder, or embedded:NAME."""
    trainer: Literal["sft", "rm", "dpo", "kto", "ppo", "grpo"] = "sft"
    """The job: sft, rm, dpo, kto, ppo (actor, critic, reward, reference) or grpo (no critic)."""
    gpu: str = "A100-80G"
    """GPU type: A100-40G A100-80G H100-80G H100-94G H200 B200 L40S L4 A10G A6000 RTX4090 RTX3090 V100-32G."""
    gpu_memory_gb: Optional[float] = None
    """Memory per GPU in GiB, overriding --gpu (with --device cpu: the host's RAM, shared by its --num_gpus_per_node ranks; default this machine's)."""
    num_gpus_per_node: int = 8
    """GPUs per node."""
    num_nodes: int = 1
    """Nodes."""
    device: Literal["gpu", "cpu"] = "gpu"
    """gpu: bf16 (unless --no-bf16) on --gpu; cpu: fp32 ranks in host RAM (--num_gpus_per_node = ranks per host; the tests measure this)."""
    cpu_memory_gb: Optional[float] = None
    """CPU memory per node in GiB; when given, offloaded states must fit in it too."""
    bf16: bool = True
    """Train in bfloat16 (fp32 master weights); --no-bf16 plans fp32. Ignored with --device cpu (fp32)."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage of the trainable roles (frozen roles run 0, or 3 when this is 3)."""
    adam_offload: bool = False
    """Adam states (and fp32 gradients) in CPU memory (DeepSpeed CPU-Adam)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: keep only each layer's input."""
    lora_rank: int = 0
    """LoRA rank on all linear layers; 0 trains all weights."""
    load_in_4bit: bool = False
    """QLoRA: the frozen base in 4-bit NF4 (needs --lora_rank > 0)."""
    micro_train_batch_size: int = 8
    """Samples per GPU per forward/backward (pairs for rm/dpo, which run chosen + rejected at once)."""
    max_len: int = 2048
    """sft/rm/dpo/kto: tokens per sample."""
    prompt_max_len: int = 1024
    """ppo/grpo: prompt tokens."""
    generate_max_len: int = 1024
    """ppo/grpo: generated tokens."""
    micro_rollout_batch_size: int = 16
    """ppo/grpo: sequences per GPU per scoring forward, and per engine generating at once."""
    rollout_backend: Literal["hf", "vllm"] = "hf"
    """ppo/grpo generation: hf (the actor's gathered weights) or vllm (colocated engines on the actor's GPUs)."""
    vllm_num_engines: Optional[int] = None
    """vLLM engines (OpenRLHF's flag; implies --rollout_backend vllm): actor GPUs / --vllm_tensor_parallel_size."""
    vllm_tensor_parallel_size: int = 1
    """GPUs per vLLM engine."""
    vllm_gpu_memory_utilization: float = 0.5
    """Share of each GPU's memory vLLM takes (weights + KV cache)."""
    vllm_enable_sleep: bool = False
    """vLLM frees its memory while the models train (GPU only)."""
    critic_pretrain: Optional[str] = None
    """ppo: critic size or config (default: the reward model's, else --model)."""
    reward_pretrain: Optional[str] = None
    """ppo/grpo: reward model size or config (default: --model); 'none' for a reward function only."""
    placement: Annotated[PlacementConfig, Flat] = field(default_factory=PlacementConfig)
    search: bool = True
    """When it does not fit, search for flags that make it fit (--no-search to skip)."""

    @property
    def world(self) -> int:
        return self.num_gpus_per_node * self.num_nodes

    @property
    def dtype_bytes(self) -> int:
        return 2 if self.bf16 and self.device == "gpu" else 4

    @property
    def uses_vllm(self) -> bool:
        return self.rollout_backend == "vllm" or self.vllm_num_engines is not None

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

    def roles(self) -> list[str]:
        if self.trainer in ("sft", "rm"):
            return ["actor"]
        if self.trainer in ("dpo", "kto"):
            return ["actor"] if self.lora_rank else ["actor", "reference"]  # LoRA: the base with the adapter off is the reference
        roles = ["actor"] + (["critic"] if self.trainer == "ppo" else [])
        roles += [] if (self.reward_pretrain or "").lower() == "none" else ["reward"]
        roles += [] if self.lora_rank else ["reference"]
        return roles + ["rollout"]

    @property
    def is_split(self) -> bool:
        return self.trainer in ("ppo", "grpo") and self.placement.is_split

    def validate(self) -> None:
        if self.gpu_key() not in GPUS and self.gpu_memory_gb is None:
            raise UserError(f"--gpu {self.gpu}: unknown GPU type; use one of {', '.join(GPUS)} or give --gpu_memory_gb")
        for flag in ("num_gpus_per_node", "num_nodes", "micro_train_batch_size", "max_len", "prompt_max_len", "generate_max_len", "micro_rollout_batch_size", "vllm_tensor_parallel_size"):
            if getattr(self, flag) < 1:
                raise UserError(f"--{flag} must be >= 1, got {getattr(self, flag)}")
        if self.gpu_memory_gb is not None and self.gpu_memory_gb <= 0:
            raise UserError(f"--gpu_memory_gb must be > 0, got {self.gpu_memory_gb}")
        if self.lora_rank < 0:
            raise UserError(f"--lora_rank must be >= 0, got {self.lora_rank}")
        if self.load_in_4bit and self.lora_rank == 0:
            raise UserError("--load_in_4bit (QLoRA) needs --lora_rank > 0: a 4-bit base cannot be trained directly")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise UserError(f"--vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization}")
        load_shape(self.model)
        for flag in ("critic_pretrain", "reward_pretrain"):
            value = getattr(self, flag)
            if value is not None and value.lower() != "none":
                load_shape(value)
        if self.is_split:
            self.placement.validate()
            sizes = split_sizes(self)
            used = sum(sizes[group[0]] for group in gpu_groups(self))
            if used > self.world:
                raise UserError(f"split placement: the roles take {used} GPUs ({', '.join(f'{r} {n}' for r, n in sizes.items())}) but there are {self.world}")
        if self.uses_vllm:
            engines = self.actor_gpus // self.vllm_tensor_parallel_size
            if self.actor_gpus % self.vllm_tensor_parallel_size or self.vllm_tensor_parallel_size > self.num_gpus_per_node:
                raise UserError(f"--vllm_tensor_parallel_size {self.vllm_tensor_parallel_size} must divide the actor's {self.actor_gpus} GPUs and fit in a node of {self.num_gpus_per_node}")
            if self.vllm_num_engines is not None and self.vllm_num_engines != engines:
                raise UserError(f"--vllm_num_engines {self.vllm_num_engines}: the engines sit on the actor's GPUs, so it must be {self.actor_gpus} / --vllm_tensor_parallel_size {self.vllm_tensor_parallel_size} = {engines}")

    @property
    def actor_gpus(self) -> int:
        return split_sizes(self)["actor"] if self.is_split else self.world


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

    @property
    def fits(self) -> bool:
        cpu_ok = self.cfg.cpu_memory_gb is None or self.cpu_per_node <= self.cfg.cpu_memory_gb * GiB
        return all(g.fits for g in self.groups) and cpu_ok and not self.problems


def _trainable(cfg: PlanConfig, shape: ModelShape, dp: int, nodes: int) -> States:
    """States of a trainable role: all weights, or a frozen (maybe 4-bit) base + LoRA adapters."""
    w = cfg.dtype_bytes
    if not cfg.lora_rank:
        return model_states_bytes(shape.params, shape.largest_layer_params, zero_stage=cfg.zero_stage, dp=dp, num_nodes=nodes, offload_optimizer=cfg.adam_offload, dtype_bytes=w)
    lora = shape.lora_params(cfg.lora_rank)
    adapters = model_states_bytes(lora, 0, zero_stage=cfg.zero_stage, dp=dp, num_nodes=nodes, offload_optimizer=cfg.adam_offload, dtype_bytes=w)
    if cfg.load_in_4bit:  # the linear layers in NF4, the rest (embeddings, norms) in the model dtype
        base = States(weights=shape.linear_params * NF4_BYTES_PER_PARAM + (shape.params - shape.linear_params) * w)
    else:
        base = frozen_states_bytes(shape.params, shape.largest_layer_params, zero3=cfg.zero_stage == 3, dp=dp, num_nodes=nodes, dtype_bytes=w)
    return base + adapters


def plan(cfg: PlanConfig) -> Plan:
    """Every role's memory per GPU, the peak of each group of GPUs and the CPU memory per node."""
    shape = load_shape(cfg.model)
    w = cfg.dtype_bytes
    reward_shape = shape if cfg.reward_pretrain is None or cfg.reward_pretrain.lower() == "none" else load_shape(cfg.reward_pretrain)
    critic_shape = load_shape(cfg.critic_pretrain) if cfg.critic_pretrain else reward_shape
    roles = cfg.roles()
    sizes = split_sizes(cfg) if cfg.is_split else {r: cfg.world for r in roles}
    nodes = {r: max(1, -(-n // cfg.num_gpus_per_node)) for r, n in sizes.items()}
    rl = cfg.trainer in ("ppo", "grpo")
    seq = cfg.prompt_max_len + cfg.generate_max_len if rl else cfg.max_len
    pairs = 2 if cfg.trainer in ("rm", "dpo", "kto") else 1  # chosen + rejected (KTO: + its KL batch) in one forward
    batch = cfg.micro_train_batch_size * pairs
    score_batch = cfg.micro_rollout_batch_size if rl else batch
    ckpt = cfg.gradient_checkpointing
    out: list[RoleMemory] = []
    problems: list[str] = []
    for role in roles:
        n, nn = sizes[role], nodes[role]
        if role == "actor":
            states = _trainable(cfg, shape, n, nn)
            act = activation_bytes(shape, batch, seq, checkpointing=ckpt, dtype_bytes=w, lm_head=cfg.trainer != "rm")
            out.append(RoleMemory("policy" if cfg.trainer in ("dpo", "kto") else role, n, states, act))
        elif role == "critic":
            states = model_states_bytes(critic_shape.scorer_params, critic_shape.largest_layer_params, zero_stage=cfg.zero_stage, dp=n, num_nodes=nn, offload_optimizer=cfg.adam_offload, dtype_bytes=w)
            train = activation_bytes(critic_shape, cfg.micro_train_batch_size, seq, checkpointing=ckpt, dtype_bytes=w, lm_head=False)
            out.append(RoleMemory(role, n, states, train))
        elif role in ("reward", "reference"):
            s = reward_shape if role == "reward" else shape
            offload = cfg.placement.ref_reward_offload and rl
            params = s.params if role == "reference" else s.scorer_params
            states = frozen_states_bytes(params, s.largest_layer_params, zero3=cfg.zero_stage == 3, dp=n, num_nodes=nn, offload=offload, dtype_bytes=w)
            act = activation_bytes(s, score_batch, seq, checkpointing=False, dtype_bytes=w, lm_head=role == "reference", training=False)
            out.append(RoleMemory(role, n, states, act))
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
                    problems.append(f"vLLM needs {need / GiB:.1f} GiB per GPU (weights {weights / GiB:.1f} + KV {kv / GiB:.1f} + runtime {VLLM_RUNTIME_OVERHEAD / GiB:.0f}) but --vllm_gpu_memory_utilization {cfg.vllm_gpu_memory_utilization:g} gives it {reserved / GiB:.1f}")
                out.append(RoleMemory("rollout", n, States(weights=weights), 0.0, kv, reserved=reserved, resident=not cfg.vllm_enable_sleep, note=note))
            else:
                # HF generate on the actor's weights, gathered whole when ZeRO-3 partitions them.
                gathered = shape.params * w if cfg.zero_stage == 3 and not cfg.lora_rank else 0.0
                kv = kv_cache_bytes(shape, cfg.micro_rollout_batch_size * seq, w)
                logits = cfg.micro_rollout_batch_size * shape.vocab * 4 * 2  # one step's logits and probabilities
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
    return Plan(cfg, shape, out, groups, cpu, problems)


# ----------------------------------------------------------------------------------------------
# Search: the fewest, cheapest changes that make it fit


def _placements(cfg: PlanConfig) -> list[dict[str, Optional[int]]]:
    """Colocated, then splits of the job's GPUs among the model roles (powers of two per role,
    whole nodes for roles larger than a node), most GPUs to the actor first."""
    if cfg.trainer not in ("ppo", "grpo"):
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
    tensor parallelism, then the offloads), and the given placement before splits."""
    rl = cfg.trainer in ("ppo", "grpo")
    stages = sorted({cfg.zero_stage, 3}) if cfg.zero_stage >= 2 else [cfg.zero_stage, 2, 3]
    tps = [t for t in (1, 2, 4, 8) if t >= cfg.vllm_tensor_parallel_size and t <= cfg.num_gpus_per_node] if cfg.uses_vllm else [cfg.vllm_tensor_parallel_size]
    sleeps = sorted({cfg.vllm_enable_sleep, True}) if cfg.uses_vllm and cfg.device == "gpu" else [cfg.vllm_enable_sleep]
    out = []
    for stage, ckpt, tp, sleep, adam, rro in itertools.product(
        stages, sorted({cfg.gradient_checkpointing, True}), tps, sleeps, sorted({cfg.adam_offload, True}), sorted({cfg.placement.ref_reward_offload, True}) if rl else [cfg.placement.ref_reward_offload]
    ):
        for placement in _placements(cfg) if not cfg.is_split else [{}]:
            new = replace(cfg, zero_stage=stage, gradient_checkpointing=ckpt, vllm_tensor_parallel_size=tp, vllm_enable_sleep=sleep, adam_offload=adam)
            new = replace(new, placement=replace(cfg.placement, ref_reward_offload=rro, **(dict(placement, colocate_all_models=False) if placement else {})))
            if new.uses_vllm:
                new = replace(new, rollout_backend="vllm", vllm_num_engines=None)  # engines = actor GPUs / TP
            try:
                new.validate()
            except UserError:
                continue
            out.append((new, _flag_diff(cfg, new)))
    out.sort(key=lambda item: (sum(SEARCH_COST.get(f.split()[0][2:].replace("no-", ""), 4) for f in item[1]), len(item[1])))
    return out


# What a change costs in speed, roughly: the search prefers the cheapest set of changes.
SEARCH_COST = {"zero_stage": 1, "gradient_checkpointing": 1, "vllm_tensor_parallel_size": 1, "vllm_num_engines": 0, "vllm_enable_sleep": 1, "ref_reward_offload": 2, "adam_offload": 3}


def smaller_batches(cfg: PlanConfig) -> list[PlanConfig]:
    """The last resort of the search: halve the micro-batches (training, then scoring) down to 1."""
    out = []
    train, rollout = cfg.micro_train_batch_size, cfg.micro_rollout_batch_size
    while train > 1 or rollout > 1:
        train, rollout = max(1, train // 2), max(1, rollout // 2)
        out.append(replace(cfg, micro_train_batch_size=train, micro_rollout_batch_size=rollout))
    return out


def _flag_diff(old: PlanConfig, new: PlanConfig) -> list[str]:
    """The flags that turn ``old`` into ``new``, as a user adds them to the command line."""
    flags = []
    names = ["zero_stage", "gradient_checkpointing", "adam_offload", "placement.ref_reward_offload", "vllm_tensor_parallel_size", "vllm_enable_sleep", "micro_train_batch_size", "micro_rollout_batch_size"]
    names += [f"placement.{p}_num_{what}" for p in PlacementConfig.FLAG_PREFIX.values() for what in ("nodes", "gpus_per_node")]
    for name in names:
        section, name = (getattr(old, "placement"), name.split(".")[1]) if name.startswith("placement.") else (old, name)
        a = getattr(section, name)
        b = getattr(new.placement if section is old.placement else new, name)
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
    shape = load_shape(cfg.model)
    name = f"{cfg.model} ({shape.mirrors}, {shape.params / 1e9:.2f}B params)" if shape.mirrors else cfg.model
    where = f"{cfg.num_nodes} x {cfg.num_gpus_per_node} {cfg.gpu_key()}" if cfg.device == "gpu" else f"{cfg.num_nodes} x {cfg.num_gpus_per_node} CPU ranks"
    precision = "bf16" if cfg.dtype_bytes == 2 else "fp32"
    opts = [f"ZeRO-{cfg.zero_stage}"] + [o for o, on in (("adam offload", cfg.adam_offload), ("ref/reward offload", cfg.placement.ref_reward_offload), ("grad ckpt", cfg.gradient_checkpointing), (f"LoRA r{cfg.lora_rank}", cfg.lora_rank), ("4-bit", cfg.load_in_4bit)) if on]
    if cfg.uses_vllm:
        opts.append(f"vLLM TP{cfg.vllm_tensor_parallel_size} x{cfg.vllm_gpu_memory_utilization:g}" + (" sleep" if cfg.vllm_enable_sleep else ""))
    return f"{cfg.trainer}: {name} on {where} ({cfg.gpu_bytes() / GiB:.0f} GiB each), {precision}, {', '.join(opts)}, {'split' if cfg.is_split else 'colocated'}"


def render(p: Plan) -> str:
    lines = [describe(p.cfg), "", f"{'role':<10} {'GPUs':>4} {'weights':>7} {'grads':>7} {'optim':>7} {'activ':>7} {'KV':>7} {'total':>7}  GiB per GPU"]
    for m in p.roles:
        lines.append(f"{m.role:<10} {m.gpus:>4} {_gib(m.states.weights)} {_gib(m.states.grads)} {_gib(m.states.optimizer)} {_gib(m.activations)} {_gib(m.kv_cache)} {_gib(m.total)}  {m.note}".rstrip())
    lines.append("")
    for g in p.groups:
        verdict = "fits" if g.fits else "DOES NOT FIT"
        lines.append(f"GPUs of {'+'.join(g.roles)} ({g.gpus}): peak {g.peak / GiB:.1f} GiB of {g.capacity / GiB:.0f} GiB: {verdict}")
    cpu_limit = f" of {p.cfg.cpu_memory_gb:g} GiB" if p.cfg.cpu_memory_gb is not None else ""
    lines.append(f"CPU memory per node for offloaded states: {p.cpu_per_node / GiB:.1f} GiB{cpu_limit} (DeepSpeed advises 1.5x this)")
    lines += [f"problem: {x}" for x in p.problems]
    lines.append("verdict: fits" if p.fits else "verdict: does not fit")
    return "\n".join(lines)


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> None:
    from rlhf.config import parse_config

    cfg = parse_config(PlanConfig, argv, prog="python -m rlhf.plan")
    p = plan(cfg)
    print(render(p))
    if p.fits or not cfg.search:
        return
    found = suggest(cfg)
    if found is None:
        print("\nno configuration in the search space fits (ZeRO-3, checkpointing, offloads, placements, vLLM TP and sleep, micro-batches down to 1): more or larger GPUs, LoRA, or shorter sequences")
        return
    better, flags = found
    print(f"\nsuggested: add {' '.join(flags)}\n")
    print(render(better))


if __name__ == "__main__":
    main()
