"""The update phase of a PPO step: policy and value updates over one rollout batch.

``--ppo_epochs`` shuffled passes over each rank's share, cut into optimizer steps of
``--train_batch_size`` samples; every loss is normalised by the action tokens of its whole step
over all ranks, so the update does not depend on how the batch is split into micro-batches.
"""

from __future__ import annotations

import random
from typing import Optional

import torch

from rlhf.algos import ppo as ppo_math
from rlhf.config import DataConfig, PPOConfig
from rlhf.data.sft import Sample, tokenize_sft
from rlhf.data.sources import load_mixture
from rlhf.distributed.collectives import all_reduce_sums
from rlhf.engines.ema import WeightEMA
from rlhf.engines.sft_forward import forward_nll
from rlhf.engines.train_engine import TrainEngine
from rlhf.errors import UserError
from rlhf.rl.experience import ActorBatch, CriticBatch
from rlhf.rl.forward import policy_logp, to_batch, token_values


def ppo_steps(cfg: PPOConfig, action_mask: torch.Tensor, dp: int, group, seed: int):
    """``--ppo_epochs`` shuffled passes over a rank's share, cut into optimizer steps of
    ``--train_batch_size`` samples over the role's ``dp`` ranks. Yields per step the row indices
    of its micro-batches (``--micro_train_batch_size`` each) and the action tokens of the whole
    step over all ranks: the loss normaliser."""
    n_local, per_step, micro = action_mask.size(0), cfg.train.train_batch_size // dp, cfg.train.micro_train_batch_size
    rng = random.Random(seed)
    for _ in range(cfg.algo.ppo_epochs):
        order = list(range(n_local))
        rng.shuffle(order)
        for start in range(0, n_local, per_step):
            chosen = order[start : start + per_step]
            step_tokens = all_reduce_sums({"t": action_mask[chosen].sum().item()}, group)["t"]
            yield [torch.tensor(chosen[m : m + micro], device=action_mask.device) for m in range(0, len(chosen), micro)], step_tokens


class PretrainMix:
    """``--pretrain_data`` for PPO-ptx: an actor rank's share of the text chunks, served as
    micro-batches whose content depends only on their running number, so a resumed job
    continues the same sequence without saving a data position."""

    def __init__(self, samples: list[Sample], index: int, dp: int, micro: int, seed: int):
        self.mine, self.micro, self.seed = samples[index::dp], micro, seed
        if len(self.mine) < micro:
            raise UserError(
                f"--pretrain_data has {len(samples)} chunks; need at least --micro_train_batch_size x actor ranks = {micro * dp}"
            )

    @classmethod
    def from_config(cls, cfg: PPOConfig, tokenizer, index: int, dp: int) -> "PretrainMix":
        """--pretrain_data read as pre-training text (SFT's pretrain mode) for actor slot ``index`` of ``dp``."""
        ptx_cfg = DataConfig(
            dataset=cfg.data.pretrain_data,
            dataset_probs=cfg.data.pretrain_data_probs,
            input_key=cfg.data.pretrain_input_key,
            output_key=None,
            pretrain_mode=True,
            max_len=cfg.data.pretrain_max_len or cfg.data.prompt_max_len + cfg.rollout.generate_max_len,
        )
        rows = load_mixture(ptx_cfg.dataset, ptx_cfg.dataset_probs, ptx_cfg.train_split, cfg.data.max_samples, cfg.train.seed)
        return cls(tokenize_sft(rows, tokenizer, ptx_cfg), index, dp, cfg.train.micro_train_batch_size, cfg.train.seed)

    def micro_batch(self, number: int) -> list[Sample]:
        per_epoch = len(self.mine) // self.micro
        epoch, k = divmod(number, per_epoch)
        order = random.Random(self.seed * 1009 + epoch).sample(range(len(self.mine)), len(self.mine))
        return [self.mine[i] for i in order[k * self.micro : (k + 1) * self.micro]]


