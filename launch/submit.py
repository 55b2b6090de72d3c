"""Submit a trainer as a SLURM job with submitit (or run it with submitit's local executor).

    python -m launch.submit --nodes 2 --gpus_per_node 8 --partition PART --time 24:00:00 \\
        -- rlhf.ppo --pretrain ... --ckpt_path /shared/ckpt --save_steps 50

Everything after ``--`` is the trainer module and its flags, exactly as after ``torchrun -m``.
submitit writes an sbatch script that starts one task per rank (``--nodes`` x
``--tasks_per_node``, by default one task per GPU); each task sets the torch.distributed
variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR = first host of the job, MASTER_PORT) from
submitit's JobEnvironment and runs the trainer in-process: the module's ``main(argv)`` (or the
module itself through ``runpy`` when it has none), as ``python -m`` would.

Preemption and time limits: SLURM sends SIGUSR2 ``--signal_delay_s`` seconds before it kills the
job. The trainer (``rlhf.io.preemption``) finishes its step, saves a checkpoint under
``--ckpt_path`` on all ranks, then hands the signal to submitit, which calls
:meth:`TrainerTask.checkpoint` (resubmit the same trainer with ``--load_checkpoint`` added) and
requeues the job; the requeued job continues from that step. A job requeued by SLURM itself (``scontrol requeue``, node failure) resumes the
same way: a task that sees ``SLURM_RESTART_COUNT > 0`` adds ``--load_checkpoint`` too.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import re
import runpy
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import submitit

RESUME_FLAG = "--load_checkpoint"


def rendezvous_port(job_id: str) -> int:
    """A port per job, so that two jobs sharing a node do not collide (as slurm/launch_trainer.sh)."""
    digits = re.sub(r"\D", "", str(job_id)) or "0"
    return 20000 + int(digits) % 20000


class TrainerTask(submitit.helpers.Checkpointable):
    """One rank of the trainer: ``python -m <module> <args>`` inside a submitit task."""

    def __init__(self, module: str, args: Sequence[str], resume: bool = False) -> None:
        self.module = module
        self.args = list(args)
        self.resume = resume

    def trainer_argv(self) -> list[str]:
        args = list(self.args)
        restarted = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0
        if (self.resume or restarted) and RESUME_FLAG not in args:
            args.append(RESUME_FLAG)
        return args

    def __call__(self) -> dict:
        job = submitit.JobEnvironment()
        hosts = list(job.hostnames) if job.num_nodes > 1 else []
        master = os.environ.get("MASTER_ADDR") or (hosts[0] if hosts else "127.0.0.1")
        os.environ.update(
            {
                "RANK": str(job.global_rank),
                "WORLD_SIZE": str(job.num_tasks),
                "LOCAL_RANK": str(job.local_rank),
                "LOCAL_WORLD_SIZE": str(job.num_tasks // max(job.num_nodes, 1)),
                "GROUP_RANK": str(job.node),
                "MASTER_ADDR": master,
                "MASTER_PORT": os.environ.get("MASTER_PORT") or str(rendezvous_port(job.job_id)),
            }
        )
        args = self.trainer_argv()
        print(
            f"launch.submit: job {job.job_id} rank {job.global_rank}/{job.num_tasks} master {master}:{os.environ['MASTER_PORT']}: "
            f"{self.module} {' '.join(args)}",
            flush=True,
        )
        sys.argv = [self.module, *args]
        entry = getattr(importlib.import_module(self.module), "main", None)
        if callable(entry):
            # The trainers' main(argv) returns normally in-process. Its command-line guard turns a
            # UserError into os._exit(2); unwrapped, the error reaches submitit, which reports it.
            getattr(entry, "__wrapped__", entry)(args)
        else:
            try:
                runpy.run_module(self.module, run_name="__main__", alter_sys=True)
            except SystemExit as exc:
                if exc.code not in (None, 0):
                    raise RuntimeError(f"{self.module} exited with status {exc.code} on rank {job.global_rank}") from None
        # As the trainers' command-line runner does: once submitit has written this task's result,
        # leave without tearing down DeepSpeed/gloo background threads (slow, or an abort after a
        # finished job). atexit runs handlers last-registered first, so this one goes before theirs.
        atexit.register(_exit_now)
        return {"module": self.module, "rank": job.global_rank, "world_size": job.num_tasks, "args": args}

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on preemption / timeout: requeue the same trainer, resuming."""
        return submitit.helpers.DelayedSubmission(TrainerTask(self.module, self.args, resume=True))


