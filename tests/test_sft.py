"""SFT end to end: real torchrun (2 ranks, gloo), real DeepSpeed engines, the embedded tiny model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import ZERO3_FORCE_GATHER, read_jsonl, run_trainer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

# A short run: 4 optimizer steps of 32 samples (2 ranks x micro 8 x accumulation 2), fp32.
SHORT = [
    "--pretrain",
    "embedded:tiny-qwen2",
    "--dataset",
    "embedded:arith/sft_train.jsonl",
    "--eval_dataset",
    "embedded:arith/sft_eval.jsonl",
    "--max_samples",
    "256",
    "--max_len",
    "32",
    "--micro_train_batch_size",
    "8",
    "--train_batch_size",
    "32",
    "--max_steps",
    "4",
    "--learning_rate",
    "2e-3",
    "--lr_warmup_ratio",
    "0",
    "--eval_steps",
    "2",
]


def sft(tmp_path, name, *extra, nproc=2, env=None):
    out = tmp_path / name
    run_trainer("rlhf.sft", [*SHORT, "--save_path", str(out / "model"), "--ckpt_path", str(out / "ckpt"), *extra], nproc=nproc, env=env)
    return out


def losses(out):
    return [r["loss"] for r in read_jsonl(out / "model" / "metrics.jsonl") if "loss" in r]


def weights(out):
    return load_file(str(out / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def zero0_run(tmp_path_factory):
    # Also saves a resumable checkpoint after step 2 (the resume test starts from it).
    return sft(tmp_path_factory.mktemp("z0"), "run", "--zero_stage", "0", "--save_steps", "2")


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stages_match_zero0_in_fp32(zero0_run, tmp_path, stage):
    extra = ["--ds_config", ZERO3_FORCE_GATHER] if stage == 3 else []
    out = sft(tmp_path, f"z{stage}", "--zero_stage", str(stage), *extra)
    assert len(losses(out)) == 4
    assert losses(out) == pytest.approx(losses(zero0_run), abs=1e-5)
    ref, got = weights(zero0_run), weights(out)
    assert ref.keys() == got.keys()
    # The stages sum gradients in different orders (fp32 round-off ~1e-7), and Adam divides each
    # coordinate's update by its own gradient scale, so a coordinate whose gradient is near zero
    # can move by a noticeable part of lr (2e-3) on one side and not the other. So: every weight
    # within 1e-4, and all but a few in a thousand within 1e-5 (measured: 1 of 16384 at 1.16e-5).
    for key in ref:
        diff = (got[key].float() - ref[key].float()).abs()
        assert diff.max().item() < 1e-4, (key, diff.max().item())
        assert (diff > 1e-5 + 1e-4 * ref[key].float().abs()).float().mean().item() < 1e-3, key


def test_export_reloads_with_plain_transformers_and_equal_eval_loss(zero0_run):
    """The exported folder scores the eval set exactly as the training engine did."""
    model_dir = zero0_run / "model"
    final_eval = [r["eval_loss"] for r in read_jsonl(model_dir / "metrics.jsonl") if "eval_loss" in r][-1]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    from rlhf.algos.losses import sft_nll_sum
    from rlhf.config import DataConfig
    from rlhf.data.sft import collate_padded, tokenize_sft
    from rlhf.data.sources import load_mixture

    rows = load_mixture("embedded:arith/sft_eval.jsonl", None, "test", 256, 42)  # as --max_samples 256 --seed 42
    samples = tokenize_sft(rows, tokenizer, DataConfig(max_len=32))
    batch = collate_padded(samples, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mean_nll = sft_nll_sum(logits, batch["input_ids"], batch["loss_mask"]).item() / batch["loss_mask"][:, 1:].sum().item()
    assert mean_nll == pytest.approx(final_eval, abs=1e-4)


def test_resume_equals_uninterrupted(zero0_run, tmp_path):
    """4 steps straight == the same job resumed from its step-2 checkpoint (losses, weights)."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(zero0_run / "ckpt", ckpt)
    assert (ckpt / "latest").read_text() == "step_00000002"
    assert json.loads((ckpt / "step_00000002" / "trainer_state.json").read_text())["step"] == 2
    out = tmp_path / "resumed"
    run_trainer("rlhf.sft", [*SHORT, "--zero_stage", "0", "--save_path", str(out / "model"), "--ckpt_path", str(ckpt), "--load_checkpoint"])
    resumed = read_jsonl(out / "model" / "metrics.jsonl")
    assert resumed[0] == {**resumed[0], "step": 2, "resumed_from_step": 2}
    assert [r["loss"] for r in resumed if "loss" in r] == pytest.approx(losses(zero0_run)[2:], abs=1e-6)
    ref, got = weights(zero0_run), weights(out)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], atol=1e-6, rtol=0)