def train_actor(
    cfg: PPOConfig,
    exp: ActorBatch,
    actor: TrainEngine,
    group,
    kl_coef: float,
    seed: int,
    ptx: Optional[PretrainMix],
    ptx_first: int,
    ema: Optional[WeightEMA],
    pad_id: int,
) -> dict[str, float]:
    """PPO policy updates on this actor rank's share; metric sums (each step's share of the global
    loss). With ``ptx``, every micro-batch also fits one pre-training micro-batch (numbered from
    ``ptx_first``), weighted by --ptx_coef per pre-training token of the step."""
    lo, hi = cfg.algo.eps_clip_low_high
    sums = dict.fromkeys(
        ("policy_loss", "clip_fraction", "approx_kl", "entropy", "ptx_loss", "actor_updates", "kl", "rollout_logp_gap"), 0.0
    )
    ptx_number = ptx_first
    for micro_batches, step_tokens in ppo_steps(cfg, exp.action_mask, actor.dp_size, group, seed):
        if ptx is not None:
            ptx_batches = [to_batch(ptx.micro_batch(ptx_number + k), pad_id) for k in range(len(micro_batches))]
            ptx_number += len(micro_batches)
            ptx_tokens = all_reduce_sums({"t": sum(b["loss_mask"].sum().item() for b in ptx_batches)}, group)["t"]
        for j, idx in enumerate(micro_batches):
            mb, mask = {k: v[idx] for k, v in exp.batch.items()}, exp.action_mask[idx]
            # The entropy is a metric, and a loss term only at --entropy_coef != 0 (no graph otherwise).
            logp, token_entropy = policy_logp(
                actor, mb, cfg.rollout.temperature, with_entropy=True, entropy_grad=bool(cfg.algo.entropy_coef)
            )
            old_logp, is_weights = exp.old_logp, exp.is_weights
            if old_logp is None:  # behaviour log-probs = this forward's: the KL and engine statistics are measured here
                old_logp = logp.detach()
                sums["kl"] += ppo_math.masked_sum(ppo_math.kl_estimate(old_logp, exp.ref_logp[idx], cfg.algo.kl_estimator), mask).item()
                if exp.engine_logp is not None:
                    sums["rollout_logp_gap"] += ((old_logp - exp.engine_logp[idx]).abs() * mask).sum().item()
                    if cfg.rollout.vllm_is_truncation is not None:
                        is_weights = ppo_math.truncated_is_weights(old_logp, exp.engine_logp[idx], cfg.rollout.vllm_is_truncation, mask)
            else:
                old_logp = old_logp[idx]
                is_weights = is_weights[idx] if is_weights is not None else None
            loss, clip_frac, approx_kl = ppo_math.policy_loss(
                logp,
                old_logp,
                exp.advantages[idx],
                mask,
                lo,
                hi,
                cfg.algo.dual_clip,
                step_tokens,
                token_weights=is_weights,
            )
            entropy = ppo_math.masked_sum(token_entropy, mask) / step_tokens
            if cfg.algo.entropy_coef:
                loss = loss - cfg.algo.entropy_coef * entropy
            if cfg.algo.use_kl_loss:
                kl = ppo_math.kl_estimate(logp, exp.ref_logp[idx], cfg.algo.kl_estimator)
                loss = loss + kl_coef * ppo_math.masked_sum(kl, mask) / step_tokens
            sums["policy_loss"] += loss.item()
            if ptx is not None:
                pb = ptx_batches[j]
                ptx_loss = forward_nll(actor, dict(pb))[0] / ptx_tokens
                loss = loss + cfg.algo.ptx_coef * ptx_loss
                sums["ptx_loss"] += ptx_loss.item()
            actor.backward(loss * actor.grad_scale)
            actor.step()
            share = mask.sum().item() / step_tokens
            sums["clip_fraction"] += clip_frac.item() * share
            sums["approx_kl"] += approx_kl.item() * share
            sums["entropy"] += entropy.item()
            # Free the micro-batch's graph now: still bound, it would live on through the next
            # micro-batch's forward (with full logits, the step would peak with two [B, T, V]).
            del logp, loss, entropy, token_entropy
        sums["actor_updates"] += 1
        if ema is not None:
            ema.update()
    return sums


def train_critic(cfg: PPOConfig, exp: CriticBatch, critic: TrainEngine, group, seed: int) -> dict[str, float]:
    """Clipped value regression on this critic rank's share; metric sums."""
    sums = dict.fromkeys(("value_loss", "critic_updates"), 0.0)
    for micro_batches, step_tokens in ppo_steps(cfg, exp.action_mask, critic.dp_size, group, seed):
        for idx in micro_batches:
            mb, mask = {k: v[idx] for k, v in exp.batch.items()}, exp.action_mask[idx]
            vloss = ppo_math.value_loss(token_values(critic, mb), exp.values[idx], exp.returns[idx], mask, cfg.algo.value_clip, step_tokens)
            critic.backward(vloss * critic.grad_scale)
            critic.step()
            sums["value_loss"] += vloss.item()
        sums["critic_updates"] += 1
    return sums


def train_on_rollout(
    cfg: PPOConfig,
    roles,
    actor_batch: Optional[ActorBatch],
    critic_batch: Optional[CriticBatch],
    step: int,
    kl_coef: float,
    ptx: Optional[PretrainMix],
    ema: Optional[WeightEMA],
    pad_id: int,
) -> dict[str, float]:
    """Step ``step``'s updates of this rank's actor and critic; metric sums (zeros for roles this
    rank does not train). ``kl`` and ``rollout_logp_gap`` are the parts measured in training (when
    the experience phase took no behaviour log-probs): the caller adds them to the rollout's."""
    sums = dict.fromkeys(
        (
            "policy_loss",
            "clip_fraction",
            "approx_kl",
            "entropy",
            "ptx_loss",
            "actor_updates",
            "value_loss",
            "critic_updates",
            "kl",
            "rollout_logp_gap",
        ),
        0.0,
    )
    seed = cfg.train.seed * 7919 + step
    if actor_batch is not None and step >= cfg.algo.freezing_actor_steps:
        samples_per_step = cfg.rollout.rollout_batch_size * cfg.rollout.n_samples_per_prompt
        ptx_per_step = (
            cfg.algo.ppo_epochs * samples_per_step // roles.actor.dp_size // cfg.train.micro_train_batch_size
        )  # ptx micro-batches a step uses
        sums.update(train_actor(cfg, actor_batch, roles.actor, roles.group("actor"), kl_coef, seed, ptx, step * ptx_per_step, ema, pad_id))
    if critic_batch is not None:
        sums.update(train_critic(cfg, critic_batch, roles.critic, roles.group("critic"), seed))
    return sums
