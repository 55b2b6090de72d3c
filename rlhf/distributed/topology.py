"""The world layout: which ranks hold which role, as one validated object.

A job's ranks are cut into consecutive *slots*. Each slot holds one or more roles on the same
ranks. Two layouts cover what users run:

- colocate: one slot with every role on every rank; phases time-share memory.
- split: one slot per role (or per group of roles that share ranks), e.g. the seed's
  4 actor / 2 critic / 1 reward / 1 reference on 8 GPUs is
  ``Topology.split(8, {"actor": 4, "critic": 2, "reward": 1, "reference": 1})``, and
  "reward and reference share one rank" is ``shared=[("reward", "reference")]``.

Validation happens on construction: sizes add up to the world, every role sits in one slot, a
shared slot is given one size. Process groups are built once, on every rank in the same order
(``torch.distributed.new_group`` is collective over the world).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

import torch.distributed as dist

from rlhf.errors import UserError

ROLES = ("actor", "rollout", "critic", "reward", "reference")  # rollout: generation ranks apart from the actor (optional)


@dataclass(frozen=True)
class Slot:
    roles: tuple[str, ...]
    first_rank: int
    num_ranks: int

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(range(self.first_rank, self.first_rank + self.num_ranks))


@dataclass(frozen=True)
class Topology:
    world_size: int
    slots: tuple[Slot, ...]

    def __post_init__(self) -> None:
        seen: set[str] = set()
        next_rank = 0
        for slot in self.slots:
            for role in slot.roles:
                if role not in ROLES:
                    raise UserError(f"placement: unknown role {role!r}; roles are {', '.join(ROLES)}")
                if role in seen:
                    raise UserError(f"placement: role {role!r} is placed twice")
                seen.add(role)
            if slot.num_ranks < 1:
                raise UserError(f"placement: {'+'.join(slot.roles)} needs at least 1 rank, got {slot.num_ranks}")
            if slot.first_rank != next_rank:
                raise UserError("placement: slots must cover consecutive ranks")
            next_rank += slot.num_ranks
        if next_rank != self.world_size:
            layout = " + ".join(f"{'+'.join(s.roles)} {s.num_ranks}" for s in self.slots)
            raise UserError(
                f"placement: {layout} = {next_rank} ranks, but the world has {self.world_size} (set the per-role counts to "
                "add up to the number of processes)"
            )
        if "actor" not in seen:
            raise UserError("placement: the actor role must be placed")

    # ---- constructors -----------------------------------------------------------------------

    @classmethod
    def colocated(cls, world_size: int, roles: Iterable[str] = ("actor",)) -> "Topology":
        """Every role on every rank."""
        return cls(world_size, (Slot(tuple(roles), 0, world_size),))

    @classmethod
    def split(
        cls,
        world_size: int,
        sizes: Mapping[str, int],
        shared: Iterable[tuple[str, ...]] = (),
    ) -> "Topology":
        """Roles on consecutive rank ranges in the order of ROLES; ``shared`` roles sit together.

        A shared group takes the size given for its first role; the other roles of the group
        must be given the same size or none.
        """
        groups: dict[str, tuple[str, ...]] = {}
        for group in shared:
            for role in group:
                if role in groups:
                    raise UserError(f"placement: role {role!r} is in two shared groups")
                groups[role] = tuple(group)
        slots: list[Slot] = []
        placed: set[str] = set()
        rank = 0
        for role in ROLES:
            if role not in sizes or role in placed:
                continue
            group = groups.get(role, (role,))
            group_sizes = {sizes[r] for r in group if r in sizes}
            if len(group_sizes) != 1:
                raise UserError(f"placement: roles {'+'.join(group)} share ranks but are given different sizes {sorted(group_sizes)}")
            n = group_sizes.pop()
            slots.append(Slot(tuple(r for r in group if r in sizes), rank, n))
            placed.update(group)
            rank += n
        return cls(world_size, tuple(slots))

    # ---- queries ----------------------------------------------------------------------------

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(role for slot in self.slots for role in slot.roles)

    @property
    def is_colocated(self) -> bool:
        return len(self.slots) == 1

    def slot_of(self, role: str) -> Slot:
        for slot in self.slots:
            if role in slot.roles:
                return slot
        raise UserError(f"placement: role {role!r} is not placed (placed: {', '.join(self.roles)})")

    def ranks(self, role: str) -> tuple[int, ...]:
        return self.slot_of(role).ranks

    def dp_size(self, role: str) -> int:
        """Data-parallel size of a role: every rank of its slot holds a data-parallel shard."""
        return self.slot_of(role).num_ranks

    def roles_of(self, rank: int) -> tuple[str, ...]:
        for slot in self.slots:
            if rank in slot.ranks:
                return slot.roles
        raise ValueError(f"rank {rank} outside world of {self.world_size}")

    def check_divides(self, role: str, batch: int, flag: str) -> None:
        """Raise unless ``batch`` (named by ``flag``) splits evenly over the role's ranks."""
        dp = self.dp_size(role)
        if batch % dp != 0:
            raise UserError(f"{flag} {batch} must be divisible by the {role} data-parallel size {dp}")

    def describe(self) -> str:
        return ", ".join(f"{'+'.join(s.roles)}: ranks {s.first_rank}-{s.first_rank + s.num_ranks - 1}" for s in self.slots)

    # ---- process groups ---------------------------------------------------------------------

    def slot_index(self, role: str, rank: int) -> tuple[int, int]:
        """(position of ``rank`` among the role's ranks, the role's rank count)."""
        slot = self.slot_of(role)
        if rank not in slot.ranks:
            raise ValueError(f"rank {rank} does not hold role {role!r}")
        return rank - slot.first_rank, slot.num_ranks

    def build_groups(self) -> "RoleGroups":
        """Create one process group per slot, and in a split placement a one-rank group for this
        rank (DeepSpeed's model-parallel group). Collective: every rank calls it, in the same order."""
        by_slot = []
        for slot in self.slots:
            if slot.num_ranks == self.world_size:
                by_slot.append(dist.group.WORLD)
            else:
                by_slot.append(dist.new_group(ranks=list(slot.ranks)))
        alone = None if self.is_colocated else dist.new_group(ranks=[dist.get_rank()], use_local_synchronization=True)
        return RoleGroups(self, tuple(by_slot), alone)


@dataclass(frozen=True)
class RoleGroups:
    topology: Topology
    slot_groups: tuple[Optional[dist.ProcessGroup], ...]
    self_group: Optional[dist.ProcessGroup] = None  # this rank alone (split placement only)

    def group(self, role: str) -> Optional[dist.ProcessGroup]:
        """The data-parallel group of ``role`` (WORLD when the role spans all ranks)."""
        slot = self.topology.slot_of(role)
        return self.slot_groups[self.topology.slots.index(slot)]
