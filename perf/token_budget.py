"""Token-budget micro-batches (--use_dynamic_batch) and --packing_samples on a length-skewed PPO batch.

    python perf/token_budget.py                      # 2 ranks, 25M model, 128 samples, 3 rounds
    python perf/token_budget.py --samples 16 --hidden 64 --layers 2 --repeats 1 --no-report   # smoke test

What runs: under torchrun (``--nproc`` ranks, gloo, DeepSpeed ZeRO-2, fp32), the scoring and the
training phases of a PPO step with a critic, over one fixed experience batch, once per way:

* fixed: ``--micro_train_batch_size`` / ``--micro_rollout_batch_size`` samples per micro-batch;
* fixed + packing: the same micro-batches, each packed into one row (``--packing_samples``);
* dynamic: ``--use_dynamic_batch`` with ``--train_max_tokens_per_gpu`` / ``--rollout_max_tokens_per_gpu``;
* dynamic + packing: both.

Scoring = the behaviour log-probs (actor), the reference log-probs (a frozen copy) and the critic's
values through ``rlhf.rl.forward.per_token_rows`` with ``MicroBatching.for_scoring``, as
``rlhf.rl.experience`` runs them; training = ``rlhf.rl.update.train_actor`` and ``train_critic``
(``--ppo_epochs`` passes, steps of ``--train_batch_size``). The batch is length-skewed on purpose
(seeded, the same every run): most prompts short and a few long, response lengths skewed the same
way, the long ones landing unevenly on the ranks as a rollout would.

Figures: the token positions each way's forwards compute (rows x width when padded, the packed row
length when packed), of which padding, summed over the ranks and the phases: deterministic, the
same on any machine. And the wall time of each phase (median over ``--repeats`` rounds, the ways
alternating within a round; max over ranks, since a step waits for its slowest rank): only
meaningful on a quiet machine. Note: on CPU, sdpa has no variable-length kernel, so a packed row
attends through a block-diagonal mask over the whole row (quadratic in its length): packing saves
the padded positions of the MLP and projections, not of attention.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "perf"))

WAYS = {
    "fixed": [],
    "fixed + packing": ["--packing_samples"],
    "dynamic": ["--use_dynamic_batch"],
    "dynamic + packing": ["--use_dynamic_batch", "--packing_samples"],
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2, help="data-parallel ranks (torchrun processes)")
    p.add_argument("--hidden", type=int, default=512, help="model width (perf/common.py build_model)")
    p.add_argument("--layers", type=int, default=8, help="model depth")
    p.add_argument("--samples", type=int, default=128, help="samples in the rollout batch over all ranks")
    p.add_argument("--train_batch_size", type=int, default=64, help="samples per optimizer step over all ranks")
    p.add_argument("--micro_train_batch_size", type=int, default=8, help="fixed ways: samples per training micro-batch")
    p.add_argument("--micro_rollout_batch_size", type=int, default=16, help="fixed ways: samples per scoring forward")
    p.add_argument("--train_max_tokens_per_gpu", type=int, default=2048, help="dynamic ways: tokens per training micro-batch")
    p.add_argument("--rollout_max_tokens_per_gpu", type=int, default=4096, help="dynamic ways: tokens per scoring forward")
    p.add_argument("--ppo_epochs", type=int, default=1, help="passes over the batch")
    p.add_argument("--long_fraction", type=float, default=0.1, help="share of long prompts and of long responses")
    p.add_argument("--repeats", type=int, default=3, help="rounds; each runs every way once")
    p.add_argument("--no-report", dest="report", action="store_false", help="print only; do not write perf/results/token_budget.md")
    return p.parse_args(argv)


def skewed_lengths(n: int, long_fraction: float, seed: int = 0) -> list[tuple[int, int]]:
    """(prompt, response) lengths: prompts 8-32 tokens, a ``long_fraction`` of them 256-384;
    responses 4-32, a ``long_fraction`` of them 128-256 (independently)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = rng.randint(256, 384) if rng.random() < long_fraction else rng.randint(8, 32)
        response = rng.randint(128, 256) if rng.random() < long_fraction else rng.randint(4, 32)
        out.append((prompt, response))
    return out


# ----------------------------------------------------------------------------------------------
# One torchrun rank


