"""Multi-node launches on one machine: two torchrun agents as two "nodes" (c10d rendezvous on
loopback), the NGC wrapper, submitit's local executor, and the errors of launches that cannot work."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, error_lines, run_trainer, trainer_env

SFT_TINY = ["--config", "configs/sft_tiny.yaml", "--eval_steps", "-1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_nodes(cmds: list[list[str]], envs: list[dict], timeout: float = 400) -> list[subprocess.CompletedProcess]:
    """Start one process per "node" at once and wait for all; a failure shows every node's output."""
    procs = [
        subprocess.Popen(cmd, cwd=REPO, env=trainer_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for cmd, env in zip(cmds, envs)
    ]
    results = []
    try:
        for cmd, proc in zip(cmds, procs):
            out, err = proc.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def _check(results: list[subprocess.CompletedProcess]) -> None:
    if any(r.returncode != 0 for r in results):
        report = "\n".join(f"--- node {i}: exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-5000:]}" for i, r in enumerate(results))
        raise AssertionError(report)


def _two_agents(module: str, args: list[str], port: int) -> list[list[str]]:
    return [
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--nproc_per_node",
            "1",
            "--rdzv_backend",
            "c10d",
            "--rdzv_endpoint",
            f"127.0.0.1:{port}",
            "--rdzv_id",
            f"test-{port}",
            "--rdzv_conf",
            f"join_timeout=120,is_host={int(node == 0)}",
            "--max_restarts",
            "0",
            "-m",
            module,
            *args,
        ]
        for node in range(2)
    ]


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_two_node_torchrun_sft_matches_one_node(tmp_path):
    """`torchrun --nnodes 2 --nproc_per_node 1` x 2 agents trains SFT to completion, and the model
    equals the one from `torchrun --nproc_per_node 2` on one node."""
    import torch

    common = [*SFT_TINY, "--max_steps", "4"]
    results = _run_nodes(
        _two_agents("rlhf.sft", [*common, "--save_path", str(tmp_path / "two"), "--ckpt_path", str(tmp_path / "ck2")], _free_port()),
        [{}, {}],
    )
    _check(results)
    run_trainer("rlhf.sft", [*common, "--save_path", str(tmp_path / "one"), "--ckpt_path", str(tmp_path / "ck1")])
    two, one = _weights(tmp_path / "two"), _weights(tmp_path / "one")
    assert two.keys() == one.keys()
    assert all(torch.equal(two[k], one[k]) for k in two)


@pytest.mark.slow
def test_two_node_torchrun_ppo(sft_tiny_model, tmp_path):
    """GRPO on two torchrun agents (2 nodes x 1 rank) runs to completion and exports the policy."""
    args = [
        "--config",
        "configs/grpo_tiny.yaml",
        "--pretrain",
        str(sft_tiny_model),
        "--max_steps",
        "2",
        "--eval_every",
        "1",
        "--save_path",
        str(tmp_path / "model"),
        "--ckpt_path",
        str(tmp_path / "ckpt"),
    ]
    _check(_run_nodes(_two_agents("rlhf.ppo", args, _free_port()), [{}, {}]))
    assert (tmp_path / "model" / "model.safetensors").exists()


def test_ngc_wrapper_two_replicas(tmp_path):
    """launch/ngc.sh turns NGC_ARRAY_INDEX / NGC_ARRAY_SIZE / NGC_MASTER_ADDR / GPUs per node into
    one torchrun agent per replica; two replicas train SFT to completion."""
    from transformers import AutoModelForCausalLM

    port = str(_free_port())
    cmd = [
        "bash",
        "launch/ngc.sh",
        "rlhf.sft",
        *SFT_TINY,
        "--max_steps",
        "2",
        "--save_path",
        str(tmp_path / "model"),
        "--ckpt_path",
        str(tmp_path / "ckpt"),
    ]
    base = {"NGC_ARRAY_SIZE": "2", "NGC_MASTER_ADDR": "127.0.0.1", "NGC_GPUS_PER_NODE": "1", "MASTER_PORT": port, "NGC_JOB_ID": port}
    results = _run_nodes([cmd, cmd], [{**base, "NGC_ARRAY_INDEX": "0"}, {**base, "NGC_ARRAY_INDEX": "1"}])
    _check(results)
    assert "node 1 of 2, 1 rank(s) per node, rendezvous 127.0.0.1:" + port in results[1].stderr
    AutoModelForCausalLM.from_pretrained(tmp_path / "model")


