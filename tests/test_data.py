"""Data pipeline: loaders, mixing, hold-out, SFT loss masks, errors, collation and packing.

The tokenizer here is character-level (one token per printable ASCII character) with ChatML
special tokens, so expected token spans can be written down as plain strings.
"""

from __future__ import annotations

import json
import logging
import string
import sys
import types
from dataclasses import replace

import pytest
import torch

from rlhf.config import DataConfig
from rlhf.data import sources
from rlhf.data.sft import (
    Sample,
    collate_packed,
    collate_padded,
    load_preprocess_fn,
    pack_into_micro_batches,
    tokenize_sft,
)
from rlhf.data.sources import holdout_split, load_mixture, load_rows, resolve_uri
from rlhf.errors import UserError

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(chat_template=CHATML, with_bos=False):
    """Char-level fast tokenizer: BPE with no merges splits text into single characters."""
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(string.printable)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    extra = {}
    if with_bos:
        backend.add_special_tokens(["<s>"])
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))])
        extra["bos_token"] = "<s>"
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=chat_template,
        **extra,
    )
    tok.name_or_path = "test-char-tokenizer"
    return tok


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def text_of(tok, ids):
    return "".join(tok.convert_ids_to_tokens(ids))


def masked_text(tok, sample):
    return text_of(tok, [t for t, m in zip(sample.input_ids, sample.loss_mask) if m])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


ROWS = [{"input": f"q{i}", "output": f"a{i}"} for i in range(6)]


def strip_where(rows):
    return [{k: v for k, v in r.items() if k != "__where__"} for r in rows]


# ----------------------------------------------------------------------------------------------
# Loaders


def test_jsonl_with_blank_lines_names_lines(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    rows = load_rows(str(path))
    assert strip_where(rows) == ROWS[:2]
    assert [r["__where__"] for r in rows] == [f"{path}:1", f"{path}:3"]  # blank line 2 skipped


def test_json_list_and_json_lines_in_dot_json(tmp_path):
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(ROWS, indent=2))
    assert strip_where(load_rows(str(listed))) == ROWS
    assert load_rows(str(listed))[2]["__where__"] == f"{listed} row 2"
    lines = tmp_path / "lines.json"
    write_jsonl(lines, ROWS)
    assert strip_where(load_rows(str(lines))) == ROWS


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    rows = load_rows(str(path))
    assert strip_where(rows) == ROWS
    assert rows[1]["__where__"] == f"{path} row 1"


def test_csv(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("input,output\nq0,a0\nq1,a1\n")
    rows = load_rows(str(path))
    assert strip_where(rows) == ROWS[:2]
    assert rows[1]["__where__"] == f"{path}:3"  # header is line 1


def test_save_to_disk_folder_picks_split_and_lists_available(tmp_path):
    import datasets

    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:4]), "test": datasets.Dataset.from_list(ROWS[4:])}).save_to_disk(
        str(folder)
    )
    assert strip_where(load_rows(str(folder), "train")) == ROWS[:4]
    assert strip_where(load_rows(str(folder), "test")) == ROWS[4:]
    with pytest.raises(UserError, match=r"no split 'validation' \(available splits: train, test\)"):
        load_rows(str(folder), "validation")
    # The .arrow shard that save_to_disk wrote is itself a loadable file.
    shard = next((folder / "train").glob("*.arrow"))
    assert strip_where(load_rows(str(shard))) == ROWS[:4]


def test_arrow_ipc_file_format(tmp_path):
    import pyarrow as pa

    path = tmp_path / "d.arrow"
    table = pa.Table.from_pylist(ROWS)
    with pa.ipc.new_file(str(path), table.schema) as writer:
        writer.write_table(table)
    assert strip_where(load_rows(str(path))) == ROWS


