"""Which prompts each RL step takes: --rollout_batch_size per step, reshuffled every episode.

The order depends only on the seed and the episode, so a resumed job takes the same prompts at
the same step without saving a data position.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from rlhf.config import PPOConfig
from rlhf.data.prompts import Prompt, load_prompts
from rlhf.data.sources import holdout_split
from rlhf.errors import UserError


@dataclass
class PromptSchedule:
    prompts: list[Prompt]
    batch: int  # --rollout_batch_size
    per_episode: int  # steps in one pass over the prompts
    total_steps: int
    seed: int

    def step_prompts(self, step: int, index: int, dp: int) -> list[Prompt]:
        """Step ``step``'s prompts for slot ``index`` of the ``dp`` generating ranks: every dp-th
        of the step's window."""
        episode, step_in_episode = divmod(step, self.per_episode)
        order = list(range(len(self.prompts)))
        random.Random(self.seed * 1000 + episode).shuffle(order)
        window = order[step_in_episode * self.batch : (step_in_episode + 1) * self.batch]
        return [self.prompts[i] for i in window[index::dp]]

    def episode(self, step: int) -> int:
        return step // self.per_episode


def load_prompt_schedule(cfg: PPOConfig, tokenizer) -> tuple[PromptSchedule, list[Prompt]]:
    """--prompt_data as a step schedule, and the eval prompts: --eval_prompt_data, else a
    held-out share of the prompts (--eval_holdout_ratio), else none."""
    data, rollout = cfg.data, cfg.rollout
    prompts = load_prompts(data.prompt_data, data.prompt_data_probs, tokenizer, data, cfg.train.seed)
    if data.eval_prompt_data:
        eval_prompts = load_prompts(data.eval_prompt_data, None, tokenizer, data, cfg.train.seed)
    else:  # no eval file: eval on a held-out share of the user's own prompts, or not at all
        prompts, eval_prompts = holdout_split(prompts, data.eval_holdout_ratio, cfg.train.seed)
    per_episode = len(prompts) // rollout.rollout_batch_size
    if per_episode == 0:
        raise UserError(f"--prompt_data has {len(prompts)} prompts, fewer than --rollout_batch_size {rollout.rollout_batch_size}")
    total_steps = per_episode * cfg.algo.num_episodes
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    return PromptSchedule(prompts, rollout.rollout_batch_size, per_episode, total_steps, cfg.train.seed), eval_prompts