def test_ngc_wrapper_command_and_errors():
    """The torchrun command the wrapper builds, and one-line errors for an environment that cannot work."""

    def ngc(env: dict, *args: str) -> subprocess.CompletedProcess:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("NGC_") and k not in ("GPUS_PER_NODE", "MASTER_PORT")}
        return subprocess.run(["bash", "launch/ngc.sh", *args], cwd=REPO, env={**clean, **env}, capture_output=True, text=True, timeout=60)

    dry = ngc(
        {"NGC_ARRAY_INDEX": "3", "NGC_ARRAY_SIZE": "4", "NGC_MASTER_ADDR": "node0", "NGC_GPUS_PER_NODE": "8"},
        "--dry_run",
        "rlhf.ppo",
        "--pretrain",
        "m",
    )
    assert dry.returncode == 0, dry.stderr
    assert "--nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint node0:29500" in dry.stdout
    assert "is_host=0" in dry.stdout and dry.stdout.rstrip().endswith("-m rlhf.ppo --pretrain m")

    cases = [
        ({"NGC_ARRAY_INDEX": "1", "NGC_ARRAY_SIZE": "2"}, ("rlhf.sft",), "NGC_MASTER_ADDR is not set"),
        (
            {"NGC_ARRAY_INDEX": "2", "NGC_ARRAY_SIZE": "2", "NGC_MASTER_ADDR": "h"},
            ("rlhf.sft",),
            "NGC_ARRAY_INDEX=2 is not below NGC_ARRAY_SIZE=2",
        ),
        ({"NGC_ARRAY_SIZE": "two"}, ("rlhf.sft",), "NGC_ARRAY_SIZE='two' is not a positive integer"),
        ({"GPUS_PER_NODE": "0"}, ("rlhf.sft",), "GPUs per node '0' is not a positive integer"),
        ({}, (), "no trainer"),
    ]
    for env, args, message in cases:
        proc = ngc(env, *args)
        assert proc.returncode == 2, (env, proc.stderr)
        lines = error_lines(proc.stderr)
        assert len(lines) == 1 and message in lines[0], (env, proc.stderr)


def test_submit_local_executor(tmp_path):
    """python -m launch.submit --cluster local: submitit's local executor, 2 tasks, no SLURM."""
    cmd = [
        sys.executable,
        "-m",
        "launch.submit",
        "--cluster",
        "local",
        "--tasks_per_node",
        "2",
        "--folder",
        str(tmp_path / "submitit" / "%j"),
        "--",
        "rlhf.sft",
        *SFT_TINY,
        "--max_steps",
        "2",
        "--save_path",
        str(tmp_path / "model"),
        "--ckpt_path",
        str(tmp_path / "ckpt"),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "finished: 2 task(s)" in proc.stdout
    assert (tmp_path / "model" / "model.safetensors").exists()


def test_submit_usage_errors():
    def submit(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "launch.submit", *args], cwd=REPO, capture_output=True, text=True, timeout=60)

    assert "--gpus_per_node" in submit("--help").stdout
    proc = submit("--cluster", "local")
    assert proc.returncode == 2 and "no trainer given" in proc.stderr
    proc = submit("--cluster", "local", "--nodes", "2", "--", "rlhf.sft")
    assert proc.returncode != 0 and "--cluster local runs on this machine only" in proc.stderr
    proc = submit("--time", "soon", "--", "rlhf.sft")
    assert proc.returncode == 2 and "--time 'soon'" in proc.stderr


def test_missing_rank_times_out_with_a_clear_error(tmp_path):
    """A job whose world size is never reached (one of 2 ranks started, as with a wrong
    --ntasks) fails after RLHF_RDZV_TIMEOUT with one line naming the rendezvous, not a hang."""
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RLHF_RDZV_TIMEOUT": "3"}
    start = time.monotonic()
    proc = run_trainer(
        "rlhf.sft", [*SFT_TINY, "--max_steps", "1", "--save_path", str(tmp_path / "m")], nproc=0, env=env, check=False, timeout=120
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "rendezvous at 127.0.0.1:" in lines[0] and "1/2" in lines[0], proc.stderr[-3000:]
    assert time.monotonic() - start < 60


def test_missing_master_address_is_a_clear_error(tmp_path):
    for env, message in [
        ({"RANK": "1", "WORLD_SIZE": "2"}, "MASTER_ADDR is missing"),
        ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "no-such-host.invalid", "MASTER_PORT": "29999"}, "does not resolve"),
        ({"NGC_ARRAY_INDEX": "1", "NGC_ARRAY_SIZE": "2"}, "NGC_MASTER_ADDR is missing"),
    ]:
        proc = run_trainer(
            "rlhf.sft", [*SFT_TINY, "--max_steps", "1", "--save_path", str(tmp_path / "m")], nproc=0, env=env, check=False, timeout=120
        )
        assert proc.returncode == 2, (env, proc.stderr[-3000:])
        lines = error_lines(proc.stderr)
        assert len(lines) == 1 and message in lines[0], (env, proc.stderr[-3000:])


def test_two_node_rendezvous_never_complete_fails_in_bounded_time(tmp_path):
    """torchrun --nnodes 2 with only one agent started: the wrapper's join_timeout ends it."""
    cmd = _two_agents("rlhf.sft", [*SFT_TINY, "--max_steps", "1", "--save_path", str(tmp_path / "m")], _free_port())[0]
    cmd = [c.replace("join_timeout=120", "join_timeout=5") for c in cmd]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "RendezvousTimeoutError" in proc.stderr or "timed out" in proc.stderr.lower(), proc.stderr[-3000:]
    assert time.monotonic() - start < 60


def test_two_nodes_world_not_matching_the_placement(tmp_path):
    """PPO's split placement asks for 3 ranks but the two nodes give 2: each node stops with the
    placement's one-line error (no hang, no traceback)."""
    args = [
        "--config",
        "configs/grpo_tiny.yaml",
        "--pretrain",
        "embedded:tiny-qwen2",
        "--actor_num_gpus_per_node",
        "3",
        "--colocate_actor_ref",
        "--max_steps",
        "1",
        "--save_path",
        str(tmp_path / "m"),
        "--ckpt_path",
        str(tmp_path / "ck"),
    ]
    results = _run_nodes(_two_agents("rlhf.ppo", args, _free_port()), [{}, {}], timeout=200)
    for r in results:
        assert r.returncode != 0
        lines = error_lines(r.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: placement:") and "3 ranks, but the world has 2" in lines[0], r.stderr[-3000:]
