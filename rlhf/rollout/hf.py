"""Rollouts with Hugging Face ``generate`` on the actor's own ranks and weights.

The generator reads the actor's live parameters, so there is no weight sync: after each
optimizer step the next rollout already uses the new policy. Under ZeRO-3 the parameters are
gathered for the duration of generation (one all-gather, not one per decoding step) and every
rank keeps decoding until all are done (``synced_gpus``), because partitioned forwards are
collective.

Interface shared with other backends: ``generate(prompt_ids, greedy) -> Generations``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import deepspeed
import torch

from rlhf.config import RolloutConfig
from rlhf.dist.env import device


@dataclass
class Generations:
    responses: list[list[int]]  # generated ids per prompt, cut after the first EOS (kept)
    finished: list[bool]  # ended with EOS (False: hit --generate_max_len)


class HFGenerator:
    def __init__(self, model: torch.nn.Module, tokenizer, cfg: RolloutConfig, zero_stage: int):
        self.model, self.cfg, self.zero3 = model, cfg, zero_stage == 3
        self.eos_id, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], greedy: bool = False) -> Generations:
        was_training = self.model.training
        self.model.eval()
        responses: list[list[int]] = []
        finished: list[bool] = []
        gathered = deepspeed.zero.GatheredParameters(list(self.model.parameters())) if self.zero3 else contextlib.nullcontext()
        with gathered:
            step = self.cfg.micro_rollout_batch_size
            for start in range(0, len(prompts), step):
                r, f = self._generate_chunk(prompts[start : start + step], greedy)
                responses += r
                finished += f
        self.model.train(was_training)
        return Generations(responses, finished)

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
            do_sample=not greedy,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
            use_cache=True,
            synced_gpus=self.zero3,
            **{k: v for k, v in sampling.items() if k != "do_sample"},
        )
        responses, finished = [], []
        for row in out[:, width:].tolist():
            if self.eos_id in row:
                row = row[: row.index(self.eos_id) + 1]
                finished.append(True)
            else:
                finished.append(False)
            responses.append(row)
        return responses, finished
