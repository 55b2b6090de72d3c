"""Rollouts with Hugging Face ``generate`` on the actor's own ranks and weights.

The generator reads the actor's live parameters, so weights are synced in place: after each
optimizer step the next rollout already uses the new policy. Under ZeRO-3 that sync is an
all-gather of the actor's shards over the actor's ranks for the duration of generation, with
ZeRO-3's hooks off (``TrainEngine.unpartitioned``); its time is reported as ``sync_seconds``.

Interface shared with other backends: ``generate(prompt_ids, greedy) -> Generations``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Optional

import torch

from rlhf.config import RolloutConfig
from rlhf.distributed.env import device


def stop_token_ids(tokenizer, generation_config) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS, then the model's generation-config EOS ids.

    Chat models often end a turn with a token that is not the tokenizer's EOS: the first
    Llama-3-Instruct release ships ``eos_token`` ``<|end_of_text|>`` while its template closes
    each turn with ``<|eot_id|>``, listing both in ``generation_config.json``; Qwen2.5-Instruct
    lists ``<|im_end|>`` and ``<|endoftext|>``. Stopping at the tokenizer's EOS alone lets such a
    model talk past its turn until --generate_max_len. vLLM reads the generation config by itself;
    both backends are given this same list so they stop at the same tokens.
    """
    ids = [tokenizer.eos_token_id]
    extra = getattr(generation_config, "eos_token_id", None)
    ids += extra if isinstance(extra, (list, tuple)) else [extra]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def cut_at_stop(row: list[int], stop_ids: list[int]) -> tuple[list[int], bool]:
    """(``row`` up to and including its first stop token, whether it had one)."""
    for t, token in enumerate(row):
        if token in stop_ids:
            return row[: t + 1], True
    return row, False


@dataclass
class Generations:
    responses: list[list[int]]  # generated ids per prompt, cut after the first stop token (kept)
    finished: list[bool]  # ended with a stop token (False: hit --generate_max_len)
    sync_seconds: float = 0.0  # making the actor's current weights available to generation
    generate_seconds: float = 0.0  # decoding proper
    logprobs: Optional[list[list[float]]] = None  # per response token, from the generating engine (vLLM)


class HFGenerator:
    def __init__(self, model: torch.nn.Module, tokenizer, cfg: RolloutConfig, full_weights=contextlib.nullcontext):
        """``full_weights()``: a context in which ``model`` has its full weights (the actor's
        ``TrainEngine.unpartitioned``; nothing to do for a plain model)."""
        self.model, self.cfg, self.full_weights = model, cfg, full_weights
        self.pad_id = tokenizer.pad_token_id
        self.stop_ids = stop_token_ids(tokenizer, getattr(model, "generation_config", None))

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], greedy: bool = False) -> Generations:
        was_training = self.model.training
        self.model.eval()
        responses: list[list[int]] = []
        finished: list[bool] = []
        started = time.perf_counter()
        with self.full_weights():
            sync_seconds = time.perf_counter() - started
            step = self.cfg.micro_rollout_batch_size
            for start in range(0, len(prompts), step):
                r, f = self._generate_chunk(prompts[start : start + step], greedy)
                responses += r
                finished += f
            generate_seconds = time.perf_counter() - started - sync_seconds
        self.model.train(was_training)
        return Generations(responses, finished, sync_seconds, generate_seconds)

    def _generate_chunk(self, prompts: list[list[int]], greedy: bool) -> tuple[list[list[int]], list[bool]]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
            input_ids[i, width - len(p) :] = torch.tensor(p)
            attention_mask[i, width - len(p) :] = 1
        sampling = {} if greedy else {"do_sample": True, "temperature": self.cfg.temperature, "top_p": self.cfg.top_p, "top_k": 0}
        out = self.model.generate(
            input_ids=input_ids.to(device()),
            attention_mask=attention_mask.to(device()),
            max_new_tokens=self.cfg.generate_max_len,
            min_new_tokens=self.cfg.generate_max_len if self.cfg.ignore_eos else 0,  # EOS masked until the end
            do_sample=not greedy,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            use_cache=True,
            synced_gpus=False,  # unpartitioned weights: no collective per decoding step
            **{k: v for k, v in sampling.items() if k != "do_sample"},
        )
        responses, finished = [], []
        for row in out[:, width:].tolist():
            row, done = cut_at_stop(row, [] if self.cfg.ignore_eos else self.stop_ids)
            responses.append(row)
            finished.append(done)
        return responses, finished
