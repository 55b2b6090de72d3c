"""Side by side with TRL on the same machine, in one run: SFT tokens/s, DPO pairs/s, GRPO samples/s.

    bash perf/setup.sh                      # once: TRL into perf/.venv-trl (never into the main env)
    python perf/side_by_side.py --bench sft dpo grpo

Both sides train the same randomly initialised Qwen2 (saved once, loaded by both), on the same
data, in the same order (TRL's sampler is sequential and the rows are written in the order our
trainer's seeded plan visits them), with the same sequence lengths, batch sizes, optimizer
(AdamW, betas 0.9/0.95, no weight decay, clip 1.0, constant lr), fp32, one process each, for the
same number of optimizer steps, neither recomputing activations (TRL 1.16 turns gradient
checkpointing on by default; it is turned off here, as ours does not checkpoint). Rounds alternate (ours, TRL, ours, TRL, ...) so machine drift hits
both; each round's figure is the median step time after ``--warmup`` steps, and the report gives
the median over rounds and the ratio of medians. The work is checked to be the same: tokens per
step are equal, and the step-0 loss (and for DPO the chosen/rejected log-probs) agree.

GRPO: prompts are the embedded addition prompts; both sides sample ``--completion_len`` tokens
per completion with EOS suppressed (ours: ``--ignore_eos``; TRL: ``min_new_tokens``), so both
generate the same number of tokens; both keep a reference model (a k3 KL term in the loss with
coefficient ``--kl``: TRL's beta, our ``--use_kl_loss``) and take one optimizer step per rollout
(so neither runs a separate forward for the behaviour log-probs). Ours runs with the
transformers backend and with colocated vLLM; its per-phase split (generate / sync / score /
train) is reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import string
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, alternate, build_model, median_of, python_for_trl, read_jsonl, run_side, steady_steps, write_report  # noqa: E402

from rlhf.data.batching import plan_epoch  # noqa: E402

SEED = 42  # our trainer's default --seed: it fixes the data order TRL is given
ALPHABET = string.ascii_lowercase + string.digits + " "
MISMATCHES: list[str] = []  # benchmarks whose two sides were found to do different work


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(n))


def our_order(n_items: int, micro_batch: int) -> list[int]:
    """The item order our trainer visits in epoch 0 (equal lengths, no packing), flattened."""
    return [i for mb in plan_epoch([1] * n_items, micro_batch_size=micro_batch, seed=SEED, epoch=0) for i in mb]


def write_dpo_data(work: Path, n: int, seq_len: int, micro_batch: int) -> None:
    """``n`` seeded random preference pairs of ``seq_len`` tokens each (a quarter prompt, the rest
    response + EOS): dpo_ours.jsonl in file order, dpo_trl.jsonl in the order our trainer visits it."""
    rng = random.Random(1)
    prompt_len = seq_len // 4
    completion_len = seq_len - prompt_len - 1  # + EOS
    rows = [
        {"prompt": random_text(rng, prompt_len), "chosen": random_text(rng, completion_len), "rejected": random_text(rng, completion_len)}
        for _ in range(n)
    ]
    write_jsonl(work / "dpo_ours.jsonl", rows)
    write_jsonl(work / "dpo_trl.jsonl", [rows[i] for i in our_order(n, micro_batch)])


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def common_flags(args, work: Path, tag: str) -> list[str]:
    return [
        "--learning_rate",
        str(args.lr),
        "--lr_warmup_ratio",
        "0",
        "--lr_scheduler",
        "constant_with_warmup",
        "--l2",
        "0",
        "--zero_stage",
        str(args.zero_stage),
        "--max_steps",
        str(args.steps),
        "--seed",
        str(SEED),
        "--save_path",
        str(work / f"out-{tag}"),
        "--ckpt_path",
        str(work / f"ckpt-{tag}"),
        "--logging_steps",
        "1",
    ]


def step0_gap(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


# ----------------------------------------------------------------------------------------------
# SFT


def bench_sft(args, work: Path, model: str, n_params: int) -> dict:
    rng = random.Random(0)
    n = args.steps * args.batch
    rows = [{"text": random_text(rng, args.seq_len - 1)} for _ in range(n)]  # + EOS = seq_len tokens on both sides
    write_jsonl(work / "sft_ours.jsonl", rows)
    write_jsonl(work / "sft_trl.jsonl", [rows[i] for i in our_order(n, args.micro_batch)])

    def ours(r: int) -> dict:
        cmd = [
            sys.executable,
            "-m",
            "rlhf.sft",
            "--pretrain",
            model,
            "--dataset",
            str(work / "sft_ours.jsonl"),
            "--input_key",
            "text",
            "--pretrain_mode",
            "--eval_holdout_ratio",
            "0",
            "--max_len",
            str(args.seq_len),
            "--micro_train_batch_size",
            str(args.micro_batch),
            "--train_batch_size",
            str(args.batch),
            *common_flags(args, work, f"sft{r}"),
        ]
        run_side(cmd, log=work / f"sft-ours-{r}.log")
        steps = read_jsonl(work / f"out-sft{r}" / "metrics.jsonl")
        steps = [s for s in steps if "step_seconds" in s]
        seconds = statistics.median(steady_steps([s["step_seconds"] for s in steps], args.warmup))
        tokens = steps[0]["tokens_per_s"] * steps[0]["step_seconds"]
        return {
            "step_s": seconds,
            "rate": tokens / seconds,
            "tokens_per_step": tokens,
            "loss0": steps[0]["loss"],
            "loss_last": steps[-1]["loss"],
        }

    def trl(r: int) -> dict:
        out = work / f"sft-trl-{r}.json"
        cmd = [
            python_for_trl(),
            "perf/trl_side.py",
            "--no_gradient_checkpointing",  # TRL 1.16 defaults it on; ours recomputes nothing: same work
            "sft",
            "--model",
            model,
            "--data",
            str(work / "sft_trl.jsonl"),
            "--out",
            str(out),
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--micro_batch",
            str(args.micro_batch),
            "--max_len",
            str(args.seq_len),
            "--lr",
            str(args.lr),
        ]
        run_side(cmd, log=work / f"sft-trl-{r}.log")
        result = json.loads(out.read_text())
        seconds = statistics.median(steady_steps(result["step_seconds"], args.warmup))
        logs = [entry for entry in result["logs"] if "loss" in entry]
        tokens = logs[0]["num_tokens"]  # TRL's count of input tokens in step 1 (all non-padding)
        return {
            "step_s": seconds,
            "rate": tokens / seconds,
            "tokens_per_step": tokens,
            "loss0": logs[0]["loss"],
            "loss_last": logs[-1]["loss"],
        }

    return finish(
        "sft",
        "SFT: rlhf vs TRL SFTTrainer",
        "tokens/s",
        args,
        n_params,
        alternate({"rlhf": ours, "TRL": trl}, args.repeats),
        f"seq_len {args.seq_len}, {args.batch} sequences per step ({args.micro_batch} per micro-batch), pre-training loss on every token",
    )


# ----------------------------------------------------------------------------------------------
# DPO


def bench_dpo(args, work: Path, model: str, n_params: int) -> dict:
    n = args.steps * args.batch
    write_dpo_data(work, n, args.seq_len, args.micro_batch)

    def ours(r: int) -> dict:
        cmd = [
            sys.executable,
            "-m",
            "rlhf.dpo",
            "--pretrain",
            model,
            "--dataset",
            str(work / "dpo_ours.jsonl"),
            "--prompt_key",
            "prompt",
            "--chosen_key",
            "chosen",
            "--rejected_key",
            "rejected",
            "--eval_holdout_ratio",
            "0",
            "--max_len",
            str(args.seq_len),
            "--beta",
            "0.1",
            "--loss_type",
            "sigmoid",
            "--ref_mode",
            "engine",
            "--micro_train_batch_size",
            str(args.micro_batch),
            "--train_batch_size",
            str(args.batch),
            *common_flags(args, work, f"dpo{r}"),
        ]
        run_side(cmd, log=work / f"dpo-ours-{r}.log")
        steps = [s for s in read_jsonl(work / f"out-dpo{r}" / "metrics.jsonl") if "step_seconds" in s]
        seconds = statistics.median(steady_steps([s["step_seconds"] for s in steps], args.warmup))
        tokens = steps[0]["tokens_per_s"] * steps[0]["step_seconds"]
        return {
            "step_s": seconds,
            "rate": args.batch / seconds,
            "tokens_per_step": tokens,
            "loss0": steps[0]["loss"],
            "loss_last": steps[-1]["loss"],
            "chosen_logp0": steps[0]["chosen_logp"],
            "rejected_logp0": steps[0]["rejected_logp"],
        }

    def trl(r: int) -> dict:
        out = work / f"dpo-trl-{r}.json"
        cmd = [
            python_for_trl(),
            "perf/trl_side.py",
            "--no_gradient_checkpointing",  # TRL 1.16 defaults it on; ours recomputes nothing: same work
            "dpo",
            "--model",
            model,
            "--data",
            str(work / "dpo_trl.jsonl"),
            "--out",
            str(out),
            "--beta",
            "0.1",
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--micro_batch",
            str(args.micro_batch),
            "--max_len",
            str(args.seq_len),
            "--lr",
            str(args.lr),
        ]
        run_side(cmd, log=work / f"dpo-trl-{r}.log")
        result = json.loads(out.read_text())
        seconds = statistics.median(steady_steps(result["step_seconds"], args.warmup))
        logs = [entry for entry in result["logs"] if "loss" in entry]
        return {
            "step_s": seconds,
            "rate": args.batch / seconds,
            "tokens_per_step": logs[0].get("num_tokens", float("nan")),
            "loss0": logs[0]["loss"],
            "loss_last": logs[-1]["loss"],
            "chosen_logp0": logs[0]["logps/chosen"],
            "rejected_logp0": logs[0]["logps/rejected"],
        }

    return finish(
        "dpo",
        "DPO: rlhf vs TRL DPOTrainer",
        "pairs/s",
        args,
        n_params,
        alternate({"rlhf": ours, "TRL": trl}, args.repeats),
        f"{args.seq_len} tokens per sequence ({args.seq_len // 4} prompt), {args.batch} pairs per step ({args.micro_batch} per "
        "micro-batch), reference model forward every step, sigmoid loss, beta 0.1",
    )


# ----------------------------------------------------------------------------------------------
# GRPO


def bench_grpo(args, work: Path, model: str, n_params: int) -> dict:
    args = argparse.Namespace(**{**vars(args), "batch": args.grpo_batch, "micro_batch": args.grpo_micro_batch})
    prompts = [json.loads(line) for line in (REPO / "rlhf" / "assets" / "arith" / "prompts_train.jsonl").read_text().splitlines()]
    n_prompts = args.batch // args.num_generations
    rows = [{"prompt": p["input"], "input": p["input"], "label": p["label"]} for p in prompts[: n_prompts * args.steps]]
    write_jsonl(work / "grpo.jsonl", rows)
    reward = str(REPO / "perf" / "bench_reward.py") + ":digit_share"

    def ours(backend: str):
        def side(r: int) -> dict:
            tag = f"grpo-{backend}{r}"
            cmd = [
                sys.executable,
                "-m",
                "rlhf.ppo",
                "--pretrain",
                model,
                "--prompt_data",
                str(work / "grpo.jsonl"),
                "--input_key",
                "input",
                "--reward_func",
                reward,
                "--advantage_estimator",
                "group_norm",
                "--n_samples_per_prompt",
                str(args.num_generations),
                "--rollout_batch_size",
                str(n_prompts),
                "--micro_rollout_batch_size",
                str(args.batch),
                "--generate_max_len",
                str(args.completion_len),
                "--ignore_eos",
                "--temperature",
                "1.0",
                "--init_kl_coef",
                str(args.kl),
                "--use_kl_loss",
                "--kl_estimator",
                "k3",
                "--train_batch_size",
                str(args.batch),
                "--micro_train_batch_size",
                str(args.micro_batch),
                "--rollout_backend",
                backend,
                *common_flags(args, work, tag),
            ]
            run_side(cmd, log=work / f"{tag}.log")
            steps = [s for s in read_jsonl(work / f"out-{tag}" / "metrics.jsonl") if "time_train" in s]
            phases = ("generate", "sync", "score", "train")
            # A step's time is the whole loop iteration (experience, update, logging): the gap
            # between consecutive records' wall-clock stamps; so the first step has none.
            walls = [b["time"] - a["time"] for a, b in zip(steps, steps[1:])]
            skip = max(args.warmup, 1) - 1  # walls[0] is step 2's
            seconds = statistics.median(steady_steps(walls, skip))
            kept = steps[skip + 1 :]
            share = {p: sum(s[f"time_{p}"] for s in kept) / sum(walls[skip:]) for p in phases}
            return {
                "step_s": seconds,
                "rate": args.batch / seconds,
                "startup_s": steps[0]["startup_seconds"],
                "response_length": steps[0]["response_length"],
                **{f"share_{p}": v for p, v in share.items()},
            }

        return side

    def trl(r: int) -> dict:
        out = work / f"grpo-trl-{r}.json"
        cmd = [
            python_for_trl(),
            "perf/trl_side.py",
            "--no_gradient_checkpointing",  # TRL 1.16 defaults it on; ours recomputes nothing: same work
            "grpo",
            "--model",
            model,
            "--data",
            str(work / "grpo.jsonl"),
            "--out",
            str(out),
            "--reward",
            reward,
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--micro_batch",
            str(args.micro_batch),
            "--lr",
            str(args.lr),
            "--beta",
            str(args.kl),
            "--num_generations",
            str(args.num_generations),
            "--completion_len",
            str(args.completion_len),
        ]
        run_side(cmd, log=work / f"grpo-trl-{r}.log")
        result = json.loads(out.read_text())
        seconds = statistics.median(steady_steps(result["step_seconds"], args.warmup))
        logs = [entry for entry in result["logs"] if "loss" in entry]
        return {
            "step_s": seconds,
            "rate": args.batch / seconds,
            "startup_s": result["startup_seconds"],
            "response_length": logs[0].get("completions/mean_length", float("nan")),
        }

    sides = {"rlhf (transformers)": ours("hf"), "TRL": trl}
    if args.vllm:
        sides["rlhf (vLLM)"] = ours("vllm")
    return finish(
        "grpo",
        "GRPO: rlhf vs TRL GRPOTrainer",
        "samples/s",
        args,
        n_params,
        alternate(sides, args.repeats),
        f"{n_prompts} prompts x {args.num_generations} samples per step, {args.completion_len} tokens each (EOS suppressed), "
        f"reference model with a k3 KL loss of coefficient {args.kl}, one optimizer step per rollout ({args.micro_batch} per "
        "micro-batch)",
    )


# ----------------------------------------------------------------------------------------------


def finish(name: str, title: str, unit: str, args, n_params: int, results: dict[str, list[dict]], workload: str) -> dict:
    base = "TRL"
    startup = "startup_s" in results[base][0]  # process start -> first step, where both sides report it
    header = ["side", f"{unit} (median)", "step s (median)", f"ratio to {base}", "rounds"] + (["start-up s (median)"] if startup else [])
    rows, labels, values = [], [], []
    for side, rounds in results.items():
        rate = median_of(rounds, "rate")
        ratio = rate / median_of(results[base], "rate")
        rows.append(
            [side, f"{rate:.4g}", f"{median_of(rounds, 'step_s'):.3f}", f"{ratio:.2f}x", ", ".join(f"{r['rate']:.4g}" for r in rounds)]
            + ([f"{median_of(rounds, 'startup_s'):.2f}"] if startup else [])
        )
        labels.append(side)
        values.append(rate)
    notes = [
        f"Model: random-init Qwen2, {n_params / 1e6:.1f}M parameters (hidden {args.hidden}, {args.layers} layers), fp32, 1 process "
        f"each, ZeRO-{args.zero_stage} on our side.",
        f"Workload: {workload}; {args.steps} optimizer steps per round, the first {args.warmup} not timed; {args.repeats} "
        "alternating rounds.",
    ]
    first = {side: rounds[0] for side, rounds in results.items()}
    if "loss0" in first[base]:
        ours_first = first["rlhf"]
        notes.append(
            f"Same work: tokens per step rlhf {ours_first['tokens_per_step']:.0f} / TRL {first[base]['tokens_per_step']:.0f}; "
            f"step-0 loss rlhf {ours_first['loss0']:.6f} / TRL {first[base]['loss0']:.6f} (relative gap "
            f"{step0_gap(ours_first['loss0'], first[base]['loss0']):.1e}); "
            f"last-step loss {ours_first['loss_last']:.4f} / {first[base]['loss_last']:.4f}."
        )
        same_tokens = round(ours_first["tokens_per_step"]) == round(first[base]["tokens_per_step"])
        if not same_tokens or step0_gap(ours_first["loss0"], first[base]["loss0"]) > 1e-4:
            MISMATCHES.append(name)
            notes.append(
                "WARNING: the two sides did NOT do the same work (tokens per step or step-0 loss differ): the ratio is not a "
                "fair comparison."
            )
    if "chosen_logp0" in first[base]:
        ours_first = first["rlhf"]
        notes.append(
            f"Step-0 log-probs (summed over the response, mean over pairs): chosen rlhf {ours_first['chosen_logp0']:.3f} / TRL "
            f"{first[base]['chosen_logp0']:.3f}, "
            f"rejected {ours_first['rejected_logp0']:.3f} / {first[base]['rejected_logp0']:.3f}."
        )
    if "response_length" in first[base]:
        notes.append(
            "Same work: mean response length " + ", ".join(f"{side} {f['response_length']:.1f}" for side, f in first.items()) + " tokens."
        )
        for side, rounds in results.items():
            if "share_generate" in rounds[0]:
                split = ", ".join(
                    f"{p} {statistics.median(r[f'share_{p}'] for r in rounds):.1%}" for p in ("generate", "sync", "score", "train")
                )
                notes.append(f"{side} step phases (median share): {split}.")
    command = "python perf/side_by_side.py " + " ".join(sys.argv[1:])
    name = f"{name}_{args.tag}" if args.tag else name
    write_report(name, title, command, header, rows, notes, {"labels": labels, "values": values, "ylabel": unit})
    return {side: median_of(rounds, "rate") for side, rounds in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bench", nargs="+", choices=["sft", "dpo", "grpo"], default=["sft", "dpo", "grpo"], help="benchmarks to run (default all)"
    )
    parser.add_argument(
        "--hidden", type=int, default=512, help="hidden size of the Qwen2 model (default 512: 25M parameters with 8 layers)"
    )
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (default 8)")
    parser.add_argument("--seq_len", type=int, default=256, help="SFT/DPO tokens per sequence (default 256)")
    parser.add_argument("--batch", type=int, default=8, help="sequences / pairs / completions per optimizer step (default 8)")
    parser.add_argument("--micro_batch", type=int, default=4, help="per forward/backward (default 4)")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per round (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="first steps of a round not timed (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--lr", type=float, default=1e-5, help="learning rate, both sides (default 1e-5)")
    parser.add_argument(
        "--zero_stage", type=int, default=2, choices=[0, 1, 2, 3], help="our DeepSpeed ZeRO stage (default 2, as users run it)"
    )
    parser.add_argument("--grpo_batch", type=int, default=32, help="GRPO samples per step = prompts x --num_generations (default 32)")
    parser.add_argument("--grpo_micro_batch", type=int, default=8, help="GRPO samples per training forward/backward (default 8)")
    parser.add_argument("--num_generations", type=int, default=8, help="GRPO samples per prompt (default 8)")
    parser.add_argument("--completion_len", type=int, default=64, help="GRPO tokens per sample (default 64)")
    parser.add_argument(
        "--kl", type=float, default=0.001, help="GRPO KL coefficient; > 0 so both sides run a reference model (default 0.001)"
    )
    parser.add_argument("--no_vllm", dest="vllm", action="store_false", help="skip our vLLM rollout in GRPO")
    parser.add_argument(
        "--tag", default="", help="suffix of the report names (results/grpo_TAG.md), e.g. tiny for a --hidden 128 --layers 4 run"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, data) and print its path")
    args = parser.parse_args()
    python_for_trl()

    work = Path(tempfile.mkdtemp(prefix="side-by-side-"))
    model = str(work / "model")
    n_params = build_model(model, args.hidden, args.layers)
    summary = {}
    try:
        for bench in args.bench:
            print(f"== {bench} ({n_params / 1e6:.1f}M parameters)", flush=True)
            summary[bench] = {"sft": bench_sft, "dpo": bench_dpo, "grpo": bench_grpo}[bench](args, work, model, n_params)
    finally:
        if args.keep:
            print(f"work folder: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary))
    if MISMATCHES:
        sys.exit(f"error: the sides did different work in: {', '.join(MISMATCHES)} (see the reports)")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
