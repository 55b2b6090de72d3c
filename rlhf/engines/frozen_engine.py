"""The frozen-model engine: a reference policy or a reward model that is only ever run forward.

    ref = FrozenEngine(load_causal_lm(ref_model_cfg), cfg.train, bf16=cfg.model.bf16, dp_size=dp)
    logits = ref(input_ids=ids, attention_mask=mask).logits  # [B, T, V], no autograd graph

DeepSpeed builds it without an optimizer. Frozen engines must be ZeRO stage 0 or 3 (stages 1
and 2 shard optimizer state and gradients, which a frozen model does not have; DeepSpeed refuses
them without an optimizer), so the stage is 3 when the trainer runs ZeRO-3 (then the frozen
weights are partitioned like the policy's, and every forward is a collective over the ranks),
and 0 otherwise (a full replica per rank). With ``offload`` (PPO's ``--ref_reward_offload``) it is
ZeRO-3 with the parameters kept in CPU memory and fetched for each forward. The rest of the DeepSpeed config comes from the same
``build_ds_config`` as the trainable engine, so ``--ds_config`` overrides (e.g. the ZeRO-3
gathering knobs) apply to both.
"""

from __future__ import annotations

from typing import Optional

import deepspeed
import torch

from rlhf.config import TrainConfig
from rlhf.engines.subgroups import SlotParallel
from rlhf.engines.train_engine import build_ds_config


class FrozenEngine:
    """A model in eval mode with no gradients: ``forward(**model_inputs)`` only."""

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: TrainConfig,
        *,
        bf16: bool,
        dp_size: int,
        mpu: Optional[SlotParallel] = None,
        offload: bool = False,
    ):
        model.requires_grad_(False)
        model.eval()
        config = build_ds_config(cfg, bf16=bf16, dp_size=dp_size, accumulation_steps=cfg.grad_accumulation_steps(dp_size), frozen=True)
        config["zero_optimization"]["stage"] = 3 if cfg.zero_stage == 3 or offload else 0
        if offload:  # parameter offload exists only in ZeRO-3: weights live on the CPU, fetched per forward
            config["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        self.ds_config = config
        self.engine, *_ = deepspeed.initialize(model=model, config=config, mpu=mpu, dist_init_required=False)
        self.engine.eval()

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @torch.no_grad()
    def forward(self, **model_inputs):
        """The wrapped model's output (``.logits`` [B, T, V] for an LM, [B, 1] for a scorer)."""
        return self.engine(**model_inputs)

    __call__ = forward

    def release(self) -> None:
        """Drop the model (e.g. after precomputing reference log-probs). ZeRO-3 hooks hold
        references to the module, so they are removed first (``destroy``) or nothing is freed."""
        self.engine.destroy()
        del self.engine
