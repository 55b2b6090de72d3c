"""Prompts for rollouts: token ids to generate from, the text a reward function sees, a label."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlhf.config import PromptDataConfig
from rlhf.data.sft import _chat_template, _field, _fill_input_template, _messages, _render, _text_field, bos_to_prepend, encode_rendered
from rlhf.data.sources import WHERE_KEY, load_mixture
from rlhf.errors import UserError


@dataclass
class Prompt:
    ids: list[int]  # what the policy continues (chat-rendered with the generation prompt if asked)
    text: str  # the rendered prompt text, as reward functions receive it
    label: Any  # the row's --label_key value (reference answer), None without one
    input: Any = None  # the row's --input_key value as given (text or messages)
    row: Any = None  # the whole row (batch inference copies it to its output)


def tokenize_prompts(rows: list[dict], tokenizer, cfg: PromptDataConfig) -> list[Prompt]:
    template = _chat_template(tokenizer, cfg) if cfg.apply_chat_template else None  # type: ignore[arg-type]
    prompts = []
    for row in rows:
        where = row.get(WHERE_KEY, "row")
        value = _field(row, cfg.input_key, where, "--input_key")
        if template is not None:
            messages = [{"role": "user", "content": value}] if isinstance(value, str) else _messages(value, cfg.input_key, where)
            if cfg.input_template and isinstance(value, str):
                messages[0]["content"] = _fill_input_template(cfg.input_template, value, row, where)
            text = _render(tokenizer, messages, template, generation_prompt=True, where=where)
        else:
            text = _text_field(row, cfg.input_key, where, "--input_key", allow_empty=False)
            if cfg.input_template:
                text = _fill_input_template(cfg.input_template, text, row, where)
        ids = _keep_end(encode_rendered(tokenizer, text), cfg.prompt_max_len, bos_to_prepend(tokenizer))
        label = _field(row, cfg.label_key, where, "--label_key") if cfg.label_key else None
        prompts.append(Prompt(ids=ids, text=text, label=label, input=value, row={k: v for k, v in row.items() if k != WHERE_KEY}))
    if not prompts:
        raise UserError(f"--prompt_data {cfg.prompt_data}: no prompts")
    return prompts


def _keep_end(ids: list[int], max_len: int, bos_id) -> list[int]:
    """Left-truncate to ``max_len`` tokens: the end holds the question and the generation prompt.
    A model that expects BOS keeps it in front (Llama-style models degrade without it)."""
    if len(ids) <= max_len:
        return ids
    if bos_id is not None and ids[0] == bos_id and max_len > 1:
        return [bos_id] + ids[len(ids) - max_len + 1 :]
    return ids[-max_len:]


def load_prompts(source: str, probs, tokenizer, cfg: PromptDataConfig, seed: int) -> list[Prompt]:
    return tokenize_prompts(load_mixture(source, probs, "train", cfg.max_samples, seed), tokenizer, cfg)
