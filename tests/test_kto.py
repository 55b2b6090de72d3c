"""KTO end to end: torchrun with 2 ranks, real DeepSpeed, from the SFT'd tiny model."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import ZERO3_FORCE_GATHER, error_lines, read_jsonl, run_trainer


def kto_args(pretrain, out, *extra):
    return [
        "--pretrain",
        str(pretrain),
        "--eval_dataset",
        "embedded:arith/kto_eval.jsonl",
        "--max_len",
        "32",
        "--micro_train_batch_size",
        "8",
        "--train_batch_size",
        "32",
        "--learning_rate",
        "1e-4",
        "--beta",
        "0.5",
        "--lr_warmup_ratio",
        "0",
        "--save_path",
        str(out / "model"),
        "--ckpt_path",
        str(out / "ckpt"),
        *extra,
    ]


def losses(out):
    return [r["loss"] for r in read_jsonl(out / "model" / "metrics.jsonl") if "loss" in r]


@pytest.mark.slow
def test_kto_learns_the_addition_labels(sft_teacher_model, tmp_path):
    """The README's KTO preset, from the README's SFT preset: on held-out completions the mean
    implicit reward of right answers minus that of wrong answers (eval_reward_gap) rises and ends
    positive; on held-out preference pairs (--eval_pairs) the implicit reward's pair accuracy and
    chosen-minus-rejected margin rise.

    Measured (2 ranks, fp32), steps 10/20/30/34: eval_reward_gap 0.398/0.497/0.551/0.559; on the
    300 pairs of prefs_eval.jsonl eval_pair_acc 0.750/0.803/0.847/0.853 and eval_pair_margin
    0.447/0.577/0.629/0.637. (From the clean-data SFT model, which already prefers right sums,
    the pair accuracy only moved 0.763 -> 0.770.) Pair eval does not change training: same losses
    without it.
    """
    run_trainer(
        "rlhf.kto",
        [
            "--config",
            "configs/kto_tiny.yaml",
            "--pretrain",
            str(sft_teacher_model),
            "--save_path",
            str(tmp_path / "model"),
            "--ckpt_path",
            str(tmp_path / "ckpt"),
        ],
    )
    records = read_jsonl(tmp_path / "model" / "metrics.jsonl")
    evals = [r for r in records if "eval_reward_gap" in r]
    gaps = [round(r["eval_reward_gap"], 3) for r in evals]
    assert evals[-1]["eval_reward_gap"] > 0.45, gaps
    assert evals[-1]["eval_reward_gap"] > evals[0]["eval_reward_gap"] + 0.08, gaps  # measured +0.161
    assert evals[-1]["eval_reward_desirable"] > evals[-1]["eval_reward_undesirable"]
    accs = [round(r["eval_pair_acc"], 3) for r in evals]
    margins = [round(r["eval_pair_margin"], 3) for r in evals]
    assert evals[-1]["eval_pair_acc"] > 0.80, accs  # measured 0.853
    assert evals[-1]["eval_pair_acc"] > evals[0]["eval_pair_acc"] + 0.05, accs  # measured +0.103
    assert evals[-1]["eval_pair_margin"] > 0.55, margins  # measured 0.637
    assert evals[-1]["eval_pair_margin"] > evals[0]["eval_pair_margin"] + 0.10, margins  # measured +0.190
    assert all(r["kl"] >= 0 for r in records if "kl" in r)  # z0 is clamped at 0
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_kto_runs_at_zero3(sft_tiny_model, tmp_path):
    args = [
        "--pretrain",
        str(sft_tiny_model),
        "--eval_dataset",
        "embedded:arith/kto_eval.jsonl",
        "--max_len",
        "32",
        "--micro_train_batch_size",
        "8",
        "--train_batch_size",
        "32",
        "--max_samples",
        "96",
        "--learning_rate",
        "1e-4",
        "--beta",
        "0.5",
        "--lr_warmup_ratio",
        "0",
        "--max_steps",
        "2",
        "--zero_stage",
        "3",
        "--ds_config",
        ZERO3_FORCE_GATHER,
        "--save_path",
        str(tmp_path / "model"),
        "--ckpt_path",
        str(tmp_path / "ckpt"),
    ]
    run_trainer("rlhf.kto", args)
    records = [r for r in read_jsonl(tmp_path / "model" / "metrics.jsonl") if "loss" in r]
    assert len(records) == 2 and "eval_reward_gap" in records[-1]
    # Step 1: policy == reference, so every reward is 0 and each loss is w * sigmoid(0) = 0.5.
    assert records[0]["loss"] == pytest.approx(0.5, abs=1e-5)


def test_kto_resume_equals_uninterrupted(sft_tiny_model, tmp_path):
    straight = tmp_path / "straight"
    run_trainer(
        "rlhf.kto", kto_args(sft_tiny_model, straight, "--zero_stage", "2", "--max_steps", "4", "--save_steps", "2", "--max_samples", "256")
    )
    ckpt = tmp_path / "ckpt"
    shutil.copytree(straight / "ckpt", ckpt)
    resumed = tmp_path / "resumed"
    run_trainer(
        "rlhf.kto",
        [
            *kto_args(sft_tiny_model, resumed, "--zero_stage", "2", "--max_steps", "4", "--max_samples", "256"),
            "--ckpt_path",
            str(ckpt),
            "--load_checkpoint",
        ],
    )
    full, tail = losses(straight), losses(resumed)
    assert len(full) == 4 and full[-1] != full[0]
    assert tail == pytest.approx(full[2:], abs=1e-6)


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"prompt": "1+1=", "completion": "2", "label": 1}, "must be true or false"),
        ({"prompt": "1+1=", "completion": "", "label": True}, "empty"),
    ],
    ids=["non-boolean label", "empty completion"],
)
def test_kto_bad_input(tmp_path, row, expected):
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [row] + [{"prompt": "2+2=", "completion": "4", "label": True}] * 39))
    proc = run_trainer(
        "rlhf.kto",
        [
            "--dataset",
            str(data),
            "--max_len",
            "32",
            "--train_batch_size",
            "8",
            "--micro_train_batch_size",
            "8",
            "--save_path",
            str(tmp_path / "out"),
        ],
        nproc=0,
        check=False,
    )
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "bad.jsonl:1" in lines[0] and expected in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
