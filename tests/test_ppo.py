"""PPO / GRPO end to end: torchrun with 2 ranks, every role colocated, HF generation, real DeepSpeed."""

from __future__ import annotations

import shutil
import textwrap

import pytest

from helpers import ZERO3_FORCE_GATHER, error_lines, read_jsonl, run_trainer


def ppo_args(pretrain, out, *extra):
    return [
        "--config", "configs/grpo_tiny.yaml",
        "--pretrain", str(pretrain),
        "--save_path", str(out / "model"), "--ckpt_path", str(out / "ckpt"), *extra,
    ]


def eval_rewards(out):
    return [r["eval_reward"] for r in read_jsonl(out / "model" / "metrics.jsonl") if "eval_reward" in r]


@pytest.mark.slow
def test_grpo_raises_heldout_accuracy(sft_tiny_model, tmp_path):
    """GRPO (group_norm), exact-match reward: held-out greedy accuracy rises.

    The SFT'd model already answers 86.7% of held-out sums, so the headroom is small. Measured:
    0.867 -> 0.887 at the end, 0.907 at best; asserted: +0.01 at the end, +0.025 at best.
    """
    run_trainer("rlhf.ppo", ppo_args(sft_tiny_model, tmp_path), timeout=1500)
    curve = eval_rewards(tmp_path)
    assert curve[-1] >= curve[0] + 0.01 and max(curve) >= curve[0] + 0.025, f"eval reward curve {curve}"
    assert (tmp_path / "model" / "reward_curve.png").stat().st_size > 1000


@pytest.mark.slow
def test_ppo_with_critic_raises_heldout_accuracy(sft_tiny_model, tmp_path):
    """PPO with a critic (gae): held-out accuracy rises and the critic learns; the critic is exported.

    Measured: eval 0.867 -> 0.887 (best 0.897); value loss 0.157 at step 1 -> ~0.04.
    """
    run_trainer("rlhf.ppo", ppo_args(sft_tiny_model, tmp_path, "--advantage_estimator", "gae", "--n_samples_per_prompt", "4", "--rollout_batch_size", "32", "--critic_learning_rate", "1e-3"), timeout=1500)
    curve = eval_rewards(tmp_path)
    assert curve[-1] >= curve[0] + 0.01 and max(curve) >= curve[0] + 0.02, f"eval reward curve {curve}"
    value_loss = [r["value_loss"] for r in read_jsonl(tmp_path / "model" / "metrics.jsonl") if "value_loss" in r]
    assert sum(value_loss[-5:]) / 5 < 0.5 * value_loss[0], value_loss
    assert (tmp_path / "model" / "critic" / "config.json").is_file()


@pytest.mark.parametrize("stage", [2, 3])
def test_colocated_zero_stages_run(sft_tiny_model, tmp_path, stage):
    extra = ["--ds_config", ZERO3_FORCE_GATHER] if stage == 3 else []
    run_trainer("rlhf.ppo", ppo_args(sft_tiny_model, tmp_path, "--zero_stage", str(stage), "--max_steps", "2", "--eval_prompt_data", "None", *extra))
    records = [r for r in read_jsonl(tmp_path / "model" / "metrics.jsonl") if "reward" in r]
    assert len(records) == 2
    for r in records:
        assert 0.0 <= r["reward"] <= 1.0 and r["response_length"] >= 1
        assert {"kl", "policy_loss", "clip_fraction", "time_generate", "time_score", "time_train"} <= r.keys()


def test_ppo_resume_equals_uninterrupted(sft_tiny_model, tmp_path):
    common = ["--zero_stage", "0", "--max_steps", "4", "--eval_prompt_data", "None"]
    straight = tmp_path / "straight"
    run_trainer("rlhf.ppo", ppo_args(sft_tiny_model, straight, *common, "--save_steps", "2"))
    ckpt = tmp_path / "ckpt"
    shutil.copytree(straight / "ckpt", ckpt)
    resumed = tmp_path / "resumed"
    run_trainer("rlhf.ppo", [*ppo_args(sft_tiny_model, resumed, *common), "--ckpt_path", str(ckpt), "--load_checkpoint"])
    full = [r for r in read_jsonl(straight / "model" / "metrics.jsonl") if "reward" in r]
    tail = [r for r in read_jsonl(resumed / "model" / "metrics.jsonl") if "reward" in r]
    assert [r["step"] for r in tail] == [3, 4]
    for a, b in zip(full[2:], tail):
        assert b["reward"] == pytest.approx(a["reward"], abs=1e-6)
        assert b["policy_loss"] == pytest.approx(a["policy_loss"], abs=1e-6)


def reward_module(tmp_path, body: str) -> str:
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent(body))
    return str(tmp_path / "my_rewards.py") + ":score"


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--advantage_estimator", "ppo_magic"], "unknown advantage estimator 'ppo_magic'; choose one of gae,"),
        (["--advantage_estimator", "group_norm", "--n_samples_per_prompt", "1"], "--n_samples_per_prompt >= 2"),
        (["--rollout_batch_size", "3", "--n_samples_per_prompt", "64"], "--rollout_batch_size 3 must be divisible by the actor data-parallel size 2"),
    ],
    ids=["unknown estimator", "group estimator with one sample", "placement does not fit"],
)
def test_ppo_bad_config(tmp_path, extra, expected):
    proc = run_trainer("rlhf.ppo", ["--config", "configs/grpo_tiny.yaml", "--pretrain", "embedded:tiny-qwen2", "--save_path", str(tmp_path / "out"), *extra], nproc=2, check=False)
    lines = error_lines(proc.stderr)
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-3000:]
    assert expected in lines[0]


@pytest.mark.parametrize(
    "body, expected",
    [
        ("def score(prompts, responses, labels):\n    raise RuntimeError('grader crashed')\n", "raised RuntimeError: grader crashed"),
        ("def score(prompts, responses, labels):\n    return [1.0]\n", "returned 1 rewards for"),
    ],
    ids=["raises", "wrong length"],
)
def test_ppo_bad_reward_function(tmp_path, body, expected):
    spec = reward_module(tmp_path, body)
    proc = run_trainer("rlhf.ppo", ["--config", "configs/grpo_tiny.yaml", "--pretrain", "embedded:tiny-qwen2", "--reward_func", spec, "--max_steps", "1", "--eval_prompt_data", "None", "--save_path", str(tmp_path / "out")], nproc=0, check=False)
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert expected in lines[0]
