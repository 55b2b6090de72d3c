"""End-to-end launch tests on a real single-node SLURM cluster (slurm/cluster.sh).

The cluster is real: munged, slurmctld and slurmd from Debian's packages, started for the
session in a temporary state folder (no systemd, no /etc changes; found through SLURM_CONF).
Jobs are submitted with sbatch and with submitit exactly as a user would, and run the trainers
with 2 ranks on the 2 CPUs of the single node.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import REPO, read_jsonl, run_trainer, trainer_env

CLUSTER_SH = REPO / "slurm" / "cluster.sh"
SFT_TINY = ["--config", "configs/sft_tiny.yaml", "--eval_steps", "-1"]


def _cluster_missing() -> str:
    if os.geteuid() != 0:
        return "the test cluster needs root (slurmd starts jobs as their users)"
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol") if shutil.which(b) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install slurmctld slurmd slurm-client munge; .ci/run does)"
    return ""


@pytest.fixture(scope="session")
def slurm_cluster():
    """Start a single-node SLURM cluster for the session; yields the environment to reach it."""
    reason = _cluster_missing()
    if reason and os.environ.get("RLHF_REQUIRE_SLURM") == "1":  # CI installs SLURM: missing is a failure there
        pytest.fail(f"RLHF_REQUIRE_SLURM=1 but {reason}")
    if reason:
        pytest.skip(reason)
    # Not under pytest's 0700 tmp root: the munge user must be able to enter the state folder.
    state = tempfile.mkdtemp(prefix="rlhf-slurm-", dir="/tmp")
    env = dict(os.environ, RLHF_SLURM_DIR=state)
    up = subprocess.run(["bash", str(CLUSTER_SH), "up"], env=env, capture_output=True, text=True, timeout=120)
    if up.returncode != 0:
        subprocess.run(["bash", str(CLUSTER_SH), "down"], env=env, capture_output=True, timeout=120)
        pytest.fail(f"slurm/cluster.sh up failed:\n{up.stdout}\n{up.stderr}")
    conf = up.stdout.strip().splitlines()[-1].removeprefix("export SLURM_CONF=")
    try:
        yield {"SLURM_CONF": conf, "RLHF_SLURM_DIR": state}
    finally:
        subprocess.run(["bash", str(CLUSTER_SH), "down"], env=env, capture_output=True, timeout=120)


def _slurm(cluster: dict, *cmd: str, timeout: float = 60) -> str:
    out = subprocess.run(list(cmd), env=dict(os.environ, **cluster), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} failed: {out.stderr}"
    return out.stdout


def _job_state(cluster: dict, job_id: str) -> str:
    return _slurm(cluster, "squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T %r").strip()


def _sbatch_wait(cluster: dict, args: list[str], extra_env: dict[str, str], log: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = ["sbatch", "--wait", "--output", str(log), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=trainer_env({**cluster, **extra_env}), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        text = log.read_text(errors="replace")[-6000:] if log.exists() else "(no job log)"
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr}\n--- job log\n{text}")
    return proc


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    import torch

    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"{name} differs between {a} and {b}"


def test_cluster_runs_a_job(slurm_cluster):
    """The cluster is up: one idle node with 2 CPUs, and srun runs 2 tasks on it."""
    assert _slurm(slurm_cluster, "sinfo", "-h", "-o", "%T %c").split() == ["idle", "2"]
    out = _slurm(slurm_cluster, "srun", "--ntasks", "2", "bash", "-c", "echo $SLURM_PROCID")
    assert sorted(out.split()) == ["0", "1"]


def test_sbatch_sft_one_torchrun_per_node(slurm_cluster, tmp_path):
    """slurm/sft.sbatch: srun starts one torchrun per node (2 ranks), c10d on the first host."""
    from transformers import AutoModelForCausalLM

    log = tmp_path / "job.out"
    args = [*SFT_TINY, "--max_steps", "4", "--save_path", str(tmp_path / "model"), "--ckpt_path", str(tmp_path / "ckpt")]
    _sbatch_wait(slurm_cluster, ["slurm/sft.sbatch", *args], {"NPROC_PER_NODE": "2"}, log)
    text = log.read_text()
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    assert f"launch torchrun, master {host}:" in text  # from scontrol show hostnames
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert model.num_parameters() > 0
    assert len((tmp_path / "model" / "metrics.jsonl").read_text().splitlines()) >= 4


@pytest.mark.slow
def test_sbatch_sft_one_task_per_rank_matches_torchrun(slurm_cluster, tmp_path):
    """RLHF_LAUNCH=tasks: srun starts one task per rank (SLURM_PROCID -> rank, rendezvous with a
    bounded wait); the result equals the same training under plain torchrun."""
    log = tmp_path / "job.out"
    common = [*SFT_TINY, "--max_steps", "3", "--ckpt_path", str(tmp_path / "ckpt")]
    _sbatch_wait(
        slurm_cluster,
        ["--ntasks-per-node", "2", "slurm/sft.sbatch", *common, "--save_path", str(tmp_path / "slurm")],
        {"RLHF_LAUNCH": "tasks"},
        log,
    )
    assert "launch tasks" in log.read_text()
    run_trainer("rlhf.sft", [*common, "--save_path", str(tmp_path / "torchrun"), "--ckpt_path", str(tmp_path / "ckpt2")])
    _assert_same_weights(tmp_path / "slurm", tmp_path / "torchrun")


@pytest.mark.slow
def test_sbatch_ppo(slurm_cluster, sft_tiny_model, tmp_path):
    """slurm/ppo.sbatch runs GRPO (2 ranks) from the SFT'd tiny model to completion."""
    args = [
        "--config",
        "configs/grpo_tiny.yaml",
        "--pretrain",
        str(sft_tiny_model),
        "--max_steps",
        "2",
        "--eval_every",
        "2",
        "--save_path",
        str(tmp_path / "model"),
        "--ckpt_path",
        str(tmp_path / "ckpt"),
    ]
    _sbatch_wait(slurm_cluster, ["slurm/ppo.sbatch", *args], {"NPROC_PER_NODE": "2"}, tmp_path / "job.out")
    assert (tmp_path / "model" / "model.safetensors").exists()


