"""KTO end to end: torchrun with 2 ranks, real DeepSpeed, from the SFT'd tiny model."""

from __future__ import annotations

import json

import pytest

from helpers import ZERO3_FORCE_GATHER, error_lines, read_jsonl, run_trainer


def test_kto_learns_the_addition_labels(sft_tiny_model, tmp_path):
    """The README's KTO preset: on held-out completions the mean implicit reward of right answers
    minus that of wrong answers (eval_reward_gap) rises and ends positive.

    Measured (2 ranks, fp32): 0.205 at step 10 -> 0.336 at step 34.
    """
    run_trainer("rlhf.kto", ["--config", "configs/kto_tiny.yaml", "--pretrain", str(sft_tiny_model), "--save_path", str(tmp_path / "model"), "--ckpt_path", str(tmp_path / "ckpt")])
    records = read_jsonl(tmp_path / "model" / "metrics.jsonl")
    evals = [r for r in records if "eval_reward_gap" in r]
    gaps = [round(r["eval_reward_gap"], 3) for r in evals]
    assert evals[-1]["eval_reward_gap"] > 0.25, gaps
    assert evals[-1]["eval_reward_gap"] > evals[0]["eval_reward_gap"] + 0.08, gaps
    assert evals[-1]["eval_reward_desirable"] > evals[-1]["eval_reward_undesirable"]
    assert all(r["kl"] >= 0 for r in records if "kl" in r)  # z0 is clamped at 0
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_kto_runs_at_zero3(sft_tiny_model, tmp_path):
    args = [
        "--pretrain", str(sft_tiny_model), "--eval_dataset", "embedded:arith/kto_eval.jsonl",
        "--max_len", "32", "--micro_train_batch_size", "8", "--train_batch_size", "32", "--max_samples", "96",
        "--learning_rate", "1e-4", "--beta", "0.5", "--lr_warmup_ratio", "0", "--max_steps", "2",
        "--zero_stage", "3", "--ds_config", ZERO3_FORCE_GATHER,
        "--save_path", str(tmp_path / "model"), "--ckpt_path", str(tmp_path / "ckpt"),
    ]
    run_trainer("rlhf.kto", args)
    records = [r for r in read_jsonl(tmp_path / "model" / "metrics.jsonl") if "loss" in r]
    assert len(records) == 2 and "eval_reward_gap" in records[-1]
    # Step 1: policy == reference, so every reward is 0 and each loss is w * sigmoid(0) = 0.5.
    assert records[0]["loss"] == pytest.approx(0.5, abs=1e-5)


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
    proc = run_trainer("rlhf.kto", ["--dataset", str(data), "--max_len", "32", "--train_batch_size", "8", "--micro_train_batch_size", "8", "--save_path", str(tmp_path / "out")], nproc=0, check=False)
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "bad.jsonl:1" in lines[0] and expected in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
