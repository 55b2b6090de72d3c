"""SFT data: rows -> token ids with a loss mask -> padded or packed batches.

One row becomes one ``Sample`` (or several, for long pre-training texts). The loss mask marks
the tokens the model is trained to produce: ``loss_mask[t] == 1`` means token ``t`` is a target,
predicted from tokens ``< t`` of the same sample. Token 0 has nothing before it, so
``loss_mask[0]`` is always 0; packing relies on that, because in a packed row the logits at the
last token of one sample face the first token of the next, and that pair must never count.

Row shapes (``DataConfig`` names the keys):

* prompt/response: ``{input_key: str, output_key: str}``; loss on the response and the end token;
* chat: ``{input_key: [{"role", "content"}, ...]}`` with ``--apply_chat_template``; loss on every
  assistant turn (or, when the row also has ``output_key``, only on the turns given there);
* pre-training (``--pretrain_mode``): ``{input_key: str}``; loss on every token;
* conditional SFT (``--score_key``): any of the first two plus a numeric score that is written
  into the prompt with ``--score_template``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from rlhf.config import DataConfig
from rlhf.data.sources import WHERE_KEY
from rlhf.errors import UserError, describe_value

logger = logging.getLogger(__name__)

# Roles chat templates know (OpenAI's and the Llama-3 / Qwen templates' names). Anything else is
# almost always a dataset in another convention (ShareGPT's 'human' / 'gpt', 'bot'), which a
# template would render wrongly or silently skip.
CHAT_ROLES = ("system", "user", "assistant", "tool", "function", "ipython", "developer")


@dataclass
class Sample:
    """One training sequence: token ids and, per token, 1 if it is a loss target."""

    input_ids: list[int]
    loss_mask: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


# ----------------------------------------------------------------------------------------------
# The user's row hook


def load_preprocess_fn(spec: str) -> Callable[[dict], Optional[dict]]:
    """Import ``--preprocess_fn 'module:function'`` (or ``'path/to/file.py:function'``).

    This hook is how a dataset with its own layout is used without editing the data loader
    (OpenRLHF users edit ``openrlhf/datasets/*.py`` instead). The function receives one raw
    row as a dict and returns a dict with the configured keys (``--input_key``,
    ``--output_key``, ``--score_key``), or None to skip the row. Example::

        def to_sft(row):  # my_prep.py, used as --preprocess_fn my_prep:to_sft
            return {"input": row["question"], "output": row["answers"][0]}

    A module is imported from ``sys.path`` and, failing that, from the current directory.
    """
    return load_user_function(spec, "--preprocess_fn")


def load_user_function(spec: str, flag: str) -> Callable:
    """Import a user's ``'module:function'`` or ``'path/to/file.py:function'`` named by ``flag``."""
    module_name, sep, func_name = spec.rpartition(":")
    if not sep or not module_name or not func_name:
        raise UserError(f"{flag} must look like 'module:function', got {spec!r}")
    module = _import_user_module(module_name, spec, flag)
    fn = getattr(module, func_name, None)
    if fn is None:
        raise UserError(f"{flag} {spec}: module {module_name!r} has no function {func_name!r}")
    if not callable(fn):
        raise UserError(f"{flag} {spec}: {func_name!r} in {module_name!r} is not a function")
    return fn


def _import_user_module(module_name: str, spec: str, flag: str):
    try:
        if module_name.endswith(".py"):
            file = Path(module_name).expanduser()
            if not file.is_file():
                raise UserError(f"{flag} {spec}: no such file {module_name}")
            loader_spec = importlib.util.spec_from_file_location(f"_rlhf_user_{file.stem}", file)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
            return module
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            # torchrun and console scripts do not put the working directory on sys.path, but
            # that is where a user's preprocessing module usually sits.
            if err.name != module_name.split(".")[0] or os.getcwd() in sys.path:
                raise
            sys.path.append(os.getcwd())
            return importlib.import_module(module_name)
    except UserError:
        raise
    except ModuleNotFoundError as err:
        raise UserError(f"{flag} {spec}: cannot import module {module_name!r} ({err})") from None
    except Exception as err:  # noqa: BLE001 - any failure while running the user's module body
        raise UserError(f"{flag} {spec}: importing {module_name!r} failed ({type(err).__name__}: {err})") from None


def _preprocess(fn: Callable, row: dict, where: str, spec: str) -> Optional[dict]:
    """Run the user's hook on a row without our bookkeeping key, then put the key back."""
    clean = {k: v for k, v in row.items() if k != WHERE_KEY}
    try:
        out = fn(clean)
    except Exception as err:
        # Keep the traceback (the bug is in the user's code) but say which row triggered it.
        err.add_note(f"raised by --preprocess_fn {spec} on {where}")
        raise
    if out is None:
        return None
    if not isinstance(out, dict):
        raise UserError(f"{where}: --preprocess_fn {spec} returned {describe_value(out)}, expected a dict (or None to skip)")
    return {**out, WHERE_KEY: where}


# ----------------------------------------------------------------------------------------------
# Tokenising


def bos_to_prepend(tokenizer) -> Optional[int]:
    """The BOS id this model expects at the start of every sequence, or None.

    A tokenizer "expects" BOS when its own ``add_special_tokens=True`` encoding starts with it
    (Llama, Gemma, Mistral). Tokenizers that name a bos_token but never add it (GPT-2 reuses
    its eos as bos) or have none (Qwen) get nothing: their models were trained without one.
    """
    bos_id = tokenizer.bos_token_id
    if bos_id is None:
        return None
    return bos_id if tokenizer.encode("a", add_special_tokens=True)[:1] == [bos_id] else None


def encode_rendered(tokenizer, text: str) -> list[int]:
    """Token ids of text we rendered ourselves (chat templates write their own special tokens),
    with the model's BOS in front when it expects one and the text does not start with it."""
    ids = _encode(tokenizer, text)
    bos_id = bos_to_prepend(tokenizer)
    if bos_id is not None and ids[:1] != [bos_id]:
        ids = [bos_id] + ids
    return ids


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def tokenize_sft(rows: list[dict], tokenizer, cfg: DataConfig) -> list[Sample]:
    """Turn rows into samples (see the module docstring for the row shapes and masks).

    Rows longer than ``cfg.max_len`` are cut to it (``--truncate``, the default) or rejected
    (``--no-truncate``); a row whose prompt alone fills ``max_len`` has no target left and is
    dropped; the counts are logged. Pre-training texts are split into ``max_len`` chunks.
    """
    template = _chat_template(tokenizer, cfg) if cfg.apply_chat_template and not cfg.pretrain_mode else None
    bos_id = bos_to_prepend(tokenizer)
    samples: list[Sample] = []
    counts = TokenizeCounts(len(rows))
    for where, row in preprocessed_rows(rows, cfg, counts):
        if cfg.pretrain_mode:
            samples.extend(_pretrain_chunks(row, where, tokenizer, cfg, bos_id))
            continue
        ids, mask = _sft_ids(row, where, tokenizer, cfg, template)
        if not any(mask):
            # Only a chat template can cause this: it rendered the assistant turns where the
            # prefix renderings do not predict them (e.g. it rewrites or drops earlier turns).
            raise UserError(f"{where}: the chat template left no assistant tokens to train on")
        if bos_id is not None and ids[:1] != [bos_id]:
            ids, mask = [bos_id] + ids, [0] + mask
        if len(ids) > cfg.max_len:
            if not cfg.truncate:
                raise UserError(
                    f"{where}: sample is {len(ids)} tokens, longer than --max_len {cfg.max_len} "
                    "(raise --max_len, or drop --no-truncate to cut it)"
                )
            if not any(mask[: cfg.max_len]):
                counts.dropped += 1  # the prompt fills max_len: no response token would survive
                continue
            ids, mask = ids[: cfg.max_len], mask[: cfg.max_len]
            counts.truncated += 1
        samples.append(_sample(ids, mask))
    counts.report("samples", len(samples), cfg.max_len)
    return samples


@dataclass
class TokenizeCounts:
    """What tokenization did to the rows of one dataset, reported once at the end."""

    rows: int
    skipped: int = 0  # --preprocess_fn returned None
    truncated: int = 0  # cut to --max_len
    dropped: int = 0  # the prompt alone fills --max_len: no target token would survive

    def report(self, kind: str, kept: int, max_len: int) -> None:
        """Log the counts; no example left at all is a UserError."""
        if self.skipped:
            logger.info("--preprocess_fn skipped %d of %d rows", self.skipped, self.rows)
        if self.truncated:
            logger.info("truncated %d %s to --max_len %d", self.truncated, kind, max_len)
        if self.dropped:
            logger.warning("dropped %d of %d %s whose prompt alone fills --max_len %d", self.dropped, self.rows, kind, max_len)
        if not kept:
            if self.dropped:
                raise UserError(f"all {self.dropped} {kind} were dropped: every prompt is at least --max_len {max_len} tokens")
            raise UserError(f"no {kind} to train on: --preprocess_fn skipped every row")


def preprocessed_rows(rows: list[dict], cfg: DataConfig, counts: TokenizeCounts) -> Iterator[tuple[str, dict]]:
    """(location, row) for every row after the --preprocess_fn hook; rows it skips are counted."""
    preprocess = load_preprocess_fn(cfg.preprocess_fn) if cfg.preprocess_fn else None
    for index, raw in enumerate(rows):
        where = raw.get(WHERE_KEY, f"row {index}")
        row = _preprocess(preprocess, raw, where, cfg.preprocess_fn) if preprocess else raw
        if row is None:
            counts.skipped += 1
            continue
        yield where, row


def _sample(ids: list[int], mask: list[int]) -> Sample:
    # Token 0 has no context inside its sample; never a target (see the module docstring).
    return Sample(input_ids=list(ids), loss_mask=[0] + list(mask[1:]))


def _chat_template(tokenizer, cfg: DataConfig) -> str:
    template = cfg.tokenizer_chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise UserError(
            f"--apply_chat_template: the tokenizer of {tokenizer.name_or_path or 'the model'} has no chat template "
            "(pass --tokenizer_chat_template, or drop --apply_chat_template)"
        )
    return template


def _field(row: dict, key: str, where: str, flag: str) -> Any:
    if key not in row:
        fields = ", ".join(k for k in row if k != WHERE_KEY)
        raise UserError(f"{where}: field {key!r} is missing (set {flag}; the row has: {fields or 'no fields'})")
    return row[key]


def _text_field(row: dict, key: str, where: str, flag: str, allow_empty: bool) -> str:
    value = _field(row, key, where, flag)
    if not isinstance(value, str):
        raise UserError(f"{where}: field {key!r} must be a string, got {describe_value(value)}")
    if not allow_empty and not value.strip():
        raise UserError(f"{where}: field {key!r} is empty")
    return value


def _messages(value: Any, key: str, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        found = "an empty list" if isinstance(value, list) else describe_value(value)
        raise UserError(f"{where}: field {key!r} must be a non-empty list of chat messages, got {found}")
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise UserError(
                f"{where}: field {key!r} message {j} must be an object with string 'role' and 'content', got {describe_value(m)}"
            )
        for part in ("role", "content"):
            if not isinstance(m.get(part), str):
                found = "nothing" if part not in m else describe_value(m[part])
                raise UserError(f"{where}: field {key!r} message {j} must have a string {part!r}, got {found}")
        if m["role"] not in CHAT_ROLES:
            raise UserError(f"{where}: field {key!r} message {j} has role {m['role']!r}; chat roles are {', '.join(CHAT_ROLES)}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _score_text(row: dict, where: str, cfg: DataConfig) -> str:
    value = _field(row, cfg.score_key, where, "--score_key")
    try:
        if isinstance(value, bool):
            raise ValueError
        score = float(value)  # CSV cells arrive as strings such as "0.8"
    except (TypeError, ValueError):
        raise UserError(f"{where}: field {cfg.score_key!r} must be a number, got {describe_value(value)}") from None
    try:
        return cfg.score_template.format(score=score)
    except (KeyError, IndexError, ValueError) as err:
        raise UserError(f"--score_template {cfg.score_template!r}: cannot format a score with it ({err!r})") from None


def _fill_input_template(template: str, prompt: str, row: Optional[dict] = None, where: str = "row") -> str:
    """``{}`` is the prompt; ``{name}`` is the row's field ``name``. Named fields let a dataset
    that splits its prompt over columns be used as it is: alpaca's ``instruction`` plus ``input``
    is ``--input_key input --input_template '{instruction}\n\n{}'``."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
        if not names:
            raise UserError(f"--input_template must contain '{{}}' where the prompt goes (or a '{{field}}' of the row), got {template!r}")
        fields = {k: v for k, v in (row or {}).items() if k != WHERE_KEY}
        return template.format(prompt, **fields)
    except KeyError as err:
        have = ", ".join(k for k in (row or {}) if k != WHERE_KEY)
        raise UserError(
            f"{where}: --input_template names field {err.args[0]!r}, which the row lacks (it has: {have or 'no fields'})"
        ) from None
    except (IndexError, ValueError) as err:
        raise UserError(f"--input_template {template!r}: not a valid format string ({err!r}); write literal braces as {{{{ }}}}") from None


def _sft_ids(row: dict, where: str, tokenizer, cfg: DataConfig, template: Optional[str]) -> tuple[list[int], list[int]]:
    """Ids and loss mask of one prompt/response or chat row, before BOS and truncation."""
    value = _field(row, cfg.input_key, where, "--input_key")
    score = _score_text(row, where, cfg) if cfg.score_key else None

    if isinstance(value, list):  # a whole conversation
        if template is None:
            raise UserError(f"{where}: field {cfg.input_key!r} holds chat messages; add --apply_chat_template")
        messages = _messages(value, cfg.input_key, where)
        if cfg.output_key and cfg.output_key in row:
            # input is context, output is what to learn: only the appended turns are targets.
            out = row[cfg.output_key]
            if isinstance(out, list):
                extra = _messages(out, cfg.output_key, where)
            else:
                extra = [{"role": "assistant", "content": _text_field(row, cfg.output_key, where, "--output_key", False)}]
            targets = [len(messages) + j for j, m in enumerate(extra) if m["role"] == "assistant"]
            messages = messages + extra
        else:
            targets = [j for j, m in enumerate(messages) if m["role"] == "assistant"]
        if not targets:
            raise UserError(f"{where}: the conversation has no assistant message to train on")
        messages, targets = _with_score_message(messages, targets, score)
        return _chat_ids(tokenizer, messages, targets, template, where)

    if cfg.output_key is None:
        raise UserError(
            f"{where}: field {cfg.input_key!r} must be a list of chat messages when --output_key is None, got {describe_value(value)}"
        )
    prompt = _text_field(row, cfg.input_key, where, "--input_key", True)
    response = _text_field(row, cfg.output_key, where, "--output_key", False)
    if cfg.input_template:
        prompt = _fill_input_template(cfg.input_template, prompt, row, where)
    if template is not None:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        messages, targets = _with_score_message(messages, [1], score)
        return _chat_ids(tokenizer, messages, targets, template, where)

    if tokenizer.eos_token_id is None:
        raise UserError(
            f"the tokenizer of {tokenizer.name_or_path} has no eos_token, so the model could not learn where a "
            "response ends; use --apply_chat_template"
        )
    if score is not None:
        prompt = score + "\n" + prompt
    # Prompt and response are encoded separately, not as one string: at generation time the
    # prompt is tokenised alone, so this keeps training ids identical to what inference sees
    # (one string would let BPE merge across the boundary, e.g. "Assistant: " + "Hi").
    prompt_ids = _encode(tokenizer, prompt)
    response_ids = _encode(tokenizer, response) + [tokenizer.eos_token_id]
    return prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)


def _with_score_message(messages: list[dict], targets: list[int], score: Optional[str]) -> tuple[list[dict], list[int]]:
    """Conditional SFT with a chat template: the score goes first, as (part of) the system message."""
    if score is None:
        return messages, targets
    if messages[0]["role"] == "system":
        # Many templates reject two system messages; merge into the one the row has.
        first = {"role": "system", "content": score + "\n" + messages[0]["content"]}
        return [first] + messages[1:], targets
    return [{"role": "system", "content": score}] + messages, [t + 1 for t in targets]


def _render(tokenizer, messages: list[dict], template: str, generation_prompt: bool, where: str) -> str:
    import jinja2

    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt)
    except (jinja2.TemplateError, ValueError) as err:
        raise UserError(f"{where}: the chat template cannot render this conversation ({' '.join(str(err).split())})") from None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _chat_ids(tokenizer, messages: list[dict], targets: list[int], template: str, where: str) -> tuple[list[int], list[int]]:
    """Render a conversation; mask each target assistant turn's content and end-of-turn tokens.

    Real templates carry no markers for "assistant text starts/ends here", so the span of turn
    ``i`` is found by rendering prefixes: it starts where ``messages[:i]`` plus the generation
    prompt ends and stops where ``messages[:i+1]`` ends. Prefixes are compared as token ids
    against the full rendering (longest common prefix), which stays correct even when a
    template renders an earlier turn slightly differently once later turns follow.
    """
    full = _encode(tokenizer, _render(tokenizer, messages, template, False, where))
    mask = [0] * len(full)
    for i in targets:
        start = _common_prefix(_encode(tokenizer, _render(tokenizer, messages[:i], template, True, where)), full)
        end = _common_prefix(_encode(tokenizer, _render(tokenizer, messages[: i + 1], template, False, where)), full)
        mask[start:end] = [1] * max(0, end - start)
    return full, mask


def _pretrain_chunks(row: dict, where: str, tokenizer, cfg: DataConfig, bos_id: Optional[int]) -> list[Sample]:
    """One document -> consecutive ``max_len`` chunks, loss on every token but each chunk's first."""
    text = _text_field(row, cfg.input_key, where, "--input_key", False)
    ids = _encode(tokenizer, text)
    if bos_id is not None and ids[:1] != [bos_id]:
        ids = [bos_id] + ids
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)  # marks the document's end, as in pre-training
    chunks = [ids[k : k + cfg.max_len] for k in range(0, len(ids), cfg.max_len)]
    # A 1-token tail has no target (its only token is a chunk's first); it would be an empty sample.
    return [_sample(c, [1] * len(c)) for c in chunks if len(c) >= 2]


# ----------------------------------------------------------------------------------------------
# Batching


def collate_padded(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch of ``B = len(samples)`` rows, ``T`` = the longest sample.

    Returns ``input_ids`` [B, T] (``pad_id`` after each sample), ``attention_mask`` [B, T]
    (1 on real tokens) and ``loss_mask`` [B, T] (0 on padding), all int64.
    """
    if not samples:
        raise ValueError("collate_padded needs at least one sample")
    width = max(len(s) for s in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)  # [B, T]
    loss_mask = torch.zeros((len(samples), width), dtype=torch.long)  # [B, T]
    for b, s in enumerate(samples):
        n = len(s)
        input_ids[b, :n] = torch.tensor(s.input_ids, dtype=torch.long)
        attention_mask[b, :n] = 1
        loss_mask[b, :n] = torch.tensor(s.loss_mask, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def collate_packed(samples: list[Sample], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """All samples concatenated into one row of ``T`` tokens (``T = sum of lengths``, rounded
    up to ``pad_to_multiple_of`` with ``pad_id`` tokens).

    Returns int64 tensors ``input_ids`` [1, T], ``position_ids`` [1, T] (restarting at 0 at
    each sample), ``loss_mask`` [1, T] and ``sample_ids`` [1, T] (index into ``samples`` of
    each token's sample, -1 on padding). There is deliberately no ``attention_mask``: given
    ``position_ids`` and ``attention_mask=None`` (and ``use_cache=False``), transformers finds
    the sample boundaries where positions restart and builds a block-diagonal causal mask, so
    no token attends to another sample. The padding tail restarts positions too, so it forms
    its own block.
    """
    if not samples:
        raise ValueError("collate_packed needs at least one sample")
    ids: list[int] = []
    positions: list[int] = []
    loss: list[int] = []
    owner: list[int] = []
    for k, s in enumerate(samples):
        ids += s.input_ids
        positions += range(len(s))
        loss += s.loss_mask
        owner += [k] * len(s)
    pad = -len(ids) % pad_to_multiple_of
    ids += [pad_id] * pad
    positions += range(pad)
    loss += [0] * pad
    owner += [-1] * pad

    def row(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).unsqueeze(0)  # [1, T]

    return {"input_ids": row(ids), "position_ids": row(positions), "loss_mask": row(loss), "sample_ids": row(owner)}


def pack_into_micro_batches(samples: list[Sample], max_tokens: int) -> list[list[Sample]]:
    """Group samples for packing: greedy first fit in the given order, each group's total
    length at most ``max_tokens``; samples keep their relative order within a group."""
    groups: list[list[Sample]] = []
    sizes: list[int] = []
    for s in samples:
        n = len(s)
        if n > max_tokens:
            raise ValueError(f"a sample of {n} tokens cannot fit in a packed micro-batch of {max_tokens} tokens")
        for g, size in enumerate(sizes):
            if size + n <= max_tokens:
                groups[g].append(s)
                sizes[g] += n
                break
        else:
            groups.append([s])
            sizes.append(n)
    return groups
