"""Preference data: paired rows (plain, HH-RLHF, UltraFeedback-binarized) and KTO rows -> masked
samples, their errors, KTO's mismatched pairs, and padded vs packed pair batches.

Uses the embedded tiny-qwen2 tokenizer (byte-level, one token per ASCII character, ChatML,
eos ``<|im_end|>``), so expected spans are plain strings. Fixture rows are written to jsonl
files in the exact public layouts and read back with ``load_rows``, so errors carry file:line.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace

import pytest
import torch

from rlhf.algos.losses import next_token_logprobs, per_sample_nll
from rlhf.config import KTOConfig, PreferenceDataConfig
from rlhf.data.preference import (
    PairSample,
    UnpairedSample,
    collate_pairs,
    collate_pairs_packed,
    kto_mismatched_pairs,
    split_shared_prompt,
    tokenize_pairs,
    tokenize_unpaired,
)
from rlhf.data.sft import Sample
from rlhf.data.sources import ASSETS_DIR, load_rows
from rlhf.errors import UserError

EOS = "<|im_end|>"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ASSETS_DIR / "tiny-qwen2"))


def text(tok, ids):
    return tok.decode(ids, skip_special_tokens=False)


def masked(tok, sample: Sample) -> str:
    return text(tok, [t for t, m in zip(sample.input_ids, sample.loss_mask) if m])


def unmasked(tok, sample: Sample) -> str:
    return text(tok, [t for t, m in zip(sample.input_ids, sample.loss_mask) if not m])


def assert_response_span(tok, sample: Sample, prompt: str, response: str):
    """The sample is exactly prompt + response and the mask is one contiguous span on the response."""
    assert text(tok, sample.input_ids) == prompt + response
    assert masked(tok, sample) == response and unmasked(tok, sample) == prompt
    ones = [i for i, m in enumerate(sample.loss_mask) if m]
    assert ones == list(range(ones[0], len(sample))), "the response span must be contiguous and run to the end"


def write_rows(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, load_rows(str(path))


def user_error(fn, *args):
    with pytest.raises(UserError) as info:
        fn(*args)
    return str(info.value)


def chatml(*turns):
    return "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)


# ----------------------------------------------------------------------------------------------
# Paired shapes


def test_plain_pairs_from_the_embedded_data(tok):
    rows = load_rows("embedded:arith/prefs_train.jsonl")
    pairs = tokenize_pairs(rows, tok, PreferenceDataConfig())
    assert len(pairs) == len(rows) and all(isinstance(p, PairSample) for p in pairs)
    row, pair = rows[0], pairs[0]
    assert_response_span(tok, pair.chosen, row["prompt"], row["chosen"] + EOS)
    assert_response_span(tok, pair.rejected, row["prompt"], row["rejected"] + EOS)
    assert pair.margin == 0.0
    for row, pair in zip(rows, pairs):
        assert masked(tok, pair.chosen) == row["chosen"] + EOS and masked(tok, pair.rejected) == row["rejected"] + EOS


def test_plain_pairs_with_input_template_and_chat_template(tok, tmp_path):
    _, rows = write_rows(tmp_path, [{"prompt": "2+2=", "chosen": "4", "rejected": "5"}])
    [p] = tokenize_pairs(rows, tok, PreferenceDataConfig(input_template="Q: {}\nA: "))
    assert_response_span(tok, p.chosen, "Q: 2+2=\nA: ", "4" + EOS)
    assert_response_span(tok, p.rejected, "Q: 2+2=\nA: ", "5" + EOS)

    [c] = tokenize_pairs(rows, tok, PreferenceDataConfig(apply_chat_template=True))
    prompt = chatml(("user", "2+2=")) + "<|im_start|>assistant\n"
    assert_response_span(tok, c.chosen, prompt, "4<|im_end|>")
    assert_response_span(tok, c.rejected, prompt, "5<|im_end|>")


def test_hh_rlhf_text_pairs(tok, tmp_path):
    single = {
        "chosen": "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.",
        "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: It is 5, I think.",
    }
    multi = {
        "chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and 3+3?\n\nAssistant: 6",
        "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and 3+3?\n\nAssistant: 7",
    }
    no_marker = {"chosen": "The answer is 4", "rejected": "The answer is 5"}
    path, rows = write_rows(tmp_path, [single, multi, no_marker])
    s, m = tokenize_pairs(rows[:2], tok, PreferenceDataConfig(prompt_key=None))
    # The shared " It is " is cut back: the response starts right after the last marker.
    assert_response_span(tok, s.chosen, "\n\nHuman: What is 2+2?\n\nAssistant:", " It is 4." + EOS)
    assert_response_span(tok, s.rejected, "\n\nHuman: What is 2+2?\n\nAssistant:", " It is 5, I think." + EOS)
    # Earlier assistant turns are context; only the last one is the response.
    prompt = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and 3+3?\n\nAssistant:"
    assert_response_span(tok, m.chosen, prompt, " 6" + EOS)
    assert_response_span(tok, m.rejected, prompt, " 7" + EOS)
    # No marker: no way to tell the response from the prompt, so the row is an error.
    assert split_shared_prompt(no_marker["chosen"], no_marker["rejected"]) is None
    message = user_error(tokenize_pairs, rows[2:], tok, PreferenceDataConfig(prompt_key=None))
    assert message.startswith(f"{path}:3: with --prompt_key None, fields 'chosen' and 'rejected' have no 'Assistant:' turn"), message
    # A marker cut off by the first difference does not count ("\n\nAssistant:" vs "\n\nAssistant!").
    assert split_shared_prompt("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: a\n\nAssist") is None


def test_ultrafeedback_binarized_messages(tok, tmp_path):
    def msgs(answer, system=None):
        head = [{"role": "system", "content": system}] if system else []
        return head + [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": answer}]

    row = {  # the layout of HuggingFaceH4/ultrafeedback_binarized
        "prompt": "2+2?",
        "prompt_id": "0f3a",
        "chosen": msgs("4"),
        "rejected": msgs("5"),
        "messages": msgs("4"),
        "score_chosen": 9.0,
        "score_rejected": 2.0,
    }
    with_system = {**row, "chosen": msgs("four", "be brief"), "rejected": msgs("five", "be brief")}
    _, rows = write_rows(tmp_path, [row, with_system])
    a, b = tokenize_pairs(rows, tok, PreferenceDataConfig(apply_chat_template=True))
    prompt = chatml(("user", "2+2?")) + "<|im_start|>assistant\n"
    assert_response_span(tok, a.chosen, prompt, "4<|im_end|>")
    assert_response_span(tok, a.rejected, prompt, "5<|im_end|>")
    prompt = chatml(("system", "be brief"), ("user", "2+2?")) + "<|im_start|>assistant\n"
    assert_response_span(tok, b.chosen, prompt, "four<|im_end|>")
    assert_response_span(tok, b.rejected, prompt, "five<|im_end|>")
    # The prompt field is not needed when the lists carry the whole conversation.
    [c] = tokenize_pairs(
        [{k: v for k, v in rows[0].items() if k != "prompt"}], tok, PreferenceDataConfig(prompt_key=None, apply_chat_template=True)
    )
    assert c == a


def test_assistant_only_lists_with_a_prompt_field(tok, tmp_path):
    rows_in = [
        {"prompt": "2+2?", "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]},
        {
            "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "2+2?"}],
            "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": [{"role": "assistant", "content": "5"}],
        },
    ]
    _, rows = write_rows(tmp_path, rows_in)
    a, b = tokenize_pairs(rows, tok, PreferenceDataConfig(apply_chat_template=True))
    assert_response_span(tok, a.chosen, chatml(("user", "2+2?")) + "<|im_start|>assistant\n", "4<|im_end|>")
    assert_response_span(tok, b.rejected, chatml(("system", "s"), ("user", "2+2?")) + "<|im_start|>assistant\n", "5<|im_end|>")
    # Same as the plain text row with the chat template.
    [plain] = tokenize_pairs([{"prompt": "2+2?", "chosen": "4", "rejected": "5"}], tok, PreferenceDataConfig(apply_chat_template=True))
    assert plain == a


def test_margin(tok, tmp_path):
    rows_in = [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": m} for m in (1.5, "0.25", -2)]
    _, rows = write_rows(tmp_path, rows_in)
    pairs = tokenize_pairs(rows, tok, PreferenceDataConfig(margin_key="margin"))
    assert [p.margin for p in pairs] == [1.5, 0.25, -2.0]
    assert all(p.margin == 0.0 for p in tokenize_pairs(rows, tok, PreferenceDataConfig()))


# ----------------------------------------------------------------------------------------------
# Paired errors


def test_pair_errors_name_file_line_and_field(tok, tmp_path):
    msgs = lambda user, answer: [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]  # noqa: E731
    bad = [
        ({"prompt": "p", "rejected": "b"}, {}, r"field 'chosen' is missing \(set --chosen_key; the row has: prompt, rejected\)$"),
        ({"prompt": "p", "chosen": "a", "answer": "b"}, {}, r"field 'rejected' is missing \(set --rejected_key;"),
        (
            {"prompt": "p", "chosen": "same", "rejected": "same"},
            {},
            r"chosen and rejected are identical \(fields 'chosen' and "
            r"'rejected'\)$",
        ),
        ({"prompt": "p", "chosen": "a", "rejected": "  "}, {}, r"field 'rejected' is empty$"),
        (
            {"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"},
            {"margin_key": "margin"},
            r"field 'margin' must be a number, "
            r"got str 'big'$",
        ),
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, {"margin_key": "margin"}, r"field 'margin' is missing \(set --margin_key;"),
        (
            {"chosen": "\n\nHuman: q\n\nAssistant: yes", "rejected": "\n\nHuman: q\n\nAssistant:"},
            {"prompt_key": None},
            r"field 'rejected' has an empty response after the prompt both sides share$",
        ),
        (
            {"chosen": msgs("q", "4"), "rejected": msgs("q", "")},
            {"apply_chat_template": True},
            r"field 'rejected' has an empty assistant "
            r"response$",
        ),
        (
            {"chosen": msgs("q", "4"), "rejected": msgs("other q", "5")},
            {"apply_chat_template": True},
            r"fields 'chosen' and 'rejected' must share the same conversation before their last \(assistant\) message$",
        ),
        (
            {"chosen": msgs("q", "4"), "rejected": msgs("q", "5")},
            {},
            r"fields 'chosen' and 'rejected' hold chat messages; add "
            r"--apply_chat_template$",
        ),
        (
            {"prompt": "p", "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]},
            {"apply_chat_template": True},
            r"fields 'chosen' and 'rejected' must both be texts or both be messages lists$",
        ),
        (
            {"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
            {"prompt_key": None, "apply_chat_template": True},
            r"fields 'chosen' and 'rejected' hold only the assistant message; set "
            r"--prompt_key",
        ),
    ]
    path, rows = write_rows(tmp_path, [row for row, _, _ in bad])
    assert [r["__where__"] for r in rows] == [f"{path}:{i + 1}" for i in range(len(bad))]
    for i, (row, overrides, pattern) in enumerate(bad):
        message = user_error(tokenize_pairs, [rows[i]], tok, PreferenceDataConfig(**overrides))
        assert re.match(rf"^{re.escape(str(path))}:{i + 1}: {pattern}", message), message


def test_pair_truncation_drops_and_no_truncate(tok, tmp_path, caplog):
    rows_in = [
        {"prompt": "ab", "chosen": "cdefghij", "rejected": "x"},  # chosen 11 tokens -> cut to 8
        {"prompt": "abcdefgh", "chosen": "x", "rejected": "y"},  # prompt fills max_len -> dropped
        {"prompt": "abcdefg", "chosen": "xyz", "rejected": "w"},  # one response token survives on each side
    ]
    path, rows = write_rows(tmp_path, rows_in)
    cfg = PreferenceDataConfig(max_len=8)
    with caplog.at_level(logging.WARNING, logger="rlhf.data.preference"):
        first, third = tokenize_pairs(rows, tok, cfg)
    assert "dropped 1 of 3 pairs" in caplog.text
    assert text(tok, first.chosen.input_ids) == "abcdefgh" and first.chosen.loss_mask == [0, 0] + [1] * 6
    assert_response_span(tok, first.rejected, "ab", "x" + EOS)  # the short side is untouched
    assert masked(tok, third.chosen) == "x" and masked(tok, third.rejected) == "w"
    assert user_error(tokenize_pairs, rows[1:2], tok, cfg) == "all 1 pairs were dropped: every prompt is at least --max_len 8 tokens"
    message = user_error(tokenize_pairs, rows[:1], tok, replace(cfg, truncate=False))
    assert message.startswith(f"{path}:1: field 'chosen' gives a sample of 11 tokens, longer than --max_len 8")


# ----------------------------------------------------------------------------------------------
# KTO


def test_kto_rows_from_the_embedded_data(tok):
    cfg = KTOConfig().data
    rows = load_rows(cfg.dataset)
    samples = tokenize_unpaired(rows, tok, cfg)
    assert len(samples) == len(rows) and all(isinstance(s, UnpairedSample) for s in samples)
    for row, s in zip(rows, samples):
        assert s.desirable is row["label"]
        assert_response_span(tok, s.sample, row["prompt"], row["completion"] + EOS)
        assert text(tok, s.sample.input_ids[: s.prompt_len]) == row["prompt"]
    assert {s.desirable for s in samples} == {True, False}


def test_kto_chat_messages(tok, tmp_path):
    row = {  # the layout of trl-lib/kto-mix-14k
        "prompt": [{"role": "user", "content": "2+2?"}],
        "completion": [{"role": "assistant", "content": "4"}],
        "label": True,
    }
    _, rows = write_rows(tmp_path, [row, {"prompt": "2+2?", "completion": "5", "label": False}])
    cfg = PreferenceDataConfig(input_key="prompt", output_key="completion", apply_chat_template=True)
    a, b = tokenize_unpaired(rows, tok, cfg)
    prompt = chatml(("user", "2+2?")) + "<|im_start|>assistant\n"
    assert_response_span(tok, a.sample, prompt, "4<|im_end|>\n")
    assert_response_span(tok, b.sample, prompt, "5<|im_end|>\n")
    assert text(tok, a.sample.input_ids[: a.prompt_len]) == prompt and (a.desirable, b.desirable) == (True, False)


def test_kto_label_is_strictly_boolean(tok, tmp_path):
    rows_in = [{"prompt": "p", "completion": "c", "label": v} for v in (1, 0, "true", None)]
    rows_in += [
        {"prompt": "p", "completion": ""},
        {"prompt": "p", "completion": "", "label": True},
        {"prompt": "p", "completion": [{"role": "assistant", "content": " "}], "label": True},
    ]
    path, rows = write_rows(tmp_path, rows_in)
    cfg = KTOConfig().data
    expected = [
        "field 'label' must be true or false, got int 1",
        "field 'label' must be true or false, got int 0",
        "field 'label' must be true or false, got str 'true'",
        "field 'label' must be true or false, got null",
        "field 'label' is missing (set --label_key; the row has: prompt, completion)",
        "field 'completion' is empty",
        "field 'completion' is empty",
    ]
    for i, tail in enumerate(expected):
        assert user_error(tokenize_unpaired, [rows[i]], tok, replace(cfg, apply_chat_template=i == 6)) == f"{path}:{i + 1}: {tail}"


def test_kto_mismatched_pairs_are_deterministic_derangements(tok, tmp_path):
    rows_in = [{"prompt": f"{i}+{i}=", "completion": "x" * (i + 1), "label": i % 2 == 0} for i in range(9)]
    _, rows = write_rows(tmp_path, rows_in)
    samples = tokenize_unpaired(rows, tok, KTOConfig().data)
    mismatched = kto_mismatched_pairs(samples, seed=3)
    assert mismatched == kto_mismatched_pairs(samples, seed=3)
    assert mismatched != kto_mismatched_pairs(samples, seed=4)
    used = []
    for i, m in enumerate(mismatched):
        prompt = rows_in[i]["prompt"]
        full = text(tok, m.input_ids)
        assert full.startswith(prompt) and unmasked(tok, m) == prompt
        completion = masked(tok, m)
        j = len(completion) - len(EOS) - 1  # completions are "x" * (j + 1) + eos: the length names the row
        assert completion == rows_in[j]["completion"] + EOS and full == prompt + completion
        assert j != i
        used.append(j)
    assert sorted(used) == list(range(9))  # a permutation: every completion is borrowed once

    # Cut to max_len: the prompt is kept, the borrowed completion shortened.
    short = kto_mismatched_pairs(samples, seed=3, max_len=6)
    assert all(len(s) <= 6 and any(s.loss_mask) for s in short)
    assert [s.input_ids for s in short] == [m.input_ids[:6] for m in mismatched]
    assert user_error(kto_mismatched_pairs, samples[:1], 0).startswith("KTO needs at least 2 examples")
    # Two examples: the only derangement is the swap.
    two = kto_mismatched_pairs(samples[:2], seed=0)
    assert masked(tok, two[0]) == "xx" + EOS and masked(tok, two[1]) == "x" + EOS


# ----------------------------------------------------------------------------------------------
# Collation


def test_collate_pairs_shapes_and_order():
    pairs = [
        PairSample(Sample([1, 2, 3], [0, 1, 1]), Sample([1, 4], [0, 1]), 0.5),
        PairSample(Sample([5, 6], [0, 1]), Sample([5, 7, 8, 9], [0, 1, 1, 1]), -1.0),
    ]
    batch = collate_pairs(pairs, pad_id=0)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "input_ids": (4, 4),
        "attention_mask": (4, 4),
        "loss_mask": (4, 4),
        "margin": (2,),
    }
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [5, 6, 0, 0], [1, 4, 0, 0], [5, 7, 8, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 1, 1, 1]]
    assert batch["margin"].tolist() == [0.5, -1.0] and batch["margin"].dtype == torch.float32

    packed = collate_pairs_packed(pairs, pad_id=0, pad_to_multiple_of=4)
    assert {k: tuple(v.shape) for k, v in packed.items()} == {
        "input_ids": (1, 12),
        "position_ids": (1, 12),
        "loss_mask": (1, 12),
        "sample_ids": (1, 12),
        "margin": (2,),
    }
    assert packed["input_ids"].tolist() == [[1, 2, 3, 5, 6, 1, 4, 5, 7, 8, 9, 0]]
    assert packed["sample_ids"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 3, -1]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 0, 1, 2, 3, 0]]
    assert packed["margin"].tolist() == [0.5, -1.0]


def test_packed_pair_logprobs_equal_padded(tok):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    rows = [
        {"prompt": "12+30=", "chosen": "42", "rejected": "43 or so"},
        {
            "prompt": [{"role": "system", "content": "math"}, {"role": "user", "content": "7*6?"}],
            "chosen": [{"role": "assistant", "content": "42, since 7*6=42"}],
            "rejected": [{"role": "assistant", "content": "36"}],
        },
        {"prompt": "hi", "chosen": "hello there", "rejected": "go away"},
    ]
    pairs = tokenize_pairs(rows, tok, PreferenceDataConfig(apply_chat_template=True))
    lengths = [len(s) for p in pairs for s in (p.chosen, p.rejected)]
    assert len(set(lengths)) == len(lengths)  # every side a different length: padding really happens

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,  # large weights, so attention leaking across samples would show
    )
    model = Qwen2ForCausalLM(config).float().eval()
    n = 2 * len(pairs)
    with torch.no_grad():
        padded = collate_pairs(pairs, pad_id=tok.pad_token_id)
        logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False).logits
        logp = next_token_logprobs(logits, padded["input_ids"])  # [2B, T-1]
        padded_sum = (logp * padded["loss_mask"][:, 1:]).sum(-1)  # [2B]

        # Round up so that a padding tail (its own block of positions) really follows the samples.
        packed = collate_pairs_packed(pairs, pad_id=tok.pad_token_id, pad_to_multiple_of=sum(lengths) + 5)
        assert (packed["sample_ids"] == -1).sum() == 5
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], attention_mask=None, use_cache=False).logits
        packed_sum = -per_sample_nll(next_token_logprobs(logits, packed["input_ids"]), packed["loss_mask"], packed["sample_ids"], n)

    assert padded_sum.shape == packed_sum.shape == (n,)
    assert (padded_sum < 0).all()
    torch.testing.assert_close(packed_sum, padded_sum, rtol=0, atol=1e-5)
    # Rows 0..B-1 are the chosen sides: their log-probs are those of the chosen samples alone.
    with torch.no_grad():
        alone = pairs[1].chosen
        ids = torch.tensor([alone.input_ids])
        own = (next_token_logprobs(model(input_ids=ids, use_cache=False).logits, ids) * torch.tensor([alone.loss_mask[1:]])).sum()
    torch.testing.assert_close(padded_sum[1], own, rtol=0, atol=1e-5)


def test_bos_tokenizers_get_bos_on_both_sides_and_in_the_kto_prompt():
    from test_data import make_tokenizer  # char-level test tokenizer that expects a BOS

    tok = make_tokenizer(with_bos=True)
    [p] = tokenize_pairs([{"prompt": "q", "chosen": "a", "rejected": "b"}], tok, PreferenceDataConfig())
    assert tok.convert_ids_to_tokens(p.chosen.input_ids) == ["<s>", "q", "a", "<|endoftext|>"]
    assert tok.convert_ids_to_tokens(p.rejected.input_ids) == ["<s>", "q", "b", "<|endoftext|>"]
    assert p.chosen.loss_mask == p.rejected.loss_mask == [0, 0, 1, 1]
    [u] = tokenize_unpaired([{"input": "q", "output": "a", "label": False}], tok, PreferenceDataConfig())
    assert u.prompt_len == 2 and u.sample.loss_mask == [0, 0, 1, 1] and u.desirable is False
