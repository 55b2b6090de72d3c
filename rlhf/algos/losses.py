"""Loss math as pure functions over tensors (no process groups in here).

Conventions: ``logits`` [B, T, V]; ``input_ids`` and masks [B, T]; a target mask marks tokens
predicted from the tokens before them, so position 0 is never a target. Log-probabilities are
computed in fp32. Normalisers (tokens of the global batch) are arguments, never counted here,
so a loss summed over data-parallel shards equals the loss of the whole batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(input_ids[:, t] | input_ids[:, :t]) for t >= 1.

    logits [B, T, V], input_ids [B, T] -> [B, T - 1] (fp32); entry t-1 scores token t.
    """
    logits = logits[:, :-1].float()  # [B, T-1, V]; the last position predicts nothing we have
    targets = input_ids[:, 1:]  # [B, T-1]
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    return -nll.view_as(targets)


def sft_nll_sum(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of the target tokens.

    logits [B, T, V], input_ids [B, T], loss_mask [B, T] (1 = target) -> scalar (fp32).
    """
    logp = next_token_logprobs(logits, input_ids)  # [B, T-1]
    return -(logp * loss_mask[:, 1:].to(logp.dtype)).sum()


def per_sample_nll(logp: torch.Tensor, loss_mask: torch.Tensor, sample_ids: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Summed NLL per sample of a packed row.

    logp [1, T-1] from ``next_token_logprobs``, loss_mask and sample_ids [1, T] -> [num_samples].
    """
    target = loss_mask[:, 1:].to(logp.dtype)  # [1, T-1]
    owner = sample_ids[:, 1:].clamp(min=0)  # [1, T-1]; padding (-1) has target 0 anyway
    return torch.zeros(num_samples, dtype=logp.dtype, device=logp.device).index_add_(0, owner.reshape(-1), (-logp * target).reshape(-1))
