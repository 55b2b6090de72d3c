"""Reward-model training end to end: torchrun with 2 ranks, real DeepSpeed, HF-native output."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import ZERO3_FORCE_GATHER, error_lines, read_jsonl, run_trainer
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def rm_args(pretrain, out, *extra):
    return [
        "--pretrain",
        str(pretrain),
        "--dataset",
        "embedded:arith/prefs_train.jsonl",
        "--eval_dataset",
        "embedded:arith/prefs_eval.jsonl",
        "--max_len",
        "32",
        "--micro_train_batch_size",
        "8",
        "--train_batch_size",
        "32",
        "--learning_rate",
        "5e-4",
        "--lr_warmup_ratio",
        "0",
        "--save_path",
        str(out / "model"),
        "--ckpt_path",
        str(out / "ckpt"),
        *extra,
    ]


@pytest.fixture
def trained_rm(rm_tiny_model):
    return rm_tiny_model


def test_rm_learns_the_addition_rule(trained_rm):
    """Held-out pair accuracy >= 0.9 (measured 0.93-0.95); accuracy and margin rise over the run."""
    evals = [r for r in read_jsonl(trained_rm / "metrics.jsonl") if "eval_acc" in r]
    assert evals[-1]["eval_acc"] >= 0.9, [round(r["eval_acc"], 3) for r in evals]
    assert evals[-1]["eval_acc"] > evals[0]["eval_acc"] + 0.1
    assert evals[-1]["eval_margin"] > evals[0]["eval_margin"] + 1.0


def test_rm_loads_as_a_sequence_classifier_and_scores_as_in_training(trained_rm):
    """AutoModelForSequenceClassification reproduces the stored eval reward statistics."""
    from rlhf.config import PreferenceDataConfig
    from rlhf.data.preference import collate_pairs, tokenize_pairs
    from rlhf.data.sources import load_mixture

    stats = json.loads((trained_rm / "reward_stats.json").read_text())
    config = json.loads((trained_rm / "config.json").read_text())
    assert config["reward_mean"] == stats["reward_mean"] and config["reward_std"] == stats["reward_std"]
    model = AutoModelForSequenceClassification.from_pretrained(trained_rm, dtype=torch.float32).eval()
    assert model.config.num_labels == 1
    tokenizer = AutoTokenizer.from_pretrained(trained_rm)
    pairs = tokenize_pairs(
        load_mixture("embedded:arith/prefs_eval.jsonl", None, "test", 10**9, 42), tokenizer, PreferenceDataConfig(max_len=32)
    )
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1).double()
    assert rewards.mean().item() == pytest.approx(stats["reward_mean"], abs=1e-4)
    assert rewards.std(unbiased=False).item() == pytest.approx(stats["reward_std"], abs=1e-4)
    n = len(pairs)
    assert (rewards[:n] > rewards[n:]).double().mean().item() >= 0.9


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.slow
def test_rm_zero_stages_agree(sft_tiny_model, tmp_path, stage):
    """ZeRO-2 and ZeRO-3 (forced gathering) give the ZeRO-0 loss curve in fp32."""
    curves = {}
    for s in (0, stage):
        extra = ["--ds_config", ZERO3_FORCE_GATHER] if s == 3 else []
        out = tmp_path / f"z{s}"
        run_trainer("rlhf.rm", rm_args(sft_tiny_model, out, "--zero_stage", str(s), "--max_steps", "3", "--max_samples", "160", *extra))
        curves[s] = [r["loss"] for r in read_jsonl(out / "model" / "metrics.jsonl") if "loss" in r]
    assert len(curves[0]) == 3
    assert curves[stage] == pytest.approx(curves[0], abs=1e-5)


def test_rm_resume_equals_uninterrupted(sft_tiny_model, tmp_path):
    straight = tmp_path / "straight"
    run_trainer(
        "rlhf.rm", rm_args(sft_tiny_model, straight, "--zero_stage", "2", "--max_steps", "4", "--save_steps", "2", "--max_samples", "256")
    )
    ckpt = tmp_path / "ckpt"
    shutil.copytree(straight / "ckpt", ckpt)
    resumed = tmp_path / "resumed"
    run_trainer(
        "rlhf.rm",
        [
            *rm_args(sft_tiny_model, resumed, "--zero_stage", "2", "--max_steps", "4", "--max_samples", "256"),
            "--ckpt_path",
            str(ckpt),
            "--load_checkpoint",
        ],
    )
    full = [r["loss"] for r in read_jsonl(straight / "model" / "metrics.jsonl") if "loss" in r]
    tail = [r["loss"] for r in read_jsonl(resumed / "model" / "metrics.jsonl") if "loss" in r]
    assert tail == pytest.approx(full[2:], abs=1e-6)


HH_ROWS = [
    {"chosen": f"\n\nHuman: what is {a}+{b}?\n\nAssistant: {a + b}", "rejected": f"\n\nHuman: what is {a}+{b}?\n\nAssistant: {a + b + 1}"}
    for a in range(8)
    for b in range(8)
]
ULTRAFEEDBACK_ROWS = [
    {
        "prompt": f"{a}+{b}=",
        "chosen": [{"role": "user", "content": f"{a}+{b}="}, {"role": "assistant", "content": str(a + b)}],
        "rejected": [{"role": "user", "content": f"{a}+{b}="}, {"role": "assistant", "content": str(a + b + 2)}],
    }
    for a in range(8)
    for b in range(8)
]


@pytest.mark.parametrize("shape", ["hh-rlhf", "ultrafeedback"])
def test_rm_on_public_dataset_shapes(sft_tiny_model, tmp_path, shape):
    rows, extra = (HH_ROWS, ["--prompt_key", "None"]) if shape == "hh-rlhf" else (ULTRAFEEDBACK_ROWS, ["--apply_chat_template"])
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = rm_args(sft_tiny_model, tmp_path, "--max_steps", "2", "--max_len", "64", *extra)
    args[args.index("--dataset") + 1] = str(data)
    args[args.index("--eval_dataset") + 1] = str(data)
    run_trainer("rlhf.rm", args)
    assert json.loads((tmp_path / "model" / "reward_stats.json").read_text())["pairs"] == len(rows)


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([{"prompt": "1+1=", "chosen": "2"}] * 40, "rejected"),
        ([{"prompt": "1+1=", "chosen": "2", "rejected": "2"}] * 40, "identical"),
    ],
    ids=["missing rejected", "identical chosen and rejected"],
)
def test_rm_bad_input(tmp_path, rows, expected):
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_trainer(
        "rlhf.rm",
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
    assert "bad.jsonl:1" in lines[0] and expected in lines[0]
    assert "Traceback" not in proc.stderr