def worker(args: argparse.Namespace, model_dir: str, out_path: str) -> None:
    import torch
    import torch.distributed as dist

    import rlhf.rl.update as update
    from rlhf.config import PPOConfig, parse_config
    from rlhf.data.sft import Sample
    from rlhf.distributed.env import init_distributed
    from rlhf.engines.frozen_engine import FrozenEngine
    from rlhf.engines.train_engine import TrainEngine
    from rlhf.models.loading import load_causal_lm, load_reward_model, load_tokenizer
    from rlhf.rl.experience import ActorBatch, CriticBatch
    from rlhf.rl.forward import MicroBatching, padded, per_token_rows, policy_logp, to_batch, token_values

    launch = init_distributed()
    rank, world = launch.rank, launch.world_size
    torch.set_num_threads(1)

    def config(extra: list[str]) -> PPOConfig:
        return parse_config(
            PPOConfig,
            [
                "--pretrain",
                model_dir,
                "--reward_func",
                "rlhf.rewards:exact_match",
                "--advantage_estimator",
                "gae",
                "--rollout_batch_size",
                str(args.samples),
                "--train_batch_size",
                str(args.train_batch_size),
                "--micro_train_batch_size",
                str(args.micro_train_batch_size),
                "--micro_rollout_batch_size",
                str(args.micro_rollout_batch_size),
                "--train_max_tokens_per_gpu",
                str(args.train_max_tokens_per_gpu),
                "--rollout_max_tokens_per_gpu",
                str(args.rollout_max_tokens_per_gpu),
                "--ppo_epochs",
                str(args.ppo_epochs),
                "--learning_rate",
                "1e-5",
                "--lr_scheduler",
                "constant",
                "--zero_stage",
                "2",
                *extra,
            ],
        )

    base = config([])
    tokenizer = load_tokenizer(base.model)
    pad_id = tokenizer.pad_token_id
    vocab = len(tokenizer)
    lengths = skewed_lengths(args.samples, args.long_fraction)
    g = torch.Generator().manual_seed(1234)
    everyone = [Sample(torch.randint(3, vocab, (p + r,), generator=g).tolist(), [0] * p + [1] * r) for p, r in lengths]
    samples = everyone[rank::world]  # a rank's share, in rollout order
    steps_per_way = args.ppo_epochs * (args.samples // args.train_batch_size)

    # Count what every forward computes: token positions, and how many of them are padding.
    counts = {"positions": 0, "real": 0}

    def counted(fn):
        def wrapper(model, batch, *rest, **options):
            ids = batch["input_ids"]
            counts["positions"] += ids.numel()
            counts["real"] += ids.numel() if "position_ids" in batch else int(batch["attention_mask"].sum())
            return fn(model, batch, *rest, **options)

        return wrapper

    update.policy_logp, update.token_values = counted(policy_logp), counted(token_values)
    score_logp, score_values = counted(policy_logp), counted(token_values)

    results: dict[str, dict[str, list[float]]] = {way: {} for way in WAYS}
    for round_ in range(args.repeats):
        for way, extra in WAYS.items():
            cfg = config(extra)
            torch.manual_seed(0)
            actor = TrainEngine(load_causal_lm(cfg.model), cfg.train, bf16=False, total_steps=steps_per_way, dp_size=world)
            critic = TrainEngine(load_reward_model(cfg.model, pad_id), cfg.train, bf16=False, total_steps=steps_per_way, dp_size=world)
            reference = FrozenEngine(load_causal_lm(cfg.model), cfg.train, bf16=False, dp_size=world)
            figures: dict[str, float] = {}

            dist.barrier()
            counts.update(positions=0, real=0)
            started = time.perf_counter()
            batching = MicroBatching.for_scoring(cfg, None)
            with torch.no_grad():
                old = per_token_rows(lambda mb: score_logp(actor, mb, 1.0)[0], samples, pad_id, batching)
                ref = per_token_rows(lambda mb: score_logp(reference, mb, 1.0)[0], samples, pad_id, batching)
                val = per_token_rows(lambda mb: score_values(critic, mb), samples, pad_id, batching)
            figures["score_s"] = time.perf_counter() - started
            figures["score_positions"], figures["score_padding"] = counts["positions"], counts["positions"] - counts["real"]

            batch = to_batch(samples, pad_id)
            width = batch["input_ids"].size(1) - 1
            action_mask = batch["loss_mask"][:, 1:].float()
            old_logp, ref_logp, values = padded(old, width), padded(ref, width), padded(val, width)
            advantages = torch.randn(old_logp.shape, generator=torch.Generator().manual_seed(rank)) * action_mask
            returns = values + advantages

            dist.barrier()
            counts.update(positions=0, real=0)
            started = time.perf_counter()
            exp = ActorBatch(batch, action_mask, old_logp, ref_logp, advantages)
            update.train_actor(cfg, exp, actor, None, 0.01, 5, None, 0, None, pad_id)
            update.train_critic(cfg, CriticBatch(batch, action_mask, values, returns), critic, None, 5, pad_id)
            figures["train_s"] = time.perf_counter() - started
            figures["train_positions"], figures["train_padding"] = counts["positions"], counts["positions"] - counts["real"]

            # The slowest rank sets the pace; positions add up over the ranks.
            gathered = [None] * world
            dist.all_gather_object(gathered, figures)
            for key in figures:
                values_ = [f[key] for f in gathered]
                results[way].setdefault(key, []).append(max(values_) if key.endswith("_s") else sum(values_))
            if rank == 0:
                print(f"round {round_} {way}: " + ", ".join(f"{k} {results[way][k][-1]:.4g}" for k in figures), flush=True)
            actor = critic = reference = None  # freed before the next way builds its engines
    if rank == 0:
        Path(out_path).write_text(json.dumps(results))


# ----------------------------------------------------------------------------------------------
# The driver: build the model, launch the ranks, report


def main(argv=None) -> None:
    args = parse_args(argv)
    if os.environ.get("TOKEN_BUDGET_WORKER"):
        worker(args, os.environ["TOKEN_BUDGET_MODEL"], os.environ["TOKEN_BUDGET_OUT"])
        return
    from common import build_model, write_report

    with tempfile.TemporaryDirectory() as tmp:
        params = build_model(f"{tmp}/model", args.hidden, args.layers)
        out = f"{tmp}/results.json"
        env = dict(os.environ, TOKEN_BUDGET_WORKER="1", TOKEN_BUDGET_MODEL=f"{tmp}/model", TOKEN_BUDGET_OUT=out, OMP_NUM_THREADS="1")
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}", __file__, *sys.argv[1:]]
        subprocess.run(cmd, env=env, check=True, cwd=REPO)
        results = json.loads(Path(out).read_text())

    lengths = skewed_lengths(args.samples, args.long_fraction)
    totals = [p + r for p, r in lengths]
    fixed = results["fixed"]

    def med(way: str, key: str) -> float:
        return statistics.median(results[way][key])

    header = ["way", "train positions", "train padding", "score positions", "score padding", "train s", "score s", "train+score vs fixed"]
    rows = []
    for way in WAYS:
        step = med(way, "train_s") + med(way, "score_s")
        rows.append(
            [
                way,
                int(med(way, "train_positions")),
                f"{int(med(way, 'train_padding'))} ({med(way, 'train_padding') / med(way, 'train_positions'):.0%})",
                int(med(way, "score_positions")),
                f"{int(med(way, 'score_padding'))} ({med(way, 'score_padding') / med(way, 'score_positions'):.0%})",
                f"{med(way, 'train_s'):.2f}",
                f"{med(way, 'score_s'):.2f}",
                f"{(med('fixed', 'train_s') + med('fixed', 'score_s')) / step:.2f}x",
            ]
        )
    notes = [
        f"Model: seeded random Qwen2, hidden {args.hidden} x {args.layers} layers ({params / 1e6:.1f}M parameters), fp32, ZeRO-2, "
        f"{args.nproc} ranks (gloo); PPO with a critic and a reference copy.",
        f"Batch: {args.samples} samples, {sum(totals)} tokens (lengths {min(totals)}-{max(totals)}, median "
        f"{statistics.median(totals):.0f}; {args.long_fraction:.0%} of prompts 256-384 tokens, else 8-32; {args.long_fraction:.0%} of "
        f"responses 128-256, else 4-32), dealt to the ranks as a rollout is; {args.ppo_epochs} epoch(s), optimizer steps of "
        f"{args.train_batch_size} samples.",
        f"Fixed: {args.micro_train_batch_size} samples per training micro-batch, {args.micro_rollout_batch_size} per scoring forward. "
        f"Dynamic: --train_max_tokens_per_gpu {args.train_max_tokens_per_gpu}, --rollout_max_tokens_per_gpu "
        f"{args.rollout_max_tokens_per_gpu}. Every way computes the same update (tests/test_dynamic_batch.py).",
        "Positions: token positions the forwards compute (rows x width padded, row length packed), summed over ranks and over the "
        "actor, reference and critic forwards (training: actor + critic); deterministic. Padding: positions that are not tokens.",
        f"Times: median over {args.repeats} round(s) of the slowest rank's phase time; meaningful only when nothing else runs on the "
        "machine. On CPU a packed row attends through a block-diagonal mask over the whole row (sdpa has no varlen kernel).",
        f"Before token budgets were added, fixed micro-batches were padded to the rank's longest sample: "
        f"{rank_wide_positions(totals, args, 2)} positions in training, {rank_wide_positions(totals, args, 3)} in scoring.",
    ]
    chart = {
        "labels": list(WAYS),
        "values": [med(w, "train_positions") + med(w, "score_positions") for w in WAYS],
        "ylabel": "positions computed",
    }
    if args.report:
        write_report(
            "token_budget",
            "PPO scoring + training on a length-skewed batch: fixed vs token-budget micro-batches",
            "python perf/token_budget.py " + " ".join(sys.argv[1:]),
            header,
            rows,
            notes,
            chart,
        )
    else:
        print("\n".join(" | ".join(str(c) for c in row) for row in [header, *rows]))
        print("\n".join(notes))
    assert fixed["train_positions"], "no training forwards were counted"


def rank_wide_positions(totals: list[int], args: argparse.Namespace, models: int) -> int:
    """Positions of the fixed split as it was before: every forward [micro, longest of the rank],
    for ``models`` models (training: actor + critic, each --ppo_epochs times; scoring: actor,
    reference, critic once)."""
    per_rank = [totals[r :: args.nproc] for r in range(args.nproc)]
    passes = args.ppo_epochs if models == 2 else 1
    return sum(models * passes * len(share) * max(share) for share in per_rank)


if __name__ == "__main__":
    main()