def _exit_now() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def parse_time(text: str) -> int:
    """SLURM time ('90', '1:30:00', '2-00:00:00', '30:00') -> minutes."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"--time {text!r}: use minutes, MM:SS, HH:MM:SS or D-HH:MM:SS")
    days, a, b, c = (int(x) if x else None for x in m.groups())
    if b is None:  # minutes
        minutes = a
    elif c is None:  # MM:SS (or D-HH:MM with a day)
        minutes = a * 60 + b if days is not None else a + (1 if b else 0)
    else:  # HH:MM:SS
        minutes = a * 60 + b + (1 if c else 0)
    return (days or 0) * 24 * 60 + minutes


def parse_mem_gb(text: str) -> float:
    """'64G', '512M', '1T', '64' (GB) -> GB."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)B?", text.strip(), flags=re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"--mem {text!r}: use e.g. 64G, 512M or 1T")
    scale = {"": 1, "K": 1 / 1024**2, "M": 1 / 1024, "G": 1, "T": 1024}[m.group(2).upper()]
    return float(m.group(1)) * scale


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch.submit",
        description="Submit an rlhf trainer with submitit: one task per rank, torch.distributed set up from "
        "submitit's JobEnvironment, checkpoint + requeue on preemption/timeout.",
        epilog="example: python -m launch.submit --nodes 2 --gpus_per_node 8 --partition gpu --time 24:00:00 "
        "-- rlhf.ppo --config configs/grpo_tiny.yaml --ckpt_path /shared/ckpt --save_steps 20",
    )
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default: 1)")
    p.add_argument(
        "--gpus_per_node",
        type=int,
        default=None,
        help="GPUs per node (requested as --gpus-per-node); default 8 on SLURM, 0 locally; 0 requests no GPUs (CPU clusters)",
    )
    p.add_argument("--tasks_per_node", type=int, default=None, help="ranks per node; default: --gpus_per_node, or 1 when that is 0")
    p.add_argument("--cpus_per_task", type=int, default=None, help="CPUs per rank (SLURM --cpus-per-task); default: SLURM's")
    p.add_argument("--partition", default=None, help="SLURM partition")
    p.add_argument("--account", default=None, help="SLURM account")
    p.add_argument("--qos", default=None, help="SLURM quality of service")
    p.add_argument(
        "--time",
        type=parse_time,
        default=parse_time("24:00:00"),
        help="time limit per job run: minutes, HH:MM:SS or D-HH:MM:SS (default: 24:00:00)",
    )
    p.add_argument("--mem", type=parse_mem_gb, default=None, help="memory per node, e.g. 64G (default: SLURM's)")
    p.add_argument(
        "--cluster",
        choices=["auto", "slurm", "local"],
        default="auto",
        help="where to run: slurm (sbatch), local (submitit's "
        "local executor, one node, no SLURM), auto "
        "(default: slurm when sbatch is on PATH)",
    )
    p.add_argument(
        "--folder",
        default="submitit_logs/%j",
        help="submitit's folder for the job's pickles and logs (%%j = job id); use a fresh one per run (default: submitit_logs/%%j)",
    )
    p.add_argument("--job_name", default=None, help="job name (default: rlhf-<trainer>)")
    p.add_argument(
        "--max_requeues",
        type=int,
        default=3,
        help="how many times a timed-out job may requeue itself (preemptions do not count; default: 3)",
    )
    p.add_argument(
        "--signal_delay_s",
        type=int,
        default=120,
        help="SLURM sends SIGUSR2 this many seconds before the time limit, to checkpoint and requeue (default: 120)",
    )
    p.add_argument("--constraint", default=None, help="SLURM --constraint (node features)")
    p.add_argument("--exclude", default=None, help="SLURM --exclude (nodes to avoid)")
    p.add_argument(
        "--setup",
        action="append",
        default=[],
        metavar="CMD",
        help="shell line run in the sbatch script before the tasks start (repeatable), e.g. 'source venv/bin/activate'",
    )
    p.add_argument("--no_wait", action="store_true", help="print the job id and return at once instead of waiting for the job to finish")
    p.add_argument(
        "trainer",
        nargs=argparse.REMAINDER,
        help="-- MODULE [trainer flags]: the trainer to run, e.g. -- rlhf.sft --config configs/sft_tiny.yaml",
    )
    return p


