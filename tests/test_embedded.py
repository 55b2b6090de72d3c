"""The embedded default model and datasets: reproducible from code, loadable the plain HF way, and
a task whose held-out split and answers are right."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import rlhf
from rlhf.data.embedded import build_datasets
from rlhf.models.tiny import build_tiny_model, build_tokenizer

ASSETS = Path(rlhf.__file__).parent / "assets"
TINY = ASSETS / "tiny-qwen2"
ARITH = ASSETS / "arith"
PROMPT = re.compile(r"^(\d+)\+(\d+)=$")
EQUATION = re.compile(r"^(\d+)\+(\d+)=(\d+)$")


def read_jsonl(name: str) -> list[dict]:
    with (ARITH / name).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def pair_of(prompt: str) -> tuple[int, int]:
    match = PROMPT.match(prompt)
    assert match, f"not an a+b= prompt: {prompt!r}"
    return int(match[1]), int(match[2])


def answer(prompt: str) -> str:
    a, b = pair_of(prompt)
    return str(a + b)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY)


# ----------------------------------------------------------------------------------------------
# (a), (b) rebuilding reproduces the shipped files


def test_rebuilt_model_matches_shipped(tmp_path):
    build_tiny_model(str(tmp_path))
    shipped = {p.name for p in TINY.iterdir()}
    assert {p.name for p in tmp_path.iterdir()} == shipped
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= shipped

    for name in sorted(shipped - {"model.safetensors", "config.json", "generation_config.json"}):
        assert (tmp_path / name).read_bytes() == (TINY / name).read_bytes(), f"{name} differs from the rebuild"
    # The two configs record the transformers version that wrote them; everything else must match.
    for name in ("config.json", "generation_config.json"):
        rebuilt, ref = (json.loads((d / name).read_text()) for d in (tmp_path, TINY))
        rebuilt.pop("transformers_version", None), ref.pop("transformers_version", None)
        assert rebuilt == ref, f"{name} differs from the rebuild"

    rebuilt, ref = load_file(tmp_path / "model.safetensors"), load_file(TINY / "model.safetensors")
    assert rebuilt.keys() == ref.keys()
    for key in ref:
        assert torch.equal(rebuilt[key], ref[key]), f"weight {key} differs from the rebuild"


def test_rebuilt_datasets_match_shipped(tmp_path):
    build_datasets(str(tmp_path))
    names = sorted(p.name for p in ARITH.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    for name in names:
        assert (tmp_path / name).read_bytes() == (ARITH / name).read_bytes(), f"{name} differs from the rebuild"


# ----------------------------------------------------------------------------------------------
# (c) tokenizer


@pytest.mark.parametrize(
    "text",
    [
        "12+7=19",
        "  two leading, two trailing  ",
        "line one\nline two\n\n\nend\n",
        " \n \n",
        "".join(chr(c) for c in range(0x20, 0x7F)) + "\n",
        "tab\there, caf\u00e9 \u65e5\u672c",  # outside the task alphabet: must still survive
    ],
)
def test_tokenizer_round_trips_exactly(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    assert tokenizer.decode(ids) == text
    if text.isascii() and "\t" not in text:
        assert len(ids) == len(text), "one token per character"
        assert all(3 <= i <= 98 for i in ids), "task characters take ids 3..98"


def test_tokenizer_special_tokens_and_settings(tokenizer):
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 0)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert tokenizer.bos_token is None
    assert tokenizer.padding_side == "right" and tokenizer.model_max_length == 512
    assert tokenizer("<|im_start|>user<|im_end|>")["input_ids"] == [1, *tokenizer("user")["input_ids"], 2]
    assert tokenizer.decode([1, 2, 0], skip_special_tokens=True) == ""


def test_loaded_tokenizer_pipeline_equals_built(tokenizer):
    # AutoTokenizer rebuilds Qwen2 tokenizers from vocab + merges alone; the pipeline we ship must
    # be exactly that one, or the folder would tokenize differently depending on how it is loaded.
    loaded = json.loads(tokenizer.backend_tokenizer.to_str())
    built = json.loads(build_tokenizer().backend_tokenizer.to_str())
    for part in ("normalizer", "pre_tokenizer", "decoder", "model", "added_tokens"):
        assert loaded[part] == built[part], part


def test_chat_template_renders_chatml(tokenizer):
    messages = [
        {"role": "user", "content": "12+7="},
        {"role": "assistant", "content": "19"},
        {"role": "user", "content": "3+4="},
        {"role": "assistant", "content": "7"},
    ]
    expected = (
        "<|im_start|>user\n12+7=<|im_end|>\n<|im_start|>assistant\n19<|im_end|>\n"
        "<|im_start|>user\n3+4=<|im_end|>\n<|im_start|>assistant\n7<|im_end|>\n"
    )
    assert tokenizer.apply_chat_template(messages, tokenize=False) == expected
    assert tokenizer.apply_chat_template(messages[:3], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\n12+7=<|im_end|>\n<|im_start|>assistant\n19<|im_end|>\n<|im_start|>user\n3+4=<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "{% generation %}" not in tokenizer.chat_template


# ----------------------------------------------------------------------------------------------
# (d) model


def test_shipped_model_loads_and_runs(tokenizer):
    model = AutoModelForCausalLM.from_pretrained(TINY)
    config = model.config
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert config.vocab_size % 8 == 0 and len(tokenizer) <= config.vocab_size < len(tokenizer) + 8
    assert (config.eos_token_id, config.pad_token_id, config.bos_token_id) == (2, 0, None)
    assert model.lm_head.weight is model.model.embed_tokens.weight, "embeddings are tied"
    assert 500_000 < sum(p.numel() for p in model.parameters()) < 700_000
    assert model.generation_config.eos_token_id == 2 and model.generation_config.pad_token_id == 0

    batch = tokenizer(["12+7="], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], config.vocab_size)
    assert batch["input_ids"].shape[1] == 5
    assert torch.isfinite(logits).all()


# ----------------------------------------------------------------------------------------------
# (e) datasets


def train_pairs_by_file() -> dict[str, set[tuple[int, int]]]:
    """Every question each training file contains."""
    out = {
        "sft_train.jsonl": {pair_of(r["input"]) for r in read_jsonl("sft_train.jsonl")},
        "sft_teacher_train.jsonl": {pair_of(r["input"]) for r in read_jsonl("sft_teacher_train.jsonl")},
        "conditional_train.jsonl": {pair_of(r["input"]) for r in read_jsonl("conditional_train.jsonl")},
        "prefs_train.jsonl": {pair_of(r["prompt"]) for r in read_jsonl("prefs_train.jsonl")},
        "kto_train.jsonl": {pair_of(r["prompt"]) for r in read_jsonl("kto_train.jsonl")},
        "prompts_train.jsonl": {pair_of(r["input"]) for r in read_jsonl("prompts_train.jsonl")},
        "chat_train.jsonl": {pair_of(m["content"]) for r in read_jsonl("chat_train.jsonl") for m in r["messages"] if m["role"] == "user"},
    }
    equations = [line for r in read_jsonl("pretrain.jsonl") for line in r["text"].splitlines()]
    out["pretrain.jsonl"] = {(int(m[1]), int(m[2])) for m in map(EQUATION.match, equations)}
    return out


def test_eval_pairs_never_in_train_files():
    eval_pairs = {pair_of(r["input"]) for r in read_jsonl("sft_eval.jsonl")}
    assert len(eval_pairs) == 300
    for name in ("prefs_eval.jsonl", "kto_eval.jsonl"):
        assert {pair_of(r["prompt"]) for r in read_jsonl(name)} == eval_pairs, name
    assert {pair_of(r["input"]) for r in read_jsonl("prompts_eval.jsonl")} == eval_pairs
    assert {pair_of(r["messages"][0]["content"]) for r in read_jsonl("chat_eval.jsonl")} == eval_pairs
    for name, pairs in train_pairs_by_file().items():
        assert not pairs & eval_pairs, f"{name} holds eval questions"
        assert len(pairs) == 2500 - 300, f"{name} does not cover every train pair"
        assert all(0 <= a < 50 and 0 <= b < 50 for a, b in pairs)


def test_answers_and_labels_are_correct_sums():
    for name in ("sft_train.jsonl", "sft_eval.jsonl"):
        for r in read_jsonl(name):
            assert r["output"] == answer(r["input"]), r
    for name in ("prompts_train.jsonl", "prompts_eval.jsonl"):
        for r in read_jsonl(name):
            assert r["label"] == answer(r["input"]), r
    for name in ("chat_train.jsonl", "chat_eval.jsonl"):
        for r in read_jsonl(name):
            roles = [m["role"] for m in r["messages"]]
            assert roles in (["user", "assistant"], ["user", "assistant", "user", "assistant"]), roles
            for question, reply in zip(r["messages"][::2], r["messages"][1::2]):
                assert reply["content"] == answer(question["content"]), r
    equations = [line for r in read_jsonl("pretrain.jsonl") for line in r["text"].splitlines()]
    for line in equations:
        a, b, c = map(int, EQUATION.match(line).groups())
        assert a + b == c, line


def test_teacher_answers_are_right_or_one_too_high():
    """The imperfect teacher slips (answers a+b+1) on about 60% of rows and is otherwise right."""
    rows = read_jsonl("sft_teacher_train.jsonl")
    errors = [int(r["output"]) - int(answer(r["input"])) for r in rows]
    assert set(errors) == {0, 1}
    assert 0.55 < sum(errors) / len(rows) < 0.65


def test_chat_train_is_about_a_third_two_turn():
    rows = read_jsonl("chat_train.jsonl")
    two_turn = sum(len(r["messages"]) == 4 for r in rows)
    assert 0.25 < two_turn / len(rows) < 0.40


def test_preferences_reject_a_different_nonnegative_answer():
    for name in ("prefs_train.jsonl", "prefs_eval.jsonl"):
        for r in read_jsonl(name):
            assert r["chosen"] == answer(r["prompt"]), r
            assert r["rejected"] != r["chosen"], r
            assert int(r["rejected"]) >= 0 and 1 <= abs(int(r["rejected"]) - int(r["chosen"])) <= 5, r


def test_kto_labels_say_whether_the_completion_is_correct():
    for name in ("kto_train.jsonl", "kto_eval.jsonl"):
        rows = read_jsonl(name)
        for r in rows:
            assert r["label"] is (r["completion"] == answer(r["prompt"])), r
            assert int(r["completion"]) >= 0
        assert sum(r["label"] for r in rows) == len(rows) // 2, "half desirable"


def test_conditional_scores_follow_the_error():
    rows = read_jsonl("conditional_train.jsonl")
    for r in rows:
        error = abs(int(r["output"]) - int(answer(r["input"])))
        assert error <= 3 and r["score"] == float(max(0, 9 - 3 * error)), r
    correct = sum(r["score"] == 9.0 for r in rows) / len(rows)
    assert 0.4 < correct < 0.6


def test_shipped_assets_stay_small():
    size = sum(p.stat().st_size for d in (TINY, ARITH) for p in d.iterdir())
    assert size < 4 * 1024 * 1024
