"""Fixtures in the shapes of real post-training data and real tokenizer families, built locally.

Nothing here comes from a hub: the rows are written by this module in the exact field names and
nesting of the public datasets users point the trainers at, and the tokenizers are trained here
with the ``tokenizers`` library, each saved with a tiny random model as an ordinary HF folder
(``--pretrain FOLDER``). The shapes (one writer per dataset):

* Anthropic HH-RLHF: ``{chosen, rejected}``, whole dialogues "\\n\\nHuman: ...\\n\\nAssistant: ...";
* UltraFeedback-binarized: ``{prompt, prompt_id, chosen, rejected, messages, score_chosen,
  score_rejected}`` with message lists, as jsonl and as the hub snapshot's parquet layout
  (``data/train_prefs-00000-of-00001.parquet`` and the other five splits);
* OpenOrca: ``{id, system_prompt, question, response}``;
* alpaca: ``{instruction, input, output}`` with a non-empty ``input``;
* chat SFT: ``{messages}`` with system turns and several user/assistant turns;
* KTO-mix: ``{prompt: [user msg], completion: [assistant msg], label: bool}``;
* OpenRLHF prompt-collection: ``{dataset, context, context_messages, id}``;
* GSM8K: ``{question, answer}`` with answers ending in ``#### N``, and a verifiable reward file;
  the same problems as chat prompts in the prompt-collection layout, with the answer as label.

The tokenizer families differ where real ones trip trainers up:

* Qwen2-like: byte-level BPE with merges, no BOS, ``<|endoftext|>`` pad, ``<|im_end|>`` EOS,
  ChatML with a default system message, embedding matrix padded well past the tokenizer;
* Llama-3-like: BOS ``<|begin_of_text|>`` added by the tokenizer's post-processor AND written by
  the chat template (the double-BOS trap), no pad token, ``<|end_of_text|>`` as the tokenizer's
  EOS but ``<|eot_id|>`` ending every chat turn, both listed as EOS in ``generation_config.json``
  (as the first Llama-3-Instruct release shipped them), a template that trims message contents.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# Qwen2's own split regex (transformers rebuilds Qwen2 tokenizers with it, see rlhf.models.tiny).
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT_REGEX

# ----------------------------------------------------------------------------------------------
# Rows. Short, but with the real field names, nesting and quirks (multi-turn, system turns,
# non-ASCII text, trailing spaces a template may trim).

QA = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Name a primary colour.", "Red is a primary colour."),
    ("Übersetze 'Katze' ins Englische.", "'Katze' heißt auf Englisch 'cat'."),
    ("用一句话介绍北京。", "北京是中国的首都。"),
    ("Give me an emoji for joy.", "Here you go: 😀"),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("¿Cuál es el plural de 'luz'?", "El plural de 'luz' es 'luces'."),
    ("What do bees make?", "Bees make honey."),
]
WRONG = [
    "I do not know.",
    "Blue, probably, or maybe not.",
    "Das weiß ich nicht.",
    "不知道。",
    "No.",
    "Six, I think.",
    "No lo sé.",
    "Bees make milk.",
]
SYSTEM = "You are a concise assistant. Réponds brièvement."


def _pairs(n: int) -> Iterable[tuple[str, str, str]]:
    for i in range(n):
        q, good = QA[i % len(QA)]
        yield q, good, WRONG[i % len(WRONG)]


def hh_rlhf_rows(n: int = 8) -> list[dict]:
    """Anthropic/hh-rlhf: two whole dialogues that share everything up to the last Assistant turn."""
    rows = []
    for i, (q, good, bad) in enumerate(_pairs(n)):
        history = f"\n\nHuman: Hi there!\n\nAssistant: Hello! How can I help?\n\nHuman: {q}" if i % 2 else f"\n\nHuman: {q}"
        rows.append({"chosen": f"{history}\n\nAssistant: {good}", "rejected": f"{history}\n\nAssistant: {bad}"})
    return rows


def ultrafeedback_rows(n: int = 8) -> list[dict]:
    """HuggingFaceH4/ultrafeedback_binarized: the whole conversation on each side."""
    rows = []
    for i, (q, good, bad) in enumerate(_pairs(n)):
        user = {"content": q, "role": "user"}
        chosen = [user, {"content": good, "role": "assistant"}]
        rows.append(
            {
                "prompt": q,
                "prompt_id": f"{i:064x}",
                "chosen": chosen,
                "rejected": [user, {"content": bad, "role": "assistant"}],
                "messages": chosen,
                "score_chosen": 8.5 - (i % 3),
                "score_rejected": 3.0 + (i % 2) * 0.5,
            }
        )
    return rows


def openorca_rows(n: int = 8) -> list[dict]:
    """Open-Orca/OpenOrca: a system prompt (sometimes empty), a question and a response."""
    return [
        {"id": f"flan.{1000 + i}", "system_prompt": SYSTEM if i % 2 else "", "question": q, "response": good}
        for i, (q, good, _) in enumerate(_pairs(n))
    ]


def alpaca_rows(n: int = 8) -> list[dict]:
    """tatsu-lab/alpaca: an instruction and a non-empty input (the prompt is both together)."""
    instructions = ("Answer the question below.", "Answer in one sentence.", "Réponds à la question.")
    return [{"instruction": instructions[i % 3], "input": q, "output": good} for i, (q, good, _) in enumerate(_pairs(n))]


def chat_rows(n: int = 8) -> list[dict]:
    """Multi-turn chats with a system turn: the shape of HuggingFaceH4/ultrachat_200k-style `messages`."""
    rows = []
    for i, (q, good, _) in enumerate(_pairs(n)):
        q2, good2 = QA[(i + 3) % len(QA)]
        messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": q},
            {"role": "assistant", "content": good},
            {"role": "user", "content": q2},
            {"role": "assistant", "content": good2},
        ]
        rows.append({"messages": messages if i % 3 else messages[1:]})  # some rows have no system turn
    return rows


def kto_mix_rows(n: int = 8) -> list[dict]:
    """trl-lib/kto-mix-14k: a one-message prompt list, a one-message completion list, a bool label."""
    rows = []
    for i, (q, good, bad) in enumerate(_pairs(n)):
        desirable = i % 2 == 0
        rows.append(
            {
                "prompt": [{"content": q, "role": "user"}],
                "completion": [{"content": good if desirable else bad, "role": "assistant"}],
                "label": desirable,
            }
        )
    return rows


def prompt_collection_rows(n: int = 8) -> list[dict]:
    """OpenRLHF/prompt-collection-v0.1: the prompt as text and as a messages list."""
    return [
        {"dataset": "fixture", "context": q, "context_messages": [{"content": q, "role": "user"}], "id": i}
        for i, (q, _, _) in enumerate(_pairs(n))
    ]


def gsm8k_rows(n: int = 8) -> list[dict]:
    """openai/gsm8k (main): a word problem; the answer's reasoning ends with '#### N'."""
    rows = []
    for i in range(n):
        a, b = 3 + i, 4 + 2 * i
        rows.append(
            {
                "question": f"Mia has {a} apples and buys {b} more. How many apples does she have now?",
                "answer": f"Mia starts with {a} apples.\nShe buys {b} more, so she has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### "
                f"{a + b}",
            }
        )
    return rows


