"""Resumable checkpoints and the final Hugging Face export, both written atomically.

Checkpoint layout under ``--ckpt_path``::

    latest                      name of the newest complete checkpoint (replaced atomically)
    step_00000040/
        <engine name>/engine/   DeepSpeed engine + optimizer + LR schedule shards
        rng/rank_<r>.pt         every rank's RNG states (python, numpy, torch, cuda)
        trainer_state.json      step, data position and whatever the trainer adds

A checkpoint is written into ``.incomplete-step_N`` and renamed once every rank has finished;
only then does ``latest`` move. A job killed mid-save leaves the previous checkpoint and
``latest`` untouched, and the next save clears the leftover folder.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist

from rlhf.errors import UserError

LATEST = "latest"
STATE_FILE = "trainer_state.json"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(ckpt_path: str, step: int, engines: Mapping[str, Any], trainer_state: dict, max_keep: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder."""
    root = Path(ckpt_path)
    name = f"step_{step:08d}"
    staging = root / f".incomplete-{name}"
    final = root / name
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob(".incomplete-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        (staging / "rng").mkdir(parents=True)
    _barrier()
    for engine_name, engine in engines.items():
        engine.save(str(staging / engine_name))
    torch.save(rng_state(), staging / "rng" / f"rank_{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        (staging / STATE_FILE).write_text(json.dumps({"step": step, **trainer_state}, indent=1))
        if final.exists():  # a save of the same step from an earlier, interrupted run
            shutil.rmtree(final)
        os.replace(staging, final)
        _write_text_atomic(root / LATEST, name)
        _prune(root, keep=max_keep)
    _barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(ckpt_path: str) -> Optional[Path]:
    """The newest complete checkpoint folder, or None when there is none yet."""
    pointer = Path(ckpt_path) / LATEST
    if not pointer.is_file():
        return None
    folder = Path(ckpt_path) / pointer.read_text().strip()
    if not (folder / STATE_FILE).is_file():
        raise UserError(f"{pointer}: names {folder.name}, which is not a complete checkpoint")
    return folder


def load_checkpoint(folder: Path, engines: Mapping[str, Any]) -> dict:
    """Collective. Restores engines and this rank's RNG; returns the trainer state."""
    for engine_name, engine in engines.items():
        engine.load(str(folder / engine_name))
    rng_file = folder / "rng" / f"rank_{_rank()}.pt"
    if not rng_file.is_file():
        raise UserError(f"{folder}: no RNG state for rank {_rank()} (was it written by a job with a different world size?)")
    set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((folder / STATE_FILE).read_text())


# Files a trainer writes next to the model (metrics, plots, wandb runs, PPO's critic) that an
# export keeps.
KEEP_ON_EXPORT = ("metrics.jsonl", "*.png", "wandb", "critic")


def export_hf(engine: Any, tokenizer: Any, out_dir: str, extra_files: Optional[Mapping[str, str]] = None) -> None:
    """Collective over the engine's ranks. Write an HF folder (model or LoRA adapter + tokenizer)
    that plain transformers loads.

    ZeRO-3 shards are gathered one parameter at a time; the engine group's first rank writes into
    a temporary folder and swaps it in, so an interrupted export never leaves a half-written
    model at ``out_dir``. The run's own files already in ``out_dir`` (``KEEP_ON_EXPORT``) move
    into the new folder.
    """
    group = getattr(engine, "group", None)  # None: the engine spans the world
    writer = not dist.is_initialized() or dist.get_rank(group) == 0
    state = engine.gathered_state_dict(keep=writer)
    if writer:
        out = Path(out_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        model = engine.module
        # transformers writes only on GLOBAL rank 0; a critic on ranks 2-3 must write too.
        model.should_save_on_this_rank = lambda is_main_process: is_main_process
        try:
            model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
        finally:
            del model.should_save_on_this_rank
        tokenizer.save_pretrained(str(tmp))
        for filename, text in (extra_files or {}).items():
            (tmp / filename).write_text(text)
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            for pattern in KEEP_ON_EXPORT:
                for kept in out.glob(pattern):
                    os.replace(kept, tmp / kept.name)
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier(group)
