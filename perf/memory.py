"""Peak memory of one SFT, DPO and GRPO optimizer step, ours vs TRL, on the same work.

    bash perf/setup.sh              # once: TRL into perf/.venv-trl
    python perf/memory.py           # 25M benchmark model with a 32k vocabulary, seq 1024

Both sides train the same seeded random Qwen2 (perf/ppo_step_memory.py build_model: the perf
benchmark model, 512 hidden x 8 layers, its vocabulary widened to ``--vocab_size``), fp32, one
process each, no gradient checkpointing on either side, on the same rows with the same lengths and
batch shapes: ``--batch`` sequences / pairs / completions per optimizer step in micro-batches of
``--micro_batch``. Why a real-sized vocabulary: the embedded character tokenizer has 264 tokens,
real ones 32k-152k, and the [B, T, V] logits that chunked log-probs remove only weigh what they do
on a real model with a real vocabulary.

What is measured: optimizer step 2 (step 1 is a warm-up that also allocates Adam's state, so both
sides start the measured step holding weights, optimizer state and whatever buffers they keep).
At the end of step 1: ``gc.collect()``, ``malloc_trim(0)``, read VmRSS, reset VmHWM to it
(``/proc/self/clear_refs``); at the end of step 2 read VmHWM. Reported: the RSS before, the
absolute peak, and the peak above the RSS before (what the step itself needs). Ours: the real
``rlhf.sft`` / ``rlhf.dpo`` / ``rlhf.ppo`` programs, in process, with ``TrainEngine.step`` wrapped
to take the readings at its accumulation boundaries; TRL: ``perf/trl_side.py --memory_json`` (a
``TrainerCallback`` at ``on_step_end``). The GRPO step includes generation on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, python_for_trl, run_side, write_report  # noqa: E402
from ppo_step_memory import build_model, reset_peak, settle, status_kb  # noqa: E402
from side_by_side import our_order, random_text, write_dpo_data, write_jsonl  # noqa: E402

MEASURED_STEP = 2  # optimizer step measured: the one after the warm-up step


# ----------------------------------------------------------------------------------------------
# Our side: the real program in this process, readings at TrainEngine.step's boundaries


def our_child(args) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    import importlib

    from rlhf.engines.train_engine import TrainEngine

    original_step = TrainEngine.step
    state = {"steps": 0}

    def measured_step(self):
        boundary = self.engine.is_gradient_accumulation_boundary()
        original_step(self)
        if not boundary:
            return
        state["steps"] += 1
        if state["steps"] == MEASURED_STEP - 1:
            settle()
            state["before_kb"] = status_kb("VmRSS")
            reset_peak()
        elif state["steps"] == MEASURED_STEP:
            Path(args.json).write_text(
                json.dumps({"step": MEASURED_STEP, "before_mb": state["before_kb"] / 1024, "peak_mb": status_kb("VmHWM") / 1024})
            )

    TrainEngine.step = measured_step
    importlib.import_module(args.module).main(args.argv)


# ----------------------------------------------------------------------------------------------
# Parent: data, both sides per trainer, report


def measure_ours(module: str, argv: list[str], work: Path, tag: str) -> dict:
    out = work / f"{tag}-ours.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", module, "--json", str(out), "--", *argv]
    run_side(cmd, log=work / f"{tag}-ours.log")
    return json.loads(out.read_text())


def measure_trl(argv: list[str], work: Path, tag: str) -> dict:
    out = work / f"{tag}-trl.json"
    cmd = [python_for_trl(), "perf/trl_side.py", *argv, "--memory_json", str(out), "--no_gradient_checkpointing"]
    cmd += ["--out", str(work / f"{tag}-trl-steps.json")]
    run_side(cmd, log=work / f"{tag}-trl.log")
    return json.loads(out.read_text())


def common_flags(args, work: Path, tag: str) -> list[str]:
    """Our flags shared by the three trainers (side_by_side.py's settings); 2 optimizer steps."""
    return [
        *("--learning_rate", "1e-5", "--lr_warmup_ratio", "0", "--lr_scheduler", "constant_with_warmup", "--l2", "0"),
        *("--max_steps", str(MEASURED_STEP), "--seed", "42", "--logging_steps", "1"),
        *("--save_path", str(work / f"out-{tag}"), "--ckpt_path", str(work / f"ckpt-{tag}")),
        *("--micro_train_batch_size", str(args.micro_batch), "--train_batch_size", str(args.batch)),
    ]


def trl_flags(args, model: str, data: Path, trainer: str) -> list[str]:
    flags = [trainer, "--model", model, "--data", str(data), "--steps", str(MEASURED_STEP)]
    return flags + ["--batch", str(args.batch), "--micro_batch", str(args.micro_batch), "--lr", "1e-5"]


def bench_sft(args, work: Path, model: str) -> dict:
    rng = random.Random(0)
    n = MEASURED_STEP * args.batch
    rows = [{"text": random_text(rng, args.seq_len - 1)} for _ in range(n)]  # + EOS = seq_len tokens on both sides
    write_jsonl(work / "sft_ours.jsonl", rows)
    write_jsonl(work / "sft_trl.jsonl", [rows[i] for i in our_order(n, args.micro_batch)])
    ours = [
        *("--pretrain", model, "--dataset", str(work / "sft_ours.jsonl"), "--input_key", "text", "--pretrain_mode"),
        *("--eval_holdout_ratio", "0", "--max_len", str(args.seq_len)),
        *common_flags(args, work, "sft"),
    ]
    return {
        "rlhf": measure_ours("rlhf.sft", ours, work, "sft"),
        "TRL": measure_trl(trl_flags(args, model, work / "sft_trl.jsonl", "sft") + ["--max_len", str(args.seq_len)], work, "sft"),
    }


def bench_dpo(args, work: Path, model: str) -> dict:
    write_dpo_data(work, MEASURED_STEP * args.batch, args.seq_len, args.micro_batch)
    ours = [
        *("--pretrain", model, "--dataset", str(work / "dpo_ours.jsonl")),
        *("--prompt_key", "prompt", "--chosen_key", "chosen", "--rejected_key", "rejected"),
        *("--eval_holdout_ratio", "0", "--max_len", str(args.seq_len), "--beta", "0.1", "--loss_type", "sigmoid", "--ref_mode", "engine"),
        *common_flags(args, work, "dpo"),
    ]
    trl = trl_flags(args, model, work / "dpo_trl.jsonl", "dpo") + ["--max_len", str(args.seq_len), "--beta", "0.1"]
    return {"rlhf": measure_ours("rlhf.dpo", ours, work, "dpo"), "TRL": measure_trl(trl, work, "dpo")}


def bench_grpo(args, work: Path, model: str) -> dict:
    prompts = [json.loads(line) for line in (REPO / "rlhf" / "assets" / "arith" / "prompts_train.jsonl").read_text().splitlines()]
    n_prompts = args.batch // args.num_generations
    rows = [{"prompt": p["input"], "input": p["input"], "label": p["label"]} for p in prompts[: n_prompts * MEASURED_STEP]]
    write_jsonl(work / "grpo.jsonl", rows)
    reward = str(REPO / "perf" / "bench_reward.py") + ":digit_share"
    completion_len = args.seq_len - max(len(r["input"]) for r in rows) - 2  # prompt + completion within seq_len (chat template aside)
    ours = [
        *("--pretrain", model, "--prompt_data", str(work / "grpo.jsonl"), "--input_key", "input", "--reward_func", reward),
        *("--advantage_estimator", "group_norm", "--n_samples_per_prompt", str(args.num_generations)),
        *("--rollout_batch_size", str(n_prompts), "--micro_rollout_batch_size", str(args.micro_batch)),
        *("--generate_max_len", str(completion_len), "--ignore_eos", "--temperature", "1.0"),
        *("--init_kl_coef", "0.001", "--use_kl_loss", "--kl_estimator", "k3", "--rollout_backend", "hf"),
        *common_flags(args, work, "grpo"),
    ]
    trl = trl_flags(args, model, work / "grpo.jsonl", "grpo") + [
        *("--reward", reward, "--beta", "0.001", "--num_generations", str(args.num_generations)),
        *("--completion_len", str(completion_len)),
    ]
    result = {"rlhf": measure_ours("rlhf.ppo", ours, work, "grpo"), "TRL": measure_trl(trl, work, "grpo")}
    result["completion_len"] = completion_len
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", nargs="+", default=["sft", "dpo", "grpo"], choices=["sft", "dpo", "grpo"], help="which trainers")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size (default 512: the 25M perf benchmark model)")
    parser.add_argument("--layers", type=int, default=8, help="layers (default 8)")
    parser.add_argument("--vocab_size", type=int, default=32000, help="vocabulary (default 32000: a real one; the embedded has 264)")
    parser.add_argument("--seq_len", type=int, default=1024, help="tokens per sequence (default 1024)")
    parser.add_argument("--batch", type=int, default=8, help="sequences / pairs / completions per optimizer step (default 8)")
    parser.add_argument("--micro_batch", type=int, default=4, help="per forward/backward (default 4)")
    parser.add_argument("--num_generations", type=int, default=4, help="GRPO completions per prompt (default 4)")
    parser.add_argument("--work", default=None, help="work folder (default: a new temporary one)")
    parser.add_argument(
        "--report_from", nargs="+", default=None, help="write the report from these saved results.json files (runs of this script) only"
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)
    parser.add_argument("argv", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        our_child(argparse.Namespace(module=args.child, json=args.json, argv=args.argv))
        return

    if args.report_from:
        results = {}
        for path in args.report_from:
            results.update(json.loads(Path(path).read_text()))
        params, vocab = json.loads(Path(args.report_from[0]).with_name("model.json").read_text()).values()
        report(args, results, params, vocab, Path(args.report_from[0]).parent)
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="memory_"))
    work.mkdir(parents=True, exist_ok=True)
    model = str(work / "model")
    params, vocab = build_model(model, args.hidden, args.layers, args.vocab_size)
    print(f"model: Qwen2 {args.hidden}x{args.layers}, {params / 1e6:.1f}M parameters, vocabulary {vocab} -> {model}", flush=True)
    (work / "model.json").write_text(json.dumps({"params": params, "vocab": vocab}))
    benches = {"sft": bench_sft, "dpo": bench_dpo, "grpo": bench_grpo}
    results = {}
    for name in args.bench:
        results[name] = benches[name](args, work, model)
        print(name, json.dumps(results[name]), flush=True)
        (work / "results.json").write_text(json.dumps(results, indent=1))
    report(args, results, params, vocab, work)


