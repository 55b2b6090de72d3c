"""rlhf.metrics: the jsonl record, the wandb offline run, and the plot."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Iterator

import pytest

from rlhf.config import LoggingConfig
from rlhf.errors import UserError
from rlhf.metrics import MetricsLogger, metric_series, plot_metrics, read_metrics

STEPS = {
    1: {"loss": 2.5, "lr": 1e-5, "tokens_per_s": 1234.0},
    2: {"loss": 1.75, "lr": 2e-5, "tokens_per_s": 1500.0},
    3: {"loss": 1.0, "lr": 3e-5, "eval_loss": 1.25},
}


def log_steps(logger: MetricsLogger) -> None:
    for step, metrics in STEPS.items():
        logger.log(step, metrics)


def test_jsonl_lines_are_written_and_read_back(tmp_path):
    path = tmp_path / "out" / "metrics.jsonl"
    logger = MetricsLogger(str(path), LoggingConfig(), {"lr": 1e-5}, "sft", total_steps=3)
    log_steps(logger)
    # Flushed per line: readable while the logger is still open.
    assert len(path.read_text().splitlines()) == 3
    logger.close()

    records = read_metrics(str(path))
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        expected = STEPS[record["step"]]
        assert {k: v for k, v in record.items() if k not in ("step", "time")} == expected
        assert isinstance(record["time"], float)
    assert list(records[0])[0] == "step" and list(records[0])[-1] == "time"


def test_tensor_values_and_reserved_names(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "metrics.jsonl"
    with MetricsLogger(str(path), LoggingConfig(), {}, "sft", total_steps=1) as logger:
        logger.log(1, {"loss": torch.tensor(0.5)})
        with pytest.raises(ValueError, match="reserved"):
            logger.log(2, {"step": 3})
    assert read_metrics(str(path))[0]["loss"] == 0.5


def test_disabled_logger_writes_nothing(tmp_path):
    path = tmp_path / "metrics.jsonl"
    logger = MetricsLogger(str(path), LoggingConfig(use_wandb=True), {}, "sft", total_steps=3, enabled=False)
    log_steps(logger)
    logger.close()
    assert not path.exists() and not (tmp_path / "wandb").exists()


def test_resume_appends_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0, "time": 1.0}\n{"step": 2, "lo')  # killed mid-write
    with MetricsLogger(str(path), LoggingConfig(), {}, "sft", total_steps=3, resumed=True) as logger:
        logger.log(2, {"loss": 2.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(str(path))] == [(1, 3.0), (2, 2.0)]


def test_fresh_run_starts_the_file_anew(tmp_path):
    """An old run's records in the same --save_path must not mix into a new run's curve."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "eval_reward": 0.9, "time": 1.0}\n{"step": 2, "eval_reward": 0.95, "time": 2.0}\n')
    with MetricsLogger(str(path), LoggingConfig(), {}, "ppo", total_steps=1) as logger:
        logger.log(1, {"eval_reward": 0.1})
    assert [(r["step"], r["eval_reward"]) for r in read_metrics(str(path))] == [(1, 0.1)]


def test_read_metrics_names_a_bad_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(UserError, match=r"metrics.jsonl:2: not valid JSON"):
        read_metrics(str(path))


def test_metric_series_later_record_of_a_step_wins():
    records = [{"step": 1, "r": 0.1}, {"step": 2, "r": 0.2}, {"step": 2, "r": 0.25}, {"step": 3}, {"step": 4, "r": 0.4}]
    assert metric_series(records, "r") == ([1, 2, 4], [0.1, 0.25, 0.4])


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLogger(str(path), LoggingConfig(), {}, "ppo", total_steps=3) as logger:
        log_steps(logger)
    out = tmp_path / "plots" / "reward.png"
    assert plot_metrics(str(path), ["loss", "eval_loss"], str(out)) == str(out)
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    assert [p.name for p in out.parent.iterdir()] == ["reward.png"]  # no temp file left
    with pytest.raises(UserError, match="no values for metric.*reward.*available: .*loss"):
        plot_metrics(str(path), ["reward"], str(tmp_path / "r.png"))


# ----------------------------------------------------------------------------------------------
# wandb offline
#
# wandb 0.31 ships no Python reader for its run files (the old wandb.sdk.internal.datastore is
# gone; wandb-core, in Go, writes them). The format is small and stable: a 7-byte header
# (":W&B", magic 0xBEE1 little-endian, version 0) followed by a LevelDB-style log of 32 KiB
# blocks; each chunk has a 7-byte header (CRC32 of type byte + data, length, type
# FULL/FIRST/MIDDLE/LAST) and the reassembled payloads are serialized `Record` protobufs, whose
# classes wandb does ship. So the test reads the values back for real, checksums included.

