"""The reference policy of DPO and KTO: how it is loaded, and the summed response log-probs
that both trainers take from it and from the policy.

The reference is one of (``load_reference``):

* a frozen copy of ``--ref_pretrain`` (default ``--pretrain``) on the same ranks
  (``FrozenEngine``: ZeRO-3 when the policy is ZeRO-3, else ZeRO-0);
* with LoRA (``--lora_rank > 0``) and no ``--ref_pretrain``: the policy itself with its adapter
  switched off (``adapter_off``), which is exactly the frozen base; no second model is loaded.

A ``Forward`` is anything called with model inputs that returns a Hugging Face output with
``.logits`` and whose ``.module`` is the model: the policy's ``TrainEngine``, a ``FrozenEngine``,
or ``adapter_off``. Log-probs are summed over the response tokens (the loss mask) of each
sequence, taken without the [B, T, V] logits where the model allows it (``rlhf.engines.logprobs``).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.distributed as dist

from rlhf.algos.losses import per_sample_nll
from rlhf.config import DPOConfig, KTOConfig, loads_reference
from rlhf.data.batching import shard_for_eval
from rlhf.data.preference import PairSample, collate_pairs, collate_pairs_packed
from rlhf.data.sft import Sample, collate_packed, collate_padded
from rlhf.distributed.env import device
from rlhf.engines.frozen_engine import FrozenEngine
from rlhf.engines.logprobs import lm_logprobs
from rlhf.engines.train_engine import TrainEngine
from rlhf.models.loading import frozen_model_config, load_causal_lm

Forward = Any  # called with model inputs -> HF output with .logits; its .module is the model


def pair_logprobs(forward: Forward, pairs: list[PairSample], pad_id: int, packed: bool) -> torch.Tensor:
    """Summed response log-probs [2B] from one forward: chosen 0..B-1, then rejected B..2B-1."""
    if packed:
        return _packed_sums(forward, collate_pairs_packed(pairs, pad_id), 2 * len(pairs))
    return _padded_sums(forward, collate_pairs(pairs, pad_id))


def sample_logprobs(forward: Forward, samples: list[Sample], pad_id: int, packed: bool) -> torch.Tensor:
    """Summed completion log-probs [N] of the samples, from one forward (padded or packed)."""
    if packed:
        return _packed_sums(forward, collate_packed(samples, pad_id), len(samples))
    return _padded_sums(forward, collate_padded(samples, pad_id))


def _padded_sums(forward: Forward, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Padded batch [N, T] -> summed log-probs of each row's loss-mask tokens [N]."""
    batch = {k: v.to(device()) for k, v in batch.items()}
    logp = lm_logprobs(forward, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}).logp  # [N, T-1]
    return (logp * batch["loss_mask"][:, 1:].to(logp.dtype)).sum(-1)


def _packed_sums(forward: Forward, batch: dict[str, torch.Tensor], num_samples: int) -> torch.Tensor:
    """One packed row [1, T] -> summed log-probs of each sample's loss-mask tokens [num_samples]."""
    batch = {k: v.to(device()) for k, v in batch.items()}
    logp = lm_logprobs(forward, {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}).logp  # [1, T-1]
    return -per_sample_nll(logp, batch["loss_mask"], batch["sample_ids"], num_samples)


class adapter_off:
    """The LoRA policy with its adapter disabled: the frozen base model, without a copy."""

    def __init__(self, engine: TrainEngine):
        self.engine = engine

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def __call__(self, **inputs):
        module = self.engine.module
        was_training = module.training
        module.eval()  # a reference never drops out
        try:
            with torch.no_grad(), module.disable_adapter():
                return self.engine(**inputs)
        finally:
            module.train(was_training)


def load_reference(cfg: Union[DPOConfig, KTOConfig], engine: TrainEngine, dp: int) -> tuple[Forward, Optional[FrozenEngine], int]:
    """(reference forward, its FrozenEngine or None, parameters of a separately loaded reference)."""
    if not loads_reference(cfg):
        return adapter_off(engine), None, 0
    # The reference is a plain full-precision-layout copy: no adapter, no 4-bit, no checkpointing.
    ref_cfg = frozen_model_config(cfg.model, cfg.ref_pretrain)
    model = load_causal_lm(ref_cfg, flag="--ref_pretrain" if cfg.ref_pretrain else "--pretrain")
    params = sum(p.numel() for p in model.parameters())
    ref = FrozenEngine(model, cfg.train, bf16=cfg.model.bf16, dp_size=dp, offload=cfg.ref_offload)
    return ref, ref, params


@torch.no_grad()
def precompute_reference(
    forward: Forward, pairs: list[PairSample], micro: int, pad_id: int, packed: bool, rank: int, dp: int
) -> torch.Tensor:
    """Reference log-probs [N, 2] (chosen, rejected) of every pair, identical on every rank.

    Each rank scores its shard in micro-batches (``shard_for_eval``: the same number of forwards
    on every rank, so ZeRO-3 gathers stay in step); one all-reduce SUM of the zero-filled table
    then acts as an all-gather, since each row is written by exactly one rank and adding zeros
    is exact.
    """
    table = torch.zeros(len(pairs), 2, dtype=torch.float64, device=device())
    for indices in shard_for_eval(len(pairs), micro, dp)[rank]:
        logp = pair_logprobs(forward, [pairs[i] for i in indices] or [pairs[0]], pad_id, packed)  # [2B]
        if indices:
            n = len(indices)
            table[indices] = torch.stack([logp[:n], logp[n:]], dim=1).double()
    dist.all_reduce(table)
    return table.float()  # fp32, as the on-the-fly reference returns them