def make_executor(opts: argparse.Namespace, module: str) -> submitit.Executor:
    cluster = opts.cluster
    if cluster == "auto":
        cluster = "slurm" if shutil.which("sbatch") else "local"
    gpus = opts.gpus_per_node if opts.gpus_per_node is not None else (8 if cluster == "slurm" else 0)
    tasks = opts.tasks_per_node or max(gpus, 1)
    name = opts.job_name or f"rlhf-{module.rsplit('.', 1)[-1]}"
    if cluster == "local":
        if opts.nodes != 1:
            raise SystemExit("error: --cluster local runs on this machine only: use --nodes 1 (or --cluster slurm)")
        executor = submitit.LocalExecutor(folder=opts.folder)
        executor.update_parameters(timeout_min=opts.time, tasks_per_node=tasks, gpus_per_node=gpus)
        return executor
    if shutil.which("sbatch") is None:
        raise SystemExit("error: --cluster slurm but sbatch is not on PATH (no SLURM client here; use --cluster local)")
    executor = submitit.SlurmExecutor(folder=opts.folder, max_num_timeout=opts.max_requeues)
    params = dict(
        job_name=name,
        nodes=opts.nodes,
        ntasks_per_node=tasks,
        time=opts.time,
        signal_delay_s=opts.signal_delay_s,
        setup=opts.setup or None,
        # one failed rank ends the whole step instead of leaving its peers in a collective
        srun_args=["--kill-on-bad-exit=1"],
    )
    optional = dict(
        gpus_per_node=gpus or None,
        cpus_per_task=opts.cpus_per_task,
        partition=opts.partition,
        account=opts.account,
        qos=opts.qos,
        mem=f"{int(opts.mem * 1024)}M" if opts.mem else None,
        constraint=opts.constraint,
        exclude=opts.exclude,
    )
    params.update({k: v for k, v in optional.items() if v is not None})
    executor.update_parameters(**params)
    return executor


FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def slurm_state(job_id: str) -> Optional[str]:
    """The job's state from squeue (which keeps finished jobs for MinJobAge), or None if unknown."""
    try:
        out = subprocess.run(["squeue", "-h", "-t", "all", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    states = out.stdout.split()
    return states[0] if out.returncode == 0 and states else None


def wait(job: submitit.Job, poll_s: float = 2.0, grace_s: float = 10.0) -> list:
    """Wait for every task and return their results; a task's failure raises with its log's tail.

    submitit learns that a job ended from sacct, which needs SLURM accounting; on a cluster without
    it a job killed by a signal (scancel, OOM, node failure) would be waited for forever. So squeue
    is asked too: a job in a final state that still has no result after ``grace_s`` is an error.
    """
    ended_since: Optional[float] = None
    while not job.done():
        if isinstance(job, submitit.SlurmJob):
            state = slurm_state(job.job_id)
            if state in FINAL_STATES:
                ended_since = ended_since or time.monotonic()
                if time.monotonic() - ended_since > grace_s:
                    raise RuntimeError(
                        f"job {job.job_id} ended ({state}) without a result from every task; see the logs in {job.paths.folder}"
                    )
            else:
                ended_since = None
        time.sleep(poll_s)
    return job.results()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    opts = parser.parse_args(argv)
    trainer = list(opts.trainer)
    if trainer and trainer[0] == "--":
        trainer = trainer[1:]
    if not trainer:
        parser.error("no trainer given: end the options with -- MODULE [flags], e.g. -- rlhf.sft --config configs/sft_tiny.yaml")
    module, args = trainer[0], trainer[1:]
    if not re.fullmatch(r"[A-Za-z_][\w.]*", module):
        parser.error(f"{module!r} is not a module name: after -- give e.g. rlhf.ppo, then its flags")
    if opts.nodes < 1:
        parser.error("--nodes must be >= 1")
    if "--save_steps" not in args and "--config" not in args:
        print(
            "launch.submit: warning: without --save_steps the trainer checkpoints only when warned of a preemption; a job killed "
            "without warning (node failure) restarts from step 0",
            file=sys.stderr,
        )
    executor = make_executor(opts, module)
    job = executor.submit(TrainerTask(module, args))
    print(
        f"launch.submit: submitted job {job.job_id} ({module}); logs in {Path(str(opts.folder).replace('%j', str(job.job_id))).resolve()}",
        flush=True,
    )
    if opts.no_wait:
        return 0
    try:
        results = wait(job)
    except (RuntimeError, submitit.core.utils.UncompletedJobError) as err:  # a task failed, or the job was killed
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    print(f"launch.submit: job {job.job_id} finished: {len(results)} task(s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
