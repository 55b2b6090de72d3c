"""Paths a new user takes that used to break (issue 12): hub-snapshot split names, a reward file
given to --remote_rm_url, fresh vs resumed metrics files. The error cases of the same items are
rows of tests/test_input_errors.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.data.sources import load_rows
from rlhf.errors import UserError


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def texts(rows: list[dict]) -> list[str]:
    return [r["t"] for r in rows]


def test_hub_snapshot_split_names_keep_their_underscore(tmp_path):
    """UltraFeedback-binarized's snapshot: data/{train,test}_{prefs,sft}-00000-of-00001.parquet."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    snapshot = tmp_path / "ultrafeedback_binarized"
    for split in ("train_prefs", "test_prefs", "train_sft"):
        (snapshot / "data").mkdir(parents=True, exist_ok=True)
        pq.write_table(
            pa.Table.from_pylist([{"t": f"{split} {i}"} for i in range(2)]), snapshot / "data" / f"{split}-00000-of-00001.parquet"
        )
    assert texts(load_rows(str(snapshot), "train_prefs")) == ["train_prefs 0", "train_prefs 1"]
    assert texts(load_rows(str(snapshot), "test_prefs")) == ["test_prefs 0", "test_prefs 1"]
    # 'train' would mix two different datasets (prefs and sft): it must be named in full.
    with pytest.raises(UserError, match=r"no files for split 'train' \(available splits: test_prefs, train_prefs, train_sft\)"):
        load_rows(str(snapshot), "train")


def test_plain_split_file_names_still_work(tmp_path):
    folder = tmp_path / "plain"
    write_jsonl(folder / "train_0.jsonl", [{"t": "a"}])  # numbered shards of one split
    write_jsonl(folder / "train_1.jsonl", [{"t": "b"}])
    write_jsonl(folder / "test-00001.jsonl", [{"t": "c"}])
    assert texts(load_rows(str(folder), "train")) == ["a", "b"]
    assert texts(load_rows(str(folder), "test")) == ["c"]
    other = tmp_path / "other"
    write_jsonl(other / "train_data.jsonl", [{"t": "d"}])  # one longer name: 'train' still finds it
    write_jsonl(other / "eval_data.jsonl", [{"t": "e"}])
    assert texts(load_rows(str(other), "train")) == ["d"]
    assert texts(load_rows(str(other), "train_data")) == ["d"]


OPENRLHF_REWARD_FILE = """
import torch

def reward_func(queries, prompts, labels):
    # OpenRLHF's convention: a query is the prompt followed by the response
    return torch.tensor([float(q == p + str(y)) for q, p, y in zip(queries, prompts, labels)])
"""


def test_remote_rm_url_takes_an_openrlhf_reward_file(tmp_path):
    from rlhf.rewards import RemoteReward, remote_reward

    path = tmp_path / "reward.py"
    path.write_text(OPENRLHF_REWARD_FILE)
    source = remote_reward(str(path), timeout=1.0, retries=0)
    rewards = source(["1+1=", "2+2="], ["2", "5"], [2, 4])
    assert rewards.tolist() == [1.0, 0.0]
    # OpenRLHF's newer files return a dict; its "rewards" are the rewards.
    path.write_text(
        "def reward_func(queries, prompts, labels):\n    return {'rewards': [0.5] * len(queries), 'scores': [1] * len(queries)}\n"
    )
    assert remote_reward(str(path), 1.0, 0)(["p"], ["r"], [None]).tolist() == [0.5]
    assert isinstance(remote_reward("http://localhost:5000/get_reward", 1.0, 0), RemoteReward)


def test_kto_data_with_one_label_class_warns(tmp_path, caplog):
    import logging

    from transformers import AutoTokenizer

    from rlhf.config import KTOConfig
    from rlhf.data.sources import ASSETS_DIR
    from rlhf.kto import load_examples

    tok = AutoTokenizer.from_pretrained(str(ASSETS_DIR / "tiny-qwen2"))
    data = tmp_path / "kto.jsonl"
    write_jsonl(data, [{"prompt": f"{i}+1=", "completion": str(i + 1), "label": True} for i in range(8)])
    cfg = KTOConfig()
    cfg.data.dataset, cfg.data.eval_holdout_ratio = str(data), 0.0
    with caplog.at_level(logging.WARNING):
        train, _ = load_examples(cfg, tok)
    assert len(train) == 8
    assert f"KTO data {data}: all 8 training examples have --label_key 'label' true (desirable)" in caplog.text
    caplog.clear()
    write_jsonl(data, [{"prompt": f"{i}+1=", "completion": str(i + 1), "label": i % 2 == 0} for i in range(8)])
    with caplog.at_level(logging.WARNING):
        load_examples(cfg, tok)
    assert "training examples have" not in caplog.text  # both classes: no warning


