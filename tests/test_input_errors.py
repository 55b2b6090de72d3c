"""Bad input, as a table: each row is one mistake a user makes, the library call that meets it,
and the words the one-line error must contain (issue 12, items 2-9).

Every case calls the library function that checks the input (config parsing, a data loader, a
tokeniser, a model loader, a reward source) directly, so the table stays fast; that those
``UserError``s reach the user as one ``error:`` line with exit status 2 is proven once for all
entry points in the trainer tests. Rows are added where a check is added.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from typing import Any, Callable

import pytest

from rlhf.config import DataConfig, GenerateConfig, ModelConfig, PPOConfig, PreferenceDataConfig, parse_config
from rlhf.data.preference import tokenize_pairs, tokenize_unpaired
from rlhf.data.sft import tokenize_sft
from rlhf.data.sources import ASSETS_DIR, load_rows
from rlhf.errors import UserError
from rlhf.rewards import remote_reward


@dataclass
class Case:
    id: str
    call: Callable[[Any], object]  # tmp_path -> whatever the checked function returns
    expect: tuple[str, ...]  # fragments of the message, in order


def ppo(*flags: str) -> PPOConfig:
    return parse_config(PPOConfig, ["--reward_func", "rlhf.rewards:exact_match", *flags])


def reward_file(tmp, body: str):
    """Score one response with an OpenRLHF-style reward file whose reward_func returns ``body``."""
    path = tmp / "reward.py"
    path.write_text(f"def reward_func(queries, prompts, labels):\n    return {body}\n")
    return remote_reward(str(path), 1.0, 0)(["2+2="], ["4"], ["4"])


def corrupt_model(tmp) -> str:
    """A copy of the embedded model whose weights file was cut short (an interrupted download)."""
    import shutil

    folder = tmp / "rm_broken"
    shutil.copytree(ASSETS_DIR / "tiny-qwen2", folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return str(folder)


def load_model(kind: str, pretrain: str, flag: str):
    from rlhf.models.loading import load_causal_lm, load_reward_model

    cfg = ModelConfig(pretrain=pretrain)
    return load_reward_model(cfg, pad_token_id=0, flag=flag) if kind == "reward" else load_causal_lm(cfg, flag=flag)


@functools.cache
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ASSETS_DIR / "tiny-qwen2"))


def rows(tmp, *items: dict) -> list[dict]:
    """The rows as a data file on disk, read back: errors then name data.jsonl and the line."""
    path = tmp / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return load_rows(str(path))


def sft(tmp, row: dict, **cfg):
    """Tokenise a good row, then ``row`` (line 2 of the file)."""
    good = (
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
        if "messages" in row
        else {"input": "q", "output": "a"}
    )
    return tokenize_sft(rows(tmp, good, row), tokenizer(), DataConfig(**cfg))


def pairs(tmp, row: dict, **cfg):
    return tokenize_pairs(rows(tmp, row), tokenizer(), PreferenceDataConfig(**cfg))


HH = "\n\nHuman: 2+2?\n\nAssistant: "
CHAT = {"apply_chat_template": True, "input_key": "messages", "output_key": None}


CASES = [
    # item 2: an eval set is chosen once
    Case(
        "ppo eval holdout out of range",
        lambda tmp: ppo("--eval_holdout_ratio", "1.5"),
        ("--eval_holdout_ratio must be in [0, 1), got 1.5",),
    ),
    Case(
        "ppo eval holdout and eval file",
        lambda tmp: ppo("--eval_holdout_ratio", "0.1", "--eval_prompt_data", "x.jsonl"),
        ("--eval_holdout_ratio and --eval_prompt_data", "give one"),
    ),
    # item 8: flags that would do nothing
    Case(
        "generate normalize_reward without reward model",
        lambda tmp: parse_config(
            GenerateConfig,
            ["--eval_task", "rm", "--output_key", "output", "--reward_func", "rlhf.rewards:exact_match", "--normalize_reward"],
        ),
        ("--normalize_reward", "no --reward_pretrain"),
    ),
    # items 5, 8, 9: a reward source must return numbers, and the message names what came back
    Case(
        "reward file returns strings",
        lambda tmp: reward_file(tmp, "['1.0']"),
        (
            "--remote_rm_url",
            "reward.py must return numbers, got str '1.0' at index 0",
        ),
    ),
    Case("reward file returns None items", lambda tmp: reward_file(tmp, "[None]"), ("must return numbers, got null at index 0",)),
    Case("reward file returns a number", lambda tmp: reward_file(tmp, "1"), ("must return a list of numbers, got int 1",)),
    Case(
        "reward file returns a dict without rewards",
        lambda tmp: reward_file(tmp, "{'score': [1]}"),
        ("returned a dict without 'rewards' (keys: score)",),
    ),
    Case("reward file raises", lambda tmp: reward_file(tmp, "1 / 0"), ("reward.py raised ZeroDivisionError: division by zero",)),
    Case(
        "ppo reward file missing",
        lambda tmp: ppo("--remote_rm_url", str(tmp / "nope.py")),
        ("--remote_rm_url", "nope.py: no such reward file"),
    ),
    Case("reward file missing", lambda tmp: remote_reward(str(tmp / "nope.py"), 1.0, 0), ("--remote_rm_url", "no such file", "nope.py")),
    # item 8: HH-RLHF whole dialogues must have the Assistant turn the response follows
    Case(
        "hh-rlhf without assistant turn",
        lambda tmp: pairs(tmp, {"chosen": "\n\nHuman: 2+2? 4", "rejected": "\n\nHuman: 2+2? 5"}, prompt_key=None),
        ("data.jsonl:1: with --prompt_key None, fields 'chosen' and 'rejected' have no 'Assistant:' turn", "set --prompt_key"),
    ),
    Case(
        "hh-rlhf one side without assistant turn",
        lambda tmp: pairs(tmp, {"chosen": HH + "4", "rejected": "\n\nHuman: 2+2? 5"}, prompt_key=None),
        ("data.jsonl:1: with --prompt_key None, field 'rejected' has no 'Assistant:' turn",),
    ),
    Case(
        "hh-rlhf pair of two dialogues",
        lambda tmp: pairs(tmp, {"chosen": HH + "4", "rejected": "\n\nHuman: 3+3?\n\nAssistant: 6"}, prompt_key=None),
        ("data.jsonl:1: fields 'chosen' and 'rejected' differ before their last 'Assistant:' turn",),
    ),
    # item 9: the message names the type found, and an unknown chat role by name
    Case(
        "text field is a number",
        lambda tmp: sft(tmp, {"input": 7, "output": "a"}),
        ("data.jsonl:2: field 'input' must be a string, got int 7",),
    ),
    Case(
        "text field is null",
        lambda tmp: sft(tmp, {"input": "q", "output": None}),
        ("data.jsonl:2: field 'output' must be a string, got null",),
    ),
    Case(
        "messages is a string",
        lambda tmp: sft(tmp, {"messages": "hi"}, **CHAT),
        ("data.jsonl:2: field 'messages' must be a list of chat messages when --output_key is None, got str 'hi'",),
    ),
    Case(
        "messages is an empty list",
        lambda tmp: sft(tmp, {"messages": []}, **CHAT),
        ("data.jsonl:2: field 'messages' must be a non-empty list of chat messages, got an empty list",),
    ),
    Case(
        "message content null",
        lambda tmp: sft(tmp, {"messages": [{"role": "user", "content": None}]}, **CHAT),
        ("field 'messages' message 0 must have a string 'content', got null",),
    ),
    Case(
        "message without role",
        lambda tmp: sft(tmp, {"messages": [{"content": "hi"}]}, **CHAT),
        ("field 'messages' message 0 must have a string 'role', got nothing",),
    ),
    Case(
        "unknown chat role",
        lambda tmp: sft(tmp, {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "4"}]}, **CHAT),
        ("data.jsonl:2: field 'messages' message 1 has role 'bot'; chat roles are system, user, assistant",),
    ),
    Case(
        "kto label is null",
        lambda tmp: tokenize_unpaired(
            rows(tmp, {"prompt": "p", "completion": "c", "label": None}),
            tokenizer(),
            PreferenceDataConfig(input_key="prompt", output_key="completion"),
        ),
        ("data.jsonl:1: field 'label' must be true or false, got null",),
    ),
    Case(
        "data line is not an object",
        lambda tmp: rows(tmp, {"input": "q"}) and (tmp / "data.jsonl").write_text("null\n") and load_rows(str(tmp / "data.jsonl")),
        ("data.jsonl:1: expected a JSON object, got null",),
    ),
    # item 7: a bad model folder is named with the flag that named it
    Case(
        "corrupt safetensors",
        lambda tmp: load_model("reward", corrupt_model(tmp), "--reward_pretrain"),
        ("--reward_pretrain", "rm_broken: the model's weights are not a readable safetensors file", "download or export the model again"),
    ),
    Case(
        "missing reference folder",
        lambda tmp: load_model("causal", str(tmp / "no_ref"), "--ref_pretrain"),
        ("--ref_pretrain", "no_ref: no such model folder"),
    ),
    Case(
        "critic folder without config",
        lambda tmp: load_model("reward", str(tmp), "--critic_pretrain"),
        ("--critic_pretrain", "folder has no config.json"),
    ),
    Case(
        "reward file without reward_func",
        lambda tmp: (tmp / "r.py").write_text("x = 1\n") and remote_reward(str(tmp / "r.py"), 1.0, 0),
        ("has no function 'reward_func'",),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_error_case(case: Case, tmp_path):
    with pytest.raises(UserError) as caught:
        case.call(tmp_path)
    message = str(caught.value)
    assert "\n" not in message, message  # one line
    position = 0
    for fragment in case.expect:
        found = message.find(fragment, position)
        assert found >= 0, f"{fragment!r} not in {message!r}"
        position = found + len(fragment)


def test_ppo_has_no_eval_set_unless_asked():
    """Without --eval_prompt_data nothing is evaluated: no default file the user never named."""
    cfg = ppo()
    assert cfg.data.eval_prompt_data is None and cfg.data.eval_holdout_ratio == 0.0
    assert ppo("--eval_holdout_ratio", "0.25").data.eval_holdout_ratio == 0.25
    assert parse_config(PPOConfig, ["--config", "configs/grpo_tiny.yaml"]).data.eval_prompt_data == "embedded:arith/prompts_eval.jsonl"


def test_normalize_reward_without_a_reward_model_warns(caplog):
    """--normalize_reward with only a reward function or server parses (OpenRLHF's trainer ignores
    it there, and its remote-RM example passes it) but says, once, that it does nothing."""
    with caplog.at_level(logging.WARNING, logger="rlhf"):
        cfg = ppo("--normalize_reward")
    assert cfg.algo.normalize_reward
    lines = [r.getMessage() for r in caplog.records if "--normalize_reward" in r.getMessage()]
    assert len(lines) == 1 and "no effect without --reward_pretrain" in lines[0], lines


def test_vllm_num_engines_without_the_vllm_backend_warns(caplog):
    """OpenRLHF's --vllm_num_engines turns on its Ray vLLM actors; here vLLM runs inside the
    colocated ranks only with --rollout_backend vllm, so the flag alone is accepted (ported split
    scripts keep running) but says, once, that generation stays with transformers."""
    with caplog.at_level(logging.WARNING, logger="rlhf"):
        cfg = ppo("--vllm_num_engines", "2")
    assert cfg.rollout.rollout_backend == "hf"
    lines = [r.getMessage() for r in caplog.records if "--vllm_num_engines" in r.getMessage()]
    assert len(lines) == 1 and "add --rollout_backend vllm" in lines[0], lines
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rlhf"):
        ppo("--vllm_num_engines", "1", "--rollout_backend", "vllm")
    assert not [r for r in caplog.records if "--vllm_num_engines" in r.getMessage()]