def test_folder_of_files_concatenates_and_respects_split_names(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    write_jsonl(plain / "a.jsonl", ROWS[:2])
    write_jsonl(plain / "b.jsonl", ROWS[2:5])
    rows = load_rows(str(plain))
    assert strip_where(rows) == ROWS[:5]
    assert rows[2]["__where__"] == f"{plain}/b.jsonl:1"

    split = tmp_path / "split"
    split.mkdir()
    write_jsonl(split / "train.jsonl", ROWS[:4])
    write_jsonl(split / "test.jsonl", ROWS[4:])
    assert strip_where(load_rows(str(split), "train")) == ROWS[:4]
    assert strip_where(load_rows(str(split), "test")) == ROWS[4:]
    with pytest.raises(UserError, match=r"no files for split 'dev' \(available splits: test, train\)"):
        load_rows(str(split), "dev")


def test_embedded_and_s3_resolution(tmp_path, monkeypatch):
    assets = tmp_path / "assets"
    (assets / "arith").mkdir(parents=True)
    write_jsonl(assets / "arith" / "sft.jsonl", ROWS)
    monkeypatch.setattr(sources, "ASSETS_DIR", assets)
    assert resolve_uri("embedded:arith/sft.jsonl") == str(assets / "arith" / "sft.jsonl")
    rows = load_rows("embedded:arith/sft.jsonl")
    assert rows[0]["__where__"] == "embedded:arith/sft.jsonl:1"
    with pytest.raises(UserError, match=r"embedded:nope\.jsonl: no such embedded asset \(rlhf/assets holds: arith\)"):
        resolve_uri("embedded:nope.jsonl")

    calls = []

    def fake_download(uri, dest_dir):
        calls.append((uri, dest_dir))
        return str(assets / "arith" / "sft.jsonl")

    monkeypatch.setitem(sys.modules, "rlhf.io.s3", types.SimpleNamespace(download=fake_download))
    rows = load_rows("s3://bucket/data/sft.jsonl")
    assert calls == [("s3://bucket/data/sft.jsonl", str(sources.Path.home() / ".cache/rlhf/s3/bucket/data/sft.jsonl"))]
    assert rows[0]["__where__"] == "s3://bucket/data/sft.jsonl:1"  # errors name the URI, not the cache
    assert resolve_uri("s3://b/k/", cache_dir=str(tmp_path)) and calls[-1][1] == str(tmp_path / "b" / "k")
    assert resolve_uri("org/name") == "org/name"


def test_hub_failure_is_a_user_error(monkeypatch):
    import datasets

    def fail(name, split):
        raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(
        UserError,
        match=r"^someorg/nothing: is not a local file/folder and could not be loaded from the hub: .*doesn't "
        r"exist",
    ):
        load_rows("someorg/nothing")


# ----------------------------------------------------------------------------------------------
# Loader errors


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"input": "a", "output": "b"}\n{"input": "c", "output": "d"}\n{"input": "e", oops}\n')
    with pytest.raises(UserError, match=rf"^{path}:3: malformed JSON \(Expecting"):
        load_rows(str(path))


def test_empty_dataset_and_missing_path(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(UserError, match=rf"^{empty}: dataset is empty$"):
        load_rows(str(empty))
    with pytest.raises(UserError, match=r"^\./missing/train\.jsonl: no such file or directory$"):
        load_rows("./missing/train.jsonl")
    with pytest.raises(UserError, match=r"data/nothere\.parquet: no such file or directory"):
        load_rows("data/nothere.parquet")


# ----------------------------------------------------------------------------------------------
# Mixing and hold-out


def test_mixture_follows_probs_and_is_deterministic(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"input": f"a{i}", "output": "x"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"input": f"b{i}", "output": "x"} for i in range(100)])
    mixed = load_mixture(f"{a},{b}", "0.75,0.25", "train", max_samples=40, seed=1)
    from_a = [r["input"] for r in mixed if r["input"].startswith("a")]
    from_b = [r["input"] for r in mixed if r["input"].startswith("b")]
    # 40 rows: 30 from a (10 rows, each exactly 3 times: oversampled), 10 from b (a subset).
    assert len(mixed) == 40 and len(from_a) == 30 and len(from_b) == 10
    assert sorted(set(from_a)) == sorted(f"a{i}" for i in range(10)) and all(from_a.count(x) == 3 for x in from_a)
    assert len(set(from_b)) == 10
    assert mixed == load_mixture(f"{a},{b}", "0.75,0.25", "train", max_samples=40, seed=1)
    assert mixed != load_mixture(f"{a},{b}", "0.75,0.25", "train", max_samples=40, seed=2)
    assert all(r["__where__"].startswith((a, b)) for r in mixed)
    # No probs, one source: every row once, in file order; max_samples caps the total.
    assert [r["input"] for r in load_mixture(a, None, "train", 100, 0)] == [f"a{i}" for i in range(10)]
    assert len(load_mixture(f"{a},{b}", None, "train", 7, 0)) == 7
    with pytest.raises(UserError, match="--dataset_probs has 1 values for 2 --dataset sources"):
        load_mixture(f"{a},{b}", "1", "train", 10, 0)


def test_holdout_split_is_deterministic_and_disjoint():
    rows = [{"i": i} for i in range(100)]
    train, held = holdout_split(rows, 0.1, seed=3)
    assert len(train) == 90 and len(held) == 10
    assert sorted(r["i"] for r in train + held) == list(range(100))
    assert (train, held) == holdout_split(rows, 0.1, seed=3)
    assert held != holdout_split(rows, 0.1, seed=4)[1]
    assert holdout_split(rows, 0.0, seed=3) == (rows, [])
    assert len(holdout_split(rows[:5], 0.01, seed=3)[1]) == 1  # a positive ratio holds out at least one row


