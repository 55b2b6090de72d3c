"""Static checks of the launch files: scripts parse, templates name real trainers, flag parsing."""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess

import pytest
from helpers import REPO

from launch.submit import TrainerTask, parse_mem_gb, parse_time, rendezvous_port

TEMPLATES = sorted((REPO / "slurm").glob("*.sbatch"))


def test_shell_scripts_parse():
    scripts = [*TEMPLATES, REPO / "slurm" / "launch_trainer.sh", REPO / "slurm" / "cluster.sh", REPO / "launch" / "ngc.sh"]
    for script in scripts:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"


def test_sbatch_templates_name_real_trainers():
    assert {t.stem for t in TEMPLATES} >= {"sft", "dpo", "ppo"}
    for template in TEMPLATES:
        text = template.read_text()
        trainer = re.search(r"^TRAINER=(\S+)$", text, flags=re.M).group(1)
        assert trainer == f"rlhf.{template.stem}"
        assert importlib.util.find_spec(trainer) is not None, trainer
        assert "slurm/launch_trainer.sh" in text
        assert "#SBATCH --nodes=" in text and "#SBATCH --output=" in text


def test_ngc_job_templates():
    yaml = pytest.importorskip("yaml")
    jobs = sorted((REPO / "launch" / "ngc" / "jobs").glob("*.yaml"))
    assert jobs
    for path in jobs:
        job = yaml.safe_load(path.read_text())
        for key in ("job_type", "job_name", "image", "ace_instance", "replica_count", "command"):
            assert key in job, f"{path.name}: {key} missing"
        assert "launch/ngc.sh rlhf." in " ".join(job["command"])
    env_example = (REPO / "launch" / "ngc" / "build_values.env.example").read_text()
    assert "MODELS_ROOT=" in env_example and "WANDB=" in env_example


def test_parse_time_and_mem():
    assert parse_time("90") == 90
    assert parse_time("1:30:00") == 90
    assert parse_time("2-00:00:00") == 2 * 24 * 60
    assert parse_time("30:00") == 30  # MM:SS
    assert parse_time("0:00:30") == 1  # rounded up to a whole minute
    with pytest.raises(argparse.ArgumentTypeError):
        parse_time("soon")
    assert parse_mem_gb("64G") == 64 and parse_mem_gb("512M") == 0.5 and parse_mem_gb("1T") == 1024
    with pytest.raises(argparse.ArgumentTypeError):
        parse_mem_gb("lots")


def test_resume_flag_added_on_requeue(monkeypatch):
    task = TrainerTask("rlhf.sft", ["--ckpt_path", "c"])
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert task.trainer_argv() == ["--ckpt_path", "c"]
    resumed = task.checkpoint().function  # what submitit requeues on SIGUSR2
    assert resumed.trainer_argv() == ["--ckpt_path", "c", "--load_checkpoint"]
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # requeued by SLURM itself
    assert task.trainer_argv() == ["--ckpt_path", "c", "--load_checkpoint"]
    assert TrainerTask("rlhf.sft", ["--load_checkpoint"]).trainer_argv() == ["--load_checkpoint"]
    assert rendezvous_port("123") == 20123 and rendezvous_port("4_1") == 20041
