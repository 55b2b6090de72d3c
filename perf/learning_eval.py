"""The one held-out evaluation both sides of perf/learning_side_by_side.py are measured with.

Plain torch + transformers (no rlhf, no TRL import), so it runs the same in the main environment
and in perf/.venv-trl. A model is evaluated from a folder (an HF export or a TRL checkpoint) or
from a state dict (our DeepSpeed checkpoints), always in fp32 on the CPU.

* GRPO: greedy accuracy. Each prompt's raw text (no chat template, no BOS: the tokenizer's ids of
  the text) is continued greedily for up to ``max_new_tokens`` tokens, stopping at EOS; the
  decoded completion, stripped, must equal the label exactly (the training reward).
* DPO: implicit-reward preference accuracy. For each pair, the summed log-prob of the response
  tokens (response text + EOS, given the prompt) under the policy minus under the reference;
  a pair counts as right when the chosen side's log-ratio is larger than the rejected side's
  (ties count as wrong).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def text_ids(tokenizer, text: str) -> list[int]:
    """The ids of raw text, nothing added (what both trainers feed for these plain prompts)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def load_model(folder: str, state_dict: Optional[dict] = None):
    """An fp32 causal LM in eval mode from ``folder``; ``state_dict`` (full weights) replaces its weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if state_dict is not None:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        if set(missing) - tied or unexpected:
            raise RuntimeError(
                f"checkpoint does not match {folder}: missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}"
            )
        model.tie_weights()
    return model.eval()


@torch.no_grad()
def greedy_accuracy(model, tokenizer, rows: list[dict], max_new_tokens: int, input_key: str = "input", label_key: str = "label") -> float:
    """Share of ``rows`` whose greedy completion, stripped, equals the label.

    Prompts are batched by token length, so no batch is padded (identical to one prompt at a time).
    """
    by_len: dict[int, list[tuple[list[int], str]]] = defaultdict(list)
    for row in rows:
        ids = text_ids(tokenizer, row[input_key])
        by_len[len(ids)].append((ids, str(row[label_key])))
    eos = tokenizer.eos_token_id
    right = 0
    for _, items in sorted(by_len.items()):
        ids = torch.tensor([i for i, _ in items])  # [B, P]
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
            temperature=None,
            top_p=None,
            top_k=None,
        )
        for row_ids, (_, label) in zip(out[:, ids.size(1) :].tolist(), items):
            completion = row_ids[: row_ids.index(eos)] if eos in row_ids else row_ids
            right += tokenizer.decode(completion, skip_special_tokens=True).strip() == label.strip()
    return right / len(rows)


@torch.no_grad()
def response_logps(model, tokenizer, prompts: list[str], responses: list[str], micro_batch: int = 64) -> torch.Tensor:
    """[N] summed log-probs of ``response`` + EOS given ``prompt`` (ids of the texts, nothing else added)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    out = []
    for start in range(0, len(prompts), micro_batch):
        seqs, masks = [], []
        for prompt, response in zip(prompts[start : start + micro_batch], responses[start : start + micro_batch]):
            p, r = text_ids(tokenizer, prompt), text_ids(tokenizer, response) + [eos]
            seqs.append(p + r)
            masks.append([0] * len(p) + [1] * len(r))
        width = max(map(len, seqs))
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])  # [B, T], right-padded
        attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        mask = torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.float32)
        logits = model(input_ids=ids, attention_mask=attention).logits.float()  # [B, T, V]
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # [B, T-1]: token t+1 given <= t
        out.append((logp * mask[:, 1:]).sum(-1))
    return torch.cat(out)


def preference_logps(model, tokenizer, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    prompts = [r["prompt"] for r in rows]
    return response_logps(model, tokenizer, prompts, [r["chosen"] for r in rows]), response_logps(
        model, tokenizer, prompts, [r["rejected"] for r in rows]
    )


def preference_accuracy(model, reference_logps: tuple[torch.Tensor, torch.Tensor], tokenizer, rows: list[dict]) -> float:
    """Share of pairs where log pi/pi_ref of the chosen response beats the rejected one's."""
    chosen, rejected = preference_logps(model, tokenizer, rows)
    ref_chosen, ref_rejected = reference_logps
    return ((chosen - ref_chosen) > (rejected - ref_rejected)).float().mean().item()