# ----------------------------------------------------------------------------------------------
# SFT samples and loss masks


def test_prompt_response_mask_is_exactly_response_plus_eos(tok):
    cfg = DataConfig(input_template="User: {}\nAssistant: ")
    [s] = tokenize_sft([{"input": "2+3", "output": "5", "__where__": "x:1"}], tok, cfg)
    assert text_of(tok, s.input_ids) == "User: 2+3\nAssistant: 5<|endoftext|>"
    assert masked_text(tok, s) == "5<|endoftext|>"
    assert s.loss_mask == [0] * len("User: 2+3\nAssistant: ") + [1, 1]


def test_prompt_response_with_chat_template(tok):
    cfg = DataConfig(apply_chat_template=True)
    [s] = tokenize_sft([{"input": "hi", "output": "yo"}], tok, cfg)
    assert text_of(tok, s.input_ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    assert masked_text(tok, s) == "yo<|im_end|>\n"


def test_multi_turn_chat_masks_every_assistant_turn(tok):
    cfg = DataConfig(input_key="messages", output_key=None, apply_chat_template=True)
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"},
        {"role": "assistant", "content": "A2"},
    ]
    [s] = tokenize_sft([{"messages": messages}], tok, cfg)
    assert masked_text(tok, s) == "A1<|im_end|>\nA2<|im_end|>\n"
    # The masked tokens are exactly the two contiguous assistant spans.
    full = text_of(tok, s.input_ids)
    spans = [i for i, m in enumerate(s.loss_mask) if m]
    first = len("".join(tok.convert_ids_to_tokens(s.input_ids[: spans[0]])))
    assert full[first:].startswith("A1<|im_end|>")
    # With default --output_key 'output' absent from the row, the whole chat is still used.
    [s2] = tokenize_sft([{"messages": messages}], tok, replace(cfg, output_key="output"))
    assert s2 == s
    # A row that also has 'output': the messages are context, only the output is a target.
    [s3] = tokenize_sft([{"messages": messages[:4], "output": "A2"}], tok, replace(cfg, output_key="output"))
    assert s3.input_ids == s.input_ids and masked_text(tok, s3) == "A2<|im_end|>\n"


def test_pretrain_chunks_cover_the_text(tok):
    cfg = DataConfig(pretrain_mode=True, input_key="text", max_len=10)
    text = string.ascii_lowercase[:25]
    samples = tokenize_sft([{"text": text}], tok, cfg)
    # 25 chars + eos = 26 tokens -> chunks of 10, 10, 6; loss on all but each chunk's first.
    assert [len(s) for s in samples] == [10, 10, 6]
    assert text_of(tok, sum((s.input_ids for s in samples), [])) == text + "<|endoftext|>"
    assert all(s.loss_mask == [0] + [1] * (len(s) - 1) for s in samples)
    # 20 chars + eos = 21: the 1-token tail has no target and is not a sample.
    assert [len(s) for s in tokenize_sft([{"text": text[:20]}], tok, cfg)] == [10, 10]


def test_conditional_sft_writes_score_into_prompt(tok):
    cfg = DataConfig(score_key="score")
    [s] = tokenize_sft([{"input": "Q", "output": "A", "score": "0.84"}], tok, cfg)
    assert text_of(tok, s.input_ids) == "<rm_score>: 0.8\nQA<|endoftext|>"
    assert masked_text(tok, s) == "A<|endoftext|>"
    [c] = tokenize_sft([{"input": "Q", "output": "A", "score": 3}], tok, replace(cfg, apply_chat_template=True))
    assert text_of(tok, c.input_ids).startswith("<|im_start|>system\n<rm_score>: 3.0<|im_end|>\n<|im_start|>user\nQ")
    assert masked_text(tok, c) == "A<|im_end|>\n"
    with pytest.raises(UserError, match=r"^d\.jsonl:4: field 'score' must be a number, got str 'good'$"):
        tokenize_sft([{"input": "Q", "output": "A", "score": "good", "__where__": "d.jsonl:4"}], tok, cfg)


