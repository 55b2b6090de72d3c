"""Split placement: the seed's "roles on their own GPUs" layout, here actor 2, critic 1 and
reward + reference 1 on 4 torchrun ranks, each role a DeepSpeed engine on its own process group.

The strongest check of the plumbing (batches moved between groups, per-group normalisers,
DeepSpeed confined to subgroups) is that nothing numerical changes: the same run colocated on 2
ranks (every role on both) gives the same rewards, KL, losses and final weights.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import ZERO3_FORCE_GATHER, error_lines, read_jsonl, run_trainer
from safetensors.torch import load_file

SPLIT = ["--actor_num_gpus_per_node", "2", "--critic_num_gpus_per_node", "1", "--reward_num_gpus_per_node", "1", "--colocate_ref_reward"]
COMPARED = ("reward", "kl", "reward_model0", "reward_func", "policy_loss", "entropy", "value_loss", "response_length")


def gae_args(sft, rm, out, *extra):
    """PPO with a critic, a reward model plus the exact-match function, 3 steps."""
    return [
        "--config",
        "configs/grpo_tiny.yaml",
        "--pretrain",
        str(sft),
        "--reward_pretrain",
        str(rm),
        "--advantage_estimator",
        "gae",
        "--n_samples_per_prompt",
        "2",
        "--rollout_batch_size",
        "32",
        "--train_batch_size",
        "64",
        "--micro_train_batch_size",
        "32",
        "--init_kl_coef",
        "0.05",
        "--critic_learning_rate",
        "1e-3",
        "--max_steps",
        "3",
        "--eval_prompt_data",
        "None",
        "--save_path",
        str(out / "model"),
        "--ckpt_path",
        str(out / "ckpt"),
        *extra,
    ]


def step_records(out):
    return [r for r in read_jsonl(out / "model" / "metrics.jsonl") if "reward" in r]


def assert_same_run(a, b, tol=1e-5):
    ra, rb = step_records(a), step_records(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        for key in COMPARED:
            assert y[key] == pytest.approx(x[key], abs=tol), (key, x["step"], x[key], y[key])


def assert_same_weights(a, b, tol=1e-5):
    for sub in ("model.safetensors", "critic/model.safetensors"):
        wa, wb = load_file(a / "model" / sub), load_file(b / "model" / sub)
        assert wa.keys() == wb.keys()
        for name in wa:
            assert torch.allclose(wa[name], wb[name], atol=tol), (sub, name, (wa[name] - wb[name]).abs().max())


@pytest.fixture(scope="module")
def colocated_run(sft_tiny_model, rm_tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("colocated")
    run_trainer("rlhf.ppo", gae_args(sft_tiny_model, rm_tiny_model, out, "--zero_stage", "2"))
    return out


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.slow
def test_split_placement_equals_colocated(sft_tiny_model, rm_tiny_model, colocated_run, tmp_path, stage):
    """ZeRO-2 (with the reference and reward weights offloaded to the CPU between forwards), and
    ZeRO-3 with every parameter partitioned (the 1-rank reference and reward engines too): same
    metrics and weights as the colocated run, to 1e-5."""
    extra = ["--ds_config", ZERO3_FORCE_GATHER] if stage == 3 else ["--ref_reward_offload"]
    run_trainer("rlhf.ppo", gae_args(sft_tiny_model, rm_tiny_model, tmp_path, "--zero_stage", str(stage), *SPLIT, *extra), nproc=4)
    records = step_records(tmp_path)
    assert len(records) == 3 and records[-1]["kl"] > 0  # the policy moved away from the reference
    assert_same_run(colocated_run, tmp_path)
    assert_same_weights(colocated_run, tmp_path)


@pytest.mark.slow
def test_split_placement_with_token_budget_and_packing_equals_colocated(sft_tiny_model, rm_tiny_model, colocated_run, tmp_path):
    """--use_dynamic_batch --packing_samples on the split placement: the actor's samples move
    between its 2 ranks (gathered over the actor's process group), the 1-rank critic, reference and
    reward score by token budgets; the colocated run's fixed micro-batches, padded, give the same
    run up to float rounding (Adam's first steps can raise it to ~1e-5 in the weights)."""
    budgets = ["--use_dynamic_batch", "--packing_samples", "--train_max_tokens_per_gpu", "200", "--rollout_max_tokens_per_gpu", "120"]
    run_trainer("rlhf.ppo", gae_args(sft_tiny_model, rm_tiny_model, tmp_path, "--zero_stage", "2", *SPLIT, *budgets), nproc=4)
    assert_same_run(colocated_run, tmp_path, tol=1e-4)
    assert_same_weights(colocated_run, tmp_path, tol=2e-4)


@pytest.mark.slow
def test_split_zero3_resume_equals_uninterrupted(sft_tiny_model, rm_tiny_model, tmp_path):
    """Each role checkpoints on its own group (the critic's ranks exclude global rank 0); a job
    resumed from step 2 ends where the uninterrupted one does."""
    common = ["--zero_stage", "3", "--ds_config", ZERO3_FORCE_GATHER, *SPLIT]
    straight = tmp_path / "straight"
    run_trainer("rlhf.ppo", gae_args(sft_tiny_model, rm_tiny_model, straight, *common, "--save_steps", "2"), nproc=4)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(straight / "ckpt", ckpt)
    assert sorted(p.name for p in (ckpt / "step_00000002").iterdir()) == ["actor", "critic", "rng", "trainer_state.json"]
    resumed = tmp_path / "resumed"
    run_trainer(
        "rlhf.ppo", [*gae_args(sft_tiny_model, rm_tiny_model, resumed, *common), "--ckpt_path", str(ckpt), "--load_checkpoint"], nproc=4
    )
    tail = step_records(resumed)
    assert [r["step"] for r in tail] == [3]
    for key in COMPARED:
        assert tail[0][key] == pytest.approx(step_records(straight)[2][key], abs=1e-6), key
    assert_same_weights(straight, resumed, tol=1e-6)


@pytest.mark.parametrize(
    "extra, expected",
    [
        (SPLIT, "placement: actor 2 + critic 1 + reward+reference 1 = 4 ranks, but the world has 2"),
        (
            ["--actor_num_gpus_per_node", "1", "--critic_num_gpus_per_node", "1"],
            "split placement: this run uses roles actor, critic, reward, reference; give --reward_num_gpus_per_node",
        ),
        (["--actor_num_gpus_per_node", "1", "--critic_num_gpus_per_node", "1", "--colocate_critic_reward", "--colocate_actor_ref"], None),
    ],
    ids=["does not fit the world", "role without ranks", "fits"],
)
def test_split_placement_is_validated(sft_tiny_model, rm_tiny_model, tmp_path, extra, expected):
    proc = run_trainer("rlhf.ppo", gae_args(sft_tiny_model, rm_tiny_model, tmp_path, "--max_steps", "1", *extra), nproc=2, check=False)
    if expected is None:
        assert proc.returncode == 0, proc.stderr[-3000:]
        return
    lines = error_lines(proc.stderr)
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-3000:]
    assert expected in lines[0]


def test_rollout_ranks_of_their_own_get_the_actors_weights_every_step(sft_tiny_model, tmp_path):
    """Generation on 2 rollout ranks apart from the 2 actor ranks (ZeRO-3, every parameter
    partitioned): the actor's weights are gathered in ~0.5 MB buckets and broadcast before each
    rollout. Samples, rewards, losses and the greedy eval then equal the colocated run's, where
    generation reads the live weights; a stale or partial sync would change them from step 2 on."""

    def grpo(out, *extra):
        return [
            "--config",
            "configs/grpo_tiny.yaml",
            "--pretrain",
            str(sft_tiny_model),
            "--max_steps",
            "3",
            "--eval_every",
            "3",
            "--rollout_batch_size",
            "16",
            "--train_batch_size",
            "64",
            "--micro_train_batch_size",
            "32",
            "--zero_stage",
            "3",
            "--ds_config",
            ZERO3_FORCE_GATHER,
            "--init_kl_coef",
            "0.05",
            "--save_path",
            str(out / "model"),
            "--ckpt_path",
            str(out / "ckpt"),
            *extra,
        ]

    run_trainer("rlhf.ppo", grpo(tmp_path / "colocated"))
    split = [
        "--actor_num_gpus_per_node",
        "2",
        "--rollout_num_gpus_per_node",
        "2",
        "--ref_num_gpus_per_node",
        "1",
        "--weight_sync_bucket_mb",
        "0.5",
    ]
    run_trainer("rlhf.ppo", grpo(tmp_path / "split", *split), nproc=5)
    a, b = [read_jsonl(tmp_path / name / "model" / "metrics.jsonl") for name in ("colocated", "split")]
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3]
    for x, y in zip(a, b):
        for key in ("reward", "kl", "policy_loss", "response_length", "eval_reward"):
            if key in x:
                assert y[key] == pytest.approx(x[key], abs=1e-6), (key, x["step"])
    assert b[-1]["kl"] > 0 and b[-1]["eval_reward"] != b[0]["eval_reward"]  # the policy did move
    n_params = sum(t.numel() for t in load_file(tmp_path / "split" / "model" / "model.safetensors").values())
    assert b[1]["weight_sync_mb"] == pytest.approx(n_params * 4 / 2**20)  # every fp32 weight, once per step