_BLOCK = 32 * 1024
_CHUNK_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_wandb_records(path: Path) -> Iterator[object]:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"unexpected .wandb header {data[:7]!r}"
    pos, pending = 7, b""
    while pos + _CHUNK_HEADER <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _CHUNK_HEADER:  # block trailer padding
            pos += left_in_block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + _CHUNK_HEADER])
        if (crc, length, kind) == (0, 0, 0):  # zero padding to the end of the block
            pos += left_in_block
            continue
        chunk = data[pos + _CHUNK_HEADER : pos + _CHUNK_HEADER + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad checksum at byte {pos}"
        pos += _CHUNK_HEADER + length
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_history(path: Path) -> list[dict]:
    rows = []
    for record in read_wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return rows


def wandb_run_config(path: Path) -> dict:
    """The run config: sent first with the run record, later changes as config records."""
    config = {}
    for record in read_wandb_records(path):
        kind = record.WhichOneof("record_type")
        updates = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        config.update({item.key: json.loads(item.value_json) for item in updates})
    return config


def test_wandb_offline_run_holds_the_logged_values(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    # Without WANDB_DIR the run goes beside the metrics file (a user's WANDB_DIR would win:
    # tests/test_sft_features.py::test_wandb_offline_run_holds_the_metrics covers that).
    for var in ("WANDB_DIR", "WANDB_API_KEY", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_NAME"):
        monkeypatch.delenv(var, raising=False)

    out = tmp_path / "save"
    cfg = LoggingConfig(use_wandb=True, wandb_project="rlhf-test", wandb_run_name="sft-offline")
    run_config = {"train": {"learning_rate": 1e-5, "seed": 42}, "model": {"pretrain": "embedded:tiny-qwen2"}}
    logger = MetricsLogger(str(out / "metrics.jsonl"), cfg, run_config, "sft", total_steps=3)
    log_steps(logger)
    logger.close()

    # The run lives next to the metrics file (what the export keeps), not in the cwd.
    run_files = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, list(out.rglob("*"))

    history = wandb_history(run_files[0])
    assert [row["_step"] for row in history] == [1, 2, 3]
    for row in history:
        expected = STEPS[row["_step"]]
        assert {k: v for k, v in row.items() if not k.startswith("_")} == pytest.approx(expected)

    config = wandb_run_config(run_files[0])
    assert {k: config[k] for k in run_config} == run_config
    (run,) = [r.run for r in read_wandb_records(run_files[0]) if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.display_name) == ("rlhf-test", "sft-offline")


def test_progress_bar_shows_what_the_trainer_logs():
    """PPO's bar shows reward, KL and response length (it showed only lr); SFT's stays loss, lr,
    tok/s; a caller may choose the keys and their order."""
    from rlhf.metrics import DEFAULT_BAR_KEYS, bar_text

    ppo = {"reward": 0.5, "kl": 0.0123, "response_length": 7.25, "policy_loss": -0.1, "lr": 1e-5}
    assert bar_text(ppo, DEFAULT_BAR_KEYS) == "reward=0.5 kl=0.0123 len=7.2 lr=1.00e-05"
    assert (
        bar_text({"loss": 1.23456, "lr": 2e-4, "tokens_per_s": 1530.0, "grad_norm": 3.0}, DEFAULT_BAR_KEYS)
        == "loss=1.235 lr=2.00e-04 tok/s=1.5k"
    )
    assert bar_text(ppo, ["policy_loss", "kl"]) == "policy_loss=-0.1 kl=0.0123"
    assert bar_text({"reward": float("nan"), "kl": True}, DEFAULT_BAR_KEYS) == ""  # no NaN or bool on the bar


def test_progress_bar_keys_are_the_callers(tmp_path):
    with MetricsLogger(str(tmp_path / "m.jsonl"), LoggingConfig(), {}, "ppo", total_steps=1, bar_keys=["kl"]) as logger:
        logger.log(1, {"reward": 0.5, "kl": 0.25})
        assert logger._bar.postfix == "kl=0.25"


def test_plot_title_names_the_run(tmp_path):
    from rlhf.metrics import run_title

    assert run_title("outputs/grpo_tiny/model/metrics.jsonl") == "outputs/grpo_tiny/model"
    assert run_title("outputs/grpo_tiny/model/metrics.jsonl", "grpo-seed1") == "grpo-seed1"
    assert run_title("metrics.jsonl") == str(Path.cwd())
