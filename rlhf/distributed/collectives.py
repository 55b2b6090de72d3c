"""Small collectives every trainer uses: sums of metric dicts and of tensors over a group, and
per-rank records gathered back into input order."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from rlhf.distributed.env import device


def all_reduce_sums(values: dict[str, float], group: Optional[dist.ProcessGroup] = None) -> dict[str, float]:
    """Element-wise sum of a dict of floats over the group's ranks (all ranks by default; same keys on every rank)."""
    keys = sorted(values)
    totals = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device())
    dist.all_reduce(totals, group=group)
    return dict(zip(keys, totals.tolist()))


def all_reduce_tensor(tensor: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """A summed copy of ``tensor`` over the group's ranks."""
    total = tensor.clone()
    dist.all_reduce(total, group=group)
    return total


def all_reduce_max(value: int, group: Optional[dist.ProcessGroup] = None) -> int:
    """The largest of every rank's ``value`` over the group (all ranks by default)."""
    top = torch.tensor([value], dtype=torch.int64, device=device())
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    return int(top.item())


def gather_objects(value: Any, group: Optional[dist.ProcessGroup] = None) -> list:
    """Every rank's ``value`` (picklable; tensors on the CPU), in the group's rank order."""
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, value, group=group)
    return everyone


def gather_in_order(records: list[dict], world_size: int) -> list[dict]:
    """Every rank's records on every rank, sorted back into input order (row, then sample)."""
    everyone: list = [None] * world_size
    dist.all_gather_object(everyone, records)
    return sorted((r for part in everyone for r in part), key=lambda r: (r["_row"], r["_sample"]))
