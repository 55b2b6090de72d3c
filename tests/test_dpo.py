"""DPO / IPO / cDPO end to end: torchrun with 2 ranks, real DeepSpeed, from the SFT'd tiny model."""

from __future__ import annotations

import shutil

import pytest
from helpers import ZERO3_FORCE_GATHER, read_jsonl, run_trainer


def dpo_args(pretrain, out, *extra):
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
def test_dpo_learns_the_addition_preferences(sft_tiny_model, tmp_path):
    """The README's DPO preset: held-out implicit-reward accuracy and margin rise.

    Measured (2 ranks, fp32): eval_acc 0.77 at step 10 -> 0.87 at step 68; eval_margin 0.27 -> 0.72.
    """
    run_trainer(
        "rlhf.dpo",
        [
            "--config",
            "configs/dpo_tiny.yaml",
            "--pretrain",
            str(sft_tiny_model),
            "--save_path",
            str(tmp_path / "model"),
            "--ckpt_path",
            str(tmp_path / "ckpt"),
        ],
    )
    evals = [r for r in read_jsonl(tmp_path / "model" / "metrics.jsonl") if "eval_acc" in r]
    assert evals[-1]["eval_acc"] >= 0.82, [round(r["eval_acc"], 3) for r in evals]
    assert evals[-1]["eval_acc"] > evals[0]["eval_acc"] + 0.05
    assert evals[-1]["eval_margin"] > evals[0]["eval_margin"] + 0.25, [round(r["eval_margin"], 3) for r in evals]
    assert (tmp_path / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.slow
def test_dpo_zero_stages_agree(sft_tiny_model, tmp_path, stage):
    """ZeRO-2 and ZeRO-3 (forced gathering, reference engine ZeRO-3 too) give the ZeRO-0 loss curve in fp32."""
    curves = {}
    for s in (0, stage):
        extra = ["--ds_config", ZERO3_FORCE_GATHER] if s == 3 else []
        out = tmp_path / f"z{s}"
        run_trainer("rlhf.dpo", dpo_args(sft_tiny_model, out, "--zero_stage", str(s), "--max_steps", "3", "--max_samples", "160", *extra))
        curves[s] = losses(out)
    assert len(curves[0]) == 3 and curves[0][-1] != curves[0][0]
    assert curves[stage] == pytest.approx(curves[0], abs=1e-5)


def test_dpo_precomputed_reference_matches_reference_engine(sft_tiny_model, tmp_path):
    curves, stdout = {}, {}
    for mode in ("engine", "precompute"):
        out = tmp_path / mode
        proc = run_trainer(
            "rlhf.dpo", dpo_args(sft_tiny_model, out, "--zero_stage", "0", "--max_steps", "3", "--max_samples", "160", "--ref_mode", mode)
        )
        curves[mode], stdout[mode] = losses(out), proc.stdout
    assert "mode precompute" in stdout["precompute"]
    assert curves["precompute"] == pytest.approx(curves["engine"], abs=1e-5)


def test_dpo_lora_uses_the_policy_without_adapter_as_reference(sft_tiny_model, tmp_path):
    """No second model: the trainer reports 0 parameters in a separate reference; the loss falls."""
    proc = run_trainer(
        "rlhf.dpo",
        dpo_args(
            sft_tiny_model,
            tmp_path,
            "--lora_rank",
            "8",
            "--lora_alpha",
            "16",
            "--learning_rate",
            "1e-3",
            "--max_steps",
            "8",
            "--max_samples",
            "256",
        ),
    )
    assert "reference = the policy with its LoRA adapter disabled" in proc.stdout
    assert "separate reference parameters: 0" in proc.stdout
    curve = losses(tmp_path)
    # At step 1 policy == reference, so the loss is exactly log 2.
    assert curve[0] == pytest.approx(0.693147, abs=1e-5)
    # Measured: step-8 loss 0.645, eval loss after it 0.652, eval_acc 0.73 (noisy per-step losses:
    # every step sees other pairs).
    assert curve[-1] < curve[0] - 0.02, curve
    final = read_jsonl(tmp_path / "model" / "metrics.jsonl")[-1]
    assert final["eval_loss"] < 0.68 and final["eval_acc"] > 0.6, final
    assert (tmp_path / "model" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("flags", [["--loss_type", "ipo"], ["--label_smoothing", "0.1"]], ids=["ipo", "cdpo"])
def test_dpo_variants_run(sft_tiny_model, tmp_path, flags):
    run_trainer("rlhf.dpo", dpo_args(sft_tiny_model, tmp_path, "--max_steps", "2", "--max_samples", "64", *flags))
    curve = losses(tmp_path)
    # Step 1: policy == reference so h = 0: IPO's loss is (1 / (2 beta))^2 = 1, (c)DPO's log 2.
    assert len(curve) == 2 and curve[0] == pytest.approx(1.0 if "ipo" in flags else 0.693147, abs=1e-5)


def test_dpo_packing_gives_the_unpacked_loss(sft_tiny_model, tmp_path):
    """Packed rows (block-diagonal attention) score pairs as padded batches do.

    16 pairs and --train_batch_size 16: the first step holds every pair in both modes (packing
    only regroups them into micro-batches), so its loss must agree. --nll_loss_coef makes the
    step-1 loss depend on the log-probs (the DPO term alone is log 2 while policy == reference);
    the eval after that step (same update, padded or packed eval forwards) must agree too.
    """
    records = {}
    for name, extra in (("padded", []), ("packed", ["--packing_samples"])):
        out = tmp_path / name
        args = dpo_args(
            sft_tiny_model,
            out,
            "--zero_stage",
            "0",
            "--max_steps",
            "1",
            "--max_samples",
            "16",
            "--train_batch_size",
            "16",
            "--nll_loss_coef",
            "0.5",
            *extra,
        )
        run_trainer("rlhf.dpo", args)
        records[name] = read_jsonl(out / "model" / "metrics.jsonl")[-1]
    for key in ("loss", "chosen_logp", "rejected_logp", "eval_loss", "eval_margin"):
        assert records["packed"][key] == pytest.approx(records["padded"][key], abs=1e-5), key
    assert records["padded"]["loss"] > 0.693147 + 0.01  # the NLL term is really there


def test_dpo_resume_equals_uninterrupted(sft_tiny_model, tmp_path):
    straight = tmp_path / "straight"
    run_trainer(
        "rlhf.dpo", dpo_args(sft_tiny_model, straight, "--zero_stage", "2", "--max_steps", "4", "--save_steps", "2", "--max_samples", "256")
    )
    ckpt = tmp_path / "ckpt"
    shutil.copytree(straight / "ckpt", ckpt)
    resumed = tmp_path / "resumed"
    run_trainer(
        "rlhf.dpo",
        [
            *dpo_args(sft_tiny_model, resumed, "--zero_stage", "2", "--max_steps", "4", "--max_samples", "256"),
            "--ckpt_path",
            str(ckpt),
            "--load_checkpoint",
        ],
    )
    full, tail = losses(straight), losses(resumed)
    assert tail == pytest.approx(full[2:], abs=1e-6)
