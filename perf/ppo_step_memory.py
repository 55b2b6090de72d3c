"""Peak memory of one PPO step: resident memory each phase needs above what the process held before it.

    python perf/ppo_step_memory.py                                   # this tree, 25M model, B=4, ~1k tokens
    python perf/ppo_step_memory.py --vocab_size 32000 --repeats 3    # a real-sized vocabulary: [B, T, V] matters
    python perf/ppo_step_memory.py --tree before=/tmp/ppo_before --tree now=.   # compare checkouts, rounds alternate

What runs: the real ``python -m rlhf.ppo`` program (``rlhf.ppo.main``), one process (a gloo group of
world 1, no torchrun), PPO with a critic and a reference model by default (``--advantage_estimator
gae``, KL in the reward), on the perf benchmark model (a seeded random Qwen2, 512 hidden x 8
layers: 25M parameters with the embedded character tokenizer's vocabulary; ``--vocab_size`` widens
the embedding and LM head to a real vocabulary so the [B, T, V] logits weigh what they do on a real
model). Prompts are the embedded arithmetic prompts; every response is exactly ``--response_len``
tokens (``--ignore_eos``), so T = prompt + response. ``rlhf.ppo``'s phase functions
(``make_experience``, ``train_actor``, ``train_critic``) are wrapped, nothing inside them changes;
the final export is skipped.

Measurement (Linux): before a phase, ``gc.collect()`` and ``malloc_trim(0)``, read VmRSS, then write
"5" to /proc/self/clear_refs, which resets the peak (VmHWM) to the current RSS; after the phase read
VmHWM. Reported: peak - RSS before, per phase, and for the whole step (experience + actor + critic:
the highest of the phases' peaks minus the RSS before the experience phase). The first step also
allocates the optimizer's state; the later steps are the steady state. Each ``--repeats`` round runs
every ``--tree`` in a fresh process, in turn; figures are the median and the range over rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = ("make_experience", "train_actor", "train_critic")


# ----------------------------------------------------------------------------------------------
# Memory readings (Linux /proc)


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def settle() -> None:
    """Drop cyclic garbage and give freed heap back to the OS, so the RSS before a phase is what is live."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# ----------------------------------------------------------------------------------------------
# Child: one run of rlhf.ppo.main with its phases wrapped


