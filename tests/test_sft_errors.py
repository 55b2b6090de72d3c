"""Bad input to the SFT trainer: exit code 2, one clear line, no traceback, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import error_lines, run_trainer

import rlhf

TINY = Path(rlhf.__file__).parent / "assets" / "tiny-qwen2"


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


GOOD_ROWS = [{"input": f"{i}+1=", "output": str(i + 1)} for i in range(40)]


def tiny_without_chat_template(tmp_path: Path) -> str:
    folder = tmp_path / "no-template"
    shutil.copytree(TINY, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("chat_template", None)
    config_file.write_text(json.dumps(config))
    return str(folder)


CASES = {
    "missing key": (
        lambda t: ["--dataset", write_jsonl(t / "d.jsonl", [{"input": "1+1=", "answer": "2"}] * 40)],
        "field 'output' is missing",
    ),
    "empty dataset": (lambda t: ["--dataset", write_jsonl(t / "d.jsonl", [])], "is empty"),
    "malformed json line": (
        lambda t: ["--dataset", write_jsonl(t / "d.jsonl", [GOOD_ROWS[0], '{"input": "2+2=", "output": ', GOOD_ROWS[1]])],
        "d.jsonl:2: malformed JSON",
    ),
    "prompt longer than max_len": (
        lambda t: ["--dataset", write_jsonl(t / "d.jsonl", GOOD_ROWS + [{"input": "1+" * 40 + "1=", "output": "41"}]), "--no-truncate"],
        "d.jsonl:41",
    ),
    "no chat template": (
        lambda t: [
            "--pretrain",
            tiny_without_chat_template(t),
            "--apply_chat_template",
            "--dataset",
            write_jsonl(t / "d.jsonl", GOOD_ROWS),
        ],
        "chat template",
    ),
    "model path missing": (lambda t: ["--pretrain", str(t / "no-such-model")], "no-such-model: no such model folder"),
    "4-bit without lora": (lambda t: ["--load_in_4bit"], "--load_in_4bit (QLoRA) needs --lora_rank > 0"),
    "batch does not divide": (
        lambda t: ["--train_batch_size", "30", "--micro_train_batch_size", "8"],
        "--train_batch_size 30 must be a multiple",
    ),
    "flash attention on cpu": (lambda t: ["--flash_attn", "--bf16"], "--flash_attn needs a CUDA GPU"),
    "unknown zero stage": (lambda t: ["--zero_stage", "4"], "--zero_stage"),
    "unknown flag": (lambda t: ["--no_such_flag", "1"], "unknown option(s) --no_such_flag"),
    "unknown preset key": (lambda t: ["--config", write_jsonl(t / "p.yaml", ["zero_stag: 2"])], "p.yaml: unknown option 'zero_stag'"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.slow
def test_bad_input_gives_one_clear_line(tmp_path, case):
    make_args, expected = CASES[case]
    out = tmp_path / "out"
    args = [
        "--max_len",
        "32",
        "--micro_train_batch_size",
        "8",
        "--train_batch_size",
        "8",
        "--max_steps",
        "1",
        "--save_path",
        str(out),
        *make_args(tmp_path),
    ]
    proc = run_trainer("rlhf.sft", args, nproc=0, check=False, timeout=300)
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert expected in lines[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # nothing exported


def test_bad_input_under_torchrun_prints_one_line_per_node(tmp_path):
    proc = run_trainer("rlhf.sft", ["--pretrain", str(tmp_path / "missing-model")], nproc=2, check=False, timeout=300)
    assert proc.returncode != 0
    assert len(error_lines(proc.stderr)) == 1