def test_template_outside_a_job_is_a_clear_error():
    proc = subprocess.run(
        ["bash", "slurm/sft.sbatch"],
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: slurm/launch_trainer.sh runs inside a SLURM job: submit with sbatch slurm/<trainer>.sbatch"


def _submit(
    cluster: dict, folder: Path, trainer: list[str], *, wait: bool = True, timeout: float = 600, extra: list[str] = ()
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "launch.submit",
        "--cluster",
        "slurm",
        "--nodes",
        "1",
        "--gpus_per_node",
        "0",
        "--tasks_per_node",
        "2",
        "--time",
        "60",
        "--folder",
        str(folder / "%j"),
        *extra,
        *([] if wait else ["--no_wait"]),
        "--",
        *trainer,
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=trainer_env(cluster), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(folder.glob("*/*_log.*")))
        raise AssertionError(f"launch.submit exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}\n--- task logs\n{logs}")
    return proc


def _job_id(submit_output: str) -> str:
    for line in submit_output.splitlines():
        if line.startswith("launch.submit: submitted job "):
            return line.split()[3]
    raise AssertionError(f"no job id in: {submit_output}")


@pytest.mark.slow
def test_submit_ppo_on_slurm(slurm_cluster, sft_tiny_model, tmp_path):
    """python -m launch.submit ... -- rlhf.ppo: 2 submitit tasks on SLURM run GRPO and return."""
    out = tmp_path / "ppo"
    proc = _submit(
        slurm_cluster,
        tmp_path / "submitit",
        [
            "rlhf.ppo",
            "--config",
            "configs/grpo_tiny.yaml",
            "--pretrain",
            str(sft_tiny_model),
            "--max_steps",
            "2",
            "--eval_every",
            "2",
            "--save_path",
            str(out / "model"),
            "--ckpt_path",
            str(out / "ckpt"),
        ],
    )
    assert "finished: 2 task(s)" in proc.stdout
    assert (out / "model" / "model.safetensors").exists()
    job = _job_id(proc.stdout)
    deadline = time.monotonic() + 60  # the tasks' results are in; the processes are exiting
    while _job_state(slurm_cluster, job).startswith(("RUNNING", "COMPLETING")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _job_state(slurm_cluster, job).startswith("COMPLETED"), _job_state(slurm_cluster, job)


@pytest.mark.slow
@pytest.mark.parametrize("interrupt", ["signal", "requeue"])
def test_submit_preempted_job_requeues_and_resumes_exactly(slurm_cluster, tmp_path, interrupt):
    """Preemption mid-training, two ways. "signal": SIGUSR2 (what SLURM sends before a time limit or
    a preemption) reaches the submitit tasks; the trainer finishes its step, saves a checkpoint
    there, and hands over to submitit, whose rank 0 requeues the job with --load_checkpoint.
    "requeue": `scontrol requeue` (an operator, a node failure) kills and requeues the job; the
    tasks see SLURM_RESTART_COUNT. Either way the requeued job resumes from the newest checkpoint
    and the final weights equal an uninterrupted run's."""
    steps, save_every = "150", "40"
    args = [*SFT_TINY, "--max_steps", steps, "--save_steps", save_every]
    folder = tmp_path / "submitit"
    proc = _submit(
        slurm_cluster,
        folder,
        ["rlhf.sft", *args, "--save_path", str(tmp_path / "preempted"), "--ckpt_path", str(tmp_path / "ckpt")],
        wait=False,
    )
    job = _job_id(proc.stdout)
    # Interrupt once the first checkpoint is complete and before training ends.
    latest = tmp_path / "ckpt" / "latest"
    deadline = time.monotonic() + 240
    while not latest.exists():
        assert time.monotonic() < deadline, f"no checkpoint within 240 s; job state {_job_state(slurm_cluster, job)}"
        time.sleep(0.1)
    assert not (tmp_path / "preempted" / "model.safetensors").exists(), "training ended before the preemption; raise --max_steps"
    if interrupt == "signal":
        _slurm(slurm_cluster, "scancel", "--signal", "USR2", job)
    else:
        _slurm(slurm_cluster, "scontrol", "requeue", job)
    # SLURM holds a requeued job for ~2 minutes (BeginTime); release it at once.
    deadline = time.monotonic() + 120
    while True:
        state = _job_state(slurm_cluster, job)
        if state.startswith("PENDING"):
            _slurm(slurm_cluster, "scontrol", "update", f"JobId={job}", "StartTime=now")
            break
        assert not state.startswith(("COMPLETED", "FAILED", "CANCELLED")), f"job was not requeued: {state}"
        assert time.monotonic() < deadline, f"job not requeued within 120 s: {state}"
        time.sleep(0.2)
    deadline = time.monotonic() + 300
    while not _job_state(slurm_cluster, job).startswith(("COMPLETED", "FAILED", "CANCELLED")):
        assert time.monotonic() < deadline, f"requeued job did not finish: {_job_state(slurm_cluster, job)}"
        time.sleep(0.5)
    assert _job_state(slurm_cluster, job).startswith("COMPLETED"), _job_state(slurm_cluster, job)
    logs = "".join(p.read_text(errors="replace") for p in sorted((folder / job).glob(f"{job}_0_log.*")))
    assert "--load_checkpoint" in logs  # the requeued run resumed
    resumed = [r["resumed_from_step"] for r in read_jsonl(tmp_path / "preempted" / "metrics.jsonl") if "resumed_from_step" in r]
    if interrupt == "signal":
        # The trainer saved at the first step boundary after the warning (past the periodic
        # checkpoint at step 40), then handed the signal to submitit, which requeued.
        assert "Caught signal SIGUSR2" in logs and "checkpoint saved after SIGUSR2" in logs
        assert len(resumed) == 1 and resumed[0] > int(save_every) and resumed[0] % int(save_every) != 0, resumed
    else:  # killed without warning: back to the newest periodic checkpoint
        assert resumed and resumed[-1] % int(save_every) == 0, resumed
    # The uninterrupted run of the same configuration.
    run_trainer("rlhf.sft", [*args, "--save_path", str(tmp_path / "straight"), "--ckpt_path", str(tmp_path / "ckpt2")])
    _assert_same_weights(tmp_path / "preempted", tmp_path / "straight")


def test_submit_reports_a_failing_trainer_and_a_killed_job(slurm_cluster, tmp_path):
    """A trainer error comes back through submitit as that error; a job killed by scancel (which
    submitit alone cannot see without SLURM accounting) ends the launcher with a message, not a hang."""
    cmd = [sys.executable, "-m", "launch.submit", "--cluster", "slurm", "--gpus_per_node", "0", "--tasks_per_node", "2", "--time", "60"]
    bad = subprocess.run(
        [*cmd, "--folder", str(tmp_path / "bad" / "%j"), "--", "rlhf.sft", *SFT_TINY, "--max_steps", "0"],
        cwd=REPO,
        env=trainer_env(slurm_cluster),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0
    assert "--max_steps must be >= 1, got 0" in bad.stderr, bad.stderr[-3000:]

    long_run = [
        *cmd,
        "--folder",
        str(tmp_path / "killed" / "%j"),
        "--",
        "rlhf.sft",
        *SFT_TINY,
        "--max_steps",
        "100000",
        "--save_path",
        str(tmp_path / "m"),
        "--ckpt_path",
        str(tmp_path / "ck"),
    ]
    proc = subprocess.Popen(long_run, cwd=REPO, env=trainer_env(slurm_cluster), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        job = _job_id(proc.stdout.readline())  # "launch.submit: submitted job N ..." comes first
        deadline = time.monotonic() + 60
        while not _job_state(slurm_cluster, job).startswith("RUNNING"):
            assert time.monotonic() < deadline, f"job did not start: {_job_state(slurm_cluster, job)}"
            time.sleep(0.2)
        time.sleep(2)
        _slurm(slurm_cluster, "scancel", job)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, (out, err[-3000:])
    assert f"error: job {job} ended (CANCELLED) without a result" in err, err[-3000:]
