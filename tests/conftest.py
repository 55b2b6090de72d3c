"""Shared pytest fixtures.

S3: ``s3_server`` runs a real moto S3 server as a separate process on a loopback port, so the
code under test talks HTTP through botocore exactly as it would to MinIO or AWS (no in-process
patching). ``s3_env`` points the standard AWS variables at it for one test (subprocesses such
as trainers inherit them), and ``make_bucket`` creates uniquely named buckets, so tests sharing
the one session server never see each other's objects.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest

# ----------------------------------------------------------------------------------------------
# S3 (moto server)

MOTO_START_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(host: str, port: int) -> bool:
    """True once the server responds to HTTP. http.client ignores *_PROXY, unlike urllib."""
    conn = http.client.HTTPConnection(host, port, timeout=2)
    try:
        conn.request("GET", "/moto-api/")
        return conn.getresponse().status < 500
    except OSError:
        return False
    finally:
        conn.close()


def _die_with_parent() -> None:
    """Linux: SIGTERM the server if pytest itself is killed, so no orphan keeps the port."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[str]:
    """Endpoint URL (``http://127.0.0.1:PORT``) of a moto S3 server running for the session."""
    host, port = "127.0.0.1", _free_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto_server.log"
    # `python -m moto.server` is the `moto_server` console script run by this very interpreter;
    # the PATH script could belong to another Python (pyenv shims, venvs).
    cmd = [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)]
    with open(log_path, "wb") as log:  # a file, not a pipe: a full pipe would block the server
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
    try:
        deadline = time.monotonic() + MOTO_START_TIMEOUT_S
        while not _answers(host, port):
            if proc.poll() is not None:
                pytest.fail(f"moto server exited with code {proc.returncode} at start-up:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                pytest.fail(f"moto server did not answer on {host}:{port} within {MOTO_START_TIMEOUT_S:.0f}s:\n{_tail(log_path)}")
            time.sleep(0.2)
        yield f"http://{host}:{port}"
    finally:
        # Runs on success, failure, pytest.fail above and Ctrl-C alike.
        _stop(proc)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@pytest.fixture
def s3_env(s3_server: str, monkeypatch, tmp_path_factory):
    """Point the standard AWS environment at the moto server; returns a boto3 S3 client.

    The user's own AWS setup (profile, config files, session token, instance metadata) is hidden
    so it can neither leak into the test nor make it slow.
    """
    import boto3

    aws_home = tmp_path_factory.mktemp("aws")
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(aws_home / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(aws_home / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    # A proxy configured for the internet must not intercept loopback traffic.
    for var in ("NO_PROXY", "no_proxy"):
        existing = os.environ.get(var)
        monkeypatch.setenv(var, "127.0.0.1,localhost" + (f",{existing}" if existing else ""))
    return boto3.session.Session().client("s3")


@pytest.fixture
def make_bucket(s3_env) -> Callable[[Optional[str]], str]:
    """``make_bucket()`` creates a bucket with a unique name and returns the name;
    ``make_bucket("name")`` creates that exact bucket."""

    def create(name: Optional[str] = None) -> str:
        bucket = name or f"test-{uuid.uuid4().hex[:12]}"
        s3_env.create_bucket(Bucket=bucket)
        return bucket

    return create


@pytest.fixture(scope="session")
def sft_tiny_model(tmp_path_factory):
    """The embedded tiny model after the README's SFT preset on the clean demonstrations
    (``sft_train.jsonl``, every answer right): it knows addition (eval loss ~0.2, greedy held-out
    accuracy ~0.82).

    Preference and RL mechanics tests start from it, as users start from an SFT model.
    """
    from helpers import run_trainer

    out = tmp_path_factory.mktemp("sft-tiny")
    run_trainer(
        "rlhf.sft",
        [
            "--config",
            "configs/sft_tiny.yaml",
            "--dataset",
            "embedded:arith/sft_train.jsonl",
            "--save_path",
            str(out / "model"),
            "--ckpt_path",
            str(out / "ckpt"),
        ],
        timeout=1200,
    )
    return out / "model"


@pytest.fixture(scope="session")
def sft_teacher_model(tmp_path_factory):
    """The README's main job, first half: the SFT preset as shipped, on the imperfect teacher's
    demonstrations (60% one too high). Greedy held-out accuracy ~0.3 while 8 samples contain the
    right sum for ~0.7 of the questions: the start the RL learning tests measure their rise from."""
    from helpers import run_trainer

    out = tmp_path_factory.mktemp("sft-teacher")
    run_trainer(
        "rlhf.sft", ["--config", "configs/sft_tiny.yaml", "--save_path", str(out / "model"), "--ckpt_path", str(out / "ckpt")], timeout=1200
    )
    return out / "model"


@pytest.fixture(scope="session")
def rm_tiny_model(sft_tiny_model, tmp_path_factory):
    """The README's RM preset, from the SFT'd tiny model (prefers right sums: pair accuracy ~0.93)."""
    from helpers import run_trainer

    out = tmp_path_factory.mktemp("rm-tiny")
    run_trainer(
        "rlhf.rm",
        [
            "--config",
            "configs/rm_tiny.yaml",
            "--pretrain",
            str(sft_tiny_model),
            "--save_path",
            str(out / "model"),
            "--ckpt_path",
            str(out / "ckpt"),
        ],
        timeout=1200,
    )
    return out / "model"


@pytest.fixture(scope="session")
def sft_weak_model(tmp_path_factory):
    """The SFT preset cut to 9 epochs: it answers ~45% of held-out sums (the full preset ~87%),
    leaving room for a reward model to pull the policy up."""
    from helpers import run_trainer

    out = tmp_path_factory.mktemp("sft-weak")
    run_trainer(
        "rlhf.sft",
        ["--config", "configs/sft_tiny.yaml", "--max_epochs", "9", "--save_path", str(out / "model"), "--ckpt_path", str(out / "ckpt")],
        timeout=1200,
    )
    return out / "model"


@pytest.fixture(scope="session")
def chat_tiny_model(tmp_path_factory):
    """The embedded tiny model after 4 epochs of chat SFT on the embedded chat data (ChatML
    turns): it answers in the chat format, context-dependent though often wrong."""
    from helpers import run_trainer

    out = tmp_path_factory.mktemp("chat-tiny")
    run_trainer(
        "rlhf.sft",
        [
            "--config",
            "configs/sft_tiny.yaml",
            "--dataset",
            "embedded:arith/chat_train.jsonl",
            "--eval_dataset",
            "None",
            "--input_key",
            "messages",
            "--output_key",
            "None",
            "--apply_chat_template",
            "--max_len",
            "64",
            "--max_epochs",
            "4",
            "--save_path",
            str(out / "model"),
            "--ckpt_path",
            str(out / "ckpt"),
        ],
        timeout=1200,
    )
    return out / "model"
