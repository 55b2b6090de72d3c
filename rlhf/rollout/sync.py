"""Weight sync from the actor to rollout ranks of their own (split placement with a rollout role).

Once per step, before generating, the actor's current weights are sent to every rollout rank:
parameters are taken in buckets of about ``--weight_sync_bucket_mb``; under ZeRO-3 every actor
rank takes part in gathering a bucket (a collective over the actor's group), then the first
actor rank flattens it and broadcasts it over a group made of itself and the rollout ranks,
which copy it into their model. Only one bucket is ever materialised in full, so a model larger
than one device's free memory still syncs. Both sides walk the same parameter names in the same
order; the names are compared once, when the sync is set up.
"""

from __future__ import annotations

import contextlib
import time
from typing import Sequence

import deepspeed
import torch
import torch.distributed as dist

from rlhf.distributed.env import device


def _buckets(named: list[tuple[str, torch.nn.Parameter]], bucket_bytes: int) -> list[list[tuple[str, torch.nn.Parameter]]]:
    """Consecutive parameters grouped into buckets of at most ``bucket_bytes`` (one if bigger)."""
    out: list[list] = [[]]
    size = 0
    for name, p in named:
        nbytes = p.ds_numel * p.element_size() if hasattr(p, "ds_numel") else p.numel() * p.element_size()
        if out[-1] and size + nbytes > bucket_bytes:
            out.append([])
            size = 0
        out[-1].append((name, p))
        size += nbytes
    return out


class WeightBroadcast:
    """Collective over the actor's ranks and the rollout ranks (``group`` = the first actor rank
    and the rollout ranks); other ranks never call it."""

    def __init__(self, group: dist.ProcessGroup, members: Sequence[int], model: torch.nn.Module, bucket_mb: float):
        self.group, self.source_rank = group, members[0]
        self.named = list(model.named_parameters())
        self.plan = _buckets(self.named, int(bucket_mb * 2**20))
        self.last_bytes = 0
        if dist.get_rank() in members:
            names = [[n for n, _ in self.named]]
            dist.broadcast_object_list(names, src=self.source_rank, group=group)
            if names[0] != [n for n, _ in self.named]:
                raise RuntimeError("weight sync: the rollout model's parameters differ from the actor's")

    def send(self, zero3: bool) -> tuple[float, int]:
        """On actor ranks. Returns (seconds, bytes sent)."""
        started, sent = time.perf_counter(), 0
        is_source = dist.get_rank() == self.source_rank
        for bucket in self.plan:
            params = [p for _, p in bucket]
            with deepspeed.zero.GatheredParameters(params) if zero3 else contextlib.nullcontext():
                if is_source:
                    flat = torch.cat([p.detach().reshape(-1).to(params[0].dtype) for p in params]).to(device())
                    dist.broadcast(flat, src=self.source_rank, group=self.group)
                    sent += flat.numel() * flat.element_size()
        self.last_bytes = sent
        return time.perf_counter() - started, sent

    @torch.no_grad()
    def receive(self) -> tuple[float, int]:
        """On rollout ranks: the actor's weights into this rank's model. Returns (seconds, bytes)."""
        started, received = time.perf_counter(), 0
        for bucket in self.plan:
            params = [p for _, p in bucket]
            flat = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype, device=device())
            dist.broadcast(flat, src=self.source_rank, group=self.group)
            offset = 0
            for p in params:
                p.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
            received += flat.numel() * flat.element_size()
        self.last_bytes = received
        return time.perf_counter() - started, received
