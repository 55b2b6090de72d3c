"""The trainable-model engine: the one interface algorithm code sees, DeepSpeed underneath.

Every trainable role (SFT/DPO/KTO policy, reward model, PPO actor and critic) is a
``TrainEngine``: ``forward``, ``backward(loss)``, ``step()``, ``save``/``load`` and an HF export
that gathers ZeRO-3 shards. The DeepSpeed config is generated from ``TrainConfig`` (ZeRO stage,
CPU Adam offload, bf16, clipping, accumulation) and can be amended with ``--ds_config``.

Loss scaling contract. DeepSpeed divides each micro-batch loss by the accumulation steps and
averages gradients over data-parallel ranks. Trainers that want the exact mean over every
token of the global batch pass ``loss_sum / global_tokens * grad_scale`` where
``grad_scale = dp_size * accumulation_steps`` (see ``grad_scale``); the product of the two
DeepSpeed divisions then cancels and the update does not depend on how the batch was sharded.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Any, Optional

import deepspeed
import torch
import torch.distributed as dist

from rlhf.config import TrainConfig
from rlhf.engines.lr_schedule import make_lr_scheduler
from rlhf.engines.subgroups import SlotParallel
from rlhf.errors import UserError


def build_ds_config(
    cfg: TrainConfig,
    *,
    bf16: bool,
    dp_size: int,
    accumulation_steps: int,
    frozen: bool = False,
    zero_stage: Optional[int] = None,
) -> dict[str, Any]:
    """The DeepSpeed config for one engine, from our flags (then ``--ds_config`` merged over);
    ``zero_stage`` overrides --zero_stage (see ``effective_zero_stage``)."""
    zero: dict[str, Any] = {
        "stage": cfg.zero_stage if zero_stage is None else zero_stage,
        "reduce_bucket_size": 5e7,
        "stage3_param_persistence_threshold": 1e4,
        "stage3_max_live_parameters": 1e9,
        "stage3_prefetch_bucket_size": 5e7,
    }
    if cfg.adam_offload and not frozen:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_train_batch_size,
        "gradient_accumulation_steps": accumulation_steps,
        "train_batch_size": cfg.micro_train_batch_size * accumulation_steps * dp_size,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "gradient_clipping": cfg.max_norm,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # Our checkpoint tag is the constant "engine"; validating it costs world all-reduces,
        # which engines on a process subgroup cannot make (see engines/subgroups.py).
        "checkpoint": {"tag_validation": "IGNORE"},
    }
    if bf16:
        # Accumulate gradients in fp32 so many micro-batches do not lose precision.
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if cfg.ds_config:
        config = _deep_merge(config, _load_ds_override(cfg.ds_config))
    return config


def effective_zero_stage(stage: int, *, world_size: int, bf16: bool, adam_offload: bool) -> int:
    """The ZeRO stage a training engine is built with.

    Stages 1 and 2 partition the optimizer state and gradients over the data-parallel ranks. In
    a job of one process they partition nothing, yet still copy every gradient into reduction
    buckets, run a reduction epilogue and keep a second fp32 copy of the weights for the
    optimizer (profiled on the GRPO benchmark: about a tenth of the training phase, and 2 s of
    start-up). There the engine is built as stage 0: the same AdamW update, without the copies.
    Kept as asked: stage 3 (its gathered-parameter API is what generation and weight sync use),
    --adam_offload (offloading needs ZeRO), bf16 (DeepSpeed keeps bf16's fp32 master weights in
    the ZeRO optimizer), and any engine in a job of more processes: a ZeRO-0 engine averages its
    gradients over DeepSpeed's process-global groups, which in a split placement belong to
    another engine (DESIGN.md).
    """
    one_process = world_size == 1
    return 0 if one_process and stage in (1, 2) and not bf16 and not adam_offload else stage


def _load_ds_override(text_or_path: str) -> dict[str, Any]:
    source = text_or_path
    if os.path.isfile(text_or_path):
        with open(text_or_path) as f:
            source = f.read()
    try:
        value = json.loads(source)
    except json.JSONDecodeError as err:
        raise UserError(f"--ds_config: not a JSON object or a JSON file ({err.msg} at char {err.pos})") from None
    if not isinstance(value, dict):
        raise UserError("--ds_config: must be a JSON object")
    return value


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases and norm weights (1-D) are not decayed."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # DeepSpeed drops empty groups (LoRA has no 1-D trainable tensors), which would leave the
    # LR scheduler with more groups than the optimizer.
    return [g for g in groups if g["params"]]


def _make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = _optimizer_groups(model, cfg.l2)
    if cfg.adam_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.learning_rate, betas=cfg.adam_betas, adamw_mode=True)
    if torch.cuda.is_available():
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, lr=cfg.learning_rate, betas=cfg.adam_betas, adam_w_mode=True)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=cfg.adam_betas)


class TrainEngine:
    """A model being trained: forward, backward, step, checkpoint, export."""

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: TrainConfig,
        *,
        bf16: bool,
        total_steps: int,
        dp_size: int,
        mpu: Optional[SlotParallel] = None,
    ):
        self.cfg = cfg
        self.dp_size = dp_size
        self.group = mpu.get_data_parallel_group() if mpu is not None else None  # None: the world
        self.accumulation_steps = cfg.grad_accumulation_steps(dp_size)
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        stage = effective_zero_stage(cfg.zero_stage, world_size=world_size, bf16=bf16, adam_offload=cfg.adam_offload)
        self.ds_config = build_ds_config(cfg, bf16=bf16, dp_size=dp_size, accumulation_steps=self.accumulation_steps, zero_stage=stage)
        self.zero_stage = self.ds_config["zero_optimization"]["stage"]  # --ds_config has the last word
        optimizer = _make_optimizer(model, cfg)
        scheduler = make_lr_scheduler(
            optimizer, cfg.lr_scheduler, warmup_steps=math.ceil(total_steps * cfg.lr_warmup_ratio), total_steps=total_steps
        )
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self.ds_config,
            mpu=mpu,
            dist_init_required=False,
        )

    # ---- training ---------------------------------------------------------------------------

    @property
    def module(self) -> torch.nn.Module:
        """The wrapped model (a PeftModel with LoRA), without the DeepSpeed engine."""
        return self.engine.module

    @property
    def grad_scale(self) -> int:
        """Factor that undoes DeepSpeed's mean over accumulation steps and data-parallel ranks."""
        return self.dp_size * self.accumulation_steps

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def set_accumulation_boundary(self, last: bool) -> None:
        """Say before a micro-batch's forward whether it is the last of its optimizer step.

        For loops whose number of micro-batches varies from step to step (token-budget micro-
        batches): DeepSpeed's own counter assumes ``gradient_accumulation_steps`` per step, fixed
        when the engine is built. The loss scale does not change (``grad_scale`` undoes a constant
        division, whatever the count); every rank of the engine must run the same count."""
        self.engine.set_gradient_accumulation_boundary(last)

    def step(self) -> None:
        """Optimizer + scheduler step at the accumulation boundary; a no-op in between."""
        if self.zero_stage == 0 and self.engine.is_gradient_accumulation_boundary():
            # DeepSpeed clips ZeRO-0 fp32 gradients but discards the norm; measure it first
            # (gradients are already averaged over data-parallel ranks at the boundary).
            norms = [p.grad.detach().float().norm() for p in self.module.parameters() if p.grad is not None]
            self._zero0_grad_norm = torch.stack(norms).norm().item() if norms else 0.0
        self.engine.step()

    @property
    def global_step(self) -> int:
        return self.engine.global_steps

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    @property
    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            norm = getattr(self, "_zero0_grad_norm", None)
        return float(norm) if norm is not None else float("nan")

    # ---- checkpoints ------------------------------------------------------------------------

    def save(self, folder: str) -> None:
        """Engine, optimizer and LR schedule into ``folder`` (collective over the engine's ranks)."""
        # DeepSpeed creates the folder on global rank 0 only; an engine may not include it.
        os.makedirs(os.path.join(folder, "engine"), exist_ok=True)
        self.engine.save_checkpoint(folder, tag="engine", save_latest=False)

    def load(self, folder: str) -> None:
        path, _ = self.engine.load_checkpoint(folder, tag="engine", load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise UserError(f"checkpoint {folder}: no engine state found")

    # ---- generation -------------------------------------------------------------------------

    @contextlib.contextmanager
    def unpartitioned(self):
        """Full weights on every rank of the engine, ZeRO-3's hooks off, for generation.

        One all-gather up front; inside, forwards are plain module calls with no collective, so
        ranks may decode different numbers of tokens and no ``synced_gpus`` is needed (its
        all-reduce spans the world, wrong on a subgroup), and decoding runs at unsharded speed
        instead of re-gathering every layer per token. Weights are read only: nothing is written
        back. A no-op below ZeRO-3, where every rank already holds the full weights.
        """
        if self.cfg.zero_stage != 3:
            yield
            return
        offload = self.engine.optimizer.parameter_offload
        with deepspeed.zero.GatheredParameters(list(self.module.parameters())):
            offload._remove_module_hooks()
            try:
                yield
            finally:
                offload.setup_zero_stage3_hooks()  # re-registers; the forward trace re-records

    # ---- export -----------------------------------------------------------------------------

    def gathered_state_dict(self, keep: bool = True) -> dict[str, torch.Tensor]:
        """Full parameters and buffers on CPU (ZeRO-3 shards gathered one at a time).

        Collective over the engine's ranks; only ranks with ``keep`` hold the copy, so an
        export does not put a whole model in every rank's memory.
        """
        state: dict[str, torch.Tensor] = {}
        for name, param in self.module.named_parameters():
            if hasattr(param, "ds_id"):  # a ZeRO-3 partitioned parameter
                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    if keep:
                        state[name] = param.detach().cpu().clone()
            elif keep:
                state[name] = param.detach().cpu().clone()
        if keep:
            for module_name, module in self.module.named_modules():
                for buf_name, buf in module.named_buffers(recurse=False):
                    # Non-persistent buffers (rotary tables) are rebuilt on load, not saved.
                    if buf is not None and buf_name not in module._non_persistent_buffers_set:
                        state[f"{module_name}.{buf_name}" if module_name else buf_name] = buf.detach().cpu().clone()
        return state
