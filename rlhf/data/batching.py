"""Which samples go into which micro-batch on which rank: a plan every rank computes alike.

The plan for an epoch is a list of global micro-batches (lists of sample indices) made from a
seeded permutation. Optimizer step ``s`` of the epoch uses micro-batches
``[s * dp * acc, (s + 1) * dp * acc)``; micro-batch ``i`` of a step goes to data-parallel rank
``i % dp``. Because every rank knows the whole plan, the token count of the global batch (the
loss normaliser) needs no communication, and resuming at step ``s`` needs only ``(epoch, s)``.
"""

from __future__ import annotations

import random
from typing import Sequence


def plan_epoch(lengths: Sequence[int], *, micro_batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Global micro-batches for one epoch: ``micro_batch_size`` samples each, in a seeded order.

    The same plan serves padded and packed batches (``--packing_samples`` packs a micro-batch's
    samples into one row instead of padding them), so an optimizer step always holds
    ``--train_batch_size`` samples, as in OpenRLHF; packing by a token budget instead would
    change the number of pairs per step, and with it the learning rate's meaning.
    """
    order = list(range(len(lengths)))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    full = len(order) - len(order) % micro_batch_size
    return [order[i : i + micro_batch_size] for i in range(0, full, micro_batch_size)]


def steps_in_epoch(num_micro_batches: int, dp_size: int, accumulation_steps: int) -> int:
    """Whole optimizer steps an epoch's plan fills; the remainder is dropped."""
    return num_micro_batches // (dp_size * accumulation_steps)


def step_micro_batches(plan: list[list[int]], step_in_epoch: int, dp_size: int, accumulation_steps: int) -> list[list[list[int]]]:
    """All micro-batches of one optimizer step, as ``[rank][k] -> sample indices``."""
    per_step = dp_size * accumulation_steps
    window = plan[step_in_epoch * per_step : (step_in_epoch + 1) * per_step]
    return [window[rank::dp_size] for rank in range(dp_size)]


def shard_for_eval(num_samples: int, micro_batch_size: int, dp_size: int) -> list[list[list[int]]]:
    """Eval micro-batches per rank, ``[rank][k] -> indices``, every rank with the same count.

    ZeRO-3 forwards are collective, so ranks must run equally many. A rank short of data gets
    empty micro-batches: the caller still runs a forward (on any sample) and counts nothing.
    """
    batches = [list(range(i, min(i + micro_batch_size, num_samples))) for i in range(0, num_samples, micro_batch_size)]
    per_rank = [batches[r::dp_size] for r in range(dp_size)]
    most = max(len(b) for b in per_rank)
    return [b + [[]] * (most - len(b)) for b in per_rank]
