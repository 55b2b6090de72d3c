"""An exponential moving average of a trained engine's weights (PPO's ``--enable_ema``).

Each rank averages only what it holds: the ZeRO-3 shard of a partitioned parameter, the whole
tensor below stage 3. The average lives in fp32 on the parameter's device, so memory is one fp32
copy of the rank's share of the trainable weights. For the export the average is swapped into
the parameters (then gathered like any ZeRO-3 model) and swapped back out.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from rlhf.errors import UserError


def _held(param: torch.nn.Parameter) -> torch.Tensor:
    """The part of ``param`` this rank holds: its ZeRO-3 shard, or the parameter itself."""
    return param.ds_tensor if hasattr(param, "ds_tensor") else param.data


class WeightEMA:
    def __init__(self, engine, beta: float):
        self.beta = beta
        self.params = [p for p in engine.module.parameters() if p.requires_grad]
        self.average = [_held(p).detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: average = beta * average + (1 - beta) * weights."""
        for avg, p in zip(self.average, self.params):
            avg.mul_(self.beta).add_(_held(p).float(), alpha=1.0 - self.beta)

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self):
        """The averaged weights in place of the trained ones for the duration (e.g. an export)."""
        trained = [_held(p).clone() for p in self.params]
        for avg, p in zip(self.average, self.params):
            _held(p).copy_(avg)
        try:
            yield
        finally:
            for saved, p in zip(trained, self.params):
                _held(p).copy_(saved)

    # Checkpoint interface, as TrainEngine's: one file per rank in ``folder``.

    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        torch.save([a.cpu() for a in self.average], os.path.join(folder, f"rank_{dist.get_rank()}.pt"))

    def load(self, folder: str) -> None:
        path = os.path.join(folder, f"rank_{dist.get_rank()}.pt")
        if not os.path.isfile(path):
            raise UserError(f"checkpoint {folder}: no EMA weights for rank {dist.get_rank()} (was it written without --enable_ema?)")
        for avg, saved in zip(self.average, torch.load(path, weights_only=True)):
            avg.copy_(saved)
