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


# ----------------------------------------------------------------------------------------------
# Token-budget micro-batches (--use_dynamic_batch): cut by tokens instead of by sample count


def micro_batch_tokens(lengths: Sequence[int], packed: bool) -> int:
    """Token positions one forward over samples of these ``lengths`` computes: their sum when
    packed into one row, rows x the longest when right-padded."""
    if not lengths:
        return 0
    return sum(lengths) if packed else len(lengths) * max(lengths)


def split_by_token_budget(lengths: Sequence[int], max_tokens: int, packed: bool) -> list[list[int]]:
    """Indices into ``lengths`` grouped into micro-batches of at most ``max_tokens`` tokens each
    (``micro_batch_tokens``), as few as it can; a sample longer than the budget gets a micro-batch
    of its own (as in OpenRLHF): nothing is dropped. Each group lists its samples longest first.

    Packed: first fit over the samples, longest first (OpenRLHF's rule). Padded: the samples
    sorted by length are cut into runs, the fewest runs that fit and, among those, the fewest
    padded positions (an exact dynamic programme over the cut points): first fit would let a long
    sample pull short ones into its rows, padding them all to its length.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if not packed:
        return _padded_runs(order, [lengths[i] for i in order], max_tokens)
    groups: list[list[int]] = []
    sums: list[int] = []
    for i in order:
        n = lengths[i]
        for g in range(len(groups)):
            if sums[g] + n <= max_tokens:
                groups[g].append(i)
                sums[g] += n
                break
        else:
            groups.append([i])
            sums.append(n)
    return groups


def _padded_runs(order: list[int], longest_first: list[int], max_tokens: int) -> list[list[int]]:
    """``order`` (sample indices, their lengths ``longest_first`` descending) cut into consecutive
    runs costing ``rows x first length <= max_tokens`` (a lone sample may exceed it): fewest runs,
    then fewest positions. best[i] = (runs, positions) covering the first i samples."""
    n = len(order)
    best: list[tuple[int, int]] = [(0, 0)] + [(n + 1, 0)] * n
    start = [0] * (n + 1)
    for i in range(1, n + 1):
        for j in range(i - 1, -1, -1):  # the run order[j:i]; its cost grows as j falls
            cost = (i - j) * longest_first[j]
            if cost > max_tokens and j < i - 1:
                break
            candidate = (best[j][0] + 1, best[j][1] + cost)
            if candidate < best[i]:
                best[i], start[i] = candidate, j
    runs: list[list[int]] = []
    i = n
    while i > 0:
        runs.append(order[start[i] : i])
        i = start[i]
    return runs[::-1]


def split_to_count(lengths: Sequence[int], groups: list[list[int]], count: int, packed: bool) -> list[list[int]]:
    """``groups`` (from ``split_by_token_budget``) cut further until there are ``count``, so that
    every rank runs the same number of forwards (ZeRO's collectives pair them up across ranks).

    The costliest group with two or more samples is halved (alternate samples, longest first, so
    the halves cost about the same; neither costs more than the whole, so the budget still
    holds). When every group is a single sample, empty groups fill up the count: the caller runs
    a forward that counts nothing for each.
    """
    groups = [sorted(g, key=lambda i: (-lengths[i], i)) for g in groups]
    while len(groups) < count:
        splittable = [g for g in groups if len(g) > 1]
        if not splittable:
            return groups + [[] for _ in range(count - len(groups))]
        widest = max(splittable, key=lambda g: micro_batch_tokens([lengths[i] for i in g], packed))
        k = groups.index(widest)
        groups[k : k + 1] = [widest[0::2], widest[1::2]]
    return groups


def balance_over_ranks(lengths: Sequence[int], dp_size: int) -> list[list[int]]:
    """``dp_size`` shares of ``len(lengths) / dp_size`` samples each (indices into ``lengths``)
    whose token totals are close: samples longest first, each to the share with the smallest
    total that still has room (the LPT rule with a count cap). Equal counts keep every rank's
    share of an optimizer step the same size, as in the fixed-count split."""
    if len(lengths) % dp_size != 0:
        raise ValueError(f"{len(lengths)} samples do not split evenly over {dp_size} ranks")
    per_rank = len(lengths) // dp_size
    shares: list[list[int]] = [[] for _ in range(dp_size)]
    totals = [0] * dp_size
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min((r for r in range(dp_size) if len(shares[r]) < per_rank), key=lambda r: (totals[r], r))
        shares[r].append(i)
        totals[r] += lengths[i]
    return [sorted(s) for s in shares]


def token_budget_plan(lengths: Sequence[int], dp_size: int, max_tokens: int, packed: bool) -> list[list[list[int]]]:
    """One optimizer step's micro-batches over the data-parallel ranks, ``[rank][k] -> indices
    into lengths``: the samples balanced over the ranks by tokens (``balance_over_ranks``), each
    rank's share cut by the token budget, and the counts evened out to the largest
    (``split_to_count``). Every sample is used exactly once; every rank gets the same count."""
    shares = balance_over_ranks(lengths, dp_size)
    per_rank = [[[share[i] for i in g] for g in split_by_token_budget([lengths[i] for i in share], max_tokens, packed)] for share in shares]
    count = max(len(groups) for groups in per_rank)
    return [split_to_count(lengths, groups, count, packed) for groups in per_rank]
