"""DeepSpeed engines on a process subgroup (the split placement), made correct.

DeepSpeed 0.19 assumes one engine group spanning the world. In a split placement every rank
belongs to exactly one slot (actor ranks, critic ranks, reward+reference ranks, ...) and builds
only the engines of its slot, all on the slot's group. Each assumption and how it is met here:

1. There is no config key for the data-parallel group: it comes from ``mpu``. The
   model-parallel group must be a ONE-rank group (``None`` makes gradient clipping all-reduce
   the norm over the whole world) -> ``SlotParallel``.
2. ``deepspeed.utils.groups.mpu`` is process-global (the last engine built wins): harmless
   here because every engine of a rank lives on the same slot group.
3. ZeRO-3 optimizer construction and ``save_checkpoint`` call ``barrier()`` on the world. Slots
   build and save at different moments (a reward+reference slot builds no optimizer at all),
   so world barriers hang -> ``confine_deepspeed_to`` makes a group-less DeepSpeed barrier a
   barrier of the slot.
4. ZeRO-3's parameter coordinator checks, while it records its first forward trace, that every
   rank saw the same module order by broadcasting from global rank 0 ("disagreement on list
   length" between slots) -> the same check, within the slot.
5. ``save_checkpoint`` validates the tag with world all-reduces (disabled in the engine config:
   our tag is the constant ``engine``) and creates the folder on global rank 0 only (the
   checkpoint code creates it first).
6. HF ``generate(synced_gpus=True)`` all-reduces over the world: the rollout gathers ZeRO-3
   weights and drops the hooks instead, so generation needs no collective (``TrainEngine``).

The patches are process-wide and installed once, in split placement only; colocated runs use
DeepSpeed untouched.
"""

from __future__ import annotations

from typing import Optional

import torch.distributed as dist


class SlotParallel:
    """A DeepSpeed ``mpu``: data parallel over the slot's ranks, no model parallelism."""

    def __init__(self, dp_group: dist.ProcessGroup, self_group: dist.ProcessGroup):
        self._dp, self._mp = dp_group, self_group

    def get_data_parallel_group(self):
        return self._dp

    def get_data_parallel_world_size(self):
        return dist.get_world_size(self._dp)

    def get_data_parallel_rank(self):
        return dist.get_rank(self._dp)

    def get_model_parallel_group(self):
        return self._mp

    def get_model_parallel_world_size(self):
        return 1

    def get_model_parallel_rank(self):
        return 0


_confined_to: Optional[dist.ProcessGroup] = None


def confine_deepspeed_to(group: dist.ProcessGroup) -> None:
    """Make DeepSpeed's world-wide barriers and trace checks act on ``group`` in this process."""
    global _confined_to
    if _confined_to is not None:
        if _confined_to is not group:
            raise RuntimeError("DeepSpeed is already confined to another process group in this process")
        return
    import deepspeed.comm as ds_comm
    from deepspeed.runtime.zero import partitioned_param_coordinator

    world_barrier = ds_comm.barrier

    def slot_barrier(group=None, *args, **kwargs):
        return world_barrier(_confined_to if group is None else group, *args, **kwargs)

    def same_ints_in_slot(ints: list[int]) -> None:
        everyone: list = [None] * dist.get_world_size(_confined_to)
        dist.all_gather_object(everyone, list(ints), group=_confined_to)
        if any(other != everyone[0] for other in everyone):
            raise RuntimeError(f"ZeRO-3 trace differs between the ranks of one slot: {everyone}")

    ds_comm.barrier = slot_barrier
    partitioned_param_coordinator.assert_ints_same_as_other_ranks = same_ints_in_slot
    _confined_to = group
