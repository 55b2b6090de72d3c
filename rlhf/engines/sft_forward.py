"""The SFT micro-batch forward: model inputs of a micro-batch of ``Sample``s, the summed NLL of
its target tokens, and the target-token count that normalises it.

Used by ``rlhf.sft`` and by the fine-tuning rounds of ``rlhf.rejection_sampling``. The loss of a
step is ``sum of forward_nll over its micro-batches / target_tokens of the global step``, so it
does not depend on sharding or packing.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from rlhf.algos.losses import sft_nll_sum
from rlhf.data.sft import Sample, collate_packed, collate_padded
from rlhf.distributed.env import device
from rlhf.engines.train_engine import TrainEngine


def batch_tensors(samples: list[Sample], pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """Model inputs for one micro-batch: padded [B, T] or one packed row [1, sum T]."""
    batch = collate_packed(samples, pad_id) if packed else collate_padded(samples, pad_id)
    batch.pop("sample_ids", None)
    return {k: v.to(device()) for k, v in batch.items()}


def forward_nll(engine: TrainEngine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Summed NLL of the batch's target tokens, and the MoE router loss if the model has one."""
    loss_mask = batch.pop("loss_mask")
    out = engine(**batch, use_cache=False)
    return sft_nll_sum(out.logits, batch["input_ids"], loss_mask), getattr(out, "aux_loss", None)


def target_tokens(samples: Sequence[Sample]) -> int:
    return sum(sum(s.loss_mask) for s in samples)
