"""Forward passes of the RL roles over micro-batches of samples, padded or packed.

Per-token tensors are [B, T-1]: entry t-1 belongs to token t (the log-prob of token t, or the
value of the state before it is generated). A packed micro-batch is one row [1, S] of its samples
back to back (S = the sum of their lengths), position ids restarting at each sample so that
attention stays within it (``rlhf.data.sft.collate_packed``); its per-token tensors are [1, S-1],
and the entry where one sample's last token faces the next sample's first is 0 and masked out.
Masked sums over either layout are the same, so losses do not depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from rlhf.data.batching import split_by_token_budget, split_to_count
from rlhf.data.sft import Sample, collate_padded
from rlhf.distributed.collectives import all_reduce_max
from rlhf.distributed.env import device
from rlhf.engines.logprobs import lm_logprobs


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model reads of a micro-batch: ids and attention mask when padded; ids and position
    ids when packed, with no mask, so transformers builds the block-diagonal causal mask from the
    restarting positions (as SFT's packing does)."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


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
    out = lm_logprobs(model, model_inputs(batch), temperature, with_entropy, entropy_grad)
    return out.logp, out.entropy


def token_values(critic, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Critic values [B, T-1]: the scalar head on every hidden state; entry t-1 values the state
    before token t is generated (so it lines up with the log-prob of token t)."""
    model = critic.module
    base = getattr(model, "get_base_model", lambda: model)()
    hidden = critic(**model_inputs(batch), output_hidden_states=True).hidden_states[-1]
    return base.score(hidden).squeeze(-1)[:, :-1].float()


def to_batch(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Samples -> input_ids, attention_mask, loss_mask [B, T] on the device, right-padded."""
    return {k: v.to(device()) for k, v in collate_padded(samples, pad_id).items()}


def sample_rows(tensors: dict[str, Optional[torch.Tensor]], lengths: Sequence[int]) -> list[dict[str, torch.Tensor]]:
    """Padded per-sample tensors -> one dict per sample of its rows cut to its length:
    ``input_ids`` [B, T] -> [len], every other (per-token) tensor [B, T-1] -> [len - 1]. None
    entries are left out. Rows are views; ``collate_rows`` builds micro-batches from them."""
    return [{k: v[i, : n if k == "input_ids" else n - 1] for k, v in tensors.items() if v is not None} for i, n in enumerate(lengths)]


def collate_rows(rows: list[dict[str, torch.Tensor]], pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """Rows of samples (``sample_rows``) -> one micro-batch on the device.

    Padded: ``input_ids`` and ``attention_mask`` [b, T] (T = the longest row), per-token tensors
    [b, T-1], zero after each row. Packed: ``input_ids`` and ``position_ids`` [1, S] (S = the sum
    of the lengths), per-token tensors [1, S-1] with a 0 between samples (module docstring).
    """
    lengths = [r["input_ids"].numel() for r in rows]
    out: dict[str, torch.Tensor] = {}
    if packed:
        out["input_ids"] = torch.cat([r["input_ids"] for r in rows]).unsqueeze(0)  # [1, S]
        out["position_ids"] = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)  # [1, S]
        for key in rows[0]:
            if key != "input_ids":
                parts = [torch.cat([r[key], r[key].new_zeros(1)]) for r in rows]  # each sample's row, then the boundary entry
                out[key] = torch.cat(parts)[:-1].unsqueeze(0)  # [1, S-1]
    else:
        width = max(lengths)
        out["input_ids"] = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [b, T]
        out["attention_mask"] = torch.zeros((len(rows), width), dtype=torch.long)  # [b, T]
        for key in rows[0]:
            if key != "input_ids":
                out[key] = rows[0][key].new_zeros((len(rows), width - 1))  # [b, T-1]
        for b, (r, n) in enumerate(zip(rows, lengths)):
            out["attention_mask"][b, :n] = 1
            for key, row in r.items():
                out[key][b, : row.numel()] = row
    return {k: v.to(device()) for k, v in out.items()}


def split_rows(out: torch.Tensor, lengths: Sequence[int], packed: bool) -> list[torch.Tensor]:
    """A micro-batch's per-token output ([b, T-1] padded, [1, S-1] packed) -> one row per sample
    (length len - 1), the inverse of ``collate_rows``."""
    if not packed:
        return [out[i, : n - 1] for i, n in enumerate(lengths)]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    return [out[0, s : s + n - 1] for s, n in zip(starts, lengths)]


@dataclass(frozen=True)
class MicroBatching:
    """How a rank cuts its samples into forward micro-batches: ``size`` samples each, or, with
    ``max_tokens`` (--use_dynamic_batch), by a token budget, the count evened out over the ranks
    of ``group`` (ZeRO-3 forwards are collective); ``packed``: each micro-batch one row."""

    size: int
    max_tokens: Optional[int] = None
    packed: bool = False
    group: Any = None

    @classmethod
    def for_scoring(cls, cfg, group, packable: bool = True) -> "MicroBatching":
        """The experience phase's forwards (behaviour, reference, critic, reward) of a PPOConfig:
        --micro_rollout_batch_size, or --rollout_max_tokens_per_gpu tokens with --use_dynamic_batch;
        packed with --packing_samples where the model allows (``packable``)."""
        budget = cfg.train.rollout_max_tokens_per_gpu or cfg.train.train_max_tokens_per_gpu
        return cls(
            size=cfg.rollout.micro_rollout_batch_size,
            max_tokens=budget if cfg.train.use_dynamic_batch else None,
            packed=packable and cfg.train.packing_samples,
            group=group,
        )

    def groups(self, lengths: Sequence[int]) -> list[list[int]]:
        """Indices into ``lengths``, one list per forward; with a token budget, every rank of the
        group gets the same number (an empty list: a forward that counts nothing). Collective
        with a token budget."""
        if self.max_tokens is None:
            return [list(range(s, min(s + self.size, len(lengths)))) for s in range(0, len(lengths), self.size)]
        groups = split_by_token_budget(lengths, self.max_tokens, self.packed)
        return split_to_count(lengths, groups, all_reduce_max(len(groups), self.group), self.packed)


@torch.no_grad()
def per_token_rows(fn, samples: list[Sample], pad_id: int, batching: MicroBatching) -> list[torch.Tensor]:
    """``fn(micro_batch) -> [b, T-1]`` over ``samples``, cut back to one CPU row per sample
    (length len(sample) - 1), so rows can travel between ranks whose batches pad differently."""
    lengths = [len(s) for s in samples]
    groups = batching.groups(lengths)  # collective with a token budget: before any early return
    if not samples:
        return []
    rows: list[Optional[torch.Tensor]] = [None] * len(samples)
    for group in groups:
        chosen = group or [0]  # an empty group still runs a forward, to pair with the other ranks'
        mb = collate_rows([{"input_ids": torch.tensor(samples[i].input_ids)} for i in chosen], pad_id, batching.packed)
        out = fn(mb).float().cpu()  # [b, T-1] or [1, S-1]
        for i, row in zip(group, split_rows(out, [lengths[i] for i in chosen], batching.packed)):
            rows[i] = row
    return rows  # type: ignore[return-value]


def padded(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """Rows of different lengths -> [B, width] on the device, zero after each row."""
    out = torch.zeros(len(rows), width)
    for i, row in enumerate(rows):
        out[i, : row.numel()] = row
    return out.to(device())