def test_kill_during_saves_leaves_a_loadable_checkpoint(tmp_path):
    """SIGKILL a job that checkpoints every step; `latest` must name a complete checkpoint and resume."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from helpers import REPO, trainer_env

    ckpt = tmp_path / "ckpt"

    def job(max_steps: int, save_path) -> list[str]:
        return [
            *SHORT,
            "--zero_stage",
            "2",
            "--max_epochs",
            "100",
            "--max_steps",
            str(max_steps),
            "--save_steps",
            "1",
            "--max_ckpt_num",
            "2",
            "--eval_steps",
            "1000",
            "--save_path",
            str(save_path),
            "--ckpt_path",
            str(ckpt),
        ]

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "rlhf.sft",
        *job(400, tmp_path / "model"),
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, env=trainer_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (ckpt / "latest").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        time.sleep(1.5)  # several more saves are under way
    finally:
        # torchrun puts its workers in their own sessions: kill the whole tree, as a dead node would.
        import psutil

        tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        psutil.wait_procs([p for p in map(lambda pid: psutil.Process(pid) if psutil.pid_exists(pid) else None, tree) if p], timeout=30)
    assert (ckpt / "latest").exists(), "the job never finished a checkpoint"
    step = json.loads((ckpt / (ckpt / "latest").read_text() / "trainer_state.json").read_text())["step"]
    assert 1 <= step < 400
    # Resume for two more steps from whatever the kill left behind.
    out = tmp_path / "resumed"
    run_trainer("rlhf.sft", [*job(step + 2, out), "--load_checkpoint"])
    resumed = read_jsonl(out / "metrics.jsonl")
    assert resumed[0]["resumed_from_step"] == step
    assert [r["step"] for r in resumed if "loss" in r] == [step + 1, step + 2]


def test_preemption_warning_saves_at_the_next_step_and_exits_for_a_retry(tmp_path):
    """SIGUSR2 (SLURM's warning before preemption or the time limit) to the ranks of a plain
    torchrun job that writes no periodic checkpoints: the ranks finish the step, save there, and
    exit with 75 (EX_TEMPFAIL); resuming finishes with the uninterrupted run's weights."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil
    from helpers import REPO, trainer_env

    def job(save_path, ckpt, max_steps=300) -> list[str]:  # constant LR: the schedule does not depend on max_steps
        return [
            *SHORT,
            "--zero_stage",
            "2",
            "--max_epochs",
            "100",
            "--max_steps",
            str(max_steps),
            "--lr_scheduler",
            "constant_with_warmup",
            "--lr_warmup_ratio",
            "0",
            "--save_steps",
            "0",
            "--eval_steps",
            "1000",
            "--logging_steps",
            "1",
            "--save_path",
            str(save_path),
            "--ckpt_path",
            str(ckpt),
        ]

    ckpt = tmp_path / "ckpt"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "rlhf.sft",
        *job(tmp_path / "warned", ckpt),
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=trainer_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    metrics = tmp_path / "warned" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and len(read_jsonl(metrics)) >= 3) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    for worker in psutil.Process(proc.pid).children(recursive=True):  # the ranks, not the torchrun agent
        if "rlhf.sft" in " ".join(worker.cmdline()) and worker.pid != proc.pid:
            os.kill(worker.pid, signal.SIGUSR2)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode != 0 and "exitcode  : 75" in output, output[-3000:]
    step = json.loads((ckpt / (ckpt / "latest").read_text() / "trainer_state.json").read_text())["step"]
    assert 3 <= step < 300
    run_trainer("rlhf.sft", [*job(tmp_path / "warned", ckpt, step + 3), "--load_checkpoint"])
    run_trainer("rlhf.sft", job(tmp_path / "straight", tmp_path / "ckpt2", step + 3))
    a, b = load_file(tmp_path / "warned" / "model.safetensors"), load_file(tmp_path / "straight" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