def test_packing_keeps_the_pairs_per_optimizer_step():
    """--packing_samples packs each micro-batch's samples into a row; it must not change how many
    samples (DPO: pairs) an optimizer step holds, or --train_batch_size would lose its meaning."""
    from rlhf.config import DPOConfig
    from rlhf.data.batching import step_micro_batches
    from rlhf.trainer import _epoch_plan, plan_total_steps

    lengths = [20 + i % 7 for i in range(64)]  # short pairs: thousands would fit one --max_len budget
    counts = {}
    for packed in (False, True):
        cfg = DPOConfig()
        cfg.data.packing_samples = packed
        cfg.train.micro_train_batch_size, cfg.train.train_batch_size = 8, 16
        per_epoch, _ = plan_total_steps(cfg, lengths, dp_size=2, num_items=len(lengths))
        plan = _epoch_plan(cfg, lengths, epoch=0)
        counts[packed] = (per_epoch, [sum(len(mb) for rank in step_micro_batches(plan, s, 2, 1) for mb in rank) for s in range(per_epoch)])
    assert counts[True] == counts[False] == (4, [16, 16, 16, 16])


# ----------------------------------------------------------------------------------------------
# rlhf.ppo as a new user runs it: their own prompt file and reward file, no eval file


def tiny_ppo_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--pretrain",
        "embedded:tiny-qwen2",
        "--advantage_estimator",
        "group_norm",
        "--n_samples_per_prompt",
        "2",
        "--rollout_batch_size",
        "4",
        "--micro_rollout_batch_size",
        "8",
        "--train_batch_size",
        "8",
        "--micro_train_batch_size",
        "8",
        "--generate_max_len",
        "3",
        "--zero_stage",
        "0",
        "--max_steps",
        "2",
        "--eval_every",
        "1",
        "--save_path",
        str(tmp_path / "model"),
        "--ckpt_path",
        str(tmp_path / "ckpt"),
        *extra,
    ]


def test_ppo_with_own_prompts_reward_file_and_holdout_eval(tmp_path):
    """Items 2, 5 and 6 in one real run: prompts whose column is 'question' (the embedded eval file
    has 'input', so touching it would fail), an OpenRLHF reward file as --remote_rm_url, a quarter
    of the prompts held out for eval, and a save path holding an old run's metrics.jsonl."""
    from helpers import read_jsonl, run_trainer

    write_jsonl(tmp_path / "prompts.jsonl", [{"question": f"{i}+{i}=", "answer": str(2 * i)} for i in range(20)])
    (tmp_path / "reward.py").write_text(
        "import torch\n\ndef reward_func(queries, prompts, labels):\n    return "
        "torch.tensor([float(len(q) - len(p)) for q, p in zip(queries, prompts)])\n"
    )
    old = tmp_path / "model" / "metrics.jsonl"
    write_jsonl(old, [{"step": 7, "eval_reward": 0.99, "time": 1.0}])
    proc = run_trainer(
        "rlhf.ppo",
        tiny_ppo_args(
            tmp_path,
            "--prompt_data",
            str(tmp_path / "prompts.jsonl"),
            "--input_key",
            "question",
            "--label_key",
            "answer",
            "--remote_rm_url",
            str(tmp_path / "reward.py"),
            "--eval_holdout_ratio",
            "0.25",
        ),
        nproc=0,
    )
    records = read_jsonl(old)
    assert [r["step"] for r in records if "eval_reward" in r] == [0, 1, 2]  # the old run's step 7 is gone
    assert all(r["step"] <= 2 for r in records)
    trained = [r for r in records if "reward_remote" in r]
    # the reward file saw prompt + response: its reward is the response's length in characters
    assert len(trained) == 2 and all(0 <= r["reward_remote"] <= 3 for r in trained)  # at most 3 one-character tokens
    assert "eval_reward by step: 0: " in proc.stdout


def test_ppo_names_the_reward_model_flag_of_a_corrupt_folder(tmp_path):
    import shutil

    from helpers import error_lines, run_trainer

    from rlhf.data.sources import ASSETS_DIR

    folder = tmp_path / "rm"
    shutil.copytree(ASSETS_DIR / "tiny-qwen2", folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    proc = run_trainer("rlhf.ppo", tiny_ppo_args(tmp_path, "--reward_pretrain", str(folder)), nproc=0, check=False)
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"error: --reward_pretrain {folder}: the model's weights are not a readable safetensors file")