def test_truncation_cuts_drops_and_reports(tok, caplog):
    cfg = DataConfig(max_len=8)
    rows = [
        {"input": "ab", "output": "cdefghij", "__where__": "t:1"},  # 11 tokens -> cut to 8
        {"input": "abcdefgh", "output": "x", "__where__": "t:2"},  # prompt fills max_len -> dropped
    ]
    with caplog.at_level(logging.WARNING, logger="rlhf.data.sft"):
        [s] = tokenize_sft(rows, tok, cfg)
    assert text_of(tok, s.input_ids) == "abcdefgh" and s.loss_mask == [0, 0] + [1] * 6
    assert "dropped 1 of 2 samples" in caplog.text
    with pytest.raises(UserError, match="all 1 samples were dropped"):
        tokenize_sft(rows[1:], tok, cfg)
    with pytest.raises(UserError, match=r"^t:2: sample is 10 tokens, longer than --max_len 8"):
        tokenize_sft(rows[1:], tok, replace(cfg, truncate=False))


def test_bos_is_prepended_for_tokenizers_that_expect_it():
    tok = make_tokenizer(with_bos=True)
    [s] = tokenize_sft([{"input": "q", "output": "a"}], tok, DataConfig())
    assert text_of(tok, s.input_ids) == "<s>qa<|endoftext|>" and s.loss_mask == [0, 0, 1, 1]


def test_template_that_writes_bos_gets_no_second_bos():
    # Llama-3 style: the template itself starts with the BOS token.
    template = "{{ bos_token }}" + CHATML.replace("<|im_end|>\n", "<|im_end|>")
    tok = make_tokenizer(chat_template=template, with_bos=True)
    [s] = tokenize_sft([{"input": "q", "output": "a"}], tok, DataConfig(apply_chat_template=True))
    assert text_of(tok, s.input_ids) == "<s><|im_start|>user\nq<|im_end|><|im_start|>assistant\na<|im_end|>"
    assert masked_text(tok, s) == "a<|im_end|>"


# ----------------------------------------------------------------------------------------------
# SFT errors


def test_row_errors_name_the_row(tok):
    cfg = DataConfig()
    with pytest.raises(UserError, match=r"^x\.jsonl:2: field 'output' is missing \(set --output_key; the row has: input, answer\)$"):
        tokenize_sft([{"input": "q", "answer": "a", "__where__": "x.jsonl:2"}], tok, cfg)
    with pytest.raises(UserError, match=r"^x\.jsonl:5: field 'input' must be a string, got int 3$"):
        tokenize_sft([{"input": 3, "output": "a", "__where__": "x.jsonl:5"}], tok, cfg)
    with pytest.raises(UserError, match=r"^x\.jsonl:6: field 'output' is empty$"):
        tokenize_sft([{"input": "q", "output": " ", "__where__": "x.jsonl:6"}], tok, cfg)
    with pytest.raises(UserError, match=r"^x\.jsonl:7: field 'messages' holds chat messages; add --apply_chat_template$"):
        tokenize_sft([{"messages": [{"role": "user", "content": "hi"}], "__where__": "x.jsonl:7"}], tok, replace(cfg, input_key="messages"))


def test_missing_key_from_a_loaded_file_names_file_and_line(tmp_path, tok):
    path = tmp_path / "data.jsonl"
    write_jsonl(path, [{"input": "q", "output": "a"}, {"input": "q"}])
    with pytest.raises(UserError, match=rf"^{path}:2: field 'output' is missing"):
        tokenize_sft(load_rows(str(path)), tok, DataConfig())


def test_no_chat_template_names_flag_and_model():
    tok = make_tokenizer(chat_template=None)
    with pytest.raises(UserError, match=r"^--apply_chat_template: the tokenizer of test-char-tokenizer has no chat template"):
        tokenize_sft([{"input": "q", "output": "a"}], tok, DataConfig(apply_chat_template=True))
    # --tokenizer_chat_template supplies one.
    [s] = tokenize_sft([{"input": "q", "output": "a"}], tok, DataConfig(apply_chat_template=True, tokenizer_chat_template=CHATML))
    assert masked_text(tok, s) == "a<|im_end|>\n"


