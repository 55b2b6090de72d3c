"""Batch inference (rlhf.generate): sharded over ranks, gathered in input order, scored."""

from __future__ import annotations

import pytest
from helpers import error_lines, read_jsonl, run_trainer

from rlhf.data.sources import resolve_uri


def gen_args(model, out, *extra):
    return [
        "--pretrain",
        str(model),
        "--dataset",
        "embedded:arith/prompts_eval.jsonl",
        "--max_samples",
        "12",
        "--generate_max_len",
        "4",
        "--output_path",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def greedy_runs(sft_tiny_model, rm_tiny_model, tmp_path_factory):
    """Greedy best-of-2 on 12 held-out prompts, scored by the RM and exact match: with
    transformers on 1 and on 2 ranks, and with vLLM on 2 ranks."""
    out = tmp_path_factory.mktemp("generate")
    score = [
        "--reward_pretrain",
        str(rm_tiny_model),
        "--reward_func",
        "rlhf.rewards:exact_match",
        "--label_key",
        "label",
        "--best_of_n",
        "2",
        "--temperature",
        "0",
    ]
    run_trainer("rlhf.generate", gen_args(sft_tiny_model, out / "hf1.jsonl", *score), nproc=1)
    run_trainer("rlhf.generate", gen_args(sft_tiny_model, out / "hf2.jsonl", *score))
    run_trainer("rlhf.generate", gen_args(sft_tiny_model, out / "vllm2.jsonl", *score, "--eval_task", "generate_vllm"))
    return out


@pytest.mark.slow
def test_generate_is_gathered_in_input_order_whatever_the_ranks(greedy_runs):
    one, two = read_jsonl(greedy_runs / "hf1.jsonl"), read_jsonl(greedy_runs / "hf2.jsonl")
    assert len(one) == 24 and one == two
    file_order = [r["input"] for r in read_jsonl(resolve_uri("embedded:arith/prompts_eval.jsonl"))]
    positions = [file_order.index(r["input"]) for r in one[::2]]  # --max_samples draws 12 rows, kept in file order
    assert positions == sorted(positions) and all(a["input"] == b["input"] for a, b in zip(one[::2], one[1::2]))
    correct = sum(r["rewards"][1] for r in one[::2]) / 12  # exact match of the greedy answer
    assert correct >= 0.5 and all(r["finished"] for r in one)
    assert all(r["reward"] == pytest.approx(r["rewards"][0] + r["rewards"][1]) for r in one)


def test_vllm_batch_inference_equals_transformers(greedy_runs):
    assert read_jsonl(greedy_runs / "vllm2.jsonl") == read_jsonl(greedy_runs / "hf2.jsonl")


def test_rm_task_rescores_written_responses(greedy_runs, sft_tiny_model, rm_tiny_model):
    out = greedy_runs / "rescored.jsonl"
    run_trainer(
        "rlhf.generate",
        [
            "--pretrain",
            str(sft_tiny_model),
            "--eval_task",
            "rm",
            "--dataset",
            str(greedy_runs / "hf2.jsonl"),
            "--input_key",
            "input",
            "--output_key",
            "output",
            "--reward_pretrain",
            str(rm_tiny_model),
            "--output_path",
            str(out),
        ],
    )
    before, after = read_jsonl(greedy_runs / "hf2.jsonl"), read_jsonl(out)
    assert [r["output"] for r in after] == [r["output"] for r in before]
    for a, b in zip(before, after):
        assert b["reward"] == pytest.approx(a["rewards"][0], abs=1e-4)


def test_best_of_n_marks_the_best_sample(sft_tiny_model, tmp_path):
    out = tmp_path / "sampled.jsonl"
    run_trainer(
        "rlhf.generate",
        gen_args(sft_tiny_model, out, "--best_of_n", "4", "--reward_func", "rlhf.rewards:exact_match", "--label_key", "label"),
    )
    records = read_jsonl(out)
    assert len(records) == 48
    for row in range(12):
        group = records[4 * row : 4 * row + 4]
        assert sum(r["best"] for r in group) == 1
        assert max(group, key=lambda r: r["reward"])["reward"] == next(r for r in group if r["best"])["reward"]


def test_rm_task_without_output_key_is_a_clear_error(tmp_path):
    proc = run_trainer(
        "rlhf.generate",
        [
            "--pretrain",
            "embedded:tiny-qwen2",
            "--eval_task",
            "rm",
            "--reward_func",
            "rlhf.rewards:exact_match",
            "--output_path",
            str(tmp_path / "x.jsonl"),
        ],
        nproc=0,
        check=False,
    )
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1 and "--output_key" in lines[0], proc.stderr[-2000:]
