"""Rejection sampling: generate 8 answers per prompt, keep the right ones, fine-tune on them."""

from __future__ import annotations

import pytest
from helpers import error_lines, read_jsonl, run_trainer


def rs_args(model, out, *extra):
    return [
        "--pretrain",
        str(model),
        "--dataset",
        "embedded:arith/prompts_train.jsonl",
        "--label_key",
        "label",
        "--reward_func",
        "rlhf.rewards:exact_match",
        "--best_of_n",
        "8",
        "--max_samples",
        "512",
        "--generate_max_len",
        "4",
        "--micro_rollout_batch_size",
        "128",
        "--micro_train_batch_size",
        "32",
        "--train_batch_size",
        "64",
        "--max_epochs",
        "2",
        "--output_dir",
        str(out),
        *extra,
    ]


@pytest.mark.slow
def test_one_round_keeps_better_samples_and_raises_the_policy_reward(sft_weak_model, tmp_path):
    """From the weaker SFT model (45% of held-out sums right when greedy, 22% of samples at
    temperature 1): the kept samples are all right, and one round of SFT on them raises the
    held-out greedy accuracy. Measured: 0.447 -> 0.507 (asserted +0.03)."""
    run_trainer(
        "rlhf.rejection_sampling",
        rs_args(
            sft_weak_model,
            tmp_path,
            "--iterations",
            "1",
            "--keep",
            "threshold",
            "--reward_threshold",
            "1",
            "--learning_rate",
            "1e-4",
            "--eval_dataset",
            "embedded:arith/prompts_eval.jsonl",
        ),
    )
    before, after = read_jsonl(tmp_path / "metrics.jsonl")
    assert after["kept_reward"] == 1.0 and after["sample_reward"] < 0.5, after
    assert after["eval_reward"] >= before["eval_reward"] + 0.03, (before, after)
    kept = read_jsonl(tmp_path / "round_1.jsonl")
    assert len(kept) == after["kept"] and all(r["output"] == r["label"] for r in kept)
    assert (tmp_path / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("backend", [[], ["--eval_task", "generate_vllm", "--vllm_tensor_parallel_size", "2"]], ids=["hf", "vllm-tp2"])
def test_keep_best_writes_one_sample_per_prompt(sft_weak_model, tmp_path, backend):
    """--iterations 0: generate, score and write the dataset only; the best of each prompt's 8
    (transformers on each rank, or one vLLM engine over both ranks)."""
    run_trainer("rlhf.rejection_sampling", rs_args(sft_weak_model, tmp_path, "--iterations", "0", "--max_samples", "64", *backend))
    kept = read_jsonl(tmp_path / "round_1.jsonl")
    (record,) = read_jsonl(tmp_path / "metrics.jsonl")
    assert len(kept) == 64 and all(set(r) >= {"input", "prompt", "output", "reward"} for r in kept)
    assert record["kept_reward"] > record["sample_reward"] + 0.2, record  # best of 8 beats the average sample
    assert not (tmp_path / "model").exists()


def test_rejection_sampling_needs_a_reward(tmp_path):
    proc = run_trainer(
        "rlhf.rejection_sampling", ["--pretrain", "embedded:tiny-qwen2", "--output_dir", str(tmp_path)], nproc=0, check=False
    )
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1 and "needs a reward" in lines[0], proc.stderr[-2000:]
