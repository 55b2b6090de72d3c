"""Why training runs slower with vLLM colocated: one training step's time in a process that holds
a vLLM engine, against one that does not, and against the suspects one at a time.

    python perf/vllm_colocated.py                  # 25M benchmark Qwen2, 3 alternating rounds
    python perf/vllm_colocated.py --repeats 5 --steps 8

Each variant runs in a fresh process (``--variant`` runs one, the parent alternates them) and
times ``--steps`` forward+backward passes of the same micro-batch (8 x 84 tokens, as the GRPO
benchmark's) after a warm-up, on a gloo world of 1, the way ``rlhf.ppo`` runs:

- ``plain``: no vLLM.
- ``vllm``: a ``VLLMGenerator`` (``--rollout_backend vllm``'s engine) built and run once first.
- ``gloo_groups``: no vLLM, but as many extra idle gloo process groups as the vLLM engine creates
  (vLLM's world/TP/PP/DP/EP groups; each gloo group owns a TCP event-loop thread).
- ``vllm_memory_bind``: no vLLM, only the NUMA memory binding its CPU worker applies
  (``init_cpu_memory_env``).

Besides wall time per step it reports the process's CPU time per step and the context switches
of each thread over the timed steps, which is what separates "the arithmetic got slower" from
"the arithmetic was interrupted". Prints a table and writes results/vllm_colocated.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_model, write_report  # noqa: E402

VARIANTS = ("plain", "vllm", "gloo_groups", "vllm_memory_bind")


def thread_stats() -> dict[str, tuple[str, int, int]]:
    """tid -> (name, voluntary, involuntary context switches) for every thread of this process."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/self/task/{tid}/status") as f:
                status = f.read()
        except FileNotFoundError:  # the thread ended
            continue
        vol = int(status.split("\nvoluntary_ctxt_switches:")[1].split()[0])
        invol = int(status.split("nonvoluntary_ctxt_switches:")[1].split()[0])
        out[tid] = (name, vol, invol)
    return out


def run_variant(variant: str, model_dir: str, steps: int, extra_groups: int) -> dict:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29541")
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dist.init_process_group("gloo")
    if variant == "vllm":
        from rlhf.config import RolloutConfig
        from rlhf.rollout.vllm_engine import VLLMGenerator

        cfg = RolloutConfig(rollout_backend="vllm", generate_max_len=16)
        generator = VLLMGenerator(
            model_dir, AutoTokenizer.from_pretrained(model_dir), cfg, max_model_len=256, dtype=torch.float32, seed=0, tp_group=None
        )
        generator.generate([[5, 6, 7]] * 4)
    elif variant == "gloo_groups":
        groups = [dist.new_group(backend="gloo") for _ in range(extra_groups)]  # noqa: F841 (kept alive)
    elif variant == "vllm_memory_bind":
        import vllm._C  # noqa: F401 (registers torch.ops._C)

        torch.ops._C.init_cpu_memory_env([0])
    loops = sum(1 for name, _, _ in thread_stats().values() if name.startswith("gloo"))

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    ids = torch.randint(3, 60, (8, 84), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        logits = model(input_ids=ids, use_cache=False).logits
        logits.float().logsumexp(-1).mean().backward()

    step()  # warm-up
    before, walls, cpus = thread_stats(), [], []
    for _ in range(steps):
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    after = thread_stats()
    switches: dict[str, list[int]] = {}
    for tid, (name, vol, invol) in after.items():
        if tid in before:
            total = switches.setdefault(name, [0, 0])
            total[0] += vol - before[tid][1]
            total[1] += invol - before[tid][2]
    return {
        "variant": variant,
        "step_s": statistics.median(walls),
        "cpu_s": statistics.median(cpus),
        "gloo_loops": loops,
        "threads": len(after),
        "switches_per_step": {name: [v / steps, i / steps] for name, (v, i) in switches.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant in this process (the parent runs them all)")
    parser.add_argument("--model", help="model folder (the parent builds one)")
    parser.add_argument("--out", help="result JSON (with --variant)")
    parser.add_argument("--steps", type=int, default=6, help="timed forward+backward steps per process (default 6)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds of every variant (default 3)")
    parser.add_argument("--extra_groups", type=int, default=12, help="idle gloo groups in the gloo_groups variant (default 12)")
    parser.add_argument("--hidden", type=int, default=512, help="model hidden size (default 512: the 25M benchmark model)")
    parser.add_argument("--layers", type=int, default=8, help="model layers (default 8)")
    args = parser.parse_args()
    if args.variant:
        result = run_variant(args.variant, args.model, args.steps, args.extra_groups)
        Path(args.out).write_text(json.dumps(result))
        return

    work = Path(tempfile.mkdtemp(prefix="vllm-colocated-"))
    n_params = build_model(str(work / "model"), args.hidden, args.layers)
    rounds: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(args.repeats):
        for variant in VARIANTS:
            out = work / f"{variant}-{r}.json"
            cmd = [sys.executable, __file__, "--variant", variant, "--model", str(work / "model"), "--out", str(out)]
            cmd += ["--steps", str(args.steps), "--extra_groups", str(args.extra_groups)]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rounds[variant].append(json.loads(out.read_text()))
            print(f"round {r + 1} {variant}: {rounds[variant][-1]['step_s']:.3f} s/step", flush=True)
    base = statistics.median(x["step_s"] for x in rounds["plain"])
    rows, notes = [], []
    for variant, results in rounds.items():
        step = statistics.median(x["step_s"] for x in results)
        cpu = statistics.median(x["cpu_s"] for x in results)
        gloo = results[0]["switches_per_step"].get("gloo_tcp_loop", [0, 0])
        rows.append(
            [
                variant,
                f"{step:.3f}",
                f"{step / base:.2f}x",
                f"{cpu:.3f}",
                results[0]["gloo_loops"],
                results[0]["threads"],
                f"{gloo[0]:.0f}",
                ", ".join(f"{x['step_s']:.3f}" for x in results),
            ]
        )
        notes.append(f"{variant}: context switches per step by thread name (voluntary, involuntary): {results[0]['switches_per_step']}")
    header = [
        "variant",
        "train step s (median)",
        "vs plain",
        "CPU s per step",
        "gloo loop threads",
        "threads",
        "gloo wake-ups/step",
        "rounds",
    ]
    notes.insert(
        0, f"Model: random-init Qwen2, {n_params / 1e6:.1f}M parameters, fp32; micro-batch 8 x 84 tokens, {args.steps} timed steps."
    )
    write_report(
        "vllm_colocated",
        "Training step with and without a colocated vLLM engine",
        "python perf/vllm_colocated.py " + " ".join(sys.argv[1:]),
        header,
        rows,
        notes,
        {"labels": list(rounds), "values": [float(r[1]) for r in rows], "ylabel": "train step s"},
    )


if __name__ == "__main__":
    main()