def report(args, results: dict, params: int, vocab: int, work: Path) -> None:
    one_btv = args.micro_batch * args.seq_len * vocab * 4 / 2**20
    what = {
        "sft": f"`rlhf.sft --pretrain_mode` vs `SFTTrainer`: {args.batch} sequences x {args.seq_len} tokens",
        "dpo": f"`rlhf.dpo --ref_mode engine` vs `DPOTrainer` (sigmoid, reference forward each step): {args.batch} pairs x {args.seq_len} tokens",
        "grpo": "`rlhf.ppo --advantage_estimator group_norm --use_kl_loss` vs `GRPOTrainer` (beta 0.001): "
        f"{args.batch} completions of {results.get('grpo', {}).get('completion_len', '?')} tokens, generation included",
    }
    rows, labels, values = [], [], []
    for name, r in results.items():
        ours, trl = r["rlhf"], r["TRL"]
        step = {side: r[side]["peak_mb"] - r[side]["before_mb"] for side in ("rlhf", "TRL")}
        rows.append([name.upper(), "rlhf", f"{ours['before_mb']:.0f}", f"{ours['peak_mb']:.0f}", f"{step['rlhf']:.0f}", "", ""])
        rows.append([name.upper(), "TRL 1.16", f"{trl['before_mb']:.0f}", f"{trl['peak_mb']:.0f}", f"{step['TRL']:.0f}", "", ""])
        rows[-2][5] = f"**{ours['peak_mb'] / trl['peak_mb']:.2f}x**"
        rows[-2][6] = f"**{step['rlhf'] / step['TRL']:.2f}x**"
        labels += [f"{name.upper()} peak", f"{name.upper()} step"]
        values += [ours["peak_mb"] / trl["peak_mb"], step["rlhf"] / step["TRL"]]
    notes = [
        f"Model: seeded random Qwen2, hidden {args.hidden}, {args.layers} layers, vocabulary {vocab} ({params / 1e6:.1f}M parameters; "
        f"{(params - 2 * vocab * args.hidden) / 1e6:.1f}M without the embedding and LM head). The vocabulary is a real-sized one, not the "
        "embedded character tokenizer's 264: real vocabularies have 32k-152k entries, and the [B, T, V] logits are what chunking removes.",
        f"fp32, one process each, no gradient checkpointing on either side (TRL 1.16 defaults it on; turned off), micro-batches of "
        f"{args.micro_batch}; ours ZeRO-2 (the default). One fp32 [B, T, V] tensor of a micro-batch is {one_btv:.0f} MiB.",
        *[f"{k.upper()}: {v}." for k, v in what.items() if k in results],
        f"Measured: optimizer step {MEASURED_STEP} (step 1 is the warm-up that allocates Adam's state). RSS before = VmRSS at the end "
        "of step 1 after gc and malloc_trim; peak = VmHWM (reset to it then) at the end of step 2; step = peak - RSS before. "
        "MiB. Ratios: ours / TRL.",
    ]
    cmd = "python perf/memory.py" + "".join(
        f" --{k} {v}"
        for k, v in (("vocab_size", args.vocab_size), ("seq_len", args.seq_len), ("batch", args.batch), ("micro_batch", args.micro_batch))
    )
    write_report(
        "memory",
        "Peak memory of one optimizer step: rlhf vs TRL",
        cmd,
        ["trainer", "side", "RSS before MiB", "peak MiB", "step MiB (peak - before)", "peak ratio", "step ratio"],
        rows,
        notes,
        chart={"labels": labels, "values": values, "ylabel": "rlhf / TRL (lower is less memory)"},
    )
    print(f"(work folder with logs: {work})")


if __name__ == "__main__":
    main()
