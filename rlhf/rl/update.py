"""The update phase of a PPO step: policy and value updates over one rollout batch.

``--ppo_epochs`` shuffled passes over each rank's share, cut into optimizer steps of
``--train_batch_size`` samples; every loss is normalised by the action tokens of its whole step
over all ranks, so the update does not depend on how the batch is split into micro-batches:
``--micro_train_batch_size`` samples each, or with ``--use_dynamic_batch`` the step's samples of
every rank pooled, dealt out again with balanced token totals and cut by
``--train_max_tokens_per_gpu`` (the same samples, the same update, less padding), padded or
packed (``--packing_samples``).
"""

from __future__ import annotations

import random
from typing import Optional

import torch
import torch.distributed as dist

from rlhf.algos import ppo as ppo_math
from rlhf.config import DataConfig, PPOConfig
from rlhf.data.batching import token_budget_plan
from rlhf.data.sft import Sample, tokenize_sft
from rlhf.data.sources import load_mixture
from rlhf.distributed.collectives import all_reduce_sums, gather_objects
from rlhf.engines.ema import WeightEMA
from rlhf.engines.sft_forward import forward_nll
from rlhf.engines.train_engine import TrainEngine
from rlhf.errors import UserError
from rlhf.rl.experience import ActorBatch, CriticBatch
from rlhf.rl.forward import collate_rows, policy_logp, sample_rows, to_batch, token_values


def ppo_steps(cfg: PPOConfig, rows: list[dict[str, torch.Tensor]], dp: int, group, seed: int):
    """``--ppo_epochs`` shuffled passes over a rank's share (``rows``, one dict per sample, see
    ``sample_rows``), cut into optimizer steps of ``--train_batch_size`` samples over the role's
    ``dp`` ranks. Yields per step the rows of this rank's micro-batches and the action tokens of
    the whole step over all ranks: the loss normaliser.

    Fixed: ``--micro_train_batch_size`` of the rank's own rows each. ``--use_dynamic_batch``: the
    step's rows of all ranks (the very samples of the fixed split) are pooled and re-dealt by
    ``token_budget_plan``; every rank gets as many samples as before and the same number of
    micro-batches."""
    n_local, per_step, micro = len(rows), cfg.train.train_batch_size // dp, cfg.train.micro_train_batch_size
    rng = random.Random(seed)
    for _ in range(cfg.algo.ppo_epochs):
        order = list(range(n_local))
        rng.shuffle(order)
        for start in range(0, n_local, per_step):
            chosen = [rows[i] for i in order[start : start + per_step]]
            step_tokens = all_reduce_sums({"t": sum(r["action_mask"].sum().item() for r in chosen)}, group)["t"]
            if not cfg.train.use_dynamic_batch:
                yield [chosen[m : m + micro] for m in range(0, len(chosen), micro)], step_tokens
                continue
            pool = chosen
            if dp > 1:  # whole samples move between ranks, so that each rank's token total is about the same
                pool = [row for part in gather_objects([{k: v.cpu() for k, v in r.items()} for r in chosen], group) for row in part]
            plan = token_budget_plan(
                [r["input_ids"].numel() for r in pool], dp, cfg.train.train_max_tokens_per_gpu, cfg.train.packing_samples
            )
            mine = plan[dist.get_rank(group) if dp > 1 else 0]
            yield [[pool[i] for i in g] for g in mine], step_tokens


