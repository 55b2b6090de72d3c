"""Read the launch environment and start torch.distributed, whoever launched us.

Supported launchers, tried in this order:

- torchrun (and anything that sets its variables): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
  MASTER_PORT;
- ``srun`` with one task per rank under SLURM: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, the
  master is the first host of SLURM_JOB_NODELIST, the port derived from SLURM_JOB_ID;
- NGC multi-node jobs, one process per node: NGC_ARRAY_INDEX (node rank), NGC_ARRAY_SIZE
  (nodes), NGC_MASTER_ADDR;
- nothing: a single process (rank 0 of 1) on 127.0.0.1.

The backend is NCCL when CUDA is available, gloo otherwise.

Outside torchrun (whose own rendezvous has ``--rdzv_conf join_timeout``), the ranks meet in a
TCP store on MASTER_ADDR:MASTER_PORT that waits at most ``RLHF_RDZV_TIMEOUT`` seconds (default
600) for every rank: a node or task count the job never reaches, or a master that cannot be
reached, ends in a one-line error instead of a hang.
"""

from __future__ import annotations

import os
import re
import socket
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional

import torch
import torch.distributed as dist

from rlhf.errors import UserError

# DeepSpeed still calls torch.distributed's *_tensor collectives, which torch 2.13 marks as
# deprecated on every call: thousands of lines that hide real messages.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "ngc" | "single"

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except KeyError:
        raise UserError(f"launch environment: {name} is not set") from None
    except ValueError:
        raise UserError(f"launch environment: {name}={env[name]!r} is not an integer") from None


def first_slurm_host(nodelist: str) -> str:
    """First hostname of a SLURM node list: 'gpu[003-005,9],cpu1' -> 'gpu003'."""
    first = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not first:
        raise UserError(f"launch environment: cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, _, ranges = first.groups()
    if not ranges:
        return prefix
    start = ranges.split(",")[0].split("-")[0]
    return prefix + start


def read_launch_env(env: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    """Work out rank, world size and rendezvous address from the environment variables."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        if "MASTER_ADDR" not in env:
            raise UserError("launch environment: RANK is set but MASTER_ADDR is missing (start with torchrun or set MASTER_ADDR)")
        return LaunchEnv(
            rank=_int(env, "RANK"),
            world_size=_int(env, "WORLD_SIZE"),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            master_addr=env["MASTER_ADDR"],
            master_port=int(env.get("MASTER_PORT", "29500")),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_JOB_NODELIST" in env:
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        return LaunchEnv(
            rank=_int(env, "SLURM_PROCID"),
            world_size=_int(env, "SLURM_NTASKS"),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            master_addr=env.get("MASTER_ADDR") or first_slurm_host(env["SLURM_JOB_NODELIST"]),
            # A port per job so two jobs sharing a node do not collide.
            master_port=int(env.get("MASTER_PORT") or 20000 + job_id % 20000),
            launcher="slurm",
        )
    if "NGC_ARRAY_INDEX" in env:
        if "NGC_MASTER_ADDR" not in env:
            raise UserError("launch environment: NGC_ARRAY_INDEX is set but NGC_MASTER_ADDR is missing")
        return LaunchEnv(
            rank=_int(env, "NGC_ARRAY_INDEX"),
            world_size=_int(env, "NGC_ARRAY_SIZE"),
            local_rank=0,
            master_addr=env["NGC_MASTER_ADDR"],
            master_port=int(env.get("MASTER_PORT", "29500")),
            launcher="ngc",
        )
    return LaunchEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=_free_port(), launcher="single")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DEFAULT_RDZV_TIMEOUT_S = 600.0


def rendezvous_timeout_s(env: Optional[Mapping[str, str]] = None) -> float:
    env = os.environ if env is None else env
    raw = env.get("RLHF_RDZV_TIMEOUT", "")
    try:
        value = float(raw) if raw else DEFAULT_RDZV_TIMEOUT_S
    except ValueError:
        raise UserError(f"launch environment: RLHF_RDZV_TIMEOUT={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise UserError(f"launch environment: RLHF_RDZV_TIMEOUT={raw!r} must be > 0 seconds")
    return value


def _rendezvous_store(launch: LaunchEnv, timeout_s: float) -> "dist.TCPStore":
    """A TCP store every rank joins within ``timeout_s``, or a UserError that says what is missing."""
    hint = {
        "slurm": "SLURM_NTASKS and the tasks srun started",
        "ngc": "NGC_ARRAY_SIZE and the replicas running",
    }.get(launch.launcher, "WORLD_SIZE and the processes started")
    where = f"{launch.master_addr}:{launch.master_port}"
    try:
        socket.getaddrinfo(launch.master_addr, launch.master_port)
    except socket.gaierror as err:
        raise UserError(
            f"launch environment: master address {launch.master_addr!r} does not resolve ({err.strerror}); set MASTER_ADDR to "
            "the host of rank 0"
        ) from None
    try:
        return dist.TCPStore(
            launch.master_addr,
            launch.master_port,
            world_size=launch.world_size,
            is_master=launch.rank == 0,
            timeout=timedelta(seconds=timeout_s),
            wait_for_workers=True,
        )
    except (RuntimeError, OSError) as err:  # DistStoreError / DistNetworkError / timeouts
        detail = " ".join(str(err).split())[:300]
        if launch.rank == 0:
            raise UserError(
                f"launch environment: rendezvous at {where} timed out after {timeout_s:.0f}s waiting for {launch.world_size} ranks "
                f"(check {hint}; RLHF_RDZV_TIMEOUT sets the wait): {detail}"
            ) from None
        raise UserError(
            f"launch environment: rank {launch.rank} could not reach the master at {where} within {timeout_s:.0f}s "
            f"(is rank 0 running and is MASTER_ADDR its address? RLHF_RDZV_TIMEOUT sets the wait): {detail}"
        ) from None


def backend_for_device() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(timeout_minutes: float = 30.0) -> LaunchEnv:
    """Start the default process group (idempotent) and DeepSpeed's view of it.

    DeepSpeed's communication layer is initialised on top of our group so engines reuse it.
    Its shared-memory comm op is disabled first: it is JIT-compiled (about 20 s) on every start
    and torchrun's gloo/NCCL groups do not need it.
    """
    launch = read_launch_env()
    if launch.world_size < 1 or not 0 <= launch.rank < launch.world_size:
        raise UserError(f"launch environment: rank {launch.rank} is not inside world size {launch.world_size}")
    if torch.cuda.is_available():
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        # Variables the env:// rendezvous reads, for launchers that do not set them.
        os.environ.setdefault("MASTER_ADDR", launch.master_addr)
        os.environ.setdefault("MASTER_PORT", str(launch.master_port))
        os.environ.setdefault("RANK", str(launch.rank))
        os.environ.setdefault("WORLD_SIZE", str(launch.world_size))
        os.environ.setdefault("LOCAL_RANK", str(launch.local_rank))
        store = None
        if launch.world_size > 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
            # Not under torchrun: meet in a store with a bounded wait (torchrun bounds its own).
            store = _rendezvous_store(launch, rendezvous_timeout_s())
            store.set_timeout(timedelta(minutes=timeout_minutes))
        dist.init_process_group(
            backend=backend_for_device(),
            store=store,
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timedelta(minutes=timeout_minutes),
        )
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend_for_device(), auto_mpi_discovery=False)
    return launch


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