def test_preprocess_fn_hook_and_its_errors(tmp_path, tok, monkeypatch):
    (tmp_path / "my_prep.py").write_text(
        "def to_sft(row):\n    if row['q'] == 'skip':\n        return None\n    return {'input': row['q'], 'output': row['a']}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = [{"q": "1+1", "a": "2", "__where__": "r:1"}, {"q": "skip", "a": "", "__where__": "r:2"}]
    [s] = tokenize_sft(rows, tok, DataConfig(preprocess_fn="my_prep:to_sft"))
    assert text_of(tok, s.input_ids) == "1+12<|endoftext|>"
    assert load_preprocess_fn(f"{tmp_path}/my_prep.py:to_sft")({"q": "x", "a": "y"}) == {"input": "x", "output": "y"}
    with pytest.raises(UserError, match=r"^--preprocess_fn no_such_mod_xyz:f: cannot import module 'no_such_mod_xyz'"):
        load_preprocess_fn("no_such_mod_xyz:f")
    with pytest.raises(UserError, match=r"^--preprocess_fn my_prep:nope: module 'my_prep' has no function 'nope'$"):
        load_preprocess_fn("my_prep:nope")
    with pytest.raises(UserError, match=r"must look like 'module:function'"):
        load_preprocess_fn("my_prep")


# ----------------------------------------------------------------------------------------------
# Collation and packing


def test_collate_padded_and_packed_layouts():
    a, b = Sample([5, 6, 7], [0, 1, 1]), Sample([8, 9], [0, 1])
    padded = collate_padded([a, b], pad_id=0)
    assert padded["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert padded["loss_mask"].tolist() == [[0, 1, 1], [0, 1, 0]]
    packed = collate_packed([a, b], pad_id=0, pad_to_multiple_of=4)
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert packed["loss_mask"].tolist() == [[0, 1, 1, 0, 1, 0, 0, 0]]
    assert packed["sample_ids"].tolist() == [[0, 0, 0, 1, 1, -1, -1, -1]]
    assert all(t.dtype == torch.long for t in (*padded.values(), *packed.values()))


def test_pack_into_micro_batches_first_fit():
    samples = [Sample([1] * n, [0] * n) for n in (5, 4, 3, 2, 6)]
    groups = pack_into_micro_batches(samples, max_tokens=8)
    assert [[len(s) for s in g] for g in groups] == [[5, 3], [4, 2], [6]]
    with pytest.raises(ValueError):
        pack_into_micro_batches(samples, max_tokens=5)


def per_sample_nll(logits, input_ids, loss_mask, sample_ids, n_samples):
    """Summed NLL of each sample's loss-masked tokens; logits[:, t] predict input_ids[:, t+1]."""
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)  # [B, T-1, V]
    nll = -logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # [B, T-1]
    mask = loss_mask[:, 1:].bool()  # [B, T-1]; a sample's first token is never a target
    out = torch.zeros(n_samples, dtype=torch.float64)
    return out.index_add_(0, sample_ids[:, 1:][mask], nll[mask])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_loss_equals_padded_loss(tok, attn):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    rows = [
        {"messages": [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}]},
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello there"},
                {"role": "user", "content": "and?"},
                {"role": "assistant", "content": "bye"},
            ]
        },
        {"messages": [{"role": "user", "content": "count"}, {"role": "assistant", "content": "1 2 3 4 5 6"}]},
    ]
    cfg = DataConfig(input_key="messages", output_key=None, apply_chat_template=True)
    samples = tokenize_sft(rows, tok, cfg)
    assert len({len(s) for s in samples}) == 3  # different lengths, so padding really happens

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,  # larger than default so attention leaking across samples shows clearly
    )
    config._attn_implementation = attn
    model = Qwen2ForCausalLM(config).float().eval()

    with torch.no_grad():
        padded = collate_padded(samples, pad_id=tok.pad_token_id)
        logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False).logits
        rows_of = torch.arange(len(samples)).unsqueeze(1).expand_as(padded["input_ids"])  # [B, T]
        nll_padded = per_sample_nll(logits, padded["input_ids"], padded["loss_mask"], rows_of, len(samples))

        packed = collate_packed(samples, pad_id=tok.pad_token_id, pad_to_multiple_of=16)
        assert packed["input_ids"].shape[1] % 16 == 0 and (packed["sample_ids"] == -1).any()
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], attention_mask=None, use_cache=False).logits
        nll_packed = per_sample_nll(logits, packed["input_ids"], packed["loss_mask"], packed["sample_ids"], len(samples))

        # Same tokens, one causal row, positions NOT restarting: samples 2 and 3 now see earlier samples.
        plain_positions = torch.arange(packed["input_ids"].shape[1]).unsqueeze(0)
        logits = model(input_ids=packed["input_ids"], position_ids=plain_positions, attention_mask=None, use_cache=False).logits
        nll_leaky = per_sample_nll(logits, packed["input_ids"], packed["loss_mask"], packed["sample_ids"], len(samples))

    assert (nll_padded > 0).all()
    torch.testing.assert_close(nll_packed, nll_padded, rtol=0, atol=1e-5)
    assert torch.allclose(nll_leaky[0], nll_padded[0], atol=1e-5)  # the first sample sees nothing extra
    assert (nll_leaky[1:] - nll_padded[1:]).abs().min() > 1e-3