def experience_rows(batch: dict[str, torch.Tensor], **per_token: Optional[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """An experience batch as one dict per sample (``sample_rows``): its ``input_ids`` and the
    given per-token tensors [B, T-1] (None ones left out), each cut to the sample's length."""
    return sample_rows({"input_ids": batch["input_ids"], **per_token}, batch["attention_mask"].sum(-1).tolist())


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
    rows = experience_rows(
        exp.batch,
        action_mask=exp.action_mask,
        old_logp=exp.old_logp,
        ref_logp=exp.ref_logp,
        advantages=exp.advantages,
        is_weights=exp.is_weights,
        engine_logp=exp.engine_logp,
    )
    for micro_batches, step_tokens in ppo_steps(cfg, rows, actor.dp_size, group, seed):
        if ptx is not None:
            ptx_batches = [to_batch(ptx.micro_batch(ptx_number + k), pad_id) for k in range(len(micro_batches))]
            ptx_number += len(micro_batches)
            ptx_tokens = all_reduce_sums({"t": sum(b["loss_mask"].sum().item() for b in ptx_batches)}, group)["t"]
        for j, micro_rows in enumerate(micro_batches):
            mb = collate_rows(micro_rows, pad_id, cfg.train.packing_samples)
            mask = mb["action_mask"]
            actor.set_accumulation_boundary(j == len(micro_batches) - 1)
            # The entropy is a metric, and a loss term only at --entropy_coef != 0 (no graph otherwise).
            logp, token_entropy = policy_logp(
                actor, mb, cfg.rollout.temperature, with_entropy=True, entropy_grad=bool(cfg.algo.entropy_coef)
            )
            old_logp, is_weights = mb.get("old_logp"), mb.get("is_weights")
            if old_logp is None:  # behaviour log-probs = this forward's: the KL and engine statistics are measured here
                old_logp = logp.detach()
                sums["kl"] += ppo_math.masked_sum(ppo_math.kl_estimate(old_logp, mb["ref_logp"], cfg.algo.kl_estimator), mask).item()
                if "engine_logp" in mb:
                    sums["rollout_logp_gap"] += ((old_logp - mb["engine_logp"]).abs() * mask).sum().item()
                    if cfg.rollout.vllm_is_truncation is not None:
                        is_weights = ppo_math.truncated_is_weights(old_logp, mb["engine_logp"], cfg.rollout.vllm_is_truncation, mask)
            loss, clip_frac, approx_kl = ppo_math.policy_loss(
                logp,
                old_logp,
                mb["advantages"],
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
                kl = ppo_math.kl_estimate(logp, mb["ref_logp"], cfg.algo.kl_estimator)
                loss = loss + kl_coef * ppo_math.masked_sum(kl, mask) / step_tokens
            sums["policy_loss"] += loss.item()
            if ptx is not None:
                pb = ptx_batches[j]
                ptx_loss = forward_nll(actor, dict(pb))[0] / ptx_tokens
                loss = loss + cfg.algo.ptx_coef * ptx_loss
                sums["ptx_loss"] += ptx_loss.item()
            actor.backward(loss * actor.grad_scale)
            actor.step()
            sums["clip_fraction"] += clip_frac.item()  # already a share of the step (normalised by its tokens), like the loss
            sums["approx_kl"] += approx_kl.item()
            sums["entropy"] += entropy.item()
            # Free the micro-batch's graph now: still bound, it would live on through the next
            # micro-batch's forward (with full logits, the step would peak with two [B, T, V]).
            del logp, loss, entropy, token_entropy, mb
        sums["actor_updates"] += 1
        if ema is not None:
            ema.update()
    return sums


def train_critic(cfg: PPOConfig, exp: CriticBatch, critic: TrainEngine, group, seed: int, pad_id: int) -> dict[str, float]:
    """Clipped value regression on this critic rank's share; metric sums."""
    sums = dict.fromkeys(("value_loss", "critic_updates"), 0.0)
    rows = experience_rows(exp.batch, action_mask=exp.action_mask, values=exp.values, returns=exp.returns)
    for micro_batches, step_tokens in ppo_steps(cfg, rows, critic.dp_size, group, seed):
        for j, micro_rows in enumerate(micro_batches):
            mb = collate_rows(micro_rows, pad_id, cfg.train.packing_samples)
            critic.set_accumulation_boundary(j == len(micro_batches) - 1)
            vloss = ppo_math.value_loss(
                token_values(critic, mb), mb["values"], mb["returns"], mb["action_mask"], cfg.algo.value_clip, step_tokens
            )
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
        sums.update(train_critic(cfg, critic_batch, roles.critic, roles.group("critic"), seed, pad_id))
    return sums
