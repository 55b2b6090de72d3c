"""Our learning-rate schedules against transformers' ``get_scheduler`` (the oracle), step by step."""

import pytest
import torch
from transformers import get_scheduler

from rlhf.engines.lr_schedule import COSINE_MIN_LR_RATE, lr_factor, make_lr_scheduler


def rates(scheduler, optimizer, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("schedule", ["cosine_with_min_lr", "constant_with_warmup", "constant", "linear"])
@pytest.mark.parametrize("warmup, total", [(0, 10), (3, 10), (1, 1), (5, 37), (10, 10)])
def test_schedules_equal_transformers_at_every_step(schedule, warmup, total):
    def optimizer():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-5)

    ours_opt, theirs_opt = optimizer(), optimizer()
    ours = make_lr_scheduler(ours_opt, schedule, warmup_steps=warmup, total_steps=total)
    extra = {"scheduler_specific_kwargs": {"min_lr_rate": COSINE_MIN_LR_RATE}} if schedule == "cosine_with_min_lr" else {}
    theirs = get_scheduler(schedule, theirs_opt, num_warmup_steps=warmup, num_training_steps=total, **extra)
    ours_rates, theirs_rates = rates(ours, ours_opt, total + 3), rates(theirs, theirs_opt, total + 3)
    assert ours_rates == pytest.approx(theirs_rates, rel=1e-12, abs=1e-18)


def test_cosine_ends_at_the_floor_and_unknown_names_fail():
    assert lr_factor("cosine_with_min_lr", 10, warmup_steps=2, total_steps=10) == pytest.approx(COSINE_MIN_LR_RATE)
    with pytest.raises(ValueError, match="unknown lr schedule 'cosine'"):
        make_lr_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), "cosine", warmup_steps=0, total_steps=5)


def test_train_engine_start_up_does_not_import_peft():
    """The reason the schedules are ours: transformers.get_scheduler imports peft and bitsandbytes."""
    import subprocess
    import sys

    code = "import sys, rlhf.engines.train_engine; print('peft' in sys.modules, 'bitsandbytes' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
