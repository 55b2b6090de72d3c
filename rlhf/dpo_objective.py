"""DPO's objective on a batch of preference pairs, and its held-out evaluation.

Used by ``rlhf.dpo`` (training and eval) and by ``rlhf.kto`` (``--eval_pairs``: the implicit
reward beta * (log pi - log ref) of KTO is DPO's, so the same evaluation scores its pairs).
Log-probs are the summed response log-probs [2B] of ``rlhf.engines.reference.pair_logprobs``:
chosen 0..B-1, then rejected B..2B-1.
"""

from __future__ import annotations

from typing import Callable

import torch

from rlhf.algos.preference import dpo_loss
from rlhf.config import DPOConfig
from rlhf.data.batching import shard_for_eval
from rlhf.data.preference import PairSample
from rlhf.distributed.collectives import all_reduce_sums
from rlhf.engines.reference import pair_logprobs
from rlhf.engines.train_engine import TrainEngine

# (split "train" | "eval", pair indices, those pairs) -> reference log-probs [2B], constants
Reference = Callable[[str, list, list], torch.Tensor]


def dpo_objective(
    cfg: DPOConfig, policy_logp: torch.Tensor, ref_logp: torch.Tensor, pairs: list[PairSample]
) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed loss over the pairs (normaliser 1) and metric sums; log-probs [2B] as above."""
    n = len(pairs)
    loss_sum, chosen_r, rejected_r = dpo_loss(
        policy_logp[:n], policy_logp[n:], ref_logp[:n], ref_logp[n:], cfg.beta, cfg.loss_type, cfg.label_smoothing, normaliser=1.0
    )
    metrics = {
        "acc": (chosen_r > rejected_r).float().sum().item(),
        "margin": (chosen_r - rejected_r).sum().item(),
        "chosen_reward": chosen_r.sum().item(),
        "rejected_reward": rejected_r.sum().item(),
        "chosen_logp": policy_logp[:n].detach().sum().item(),
        "rejected_logp": policy_logp[n:].detach().sum().item(),
    }
    if cfg.nll_loss_coef > 0:
        tokens = torch.tensor([sum(p.chosen.loss_mask) for p in pairs], dtype=torch.float32, device=policy_logp.device)  # [B], >= 1
        nll_sum = (-policy_logp[:n] / tokens).sum()  # per-token NLL of each chosen response, summed over pairs
        loss_sum = loss_sum + cfg.nll_loss_coef * nll_sum
        metrics["nll"] = nll_sum.item()
    metrics["loss"] = loss_sum.item()
    return loss_sum, metrics


@torch.no_grad()
def evaluate_dpo_pairs(
    engine: TrainEngine, pairs: list[PairSample], reference: Reference, cfg: DPOConfig, pad_id: int, rank: int, dp: int
) -> dict[str, float]:
    """Held-out DPO loss, implicit-reward accuracy and margin, mean rewards (all ranks take part)."""
    micro = cfg.train.micro_eval_batch_size or cfg.train.micro_train_batch_size
    keys = ("loss", "acc", "margin", "chosen_reward", "rejected_reward")
    sums = dict.fromkeys(keys + ("pairs",), 0.0)
    for indices in shard_for_eval(len(pairs), micro, dp)[rank]:
        scored = indices or [0]  # empty: still run the forwards, keeping ZeRO-3 collectives in step
        batch = [pairs[i] for i in scored]
        ref_logp = reference("eval", scored, batch)
        policy_logp = pair_logprobs(engine, batch, pad_id, cfg.data.packing_samples)
        if not indices:
            continue
        _, metrics = dpo_objective(cfg, policy_logp, ref_logp, batch)
        for key in keys:
            sums[key] += metrics[key]
        sums["pairs"] += len(indices)
    totals = all_reduce_sums(sums)
    return {k: totals[k] / max(totals["pairs"], 1.0) for k in keys}
