"""A quiet, quick command line (issue 12, item 13): --help without the heavy imports, no
third-party start-up noise, the nearest flag name for a typo."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO, run_trainer, trainer_env

from rlhf.config import DPOConfig, PPOConfig, SFTConfig, parse_config
from rlhf.errors import UserError

ENTRY_POINTS = ["sft", "rm", "dpo", "kto", "ppo", "generate", "rejection_sampling", "chat", "plan"]
HEAVY = ["torch", "deepspeed", "vllm", "transformers", "peft", "bitsandbytes"]

# Runs the entry point as `python -m` would (run_name __main__), catches --help's SystemExit,
# and reports the exit code and which heavy packages got imported on the way.
_PROBE = """
import json, runpy, sys
sys.argv = ["prog", "--help"]
try:
    runpy.run_module(sys.argv_module, run_name="__main__", alter_sys=True)
    code = "no exit"
except SystemExit as exit:
    code = exit.code
print(json.dumps({"code": code, "heavy": [m for m in HEAVY if m in sys.modules]}), file=sys.stderr)
"""


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_help_exits_0_without_heavy_imports(entry):
    """--help answers before torch / DeepSpeed / vLLM / transformers are imported (that import
    chain took 10-15 s; the help alone takes well under a second)."""
    probe = f"import sys; sys.argv_module = 'rlhf.{entry}'; HEAVY = {HEAVY!r}\n" + _PROBE
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=120)
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    assert report == {"code": 0, "heavy": []}, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: python -m rlhf."), proc.stdout[:300]


def test_help_lists_the_openrlhf_flags_it_reads():
    """The help names every OpenRLHF spelling the command accepts and each one it refuses."""
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf.dpo", "--help"], cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "--ipo = --loss_type ipo" in text
    assert "--ring_attn_size: not supported" in text


@pytest.mark.parametrize(
    "cls, typo, suggestion",
    [
        (SFTConfig, "--learnig_rate", "--learning_rate"),
        (PPOConfig, "--n_sample_per_prompt", "--n_samples_per_prompt"),
        (DPOConfig, "--bta", "--beta"),
        (PPOConfig, "--max_new_tokens", None),  # a batch-inference flag: too far from any PPO flag to guess
    ],
)
def test_unknown_flag_suggests_the_nearest_name(cls, typo, suggestion):
    argv = [typo, "1"] + (["--reward_func", "rlhf.rewards:exact_match"] if cls is PPOConfig else [])
    with pytest.raises(UserError) as err:
        parse_config(cls, argv)
    message = str(err.value)
    assert message.startswith(f"unknown option(s) {typo} 1")
    assert "\n" not in message
    if suggestion:
        assert f"{typo}: did you mean {suggestion}?" in message
    else:
        assert "did you mean" not in message


NOISE = ["Setting accelerator to CPU", "gemm_4bit_forward", "Traceback"]


def test_a_tiny_run_prints_no_third_party_noise(tmp_path):
    """DeepSpeed's accelerator line and bitsandbytes' kernel line stay out of a run's output."""
    proc = run_trainer(
        "rlhf.sft",
        [
            "--pretrain",
            "embedded:tiny-qwen2",
            "--dataset",
            "embedded:arith/sft_train.jsonl",
            "--max_samples",
            "16",
            "--eval_holdout_ratio",
            "0",
            "--max_len",
            "32",
            "--micro_train_batch_size",
            "8",
            "--train_batch_size",
            "8",
            "--max_steps",
            "1",
            "--zero_stage",
            "0",
            "--save_path",
            str(tmp_path / "model"),
            "--ckpt_path",
            str(tmp_path / "ckpt"),
        ],
        nproc=0,
    )
    output = proc.stdout + proc.stderr
    assert [n for n in NOISE if n in output] == []
    assert (tmp_path / "model" / "config.json").is_file()


def test_unknown_preset_key_suggests_the_nearest_name(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("zero_stag: 2\n")
    with pytest.raises(UserError, match=r"p.yaml: unknown option 'zero_stag'; did you mean 'zero_stage'\?"):
        parse_config(SFTConfig, ["--config", str(preset)])