def gsm8k_messages_rows(n: int = 8) -> list[dict]:
    """GSM8K as chat prompts with their reference answers: the prompt-collection layout
    (``context_messages``, a system turn on every other row) plus GSM8K's ``answer``."""
    rows = []
    for i, row in enumerate(gsm8k_rows(n)):
        user = {"content": row["question"], "role": "user"}
        messages = [{"content": "Solve the problem. Antworte kurz.", "role": "system"}, user] if i % 2 else [user]
        rows.append({"dataset": "gsm8k", "context_messages": messages, "answer": row["answer"], "id": i})
    return rows


# A verifiable GSM8K reward: the last number in the response against the number after '####' in
# the label. It also appends every call's inputs to $RLHF_REWARD_LOG (when set), so tests can
# check exactly what the trainer handed it.
GSM8K_REWARD = """\
import json
import os
import re


def final_number(text):
    found = re.findall(r"-?\\d+(?:\\.\\d+)?", text.replace(",", ""))
    return found[-1] if found else None


def reward(prompts, responses, labels):
    if os.environ.get("RLHF_REWARD_LOG"):
        # one file per rank: ranks call the function concurrently
        with open(os.environ["RLHF_REWARD_LOG"] + "." + os.environ.get("RANK", "0"), "a", encoding="utf-8") as f:
            f.write(json.dumps({"rank": os.environ.get("RANK"), "prompts": prompts, "responses": responses, "labels": labels}, ensure_ascii=False) + "\\n")
    rewards = []
    for response, label in zip(responses, labels):
        if label is None:  # prompts without a reference answer (prompt-collection)
            rewards.append(0.0)
            continue
        want = label.split("####")[-1].strip()
        rewards.append(1.0 if final_number(response) == want else 0.0)
    return rewards
"""


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def write_ultrafeedback_snapshot(root: Path, n: int = 8) -> Path:
    """The hub snapshot's layout of HuggingFaceH4/ultrafeedback_binarized: one parquet shard per split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = ultrafeedback_rows(n)
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split in ("train_prefs", "test_prefs", "train_sft", "test_sft", "train_gen", "test_gen"):
        part = rows if split.startswith("train") else rows[: max(2, n // 4)]
        pq.write_table(pa.Table.from_pylist(part), root / "data" / f"{split}-00000-of-00001.parquet")
    return root


def write_datasets(root: Path) -> dict[str, Path]:
    """Every dataset shape under ``root``; returns name -> path (the snapshot is a folder)."""
    root.mkdir(parents=True, exist_ok=True)
    paths = {
        "hh_rlhf": write_jsonl(root / "hh_rlhf.jsonl", hh_rlhf_rows()),
        "ultrafeedback": write_jsonl(root / "ultrafeedback.jsonl", ultrafeedback_rows()),
        "ultrafeedback_snapshot": write_ultrafeedback_snapshot(root / "ultrafeedback_binarized"),
        "openorca": write_jsonl(root / "openorca.jsonl", openorca_rows()),
        "alpaca": write_jsonl(root / "alpaca.jsonl", alpaca_rows()),
        "chat": write_jsonl(root / "chat.jsonl", chat_rows()),
        "kto_mix": write_jsonl(root / "kto_mix.jsonl", kto_mix_rows()),
        "prompt_collection": write_jsonl(root / "prompt_collection.jsonl", prompt_collection_rows()),
        "gsm8k": write_jsonl(root / "gsm8k.jsonl", gsm8k_rows()),
        "gsm8k_messages": write_jsonl(root / "gsm8k_messages.jsonl", gsm8k_messages_rows()),
    }
    reward = root / "gsm8k_reward.py"
    reward.write_text(GSM8K_REWARD, encoding="utf-8")
    paths["gsm8k_reward"] = reward
    return paths


def corpus() -> list[str]:
    """The text the tokenizers are trained on: every string the fixtures contain."""
    texts: list[str] = [SYSTEM, *WRONG, *(t for pair in QA for t in pair)]
    for rows in (hh_rlhf_rows(), openorca_rows(), alpaca_rows(), gsm8k_rows()):
        texts += [v for row in rows for v in row.values() if isinstance(v, str)]
    return texts


# ----------------------------------------------------------------------------------------------
# Tokenizer families

QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# ChatML with a default system message when the conversation has none, as Qwen2.5 writes it.
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

LLAMA_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
# Llama-3's turn layout: BOS once, a header per turn, contents trimmed, <|eot_id|> after each.
LLAMA_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + (m['content'] | trim) + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
# Llama-3's split regex (contractions, letters, 1-3 digit groups, punctuation runs, whitespace).
LLAMA_SPLIT_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def _train_bpe(specials: tuple[str, ...], split_regex: str, vocab_size: int) -> Tokenizer:
    """A byte-level BPE with real merges, trained on the fixture corpus (specials get ids 0..k-1)."""
    backend = Tokenizer(models.BPE(unk_token=None, byte_fallback=False, fuse_unk=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split_regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(corpus() * 3, trainer=trainer)
    return backend


def qwen2_like_tokenizer():
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(QWEN_SPECIALS, QWEN2_SPLIT_REGEX, 600),
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        padding_side="right",
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def llama3_like_tokenizer():
    from transformers import PreTrainedTokenizerFast

    backend = _train_bpe(LLAMA_SPECIALS, LLAMA_SPLIT_REGEX, 600)
    bos = "<|begin_of_text|>"
    # Llama-3's tokenizer.json prepends BOS in its post-processor: encode(add_special_tokens=True) starts with it.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token="<|end_of_text|>",
        pad_token=None,
        additional_special_tokens=list(LLAMA_SPECIALS[2:]),
        padding_side="right",
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = LLAMA_CHAT_TEMPLATE
    return tok


def _tiny_model(config_cls, seed: int, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    # head_dim 32: vLLM's CPU attention kernels have none for 16.
    config = config_cls(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        initializer_range=0.02,
        **kw,
    )
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def build_qwen2_like(out: Path) -> Path:
    """A Qwen2-like HF folder: the embedding matrix has 128 rows more than the tokenizer has tokens."""
    from transformers import GenerationConfig, Qwen2Config

    tok = qwen2_like_tokenizer()
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    model = _tiny_model(
        Qwen2Config, 1, vocab_size=len(tok) + 128, tie_word_embeddings=True, bos_token_id=None, eos_token_id=eos, pad_token_id=pad
    )
    model.generation_config = GenerationConfig(bos_token_id=None, eos_token_id=[eos, pad], pad_token_id=pad)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_llama3_like(out: Path) -> Path:
    """A Llama-3-like HF folder: vocab exactly the tokenizer's, untied head, no pad token anywhere."""
    from transformers import GenerationConfig, LlamaConfig

    tok = llama3_like_tokenizer()
    bos, eos, eot = (tok.convert_tokens_to_ids(t) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"))
    model = _tiny_model(
        LlamaConfig,
        2,
        vocab_size=len(tok),
        tie_word_embeddings=False,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=None,
        rope_theta=500000.0,
    )
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=[eos, eot])
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


FAMILIES = {"qwen2": build_qwen2_like, "llama3": build_llama3_like}


def build_family(name: str, out: Path) -> Path:
    return FAMILIES[name](out)


def teach_chat(folder: Path, steps: int = 80, seed: int = 0) -> Path:
    """Train the tiny model in ``folder`` (in place) on its own template's renderings of the
    fixture chats, so it answers in the chat format and, above all, ends its turns with the
    template's end token. A random model almost never emits that one token, and RL tests need a
    policy that does, as users start RL from a chat-tuned model. Plain PyTorch, a few seconds."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in QA]
    for row in gsm8k_rows(16):
        chats.append(
            [
                {"role": "user", "content": row["question"]},
                {"role": "assistant", "content": "The answer is " + row["answer"].split("#### ")[-1]},
            ]
        )
    ids = [tok.encode(tok.apply_chat_template(c, tokenize=False), add_special_tokens=False) for c in chats]
    width = max(len(x) for x in ids)
    batch = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for i, x in enumerate(ids):
        batch[i, : len(x)], mask[i, : len(x)] = torch.tensor(x), 1
    labels = batch.masked_fill(mask == 0, -100)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=batch, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(folder)
    return folder