def child(args) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    import torch
    import torch.distributed as dist

    import rlhf.ppo as ppo

    steps: list[dict] = []
    shapes: dict = {}

    def wrap(name, fn):
        def measured(*a, **kw):
            if name == "make_experience":
                steps.append({})
            settle()
            before = status_kb("VmRSS")
            reset_peak()
            started = time.perf_counter()
            out = fn(*a, **kw)
            peak, after = status_kb("VmHWM"), status_kb("VmRSS")
            steps[-1][name] = {
                "before_mb": before / 1024,
                "peak_mb": peak / 1024,
                "after_mb": after / 1024,
                "seconds": time.perf_counter() - started,
            }
            if name == "train_actor":
                cfg, exp, actor = a[0], a[1], a[2]
                shapes.update(
                    B=cfg.train.micro_train_batch_size,
                    T=int(exp.batch["input_ids"].size(1)),
                    samples=int(exp.batch["input_ids"].size(0)),
                    V=int(actor.module.get_output_embeddings().weight.size(0)),
                    params=sum(p.numel() for p in actor.module.parameters()),
                )
            return out

        return measured

    # Replace each phase function wherever a loaded rlhf module holds it (rlhf.ppo itself, or the
    # modules it was split into: the caller looks the name up in its own module's globals).
    modules = [m for n, m in list(sys.modules.items()) if (n == "rlhf" or n.startswith("rlhf.")) and m is not None]
    for name in PHASES:
        original = next((getattr(m, name) for m in modules if callable(getattr(m, name, None))), None)
        if original is None:
            raise SystemExit(f"no rlhf module defines {name}")
        measured = wrap(name, original)
        for m in modules:
            if getattr(m, name, None) is original:
                setattr(m, name, measured)
    ppo.finish = lambda *a, **kw: dist.destroy_process_group()  # no export: nothing after the steps is measured

    argv = [
        "--pretrain",
        args.model,
        "--prompt_data",
        "embedded:arith/prompts_train.jsonl",
        "--input_key",
        "input",
        "--label_key",
        "label",
        "--reward_func",
        "rlhf.rewards:exact_match",
        "--advantage_estimator",
        args.estimator,
        "--rollout_batch_size",
        str(args.samples // args.n_samples_per_prompt),
        "--n_samples_per_prompt",
        str(args.n_samples_per_prompt),
        "--micro_rollout_batch_size",
        str(args.micro_train_batch_size),
        "--generate_max_len",
        str(args.response_len),
        "--ignore_eos",
        "--train_batch_size",
        str(args.samples),
        "--micro_train_batch_size",
        str(args.micro_train_batch_size),
        "--zero_stage",
        "2",
        "--max_steps",
        str(args.steps),
        "--learning_rate",
        "1e-6",
        "--lr_warmup_ratio",
        "0",
        "--save_path",
        os.path.join(args.work, "model"),
        "--ckpt_path",
        os.path.join(args.work, "ckpt"),
        "--logging_steps",
        "1",
        *args.extra,
    ]
    torch.manual_seed(0)
    ppo.main(argv)
    for step in steps:
        ran = [step[p] for p in PHASES if p in step]
        step["step"] = {
            "before_mb": ran[0]["before_mb"],
            "peak_mb": max(r["peak_mb"] for r in ran),
            "after_mb": ran[-1]["after_mb"],
            "seconds": sum(r["seconds"] for r in ran),
        }
    result = {
        "rlhf": str(Path(ppo.__file__).resolve().parents[1]),
        "shapes": shapes,
        "steps": steps,
        "torch_threads": torch.get_num_threads(),
    }
    Path(args.json).write_text(json.dumps(result))


# ----------------------------------------------------------------------------------------------
# Parent: build the model once, run each tree in fresh processes, report


def build_model(folder: str, hidden: int, layers: int, vocab_size: int) -> tuple[int, int]:
    """The perf benchmark model (perf/common.py: seeded random Qwen2, embedded tokenizer), its
    vocabulary widened to ``vocab_size`` if that is larger. Returns (parameters, vocabulary)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(REPO / "perf"))
    from common import qwen2_config

    tokenizer = AutoTokenizer.from_pretrained(REPO / "rlhf" / "assets" / "tiny-qwen2")
    vocab = max(vocab_size, len(tokenizer))
    config = qwen2_config(
        hidden, layers, vocab, bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters()), vocab


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.0f}"
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def parent(args) -> None:
    trees = []
    for spec in args.tree or [f"current={REPO}"]:
        label, _, path = spec.partition("=")
        trees.append((label, str(Path(path or label).resolve())))
    work = Path(tempfile.mkdtemp(prefix="ppo_step_memory_"))
    model = str(work / "model")
    params, vocab = build_model(model, args.hidden, args.layers, args.vocab_size)
    print(f"model: Qwen2 {args.hidden}x{args.layers}, {params / 1e6:.1f}M parameters, vocabulary {vocab} -> {model}", flush=True)

    runs: dict[str, list[dict]] = {label: [] for label, _ in trees}
    for round_index in range(args.repeats):
        for label, path in trees:
            out = work / f"{label}-{round_index}.json"
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--child",
                "--json",
                str(out),
                "--model",
                model,
                "--work",
                str(work / f"run-{label}-{round_index}"),
            ]
            cmd += [
                f"--{k}={v}"
                for k, v in (
                    ("samples", args.samples),
                    ("n_samples_per_prompt", args.n_samples_per_prompt),
                    ("micro_train_batch_size", args.micro_train_batch_size),
                    ("response_len", args.response_len),
                    ("steps", args.steps),
                    ("estimator", args.estimator),
                )
            ]
            cmd += ["--", *args.extra] if args.extra else []
            env = {**os.environ, "PYTHONPATH": path + os.pathsep + os.environ.get("PYTHONPATH", "")}
            log = work / f"{label}-{round_index}.log"
            started = time.perf_counter()
            with open(log, "w") as f:
                proc = subprocess.run(cmd, env=env, cwd=work, stdout=f, stderr=subprocess.STDOUT)
            if proc.returncode != 0:
                sys.exit(f"{label} round {round_index + 1} failed (exit {proc.returncode}); log {log}:\n{log.read_text()[-4000:]}")
            result = json.loads(out.read_text())
            if Path(result["rlhf"]) != Path(path):
                sys.exit(f"{label}: imported rlhf from {result['rlhf']}, not {path}")
            runs[label].append(result)
            last = result["steps"][-1]
            print(
                f"  round {round_index + 1}/{args.repeats} {label}: "
                + ", ".join(f"{p} +{last[p]['peak_mb'] - last[p]['before_mb']:.0f} MB" for p in (*PHASES, "step") if p in last)
                + f"  ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )

    shapes = runs[trees[0][0]][0]["shapes"]
    B, T, V = shapes["B"], shapes["T"], shapes["V"]
    one = B * T * V * 4 / 2**20
    print()
    print(
        f"model parameters {shapes['params'] / 1e6:.1f}M (actor), micro-batch B={B}, sequence T={T} (prompt + {args.response_len} response tokens), vocabulary V={V}, "
        f"{shapes['samples']} samples per step ({shapes['samples'] // B} micro-batches), {args.estimator}, {runs[trees[0][0]][0]['torch_threads']} torch threads"
    )
    print(f"one fp32 [B, T, V] tensor: {one:.0f} MB")
    print(f"peak RSS above the RSS before the phase, MB: median (min-max) over {args.repeats} fresh processes; step k of {args.steps}")
    header = f"{'tree':<12} {'step':>4} " + " ".join(f"{p:>22}" for p in (*PHASES, "step")) + f" {'train_actor / [BTV]':>20}"
    print(header)
    for label, _ in trees:
        for k in range(args.steps):
            cells = []
            for p in (*PHASES, "step"):
                values = [r["steps"][k][p]["peak_mb"] - r["steps"][k][p]["before_mb"] for r in runs[label] if p in r["steps"][k]]
                cells.append(spread(values) if values else "-")
            actor = statistics.median(
                r["steps"][k]["train_actor"]["peak_mb"] - r["steps"][k]["train_actor"]["before_mb"] for r in runs[label]
            )
            print(f"{label:<12} {k + 1:>4} " + " ".join(f"{c:>22}" for c in cells) + f" {actor / one:>20.1f}")
    print(f"(work folder with logs: {work})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", help="LABEL=PATH of an rlhf checkout to measure (repeatable; default: this one)")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size (default 512: the 25M perf benchmark model)")
    parser.add_argument("--layers", type=int, default=8, help="layers (default 8)")
    parser.add_argument("--vocab_size", type=int, default=0, help="widen the vocabulary to this (default: the embedded tokenizer's, 259)")
    parser.add_argument("--response_len", type=int, default=1000, help="response tokens, exactly (default 1000)")
    parser.add_argument(
        "--micro_train_batch_size", type=int, default=4, help="B of the training micro-batches (and of the experience forwards) (default 4)"
    )
    parser.add_argument(
        "--samples", type=int, default=8, help="samples per step = --train_batch_size: one optimizer step per rollout (default 8)"
    )
    parser.add_argument("--n_samples_per_prompt", type=int, default=4, help="(default 4)")
    parser.add_argument(
        "--steps", type=int, default=2, help="PPO steps per process (default 2; the first also allocates the optimizer state)"
    )
    parser.add_argument("--estimator", default="gae", help="--advantage_estimator (default gae: PPO with a critic)")
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes per tree (default 1)")
    parser.add_argument("extra", nargs="*", help="after --: more rlhf.ppo flags, e.g. -- --entropy_coef 0.01")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    child(args) if args.child else parent(args)


if __name__ == "__main__":
    main()
