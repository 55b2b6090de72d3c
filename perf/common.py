"""Shared parts of the benchmarks: the benchmark model, the machine header, alternating rounds,
medians and the report (Markdown table + PNG chart).

Every benchmark builds ONE randomly initialised Qwen2 (seeded) with the embedded character
tokenizer and saves it to a folder that both sides load, so both train exactly the same weights.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "perf" / "results"
TRL_PYTHON = REPO / "perf" / ".venv-trl" / "bin" / "python"


def qwen2_config(hidden: int, layers: int, vocab_size: int, tied: bool = False, **extra):
    """A Qwen2 config of the given width and depth, heads of 64 dims, GQA 2:1, MLP 3x."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 1),
        num_key_value_heads=max(hidden // 128, 1),
        max_position_embeddings=4096,
        tie_word_embeddings=tied,
        **extra,
    )


def build_model(folder: str, hidden: int, layers: int, tied: bool = False) -> int:
    """Save a seeded random Qwen2 + the embedded tokenizer to ``folder``; returns the parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(REPO / "rlhf" / "assets" / "tiny-qwen2")
    config = qwen2_config(
        hidden, layers, len(tokenizer), tied, bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


@functools.lru_cache(maxsize=None)
def machine() -> str:
    """One line: date, CPU, cores, versions."""
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    try:
        import deepspeed

        versions += f", deepspeed {deepspeed.__version__}"
    except ImportError:
        pass
    trl = trl_version()
    if trl:
        versions += f", trl {trl}"
    return f"{date.today().isoformat()}, {cpu}, {os.cpu_count()} cores, {versions}"


def trl_version() -> Optional[str]:
    if not TRL_PYTHON.exists():
        return None
    out = subprocess.run([str(TRL_PYTHON), "-c", "import trl; print(trl.__version__)"], capture_output=True, text=True)
    return out.stdout.strip() or None


def run_side(cmd: list[str], log: Optional[Path] = None) -> float:
    """Run one side's subprocess to completion (its output to ``log``); returns wall seconds.

    A failure raises with the log's tail, so a broken side is never reported as slow or fast.
    """
    started = time.perf_counter()
    with open(log or os.devnull, "w") as out:
        proc = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = Path(log).read_text()[-3000:] if log else ""
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed with exit {proc.returncode}:\n{tail}")
    return time.perf_counter() - started


def alternate(sides: dict[str, Callable[[int], dict]], repeats: int) -> dict[str, list[dict]]:
    """Run each side once per round, in turn, for ``repeats`` rounds; results per side in order."""
    results: dict[str, list[dict]] = {name: [] for name in sides}
    for round_index in range(repeats):
        for name, side in sides.items():
            result = side(round_index)
            results[name].append(result)
            print(
                f"  round {round_index + 1}/{repeats} {name}: "
                + ", ".join(f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, (int, float))),
                flush=True,
            )
    return results


def median_of(rounds: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


def steady_steps(values: list[float], warmup: int) -> list[float]:
    """Per-step values without the first ``warmup`` steps (allocator and lazy-init effects)."""
    if len(values) <= warmup:
        raise RuntimeError(f"need more than {warmup} steps to time, got {len(values)}")
    return values[warmup:]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_report(
    name: str, title: str, command: str, header: list[str], rows: list[list], notes: list[str], chart: Optional[dict] = None
) -> Path:
    """Write results/NAME.md (table + notes + command + machine) and results/NAME.png (bar chart).

    ``chart``: {"labels": [...], "values": [...], "ylabel": str}.
    """
    RESULTS.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", f"Machine: {machine()}", "", f"Command: `{command}`", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    lines += [""] + [f"- {n}" for n in notes]
    md = RESULTS / f"{name}.md"
    md.write_text("\n".join(lines) + "\n")
    if chart:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.2))
        bars = ax.bar(chart["labels"], chart["values"], color=["#4c72b0", "#dd8452", "#55a868", "#c44e52"][: len(chart["values"])])
        ax.bar_label(bars, fmt="%.3g")
        ax.set_ylabel(chart["ylabel"])
        ax.set_title(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(RESULTS / f"{name}.png", dpi=110)
        plt.close(fig)
    print("\n".join(lines))
    return md


def python_for_trl() -> str:
    if not TRL_PYTHON.exists():
        sys.exit(f"error: {TRL_PYTHON} is missing: run `bash perf/setup.sh` first (installs TRL into the benchmark's own environment)")
    return str(TRL_PYTHON)
