"""Save a checkpoint when the job is about to be preempted or to hit its time limit.

SLURM warns a job with SIGUSR2 some seconds before stopping it (``launch.submit`` asks for it
with ``--signal_delay_s``; with sbatch, ``--signal=USR2@120``). Acting inside the signal handler
would interrupt a step in the middle of a collective, so the handler only takes note. At every
step boundary the trainer asks ``stop_requested()``, a tiny all-reduce, so all ranks agree to stop
after the same step; it saves a checkpoint, then ``hand_over()`` passes the signal to the handler
that was there before (submitit's: rank 0 requeues the job with ``--load_checkpoint``) and ends
the process. Without such a handler the process exits with status 75 (EX_TEMPFAIL: "try again"),
and resuming with ``--load_checkpoint`` continues from the step it stopped at.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from rlhf.distributed.env import device

RETRY_EXIT_CODE = 75  # EX_TEMPFAIL
WARNING_SIGNAL = signal.SIGUSR2


class PreemptionWatch:
    def __init__(self) -> None:
        self._noted = False
        self._previous = signal.getsignal(WARNING_SIGNAL)
        signal.signal(WARNING_SIGNAL, self._note)

    def _note(self, signum, frame) -> None:
        self._noted = True

    def stop_requested(self) -> bool:
        """Collective (every rank, once per step): did any rank get the warning?"""
        flag = torch.tensor([float(self._noted)], device=device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    def hand_over(self) -> None:
        """After the checkpoint: let the launcher requeue, then end this process."""
        rank = dist.get_rank()
        print(f"rank {rank}: checkpoint saved after {WARNING_SIGNAL.name}; stopping for the requeue", flush=True)
        if callable(self._previous):
            self._previous(WARNING_SIGNAL, None)  # submitit: rank 0 requeues the job and exits
            time.sleep(60)  # other ranks: SLURM stops them with the requeue; leave on our own if not
            sys.stdout.flush()
            os._exit(0)
        sys.stdout.flush()
        os._exit(RETRY_EXIT_CODE)
