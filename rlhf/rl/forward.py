"""Forward passes of the RL roles over padded batches of samples.

Per-token tensors are [B, T-1]: entry t-1 belongs to token t (the log-prob of token t, or the
value of the state before it is generated).
"""

from __future__ import annotations

from typing import Optional

import torch

from rlhf.data.sft import Sample, collate_padded
from rlhf.distributed.env import device
from rlhf.engines.logprobs import lm_logprobs


def policy_logp(
    model, batch: dict[str, torch.Tensor], temperature: float, with_entropy: bool = False, entropy_grad: bool = False
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-probs [B, T-1] of the batch's tokens under softmax(logits / temperature), and with
    ``with_entropy`` that distribution's entropy [B, T-1] (a metric without a graph unless
    ``entropy_grad``), else None. No [B, T, V] logits are kept where the model allows it
    (``rlhf.engines.logprobs``).

    Rollouts sample from softmax(logits / T), so the behaviour, actor and reference log-probs of a
    PPO step must all be taken at that same T: the ratio, the KL and the gap to vLLM's log-probs
    then compare the distribution that was actually sampled (OpenRLHF and TRL scale the same way).
    """
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    out = lm_logprobs(model, inputs, temperature, with_entropy, entropy_grad)
    return out.logp, out.entropy


def token_values(critic, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Critic values [B, T-1]: the scalar head on every hidden state; entry t-1 values the state
    before token t is generated (so it lines up with the log-prob of token t)."""
    model = critic.module
    base = getattr(model, "get_base_model", lambda: model)()
    hidden = critic(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True).hidden_states[-1]
    return base.score(hidden).squeeze(-1)[:, :-1].float()


def in_micro_batches(batch: dict[str, torch.Tensor], size: int):
    """(row slice, micro-batch) pairs of ``size`` rows each over a padded batch."""
    n = batch["input_ids"].size(0)
    for start in range(0, n, size):
        yield slice(start, start + size), {k: v[start : start + size] for k, v in batch.items()}


def to_batch(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Samples -> input_ids, attention_mask, loss_mask [B, T] on the device, right-padded."""
    return {k: v.to(device()) for k, v in collate_padded(samples, pad_id).items()}


@torch.no_grad()
def per_token_rows(fn, samples: list[Sample], pad_id: int, micro: int) -> list[torch.Tensor]:
    """``fn(micro_batch) -> [b, T-1]`` over ``samples``, cut back to one CPU row per sample
    (length len(sample) - 1), so rows can travel between ranks whose batches pad differently."""
    if not samples:
        return []
    rows = []
    for _, mb in in_micro_batches(to_batch(samples, pad_id), micro):
        out = fn(mb).float().cpu()  # [b, T-1]
        lengths = mb["attention_mask"].sum(-1).tolist()
        rows += [out[i, : n - 1] for i, n in enumerate(lengths)]
    return rows


def padded(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """Rows of different lengths -> [B, width] on the device, zero after each row."""
    out = torch.zeros(len(rows), width)
    for i, row in enumerate(rows):
        out[i, : row.numel()] = row
    return out.to(device())
