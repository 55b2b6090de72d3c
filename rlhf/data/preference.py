"""Preference data: paired (reward model, DPO) and unpaired, labelled (KTO) rows -> samples.

Every sample here is an SFT ``Sample`` whose loss mask marks the response tokens (the response
text and its end-of-turn / eos token), exactly as ``rlhf.data.sft`` marks an SFT target. One
sample layout therefore serves every consumer: a reward model reads the hidden state at the
last token, DPO and KTO sum the log-probabilities of the masked tokens.

Paired row shapes (``PreferenceDataConfig`` names the keys):

* plain: ``{prompt: str, chosen: str, rejected: str}``; ``--input_template`` is applied to the
  prompt; without a chat template a side is prompt tokens + response tokens + eos, with
  ``--apply_chat_template`` the prompt is a user turn and the response the assistant turn;
* HH-RLHF (``--prompt_key None``): ``{chosen: "\\n\\nHuman: ...\\n\\nAssistant: ...", rejected: ...}``,
  two whole dialogues; the prompt is their shared beginning up to the last ``Assistant:`` turn
  (see ``split_shared_prompt``); a pair without that shared turn is an error;
* UltraFeedback-binarized (``--apply_chat_template``): ``{prompt: str, chosen: [messages],
  rejected: [messages]}`` where both lists hold the whole conversation; everything but the last
  message is the context (it must be the same on both sides), the last assistant message is
  the response; the ``prompt`` field is then not needed;
* messages lists holding only the assistant turn, with the prompt in ``prompt_key`` (a string,
  placed as a user message, or a messages list).

Unpaired (KTO) rows: ``{input_key: prompt, output_key: completion, label_key: true|false}``
with the prompt and completion as in SFT (strings, or messages lists with the chat template).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any, Optional

import torch

from rlhf.config import PreferenceDataConfig
from rlhf.data.sft import (
    Sample,
    TokenizeCounts,
    _chat_ids,
    _chat_template,
    _encode,
    _field,
    _fill_input_template,
    _messages,
    _sample,
    _sft_ids,
    _text_field,
    bos_to_prepend,
    collate_packed,
    collate_padded,
    preprocessed_rows,
)
from rlhf.data.sources import load_train_eval
from rlhf.errors import UserError, describe_value

logger = logging.getLogger(__name__)

# The turn marker of Anthropic's HH-RLHF dialogues; the response starts right after the last one.
HH_ASSISTANT_MARKER = "\n\nAssistant:"


@dataclass
class PairSample:
    """One preference pair: both sides share the prompt; ``margin`` is 0.0 without --margin_key."""

    chosen: Sample
    rejected: Sample
    margin: float


@dataclass
class UnpairedSample:
    """One KTO example. ``sample.input_ids[:prompt_len]`` is the prompt, the rest the completion
    (kept so that ``kto_mismatched_pairs`` can join one example's prompt to another's completion)."""

    sample: Sample
    desirable: bool
    prompt_len: int


# ----------------------------------------------------------------------------------------------
# Paired rows


def tokenize_pairs(rows: list[dict], tokenizer, cfg: PreferenceDataConfig) -> list[PairSample]:
    """Turn paired rows into ``PairSample``s (row shapes in the module docstring).

    Each side is cut to ``cfg.max_len`` on its own (``--truncate``, the default) or a too-long
    side is an error (``--no-truncate``); a pair where either side keeps no response token is
    dropped, since a comparison with one side missing teaches nothing. Counts are logged.
    """
    template = _chat_template(tokenizer, cfg) if cfg.apply_chat_template else None
    bos_id = bos_to_prepend(tokenizer)
    pairs: list[PairSample] = []
    counts = TokenizeCounts(len(rows))
    for where, row in preprocessed_rows(rows, cfg, counts):
        margin = _margin(row, where, cfg)
        sides = []
        for name, (ids, mask) in zip((cfg.chosen_key, cfg.rejected_key), _pair_ids(row, where, tokenizer, cfg, template)):
            if not any(mask):
                raise UserError(f"{where}: the chat template left no tokens of field {name!r} to train on")
            if bos_id is not None and ids[:1] != [bos_id]:
                ids, mask = [bos_id] + ids, [0] + mask
            sides.append((name, ids, mask))
        if any(len(ids) > cfg.max_len for _, ids, _ in sides):
            if not cfg.truncate:
                name, ids, _ = max(sides, key=lambda s: len(s[1]))
                raise UserError(
                    f"{where}: field {name!r} gives a sample of {len(ids)} tokens, longer than --max_len {cfg.max_len} "
                    "(raise --max_len, or drop --no-truncate to cut it)"
                )
            if not all(any(mask[: cfg.max_len]) for _, _, mask in sides):
                counts.dropped += 1  # the prompt fills max_len on at least one side
                continue
            sides = [(name, ids[: cfg.max_len], mask[: cfg.max_len]) for name, ids, mask in sides]
            counts.truncated += 1
        (_, c_ids, c_mask), (_, r_ids, r_mask) = sides
        pairs.append(PairSample(chosen=_sample(c_ids, c_mask), rejected=_sample(r_ids, r_mask), margin=margin))
    counts.report("pairs", len(pairs), cfg.max_len)
    return pairs


def load_pairs(data: PreferenceDataConfig, tokenizer, seed: int) -> tuple[list[PairSample], list[PairSample]]:
    """Training and eval pairs of a pairwise trainer (reward model, DPO): --dataset, and
    --eval_dataset or an --eval_holdout_ratio share of the training rows (``load_train_eval``)."""
    return load_train_eval(data, seed, lambda rows: tokenize_pairs(rows, tokenizer, data))


def _margin(row: dict, where: str, cfg: PreferenceDataConfig) -> float:
    if cfg.margin_key is None:
        return 0.0
    value = _field(row, cfg.margin_key, where, "--margin_key")
    try:
        if isinstance(value, bool):  # float(True) works, but a boolean margin is a wrong column
            raise ValueError
        margin = float(value)  # CSV cells arrive as strings such as "0.5"
    except (TypeError, ValueError):
        raise UserError(f"{where}: field {cfg.margin_key!r} must be a number, got {describe_value(value)}") from None
    if margin != margin or margin in (float("inf"), float("-inf")):
        raise UserError(f"{where}: field {cfg.margin_key!r} must be a finite number, got {value!r}")
    return margin


Ids = tuple[list[int], list[int]]


def _pair_ids(row: dict, where: str, tokenizer, cfg: PreferenceDataConfig, template: Optional[str]) -> tuple[Ids, Ids]:
    """(ids, mask) of the chosen and of the rejected side, before BOS and truncation."""
    chosen = _field(row, cfg.chosen_key, where, "--chosen_key")
    rejected = _field(row, cfg.rejected_key, where, "--rejected_key")
    if chosen == rejected:
        raise UserError(f"{where}: chosen and rejected are identical (fields {cfg.chosen_key!r} and {cfg.rejected_key!r})")
    if isinstance(chosen, list) or isinstance(rejected, list):
        return _chat_pair(row, where, tokenizer, cfg, template, chosen, rejected)

    c_text = _text_field(row, cfg.chosen_key, where, "--chosen_key", False)
    r_text = _text_field(row, cfg.rejected_key, where, "--rejected_key", False)
    if cfg.prompt_key is None:
        if template is not None:
            raise UserError(
                f"{where}: with --prompt_key None, fields {cfg.chosen_key!r} and {cfg.rejected_key!r} must hold messages "
                "lists for --apply_chat_template (whole texts have no turns to render)"
            )
        return _shared_prompt_pair(tokenizer, c_text, r_text, where, cfg)

    prompt = _field(row, cfg.prompt_key, where, "--prompt_key")
    if isinstance(prompt, list):
        if template is None:
            raise UserError(f"{where}: field {cfg.prompt_key!r} holds chat messages; add --apply_chat_template")
        context = _messages(prompt, cfg.prompt_key, where)
    else:
        prompt = _prompt_text(row, where, cfg)
        if template is None:
            # Prompt and response are encoded separately, as in SFT: at generation time the
            # prompt is tokenised alone, so training ids match what inference sees.
            eos = _eos_id(tokenizer)
            prompt_ids = _encode(tokenizer, prompt)
            return tuple(_join(prompt_ids, _encode(tokenizer, text) + [eos]) for text in (c_text, r_text))  # type: ignore[return-value]
        context = [{"role": "user", "content": prompt}]
    return tuple(  # type: ignore[return-value]
        _end_at_turn_end(
            tokenizer, *_chat_ids(tokenizer, context + [{"role": "assistant", "content": text}], [len(context)], template, where)
        )
        for text in (c_text, r_text)
    )


def _prompt_text(row: dict, where: str, cfg: PreferenceDataConfig) -> str:
    prompt = _text_field(row, cfg.prompt_key, where, "--prompt_key", True)
    return _fill_input_template(cfg.input_template, prompt, row, where) if cfg.input_template else prompt


def _join(prompt_ids: list[int], response_ids: list[int]) -> Ids:
    return prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise UserError(
            f"the tokenizer of {tokenizer.name_or_path} has no eos_token, so the model could not learn where a "
            "response ends; use --apply_chat_template"
        )
    return tokenizer.eos_token_id


def split_shared_prompt(chosen: str, rejected: str) -> Optional[int]:
    """Where the prompt ends in an HH-RLHF style pair of whole dialogues, or None.

    The prompt is the longest common prefix of the two texts, cut back to the end of the last
    ``"\\n\\nAssistant:"`` marker inside it: both answers often begin alike (" I", " Sure"), and
    that shared start belongs to the response, not to the prompt. The marker itself stays in the
    prompt because it is what a model is given before it generates. None when the common prefix
    holds no marker (the pair has no shared dialogue to answer).
    """
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    cut = chosen.rfind(HH_ASSISTANT_MARKER, 0, n)
    if cut < 0 or cut + len(HH_ASSISTANT_MARKER) > n:
        return None
    return cut + len(HH_ASSISTANT_MARKER)


def _shared_prompt_pair(tokenizer, chosen: str, rejected: str, where: str, cfg: PreferenceDataConfig) -> tuple[Ids, Ids]:
    eos = _eos_id(tokenizer)
    cut = split_shared_prompt(chosen, rejected)
    if cut is None:
        # Guessing a prompt from whatever the texts share would train on part of the question
        # (or score two answers to different questions): the row is not in HH-RLHF form.
        marker = HH_ASSISTANT_MARKER.strip()
        lacking = [key for key, text in ((cfg.chosen_key, chosen), (cfg.rejected_key, rejected)) if HH_ASSISTANT_MARKER not in text]
        if lacking:
            what = f"field {lacking[0]!r} has" if len(lacking) == 1 else f"fields {cfg.chosen_key!r} and {cfg.rejected_key!r} have"
            raise UserError(
                f"{where}: with --prompt_key None, {what} no '{marker}' turn, so the response cannot be told from the prompt "
                "(HH-RLHF form: '\\n\\nHuman: ...\\n\\nAssistant: ...'; else set --prompt_key)"
            )
        raise UserError(
            f"{where}: fields {cfg.chosen_key!r} and {cfg.rejected_key!r} differ before their last '{marker}' turn: a pair "
            "must answer the same dialogue"
        )
    prompt_ids = _encode(tokenizer, chosen[:cut])
    responses = [_encode(tokenizer, chosen[cut:]), _encode(tokenizer, rejected[cut:])]
    texts = [chosen[cut:], rejected[cut:]]
    for key, text in zip((cfg.chosen_key, cfg.rejected_key), texts):
        if not text.strip():
            raise UserError(f"{where}: field {key!r} has an empty response after the prompt both sides share")
    return _join(prompt_ids, responses[0] + [eos]), _join(prompt_ids, responses[1] + [eos])


def _chat_pair(
    row: dict, where: str, tokenizer, cfg: PreferenceDataConfig, template: Optional[str], chosen: Any, rejected: Any
) -> tuple[Ids, Ids]:
    """Both sides as messages lists: a shared context, then one assistant message each."""
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise UserError(f"{where}: fields {cfg.chosen_key!r} and {cfg.rejected_key!r} must both be texts or both be messages lists")
    if template is None:
        raise UserError(f"{where}: fields {cfg.chosen_key!r} and {cfg.rejected_key!r} hold chat messages; add --apply_chat_template")
    sides = [_messages(chosen, cfg.chosen_key, where), _messages(rejected, cfg.rejected_key, where)]
    for key, messages in zip((cfg.chosen_key, cfg.rejected_key), sides):
        if messages[-1]["role"] != "assistant":
            raise UserError(f"{where}: field {key!r} must end with an assistant message, got role {messages[-1]['role']!r}")
        if not messages[-1]["content"].strip():
            raise UserError(f"{where}: field {key!r} has an empty assistant response")
    context = sides[0][:-1]
    if context != sides[1][:-1]:
        # Different contexts would make the two log-probabilities incomparable.
        raise UserError(
            f"{where}: fields {cfg.chosen_key!r} and {cfg.rejected_key!r} must share the same conversation before "
            "their last (assistant) message"
        )
    if not context:
        # The lists hold only the answers; the prompt comes from its own field.
        if cfg.prompt_key is None:
            raise UserError(
                f"{where}: fields {cfg.chosen_key!r} and {cfg.rejected_key!r} hold only the assistant message; "
                "set --prompt_key to the field with the prompt"
            )
        prompt = _field(row, cfg.prompt_key, where, "--prompt_key")
        if isinstance(prompt, list):
            context = _messages(prompt, cfg.prompt_key, where)
        else:
            context = [{"role": "user", "content": _prompt_text(row, where, cfg)}]
    return tuple(  # type: ignore[return-value]
        _end_at_turn_end(tokenizer, *_chat_ids(tokenizer, context + messages[-1:], [len(context)], template, where)) for messages in sides
    )


def _end_at_turn_end(tokenizer, ids: list[int], mask: list[int]) -> Ids:
    """Cut a rendered pair side right after the response's last special token (its end of turn).

    Templates may write more after that token (ChatML's newline after ``<|im_end|>``), text a
    policy never generates: generation stops at the end token. A reward model reads its score at
    the last token, so it must be trained on sequences that end the way PPO's rollouts end, or it
    is trained at one position and read at another.
    """
    special = set(tokenizer.all_special_ids)
    last = next((t for t in range(len(ids) - 1, -1, -1) if mask[t] and ids[t] in special), None)
    if last is None:  # no end token in the response: nothing to line up with
        return ids, mask
    return ids[: last + 1], mask[: last + 1]


# ----------------------------------------------------------------------------------------------
# Unpaired (KTO) rows


def tokenize_unpaired(rows: list[dict], tokenizer, cfg: PreferenceDataConfig) -> list[UnpairedSample]:
    """Turn KTO rows (prompt in ``cfg.input_key``, completion in ``cfg.output_key``, a JSON
    boolean in ``cfg.label_key``) into ``UnpairedSample``s; masks and truncation as in SFT."""
    if cfg.output_key is None:
        raise UserError("--output_key must name the completion field for KTO data")
    template = _chat_template(tokenizer, cfg) if cfg.apply_chat_template else None
    bos_id = bos_to_prepend(tokenizer)
    samples: list[UnpairedSample] = []
    counts = TokenizeCounts(len(rows))
    for where, row in preprocessed_rows(rows, cfg, counts):
        label = _field(row, cfg.label_key, where, "--label_key")
        # Strict on purpose: 0/1 or "yes" columns are often scores or ratings, not labels, and
        # guessing their meaning would silently flip examples.
        if not isinstance(label, bool):
            raise UserError(f"{where}: field {cfg.label_key!r} must be true or false, got {describe_value(label)}")
        completion = _field(row, cfg.output_key, where, "--output_key")
        if isinstance(completion, list):
            text = "".join(m.get("content", "") for m in completion if isinstance(m, dict) and isinstance(m.get("content"), str))
            if not text.strip():
                raise UserError(f"{where}: field {cfg.output_key!r} is empty")
        ids, mask = _sft_ids(row, where, tokenizer, cfg, template)
        if not any(mask):
            raise UserError(f"{where}: the chat template left no tokens of field {cfg.output_key!r} to train on")
        prompt_len = mask.index(1)  # the completion starts at its first target token
        if bos_id is not None and ids[:1] != [bos_id]:
            ids, mask, prompt_len = [bos_id] + ids, [0] + mask, prompt_len + 1
        if len(ids) > cfg.max_len:
            if not cfg.truncate:
                raise UserError(
                    f"{where}: sample is {len(ids)} tokens, longer than --max_len {cfg.max_len} "
                    "(raise --max_len, or drop --no-truncate to cut it)"
                )
            if prompt_len >= cfg.max_len:
                counts.dropped += 1
                continue
            ids, mask = ids[: cfg.max_len], mask[: cfg.max_len]
            counts.truncated += 1
        samples.append(UnpairedSample(sample=_sample(ids, mask), desirable=label, prompt_len=prompt_len))
    counts.report("samples", len(samples), cfg.max_len)
    return samples


def warn_if_one_label_class(samples: list[UnpairedSample], cfg: PreferenceDataConfig) -> None:
    """Warn when every KTO training example has the same label: KTO then has nothing to contrast
    (only desirable: it just raises their likelihood against the KL anchor; only undesirable: it
    only pushes them down), which is almost always a wrong --label_key or a filtered dataset."""
    labels = {s.desirable for s in samples}
    if len(labels) == 1:
        value = "true (desirable)" if labels.pop() else "false (undesirable)"
        logger.warning(
            "KTO data %s: all %d training examples have --label_key %r %s; KTO learns from both classes, so check the labels",
            cfg.dataset,
            len(samples),
            cfg.label_key,
            value,
        )


def kto_mismatched_pairs(samples: list[UnpairedSample], seed: int, max_len: Optional[int] = None) -> list[Sample]:
    """The KL reference samples of KTO (Ethayarajh et al. 2024, arXiv 2402.01306, sec. 4.1).

    KTO estimates the reference point z0 = KL(policy || reference) from completions that do not
    answer their prompt: result ``i`` is the prompt of ``samples[i]`` followed by the completion
    of ``samples[perm[i]]``, where ``perm`` is a seeded random cyclic permutation (Sattolo's
    algorithm), so no example is ever joined to its own completion and the same seed gives the
    same pairs. The loss mask covers the borrowed completion (as it was masked in its own
    sample); the result is cut to ``max_len`` when given. The prompt of ``i`` is shorter than
    its own sample, so at least one completion token always survives the cut.
    """
    n = len(samples)
    if n < 2:
        raise UserError(f"KTO needs at least 2 examples to build its mismatched (KL) pairs, got {n}")
    perm = list(range(n))
    rng = random.Random(seed)
    for i in range(n - 1, 0, -1):  # Sattolo: swap only with an earlier index -> one n-cycle
        j = rng.randrange(i)
        perm[i], perm[j] = perm[j], perm[i]
    out = []
    for i, j in enumerate(perm):
        own, other = samples[i], samples[j]
        ids = own.sample.input_ids[: own.prompt_len] + other.sample.input_ids[other.prompt_len :]
        mask = [0] * own.prompt_len + other.sample.loss_mask[other.prompt_len :]
        if max_len is not None:
            ids, mask = ids[:max_len], mask[:max_len]
        out.append(_sample(ids, mask))
    return out


# ----------------------------------------------------------------------------------------------
# Batching


def collate_pairs(pairs: list[PairSample], pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch of both sides, so one forward pass scores a whole micro-batch.

    With ``B = len(pairs)``: ``input_ids``, ``attention_mask``, ``loss_mask`` [2B, T] (int64),
    rows ``0..B-1`` the chosen and ``B..2B-1`` the rejected sides, ``T`` the longest side; and
    ``margin`` [B] (float32).
    """
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    batch = collate_padded([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    batch["margin"] = torch.tensor([p.margin for p in pairs], dtype=torch.float32)  # [B]
    return batch


def collate_pairs_packed(pairs: list[PairSample], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Both sides of every pair packed into one row (see ``collate_packed``).

    With ``B = len(pairs)``: ``input_ids``, ``position_ids``, ``loss_mask``, ``sample_ids``
    [1, T] (int64), where ``sample_ids`` 0..B-1 are the chosen and B..2B-1 the rejected sides
    (-1 on padding); and ``margin`` [B] (float32).
    """
    if not pairs:
        raise ValueError("collate_pairs_packed needs at least one pair")
    batch = collate_packed([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, pad_to_multiple_of)
    batch["margin"] = torch.tensor([p.margin for p in pairs], dtype=torch.float32)  # [B]
    return batch
