"""Learning-rate schedules: the factor on the peak rate at each optimizer step, as pure functions.

The four schedules ``--lr_scheduler`` offers, with the semantics of transformers' ``get_scheduler``
of the same names (OpenRLHF's default is ``cosine_with_min_lr`` with a floor of 0.1 x the peak);
``tests/test_lr_schedule.py`` checks every step against transformers. They live here rather than
being taken from ``transformers.get_scheduler`` because importing that pulls in
``transformers.trainer_utils``, and with it peft and bitsandbytes: about 2 s of every job's
start-up on a CPU, for four lines of arithmetic.
"""

from __future__ import annotations

import functools
import math

import torch

COSINE_MIN_LR_RATE = 0.1  # cosine_with_min_lr decays to this fraction of the peak


def lr_factor(schedule: str, step: int, *, warmup_steps: int, total_steps: int) -> float:
    """The multiplier on the peak learning rate at optimizer step ``step`` (0-based).

    Every schedule but ``constant`` first rises linearly from 0 over ``warmup_steps`` steps.
    After it: ``constant_with_warmup`` stays at 1; ``linear`` falls to 0 at ``total_steps``;
    ``cosine_with_min_lr`` follows half a cosine from 1 down to ``COSINE_MIN_LR_RATE``.
    """
    if schedule == "constant":
        return 1.0
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    decay_steps = max(1, total_steps - warmup_steps)
    if schedule == "constant_with_warmup":
        return 1.0
    if schedule == "linear":
        return max(0.0, (total_steps - step) / decay_steps)
    if schedule == "cosine_with_min_lr":
        progress = (step - warmup_steps) / decay_steps
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, COSINE_MIN_LR_RATE + (1.0 - COSINE_MIN_LR_RATE) * cosine)
    raise ValueError(f"unknown lr schedule {schedule!r}: use cosine_with_min_lr, constant_with_warmup, constant or linear")


def make_lr_scheduler(optimizer: torch.optim.Optimizer, schedule: str, *, warmup_steps: int, total_steps: int):
    """A ``LambdaLR`` over ``optimizer`` following ``lr_factor`` (DeepSpeed steps it with the optimizer)."""
    lr_factor(schedule, 0, warmup_steps=warmup_steps, total_steps=total_steps)  # an unknown name fails here, not at step 1
    factor = functools.partial(lr_factor, schedule, warmup_steps=warmup_steps, total_steps=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
