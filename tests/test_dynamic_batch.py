"""Token-budget micro-batches (--use_dynamic_batch) and --packing_samples in rlhf.ppo: the pure
planning functions, the packed layout, the flags, equal updates on 2 data-parallel ranks, and a
CLI run."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch
from helpers import REPO, ZERO3_FORCE_GATHER, read_jsonl, run_trainer, trainer_env

from rlhf.config import PPOConfig, parse_config
from rlhf.data.batching import (
    balance_over_ranks,
    micro_batch_tokens,
    split_by_token_budget,
    split_to_count,
    token_budget_plan,
)
from rlhf.errors import UserError
from rlhf.rl.forward import collate_rows, sample_rows, split_rows

# ----------------------------------------------------------------------------------------------
# Planning (pure)


def test_micro_batch_tokens_counts_padding_unless_packed():
    assert micro_batch_tokens([10, 2, 2], packed=True) == 14
    assert micro_batch_tokens([10, 2, 2], packed=False) == 30  # 3 rows x the longest
    assert micro_batch_tokens([], packed=False) == 0


def test_split_by_token_budget_worked_examples():
    # Packed, budget 10, lengths [5, 3, 7, 2, 6]: longest first 7, 6, 5 open three groups; 3 joins
    # the 7 (10); 2 does not fit there (12) and joins the 6 (8).
    assert split_by_token_budget([5, 3, 7, 2, 6], 10, packed=True) == [[2, 1], [4, 3], [0]]
    # [10, 2, 2, 2] in 16 tokens: packed all fit in one row (16); padded the 10 costs 10 per row,
    # so the short ones go together (3 rows x 2).
    assert split_by_token_budget([10, 2, 2, 2], 16, packed=True) == [[0, 1, 2, 3]]
    assert split_by_token_budget([10, 2, 2, 2], 16, packed=False) == [[0], [1, 2, 3]]
    # Padded, the fewest runs and then the least padding: first fit would put a 10 beside the 100
    # (200 positions for 110 tokens) and the other six in a second micro-batch (260 in all); the
    # runs {100}, {10 x 7} are as few and cost 170.
    assert split_by_token_budget([100, 10, 10, 10, 10, 10, 10, 10], 200, packed=False) == [[0], [1, 2, 3, 4, 5, 6, 7]]
    # A sample over the budget gets a micro-batch of its own; nothing is dropped.
    assert split_by_token_budget([50, 3, 3], 10, packed=True) == [[0], [1, 2]]


def test_split_to_count_halves_the_costliest_and_keeps_the_budget():
    lengths = [9, 8, 1, 1, 1, 1]
    groups = split_by_token_budget(lengths, 24, packed=False)  # [[0, 1], [2, 3, 4, 5]] (18 and 4 tokens)
    assert groups == [[0, 1], [2, 3, 4, 5]]
    assert split_to_count(lengths, groups, 3, packed=False) == [[0], [1], [2, 3, 4, 5]]  # the 18-token group is halved
    assert split_to_count(lengths, groups, 2, packed=False) == groups
    # Only singletons left: empty micro-batches fill the count (the caller runs a forward that counts nothing).
    assert split_to_count([5, 4], [[0], [1]], 4, packed=True) == [[0], [1], [], []]


def test_balance_over_ranks_equal_counts_and_close_totals():
    # Worked: [8, 7, 6, 5, 4, 3, 2, 1] over 2 ranks of 4: 8->A, 7->B, 6->B (7 < 8), 5->A (8 < 13),
    # 4->A (a tie goes to the first), 3->B (16 < 17), 2->B, then B is full and 1->A: 18 each.
    shares = balance_over_ranks([8, 7, 6, 5, 4, 3, 2, 1], 2)
    assert sorted(len(s) for s in shares) == [4, 4]
    assert [sum([8, 7, 6, 5, 4, 3, 2, 1][i] for i in s) for s in shares] == [18, 18]
    with pytest.raises(ValueError, match="do not split evenly"):
        balance_over_ranks([1, 2, 3], 2)


@pytest.mark.parametrize("packed", [True, False])
def test_token_budget_plan_properties_on_skewed_lengths(packed):
    rng = random.Random(0)
    for trial in range(200):
        dp = rng.choice([1, 2, 4])
        per_rank = rng.randint(1, 12)
        # Length-skewed: most samples short, a few long (some over the budget).
        lengths = [rng.randint(200, 700) if rng.random() < 0.15 else rng.randint(5, 60) for _ in range(dp * per_rank)]
        budget = rng.choice([64, 128, 512])
        plan = token_budget_plan(lengths, dp, budget, packed)
        used = sorted(i for rank in plan for group in rank for i in group)
        assert used == list(range(len(lengths))), trial  # every sample exactly once
        assert len({len(rank) for rank in plan}) == 1, trial  # the same number of micro-batches on every rank
        assert all(sum(len(g) for g in rank) == per_rank for rank in plan), trial  # the fixed split's share sizes
        for rank in plan:
            for group in rank:
                assert group, trial  # equal shares never need an empty micro-batch in training
                cost = micro_batch_tokens([lengths[i] for i in group], packed)
                assert cost <= budget or len(group) == 1, (trial, cost)  # the budget holds but for a lone long sample
        totals = [sum(lengths[i] for g in rank for i in g) for rank in plan]
        assert max(totals) - min(totals) <= max(lengths), (trial, totals)  # balanced to within one sample


def test_token_budget_plan_cuts_padding_on_a_skewed_batch():
    """The point of it: on a length-skewed batch the token budget computes far fewer padded
    positions than fixed micro-batches of the same samples."""
    rng = random.Random(1)
    lengths = [rng.randint(400, 500) if i % 8 == 0 else rng.randint(10, 40) for i in range(64)]
    fixed = [list(range(s, s + 8)) for s in range(0, 64, 8)]  # --micro_train_batch_size 8, one rank
    fixed_tokens = sum(micro_batch_tokens([lengths[i] for i in g], packed=False) for g in fixed)
    (plan,) = token_budget_plan(lengths, 1, 1024, packed=False)
    dynamic_tokens = sum(micro_batch_tokens([lengths[i] for i in g], packed=False) for g in plan)
    assert dynamic_tokens < 0.5 * fixed_tokens, (dynamic_tokens, fixed_tokens)


# ----------------------------------------------------------------------------------------------
# Packed and padded micro-batches of experience rows


def test_collate_rows_layouts_and_round_trip():
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])  # lengths 3 and 2
    per_token = torch.tensor([[0.1, 0.2], [0.3, 0.0]])  # [B, T-1]
    rows = sample_rows({"input_ids": ids, "advantages": per_token, "gone": None}, [3, 2])
    assert set(rows[0]) == {"input_ids", "advantages"} and rows[1]["advantages"].tolist() == pytest.approx([0.3])
    packed = collate_rows(rows, pad_id=0, packed=True)
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # entry t-1 scores token t: 0.1, 0.2 for sample 0; the boundary (7 facing 8) is 0; 0.3 for sample 1
    assert packed["advantages"].tolist() == [pytest.approx([0.1, 0.2, 0.0, 0.3])]
    assert "attention_mask" not in packed
    padded = collate_rows(rows, pad_id=0, packed=False)
    assert padded["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]] and padded["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    for batch, is_packed in ((packed, True), (padded, False)):
        back = split_rows(batch["advantages"], [3, 2], is_packed)
        assert [r.tolist() for r in back] == [pytest.approx([0.1, 0.2]), pytest.approx([0.3])]


# ----------------------------------------------------------------------------------------------
# Flags

BASE = ["--reward_func", "rlhf.rewards:exact_match", "--advantage_estimator", "group_norm", "--n_samples_per_prompt", "2"]


def test_flags_parse_with_openrlhf_defaults():
    cfg = parse_config(PPOConfig, BASE)
    assert not cfg.train.use_dynamic_batch and not cfg.train.packing_samples
    assert cfg.train.train_max_tokens_per_gpu == 16192 and cfg.train.rollout_max_tokens_per_gpu is None  # OpenRLHF's defaults
    cfg = parse_config(
        PPOConfig,
        [*BASE, "--use_dynamic_batch", "--packing_samples", "--train_max_tokens_per_gpu", "4096", "--rollout_max_tokens_per_gpu", "8192"],
    )
    assert cfg.train.use_dynamic_batch and cfg.train.packing_samples
    assert (cfg.train.train_max_tokens_per_gpu, cfg.train.rollout_max_tokens_per_gpu) == (4096, 8192)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--train_max_tokens_per_gpu", "0"], "--train_max_tokens_per_gpu and --rollout_max_tokens_per_gpu must be >= 1"),
        (["--use_dynamic_batch", "--pretrain_data", "embedded:arith/sft_train.jsonl"], "--use_dynamic_batch with --pretrain_data"),
    ],
)
def test_bad_flag_combinations_are_one_line_errors(extra, message):
    with pytest.raises(UserError, match=message):
        parse_config(PPOConfig, [*BASE, *extra])


# ----------------------------------------------------------------------------------------------
# Equal updates on 2 data-parallel ranks, and a CLI run


def dynamic_batch_check(*extra: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tests/dynamic_batch_check.py", *extra]
    out = subprocess.run(cmd, cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[len("RESULT ") :])


def assert_same_updates(result: dict) -> None:
    # Scoring forwards: the same per-token log-probs, entropy and values whatever the micro-batches.
    for way, diff in result["scoring"].items():
        assert diff < 1e-5, (way, diff)
    forwards = result["scoring_forwards_per_rank"]
    assert forwards[0] == forwards[1] > 2, forwards  # evened out over the ranks (their samples differ a lot in length)
    # Training: both steps really moved the weights ...
    assert result["moved"]["actor"] > 1e-3 and result["moved"]["critic"] > 1e-3, result["moved"]
    fixed = result["fixed_sums"]
    assert fixed["actor_updates"] == 4 and fixed["critic_updates"] == 4  # 2 steps on each of 2 ranks
    for way in ("fixed_packed", "dynamic", "dynamic_packed"):
        r = result[way]
        # ... the same gradient (its norm is scale-sensitive, unlike Adam's first steps) ...
        assert r["grad_norm"] < 1e-5 and r["critic_grad_norm"] < 1e-5, (way, r)
        # ... the same step metrics (losses, clip fraction, KL, entropy: shares of each step) ...
        for key, diff in r["sums"].items():
            assert diff <= 1e-5 * max(1.0, abs(fixed[key])), (way, key, diff)
        # ... and the same weights: float rounding only, which Adam's sign-like first steps can
        # raise to a few 1e-5 where a gradient is near zero; a wrong split would move them by ~lr.
        assert r["actor"] < 2e-4 and r["critic"] < 2e-4, (way, r)


def test_fixed_dynamic_and_packed_give_the_same_update_on_two_ranks():
    assert_same_updates(dynamic_batch_check())


@pytest.mark.slow
def test_same_update_under_zero3():
    # ZeRO-3 gathers parameters in every forward: ranks whose micro-batch counts differed would hang.
    assert_same_updates(dynamic_batch_check("--zero_stage", "3"))


def test_ppo_cli_with_dynamic_batch_and_packing(tmp_path):
    """rlhf.ppo with a critic under ZeRO-3 (every forward gathers), token budgets smaller than some
    samples, packed: it trains and logs as usual."""
    out = tmp_path / "out"
    run_trainer(
        "rlhf.ppo",
        [
            "--pretrain",
            "embedded:tiny-qwen2",
            "--prompt_data",
            "embedded:arith/prompts_train.jsonl",
            "--reward_func",
            "rlhf.rewards:exact_match",
            "--advantage_estimator",
            "gae",
            "--rollout_batch_size",
            "8",
            "--n_samples_per_prompt",
            "2",
            "--train_batch_size",
            "8",
            "--micro_train_batch_size",
            "2",
            "--micro_rollout_batch_size",
            "4",
            "--generate_max_len",
            "8",
            "--max_steps",
            "2",
            "--zero_stage",
            "3",
            "--ds_config",
            ZERO3_FORCE_GATHER,
            "--use_dynamic_batch",
            "--packing_samples",
            "--train_max_tokens_per_gpu",
            "40",
            "--rollout_max_tokens_per_gpu",
            "30",
            "--save_path",
            str(out / "model"),
            "--ckpt_path",
            str(out / "ckpt"),
        ],
    )
    records = [r for r in read_jsonl(out / "model" / "metrics.jsonl") if "reward" in r]
    assert len(records) == 2
    for r in records:
        for key in ("policy_loss", "value_loss", "clip_fraction", "kl"):
            assert key in r and r[key] == r[key], (key, r)  # present and not NaN
