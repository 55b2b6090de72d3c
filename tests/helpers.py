"""Shared helpers for tests that run trainers as real programs (torchrun + gloo + DeepSpeed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]

# ZeRO-3 keeps every parameter of a tiny model resident by default; these force the
# partition / gather paths to run on every forward (DESIGN.md, environment facts).
ZERO3_FORCE_GATHER = json.dumps(
    {
        "zero_optimization": {
            "stage3_param_persistence_threshold": 0,
            "stage3_max_reuse_distance": 0,
            "stage3_prefetch_bucket_size": 0,
            "stage3_max_live_parameters": 0,
        }
    }
)


def trainer_env(extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": "1",  # 2 cores, 2 ranks: one thread each
            "TOKENIZERS_PARALLELISM": "false",
            "WANDB_MODE": "offline",
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra or {})
    return env


def run_trainer(
    module: str,
    args: Sequence[str],
    *,
    nproc: int = 2,
    env: Optional[Mapping[str, str]] = None,
    timeout: float = 600,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run ``python -m module`` under torchrun with ``nproc`` ranks (or plainly when nproc == 0)."""
    if nproc == 0:
        cmd = [sys.executable, "-m", module, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", module, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=trainer_env(env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}"
        )
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def error_lines(stderr: str) -> list[str]:
    """The lines our entry points print for a UserError."""
    return [line for line in stderr.splitlines() if line.startswith("error: ")]
