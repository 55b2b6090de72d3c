"""Moving a rollout batch between the ranks of different roles.

The actor's ranks generate; in a split placement the reference, critic and reward models sit on
other ranks. A rollout batch is a list of per-sample records; its GLOBAL order is actor rank 0's
samples, then actor rank 1's, and so on. Every role cuts the global batch into contiguous
shares, one per rank of the role, so

- ``share``: actor ranks' records -> each role rank's share (to score, or to train the critic);
- ``collect``: each role rank's per-sample results -> the actor rank's share of them.

Colocated, every role's share on a rank IS the actor's local batch: nothing moves. Split, the
records travel with one world-wide ``all_gather_object`` per call (every rank must call, in the
same order); they are token ids and per-token float rows on CPU, small next to the models.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch.distributed as dist

from rlhf.distributed.topology import Topology


class SampleRouter:
    def __init__(self, topology: Topology, rank: int):
        self.topology, self.rank = topology, rank

    def holds(self, role: str) -> bool:
        return role in self.topology.roles and self.rank in self.topology.ranks(role)

    def share(self, items: list, roles: Sequence[str], source: str = "actor") -> dict[str, list]:
        """Collective. ``items``: this ``source`` rank's records (ignored elsewhere). Returns, for
        each of ``roles`` held by this rank, its contiguous share of the global batch (the
        source ranks' records in rank order)."""
        mine = [role for role in roles if self.holds(role)]
        if self.topology.is_colocated:
            return {role: items for role in mine}
        everyone = self._all_gather(items if self.holds(source) else None)
        batch = [x for r in self.topology.ranks(source) for x in everyone[r]]
        return {role: self._cut(batch, role) for role in mine}

    def collect(self, results: dict[str, list], roles: Sequence[str]) -> dict[str, list]:
        """Collective. ``results[role]``: per-sample results of this rank's share of ``role``.
        Returns on actor ranks, per role, the results for the actor rank's own samples."""
        if self.topology.is_colocated:
            return {role: results[role] for role in roles}
        everyone = self._all_gather({role: results[role] for role in roles if self.holds(role)})
        if not self.holds("actor"):
            return {}
        out = {}
        for role in roles:
            batch = [x for r in self.topology.ranks(role) for x in everyone[r][role]]
            out[role] = self._cut(batch, "actor")
        return out

    def _cut(self, batch: list, role: str) -> list:
        index, count = self.topology.slot_index(role, self.rank)
        if len(batch) % count:
            raise ValueError(f"a batch of {len(batch)} samples does not split over the {count} ranks of role {role!r}")
        size = len(batch) // count
        return batch[index * size : (index + 1) * size]

    def _all_gather(self, obj: Any) -> list:
        everyone: list = [None] * self.topology.world_size
        dist.all_gather_object(everyone, obj)
        return everyone
