"""PPO and its critic-free cousins (GRPO, RLOO, REINFORCE++, Dr. GRPO) as one SPMD program.

    torchrun --nproc_per_node 2 -m rlhf.ppo --config configs/grpo_tiny.yaml
    torchrun --nproc_per_node 8 -m rlhf.ppo --pretrain OpenRLHF/Llama-3-8b-sft-mixture \\
        --reward_pretrain OpenRLHF/Llama-3-8b-rm-mixture --advantage_estimator gae \\
        --prompt_data OpenRLHF/prompt-collection-v0.1 --input_key context_messages --apply_chat_template \\
        --rollout_batch_size 1024 --micro_rollout_batch_size 16 --train_batch_size 128 \\
        --micro_train_batch_size 4 --zero_stage 3 --bf16 --actor_learning_rate 5e-7 --critic_learning_rate 9e-6

Placement (rlhf.distributed.topology): colocated, every rank holds a shard of every role (actor,
critic, reference, reward) and the phases of a step time-share the ranks; or split, each role on
its own ranks (--actor_num_gpus_per_node ...), a DeepSpeed engine per role on its own process
group, with rollouts routed between groups (rlhf.distributed.exchange). Generation runs on the actor's
ranks with its live weights, or on rollout ranks of their own that receive the actor's weights
by broadcast before every rollout (rlhf.rollout.sync). Phases: generate, score (reference
log-probs, critic values, rewards), advantages (pure functions chosen by
--advantage_estimator), train (actor and critic).

Steps: 1 launch, 2 data, 3 engines, 4 resume, 5 loop (experience -> advantages -> train ->
eval -> log -> checkpoint), 6 export.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import time
from dataclasses import dataclass
from typing import Optional, Sequence

from rlhf.config import DataConfig, ModelConfig, PPOConfig, answer_help_early, parse_config

if __name__ == "__main__":
    answer_help_early(PPOConfig, "python -m rlhf.ppo")  # before torch and DeepSpeed are imported

import torch
import torch.distributed as dist

from rlhf.algos import ppo as ppo_math
from rlhf.algos.estimators import estimator_traits
from rlhf.algos.losses import next_token_logprobs, sft_nll_sum
from rlhf.data.prompts import Prompt, load_prompts
from rlhf.data.sft import Sample, collate_padded, tokenize_sft
from rlhf.data.sources import holdout_split, load_mixture
from rlhf.distributed.env import device, init_distributed
from rlhf.distributed.exchange import SampleRouter
from rlhf.distributed.topology import RoleGroups, Topology
from rlhf.engines.ema import WeightEMA
from rlhf.engines.frozen_engine import FrozenEngine
from rlhf.engines.subgroups import SlotParallel, confine_deepspeed_to
from rlhf.engines.train_engine import TrainEngine
from rlhf.errors import UserError, exit_on_user_error, run_program
from rlhf.io.checkpoint import export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
from rlhf.io.preemption import PreemptionWatch
from rlhf.metrics import MetricsLogger, metric_series, plot_metrics, read_metrics
from rlhf.models.loading import load_causal_lm, load_reward_model, load_tokenizer, resolve_model_path
from rlhf.rewards import RewardFunction, combine, normalise_score, parse_weights, remote_reward
from rlhf.rollout.hf import HFGenerator
from rlhf.rollout.sync import WeightBroadcast
from rlhf.rollout.vllm_engine import VLLMGenerator, engine_tp_group
from rlhf.distributed.collectives import all_reduce_sums, all_reduce_tensor
from rlhf.trainer import finish



@dataclass
class RoleEngines:
    """This rank's engines (None / empty for roles held by other ranks) and how to reach the rest."""

    actor: Optional[TrainEngine]
    critic: Optional[TrainEngine]
    reference: Optional[FrozenEngine]  # None on reference ranks only with LoRA (the actor's base is the reference)
    reward_models: list[FrozenEngine]
    router: SampleRouter
    groups: RoleGroups
    generator: Optional[HFGenerator]  # on the ranks that generate: the rollout role's if placed, else the actor's
    weight_sync: Optional[WeightBroadcast]  # actor -> rollout ranks, when generation has ranks of its own

    def group(self, role: str):
        return self.groups.group(role)

    @property
    def generating_role(self) -> str:
        return "rollout" if "rollout" in self.groups.topology.roles else "actor"


@dataclass
class ActorBatch:
    """An actor rank's share of the rollout. Per-token tensors are [B, T-1]: entry t-1 scores token t."""

    batch: dict[str, torch.Tensor]  # input_ids, attention_mask, loss_mask [B, T]
    action_mask: torch.Tensor  # [B, T-1]
    old_logp: Optional[torch.Tensor]  # [B, T-1]; None: taken from the training forward (one update per rollout)
    ref_logp: torch.Tensor  # [B, T-1]
    advantages: torch.Tensor  # [B, T-1]
    is_weights: Optional[torch.Tensor] = None  # [B, T-1] truncated importance weights (--vllm_is_truncation)
    engine_logp: Optional[torch.Tensor] = None  # [B, T-1] the generating engine's log-probs (vLLM), 0 on prompts


@dataclass
class CriticBatch:
    """A critic rank's share of the rollout: the values it predicted and the returns to regress on."""

    batch: dict[str, torch.Tensor]
    action_mask: torch.Tensor  # [B, T-1]
    values: torch.Tensor  # [B, T-1] at rollout time (the value clip's anchor)
    returns: torch.Tensor  # [B, T-1]


# ----------------------------------------------------------------------------------------------
# Forward passes


def policy_logp(model, batch: dict[str, torch.Tensor], temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs [B, T-1] of the batch's tokens under softmax(logits / temperature), and those
    scaled logits [B, T, V].

    Rollouts sample from softmax(logits / T), so the behaviour, actor and reference log-probs of a
    PPO step must all be taken at that same T: the ratio, the KL and the gap to vLLM's log-probs
    then compare the distribution that was actually sampled (OpenRLHF and TRL scale the same way).
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    if temperature != 1.0:
        logits = logits / temperature
    return next_token_logprobs(logits, batch["input_ids"]), logits


def token_values(critic, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Critic values [B, T-1]: the scalar head on every hidden state; entry t-1 values the state
    before token t is generated (so it lines up with the log-prob of token t)."""
    model = critic.module
    base = getattr(model, "get_base_model", lambda: model)()
    hidden = critic(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True).hidden_states[-1]
    return base.score(hidden).squeeze(-1)[:, :-1].float()


def in_micro_batches(batch: dict[str, torch.Tensor], size: int):
    n = batch["input_ids"].size(0)
    for start in range(0, n, size):
        yield slice(start, start + size), {k: v[start : start + size] for k, v in batch.items()}


def to_batch(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    return {k: v.to(device()) for k, v in collate_padded(samples, pad_id).items()}


@torch.no_grad()
def per_token_rows(fn, samples: list[Sample], pad_id: int, micro: int) -> list[torch.Tensor]:
    """``fn(micro_batch) -> [b, T-1]`` over ``samples``, cut back to one CPU row per sample
    (length len(sample) - 1), so rows can travel between ranks whose batches pad differently."""
    if not samples:
        return []
    rows = []
    for _, mb in in_micro_batches(to_batch(samples, pad_id), micro):
        out = fn(mb).float().cpu()  # [b, T-1]
        lengths = mb["attention_mask"].sum(-1).tolist()
        rows += [out[i, : n - 1] for i, n in enumerate(lengths)]
    return rows


def padded(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """Rows of different lengths -> [B, width] on the device, zero after each row."""
    out = torch.zeros(len(rows), width)
    for i, row in enumerate(rows):
        out[i, : row.numel()] = row
    return out.to(device())


@torch.no_grad()
def reward_model_scores(cfg: PPOConfig, reward_models: list[FrozenEngine], samples: list[Sample], pad_id: int) -> list[list[float]]:
    """Each sample's score from every reward model ([k] per sample), normalised if asked."""
    if not samples:
        return []
    per_model = []
    for rm in reward_models:
        scores = []
        for _, mb in in_micro_batches(to_batch(samples, pad_id), cfg.rollout.micro_rollout_batch_size):
            scores.append(rm(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits.squeeze(-1).float().cpu())
        score = torch.cat(scores)
        per_model.append(normalise_score(score, rm.module.config) if cfg.algo.normalize_reward else score)
    return torch.stack(per_model, dim=1).tolist()


# ----------------------------------------------------------------------------------------------
# Experience


class Scorer:
    """Everything that scores a rollout: reference, critic, reward models, reward function, remote RM.

    ``score`` is collective: the actor ranks' samples go to the ranks of each scoring role and the
    results come back (``SampleRouter``); text rewards run on the actor ranks, which hold the prompts.
    """

    def __init__(self, cfg: PPOConfig, tokenizer, roles: RoleEngines, remote, reward_fn, kl_ctl):
        self.cfg, self.tokenizer, self.roles, self.kl_ctl = cfg, tokenizer, roles, kl_ctl
        self.pad_id = tokenizer.pad_token_id
        self.text_sources = {name: fn for name, fn in (("reward_remote", remote), ("reward_func", reward_fn)) if fn is not None}
        self.num_reward_models = len(cfg.algo.reward_pretrain.split(",")) if cfg.algo.reward_pretrain else 0
        self.weights = parse_weights(cfg.algo.reward_weights, self.num_reward_models + len(self.text_sources))

    @property
    def source_names(self) -> list[str]:
        return [f"reward_model{k}" for k in range(self.num_reward_models)] + list(self.text_sources)

    def score(self, samples: list[Sample], roles: Sequence[str]) -> tuple[dict[str, list], dict[str, list], dict[str, list]]:
        """Collective. Run each of ``roles`` (reference, critic, reward) on its ranks' share of the
        actor ranks' ``samples``. Returns per role: the results for this actor rank's samples, this
        rank's own share of samples, and this rank's results for that share (what a critic rank
        trains on)."""
        micro, temperature, r = self.cfg.rollout.micro_rollout_batch_size, self.cfg.rollout.temperature, self.roles
        shares = r.router.share(samples, roles)
        results: dict[str, list] = {}
        if "reference" in shares:
            results["reference"] = per_token_rows(lambda mb: policy_logp(r.reference, mb, temperature)[0], shares["reference"], self.pad_id, micro)
        if "critic" in shares:
            results["critic"] = per_token_rows(lambda mb: token_values(r.critic, mb), shares["critic"], self.pad_id, micro)
        if "reward" in shares:
            results["reward"] = reward_model_scores(self.cfg, r.reward_models, shares["reward"], self.pad_id)
        return r.router.collect(results, roles), shares, results

    def rewards(self, prompts: list[Prompt], responses: list[list[int]], rm_scores: list[list[float]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """On actor ranks: combined sequence rewards [B] and each source's [B]."""
        per_source: dict[str, torch.Tensor] = {}
        if self.num_reward_models:
            scores = torch.tensor(rm_scores, dtype=torch.float32).view(len(responses), self.num_reward_models)
            per_source.update({f"reward_model{k}": scores[:, k] for k in range(self.num_reward_models)})
        if self.text_sources:
            texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in responses]
            for name, source in self.text_sources.items():
                per_source[name] = source([p.text for p in prompts], texts, [p.label for p in prompts])
        return combine(list(per_source.values()), self.weights, self.cfg.algo.reward_clip_range), per_source


def scoring_roles(topology: Topology, use_reference_engine: bool) -> list[str]:
    return [role for role in ("reference", "critic", "reward") if role in topology.roles and (role != "reference" or use_reference_engine)]


def generate(cfg: PPOConfig, roles: RoleEngines, prompts: list[Prompt], tags: list, greedy: bool, timings: dict) -> list[tuple]:
    """Collective. Sync the actor's weights to the generating ranks if they are apart, generate
    for ``prompts`` (this generating rank's share; ``tags`` ride along), and return this actor
    rank's share of (prompt, response ids, finished with EOS, tag, the engine's log-probs of the
    response tokens or None)."""
    items: list[tuple] = []
    started = time.perf_counter()
    if roles.weight_sync is not None:
        roles.weight_sync.send(cfg.train.zero_stage == 3) if roles.actor is not None else roles.weight_sync.receive()
    elif isinstance(roles.generator, VLLMGenerator):
        roles.generator.refresh(roles.actor)
    sync = time.perf_counter() - started
    if roles.generator is not None:
        gen = roles.generator.generate([p.ids for p in prompts], greedy=greedy)
        items = list(zip(prompts, gen.responses, gen.finished, tags, gen.logprobs or [None] * len(prompts)))
        sync += gen.sync_seconds  # ZeRO-3: gathering the actor's shards for generation
        if isinstance(roles.generator, VLLMGenerator):
            roles.generator.sleep()  # --vllm_enable_sleep: give the memory back to training
    if roles.generating_role == "rollout":
        items = roles.router.share(items, ["actor"], source="rollout").get("actor", [])
    timings["sync"], timings["generate"] = sync, time.perf_counter() - started - sync
    return items


def behaviour_logp_from_training(cfg: PPOConfig) -> bool:
    """Whether the experience phase can skip its own actor forward for the behaviour log-probs.

    When a rollout batch gets exactly one optimizer step (one --ppo_epochs pass and
    --train_batch_size = the rollout's samples), every training micro-batch runs on the weights
    that generated it, so the training forward's log-probs ARE the behaviour log-probs (ratio 1,
    as TRL does with num_iterations=1). That holds only if nothing needs them before training: no
    KL penalty in the reward (KL as a loss, or none), no frozen-actor warm-up steps (the vLLM
    log-prob gap and truncated importance weights are then taken in training too). Saves one
    forward pass of the actor over the rollout per step.
    """
    algo, rollout = cfg.algo, cfg.rollout
    kl_in_reward = not algo.use_kl_loss and (algo.init_kl_coef != 0 or algo.kl_target is not None)
    one_update = algo.ppo_epochs == 1 and cfg.train.train_batch_size == rollout.rollout_batch_size * rollout.n_samples_per_prompt
    return one_update and not kl_in_reward and algo.freezing_actor_steps == 0


def make_experience(cfg: PPOConfig, roles: RoleEngines, scorer: Scorer, prompts: list[Prompt], timings: dict) -> tuple[Optional[ActorBatch], Optional[CriticBatch], dict[str, float]]:
    """Collective. Generate n responses per prompt (``prompts``: this generating rank's share),
    score them on every role's ranks, and turn rewards into advantages (actor ranks) and returns
    (critic ranks)."""
    n, pad_id, actor = cfg.rollout.n_samples_per_prompt, scorer.pad_id, roles.actor
    expanded = [p for p in prompts for _ in range(n)]  # the n samples of a prompt stay together
    items = generate(cfg, roles, expanded, [None] * len(expanded), greedy=False, timings=timings)
    expanded = [prompt for prompt, *_ in items]
    responses = [response for _, response, *_ in items]
    samples = [Sample(p.ids + r, [0] * len(p.ids) + [1] * len(r)) for p, r in zip(expanded, responses)]
    stats: dict[str, float] = dict.fromkeys(["reward", "kl", "response_length", "truncated", "samples", "rollout_logp_gap", *scorer.source_names], 0.0)
    no_rollout = torch.zeros(0, 1)
    stats.update(ppo_math.rollout_diagnostics(no_rollout[:, 0], no_rollout, no_rollout, n))  # all 0: ranks without an actor add nothing

    started = time.perf_counter()
    score_roles = scoring_roles(roles.groups.topology, use_reference_engine=cfg.model.lora_rank == 0)
    results, shares, own_results = scorer.score(samples, score_roles)
    actor_batch = None
    returns_rows: list[torch.Tensor] = []
    if actor is not None:
        batch = to_batch(samples, pad_id)
        action_mask = batch["loss_mask"][:, 1:].float()  # [B, T-1]
        width = action_mask.size(1)
        with torch.no_grad():
            old_logp = None  # from the training forward (behaviour_logp_from_training)
            if not behaviour_logp_from_training(cfg):
                old_logp = torch.cat([policy_logp(actor, mb, cfg.rollout.temperature)[0] for _, mb in in_micro_batches(batch, cfg.rollout.micro_rollout_batch_size)])
            if "reference" in results:
                ref_logp = padded(results["reference"], width)
            else:  # LoRA: the reference is the base model, i.e. the actor with its adapter off
                with actor.module.disable_adapter():
                    ref_logp = torch.cat([policy_logp(actor, mb, cfg.rollout.temperature)[0] for _, mb in in_micro_batches(batch, cfg.rollout.micro_rollout_batch_size)])
        values = padded(results["critic"], width) if "critic" in results else None
        is_weights, engine_logp = None, None
        if items and items[0][4] is not None:  # the engine's own log-probs: how far its numerics are from the actor's
            engine_logp = padded([torch.tensor([0.0] * (len(p.ids) - 1) + lp) for p, _, _, _, lp in items], width)
            if old_logp is not None:  # else both are measured against the training forward
                stats["rollout_logp_gap"] = ((old_logp - engine_logp).abs() * action_mask).sum().item()
                if cfg.rollout.vllm_is_truncation is not None:
                    is_weights = ppo_math.truncated_is_weights(old_logp, engine_logp, cfg.rollout.vllm_is_truncation, action_mask)
        seq_reward, per_source = scorer.rewards(expanded, responses, results.get("reward", [[]] * len(samples)))
        hit_limit = torch.tensor([not finished for _, _, finished, *_ in items])
        seq_reward = ppo_math.overlong_penalty(seq_reward, hit_limit, cfg.algo.overlong_penalty).to(device())

        # [B, T-1]; without behaviour log-probs yet the KL is measured in training (it is not in the reward then)
        kl = ppo_math.kl_estimate(old_logp, ref_logp, cfg.algo.kl_estimator) * action_mask if old_logp is not None else torch.zeros_like(action_mask)
        kl_coef = 0.0 if cfg.algo.use_kl_loss else scorer.kl_ctl.value  # GRPO puts the KL in the loss instead
        estimator = ppo_math.get_estimator(cfg.algo.advantage_estimator)
        advantages, returns = estimator(
            ppo_math.AdvantageInputs(
                token_rewards=ppo_math.token_rewards(seq_reward, kl, action_mask, kl_coef), seq_rewards=seq_reward,
                action_mask=action_mask, values=values, n_samples_per_prompt=n, gamma=cfg.algo.gamma, lambd=cfg.algo.lambd,
                sum_over_shards=lambda t: all_reduce_tensor(t, roles.group("actor")),
            )
        )
        actor_batch = ActorBatch(batch, action_mask, old_logp, ref_logp, advantages.detach(), is_weights, engine_logp)
        returns_rows = [returns[i, : len(s) - 1].cpu() for i, s in enumerate(samples)] if values is not None else []
        stats.update(
            reward=seq_reward.sum().item(), kl=kl.sum().item(), response_length=action_mask.sum().item(),
            truncated=hit_limit.float().sum().item(), samples=float(len(samples)),
            **{name: r.sum().item() for name, r in per_source.items()},
            **ppo_math.rollout_diagnostics(seq_reward, advantages, action_mask, n),
        )

    critic_batch = None
    if "critic" in score_roles:  # the returns go to the critic's ranks, which kept their share
        critic_returns = roles.router.share(returns_rows, ["critic"])
        if roles.critic is not None:
            share = shares["critic"]
            batch = to_batch(share, pad_id)
            width = batch["input_ids"].size(1) - 1
            critic_batch = CriticBatch(batch, batch["loss_mask"][:, 1:].float(), padded(own_results["critic"], width), padded(critic_returns["critic"], width))
    timings["score"] = time.perf_counter() - started
    return actor_batch, critic_batch, stats
# ----------------------------------------------------------------------------------------------
# Training on one rollout batch


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
            raise UserError(f"--pretrain_data has {len(samples)} chunks; need at least --micro_train_batch_size x actor ranks = {micro * dp}")

    def micro_batch(self, number: int) -> list[Sample]:
        per_epoch = len(self.mine) // self.micro
        epoch, k = divmod(number, per_epoch)
        order = random.Random(self.seed * 1009 + epoch).sample(range(len(self.mine)), len(self.mine))
        return [self.mine[i] for i in order[k * self.micro : (k + 1) * self.micro]]


def train_actor(cfg: PPOConfig, exp: ActorBatch, actor: TrainEngine, group, kl_coef: float, seed: int, ptx: Optional[PretrainMix], ptx_first: int, ema: Optional[WeightEMA], pad_id: int) -> dict[str, float]:
    """PPO policy updates on this actor rank's share; metric sums (each step's share of the global
    loss). With ``ptx``, every micro-batch also fits one pre-training micro-batch (numbered from
    ``ptx_first``), weighted by --ptx_coef per pre-training token of the step."""
    lo, hi = cfg.algo.eps_clip_low_high
    sums = dict.fromkeys(("policy_loss", "clip_fraction", "approx_kl", "entropy", "ptx_loss", "actor_updates", "kl", "rollout_logp_gap"), 0.0)
    ptx_number = ptx_first
    for micro_batches, step_tokens in ppo_steps(cfg, exp.action_mask, actor.dp_size, group, seed):
        if ptx is not None:
            ptx_batches = [to_batch(ptx.micro_batch(ptx_number + k), pad_id) for k in range(len(micro_batches))]
            ptx_number += len(micro_batches)
            ptx_tokens = all_reduce_sums({"t": sum(b["loss_mask"].sum().item() for b in ptx_batches)}, group)["t"]
        for j, idx in enumerate(micro_batches):
            mb, mask = {k: v[idx] for k, v in exp.batch.items()}, exp.action_mask[idx]
            logp, logits = policy_logp(actor, mb, cfg.rollout.temperature)
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
                logp, old_logp, exp.advantages[idx], mask, lo, hi, cfg.algo.dual_clip, step_tokens, token_weights=is_weights,
            )
            with contextlib.nullcontext() if cfg.algo.entropy_coef else torch.no_grad():  # only a metric at coef 0: no graph over [B, T, V]
                entropy = ppo_math.masked_sum(ppo_math.entropy_from_logits(logits[:, :-1]), mask) / step_tokens
            if cfg.algo.entropy_coef:
                loss = loss - cfg.algo.entropy_coef * entropy
            if cfg.algo.use_kl_loss:
                kl = ppo_math.kl_estimate(logp, exp.ref_logp[idx], cfg.algo.kl_estimator)
                loss = loss + kl_coef * ppo_math.masked_sum(kl, mask) / step_tokens
            sums["policy_loss"] += loss.item()
            if ptx is not None:
                pb = ptx_batches[j]
                logits = actor(input_ids=pb["input_ids"], attention_mask=pb["attention_mask"], use_cache=False).logits
                ptx_loss = sft_nll_sum(logits, pb["input_ids"], pb["loss_mask"]) / ptx_tokens
                loss = loss + cfg.algo.ptx_coef * ptx_loss
                sums["ptx_loss"] += ptx_loss.item()
            actor.backward(loss * actor.grad_scale)
            actor.step()
            share = mask.sum().item() / step_tokens
            sums["clip_fraction"] += clip_frac.item() * share
            sums["approx_kl"] += approx_kl.item() * share
            sums["entropy"] += entropy.item()
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


# ----------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def eval_reward(cfg: PPOConfig, roles: RoleEngines, scorer: Scorer, prompts: list[Prompt], rank: int) -> float:
    """Collective. Mean combined reward of greedy responses to the held-out prompts."""
    mine, counted = [], []
    if roles.generator is not None:
        index, dp = roles.groups.topology.slot_index(roles.generating_role, rank)
        mine = prompts[index::dp]
        most = -(-len(prompts) // dp)
        counted = [True] * len(mine) + [False] * (most - len(mine))
        mine = mine + [prompts[0]] * (most - len(mine))  # equal counts keep the roles' shares equal
    items = generate(cfg, roles, mine, counted, greedy=True, timings={})
    samples = [Sample(p.ids + r, [0] * len(p.ids) + [1] * len(r)) for p, r, *_ in items]
    results, _, _ = scorer.score(samples, [r for r in ("reward",) if r in roles.groups.topology.roles])
    total, n = 0.0, 0.0
    if roles.actor is not None and items:
        reward, _ = scorer.rewards([p for p, *_ in items], [r for _, r, *_ in items], results.get("reward", [[]] * len(samples)))
        keep = torch.tensor([tag for _, _, _, tag, _ in items])
        total, n = reward[keep].sum().item(), float(keep.sum().item())
    totals = all_reduce_sums({"reward": total, "n": n})
    return totals["reward"] / max(totals["n"], 1)


# ----------------------------------------------------------------------------------------------


def frozen_model_cfg(cfg: PPOConfig, pretrain: str) -> ModelConfig:
    """A frozen model like the actor's, without adapters or 4-bit."""
    return dataclasses.replace(cfg.model, pretrain=pretrain, lora_rank=0, load_in_4bit=False, gradient_checkpointing=False)


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg = parse_config(PPOConfig, argv, prog="python -m rlhf.ppo")
    algo, rollout = cfg.algo, cfg.rollout

    # 1. Launch: place the roles (colocated, or split over rank ranges) and build their groups.
    launch = init_distributed()
    in_use = cfg.roles()
    use_critic = "critic" in in_use
    reward_paths = algo.reward_pretrain.split(",") if algo.reward_pretrain else []
    placement = cfg.placement
    if placement.is_split:
        topology = Topology.split(launch.world_size, placement.role_sizes(in_use), placement.shared_roles(in_use))
    else:
        topology = Topology.colocated(launch.world_size, in_use)
    samples_per_step = rollout.rollout_batch_size * rollout.n_samples_per_prompt
    for role in ("actor", "rollout"):
        if role in topology.roles:
            topology.check_divides(role, rollout.rollout_batch_size, "--rollout_batch_size")
    for role in topology.roles:
        topology.check_divides(role, samples_per_step, "--rollout_batch_size x --n_samples_per_prompt")
        if role in ("actor", "critic"):
            topology.check_divides(role, cfg.train.train_batch_size, "--train_batch_size")
    vllm = rollout.rollout_backend == "vllm"
    tp = rollout.vllm_tensor_parallel_size
    if vllm and (launch.world_size % tp or (rollout.vllm_num_engines not in (None, launch.world_size // tp))):
        raise UserError(f"--vllm_num_engines {rollout.vllm_num_engines} x --vllm_tensor_parallel_size {tp} must equal the {launch.world_size} ranks (one engine per group of {tp} consecutive ranks)")
    groups = topology.build_groups()
    tp_group = engine_tp_group(launch.world_size, launch.rank, tp) if vllm else None
    sync_members = [topology.ranks("actor")[0], *topology.ranks("rollout")] if "rollout" in topology.roles else []
    sync_group = dist.new_group(sync_members) if sync_members else None  # collective: every rank builds it
    mine = topology.roles_of(launch.rank)
    mpu = None
    if not topology.is_colocated:
        confine_deepspeed_to(groups.group(mine[0]))
        mpu = SlotParallel(groups.group(mine[0]), groups.self_group)
    rank = launch.rank
    torch.manual_seed(cfg.train.seed)

    # 2. Data: each step takes --rollout_batch_size prompts; an actor rank gets every dp-th one.
    tokenizer = load_tokenizer(cfg.model)
    prompts = load_prompts(cfg.data.prompt_data, cfg.data.prompt_data_probs, tokenizer, cfg.data, cfg.train.seed)
    if cfg.data.eval_prompt_data:
        eval_prompts = load_prompts(cfg.data.eval_prompt_data, None, tokenizer, cfg.data, cfg.train.seed)
    else:  # no eval file: eval on a held-out share of the user's own prompts, or not at all
        prompts, eval_prompts = holdout_split(prompts, cfg.data.eval_holdout_ratio, cfg.train.seed)
    per_episode = len(prompts) // rollout.rollout_batch_size
    if per_episode == 0:
        raise UserError(f"--prompt_data has {len(prompts)} prompts, fewer than --rollout_batch_size {rollout.rollout_batch_size}")
    total_steps = per_episode * algo.num_episodes
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    updates = total_steps * algo.ppo_epochs * samples_per_step // cfg.train.train_batch_size

    # 3. Engines, only for this rank's roles: actor (+ critic) train; reference and reward models are frozen.
    actor = critic = reference = None
    reward_models: list[FrozenEngine] = []
    if "actor" in mine:
        actor_train = dataclasses.replace(cfg.train, learning_rate=algo.actor_learning_rate or cfg.train.learning_rate)
        actor = TrainEngine(load_causal_lm(cfg.model), actor_train, bf16=cfg.model.bf16, total_steps=updates, dp_size=topology.dp_size("actor"), mpu=mpu)
    if "reference" in mine:
        reference = FrozenEngine(load_causal_lm(frozen_model_cfg(cfg, cfg.model.pretrain)), cfg.train, bf16=cfg.model.bf16, dp_size=topology.dp_size("reference"), mpu=mpu, offload=placement.ref_reward_offload)
    if "reward" in mine:
        reward_models = [FrozenEngine(load_reward_model(frozen_model_cfg(cfg, p), pad_token_id=tokenizer.pad_token_id, flag="--reward_pretrain"), cfg.train, bf16=cfg.model.bf16, dp_size=topology.dp_size("reward"), mpu=mpu, offload=placement.ref_reward_offload) for p in reward_paths]
    if "critic" in mine:
        critic_cfg = dataclasses.replace(cfg.model, pretrain=algo.critic_pretrain or (reward_paths[0] if reward_paths else cfg.model.pretrain))
        critic_flag = "--critic_pretrain" if algo.critic_pretrain else "--reward_pretrain" if reward_paths else "--pretrain"
        critic_train = dataclasses.replace(cfg.train, learning_rate=algo.critic_learning_rate or cfg.train.learning_rate)
        critic = TrainEngine(load_reward_model(critic_cfg, pad_token_id=tokenizer.pad_token_id, flag=critic_flag), critic_train, bf16=cfg.model.bf16, total_steps=updates, dp_size=topology.dp_size("critic"), mpu=mpu)
    reward_fn = RewardFunction(algo.reward_func) if algo.reward_func else None
    remote = remote_reward(algo.remote_rm_url, algo.remote_rm_timeout, algo.remote_rm_retries) if algo.remote_rm_url else None
    kl_ctl = ppo_math.AdaptiveKLController(algo.init_kl_coef, algo.kl_target, algo.kl_horizon) if algo.kl_target else ppo_math.FixedKLController(algo.init_kl_coef)
    generator = weight_sync = None
    if "rollout" in mine:  # a plain copy of the policy, refreshed from the actor before each generation
        policy = load_causal_lm(frozen_model_cfg(cfg, cfg.model.pretrain)).to(device()).requires_grad_(False).eval()
        generator = HFGenerator(policy, tokenizer, rollout)
        weight_sync = WeightBroadcast(sync_group, sync_members, policy, rollout.weight_sync_bucket_mb)
    elif actor is not None and vllm:
        generator = VLLMGenerator(
            resolve_model_path(cfg.model.pretrain), tokenizer, rollout, max_model_len=cfg.data.prompt_max_len + rollout.generate_max_len,
            dtype=torch.bfloat16 if cfg.model.bf16 else torch.float32, seed=cfg.train.seed, tp_group=tp_group,
        )
    elif actor is not None:
        generator = HFGenerator(actor.module, tokenizer, rollout, actor.unpartitioned) if "rollout" not in topology.roles else None
        weight_sync = WeightBroadcast(sync_group, sync_members, actor.module, rollout.weight_sync_bucket_mb) if sync_members else None
    roles = RoleEngines(actor, critic, reference, reward_models, SampleRouter(topology, rank), groups, generator, weight_sync)
    scorer = Scorer(cfg, tokenizer, roles, remote, reward_fn, kl_ctl)
    ema = WeightEMA(actor, algo.ema_beta) if algo.enable_ema and actor is not None else None
    engines = {name: e for name, e in (("actor", actor), ("actor_ema", ema), ("critic", critic)) if e is not None}
    ptx = None
    if cfg.data.pretrain_data and actor is not None:
        ptx_cfg = DataConfig(
            dataset=cfg.data.pretrain_data, dataset_probs=cfg.data.pretrain_data_probs, input_key=cfg.data.pretrain_input_key,
            output_key=None, pretrain_mode=True, max_len=cfg.data.pretrain_max_len or cfg.data.prompt_max_len + rollout.generate_max_len,
        )
        rows = load_mixture(ptx_cfg.dataset, ptx_cfg.dataset_probs, ptx_cfg.train_split, cfg.data.max_samples, cfg.train.seed)
        index, dp = topology.slot_index("actor", rank)
        ptx = PretrainMix(tokenize_sft(rows, tokenizer, ptx_cfg), index, dp, cfg.train.micro_train_batch_size, cfg.train.seed)
    ptx_per_step = algo.ppo_epochs * samples_per_step // topology.dp_size("actor") // cfg.train.micro_train_batch_size

    # 4. Resume: engines, RNG, KL controller, step. (Seeded again here: building engines draws
    # random numbers, and a rank builds only its roles', so sampling would depend on the placement.)
    torch.manual_seed(cfg.train.seed)
    start_step = 0
    if cfg.ckpt.load_checkpoint and (folder := latest_checkpoint(cfg.ckpt.ckpt_path)) is not None:
        state = load_checkpoint(folder, engines)
        start_step = state["step"]
        kl_ctl.load_state_dict(state["kl_ctl"])

    # 5. Loop.
    metrics_path = cfg.log.metrics_path or os.path.join(cfg.ckpt.save_path, "metrics.jsonl")
    bar_keys = ("reward", f"pass_at_{rollout.n_samples_per_prompt}", "eval_reward", "kl", "entropy", "response_length")  # is it learning, at a glance
    logger = MetricsLogger(metrics_path, cfg.log, dataclasses.asdict(cfg), "ppo", total_steps, enabled=launch.is_rank0, resumed=start_step > 0, bar_keys=bar_keys)
    if start_step:
        logger.log(start_step, {"resumed_from_step": start_step})
    elif eval_prompts:
        logger.log(0, {"eval_reward": eval_reward(cfg, roles, scorer, eval_prompts, rank)})
    preemption = PreemptionWatch()
    for step in range(start_step, total_steps):
        episode, step_in_episode = divmod(step, per_episode)
        order = list(range(len(prompts)))
        random.Random(cfg.train.seed * 1000 + episode).shuffle(order)
        window = order[step_in_episode * rollout.rollout_batch_size : (step_in_episode + 1) * rollout.rollout_batch_size]
        my_prompts = []
        if generator is not None:
            index, dp = topology.slot_index(roles.generating_role, rank)
            my_prompts = [prompts[i] for i in window[index::dp]]

        timings = dict.fromkeys(("generate", "sync", "score", "train"), 0.0)
        actor_batch, critic_batch, exp_stats = make_experience(cfg, roles, scorer, my_prompts, timings)
        started = time.perf_counter()
        lr = actor.lr if actor is not None else 0.0  # the rate this step's updates start at (the scheduler moves on inside them)
        train_sums = dict.fromkeys(("policy_loss", "clip_fraction", "approx_kl", "entropy", "ptx_loss", "actor_updates", "value_loss", "critic_updates"), 0.0)
        seed = cfg.train.seed * 7919 + step
        if actor_batch is not None and step >= algo.freezing_actor_steps:
            train_sums.update(train_actor(cfg, actor_batch, actor, groups.group("actor"), kl_ctl.value, seed, ptx, step * ptx_per_step, ema, tokenizer.pad_token_id))
            for key in ("kl", "rollout_logp_gap"):  # measured in training when the experience phase had no behaviour log-probs
                exp_stats[key] += train_sums.pop(key)
        if critic_batch is not None:
            train_sums.update(train_critic(cfg, critic_batch, critic, groups.group("critic"), seed))
        timings["train"] = time.perf_counter() - started

        totals = all_reduce_sums({**exp_stats, **train_sums})
        n_samples, n_tokens = totals["samples"], max(totals["response_length"], 1.0)
        record = {"reward": totals["reward"] / n_samples, "kl": totals["kl"] / n_samples, "response_length": n_tokens / n_samples, "truncated": totals["truncated"] / n_samples}
        record.update({k: totals[k] / n_samples for k in scorer.source_names})
        record.update(ppo_math.diagnostics_record(totals, rollout.n_samples_per_prompt))
        actor_steps = max(totals["actor_updates"] / topology.dp_size("actor"), 1.0)
        record.update({k: totals[k] / actor_steps for k in ("policy_loss", "clip_fraction", "approx_kl", "entropy")})
        if cfg.data.pretrain_data:
            record["ptx_loss"] = totals["ptx_loss"] / actor_steps
        if use_critic:
            record["value_loss"] = totals["value_loss"] / max(totals["critic_updates"] / topology.dp_size("critic"), 1.0)
        record.update({f"time_{k}": v for k, v in timings.items()}, kl_coef=kl_ctl.value, lr=lr)
        if weight_sync is not None or vllm:
            record["weight_sync_mb"] = (weight_sync or generator).last_bytes / 2**20
        if vllm:
            record["rollout_logp_gap"] = totals["rollout_logp_gap"] / n_tokens  # mean |log pi_actor - log pi_vllm| per token
        kl_ctl.update(record["kl"], samples_per_step)

        done = step + 1
        if eval_prompts and (done % algo.eval_every == 0 or done == total_steps):
            record["eval_reward"] = eval_reward(cfg, roles, scorer, eval_prompts, rank)
        logger.log(done, record)
        saved = cfg.ckpt.save_steps > 0 and done % cfg.ckpt.save_steps == 0
        if saved and done < total_steps:
            save_checkpoint(cfg.ckpt.ckpt_path, done, engines, {"episode": episode, "kl_ctl": kl_ctl.state_dict()}, cfg.ckpt.max_ckpt_num)
        if done < total_steps and preemption.stop_requested():  # SLURM's warning: save now, requeue
            if not saved:
                save_checkpoint(cfg.ckpt.ckpt_path, done, engines, {"episode": episode, "kl_ctl": kl_ctl.state_dict()}, cfg.ckpt.max_ckpt_num)
            logger.close()
            preemption.hand_over()
    logger.close()

    # 6. Export: the critic and the reward curve beside the actor, then the actor (and upload).
    if critic is not None:
        export_hf(critic, tokenizer, os.path.join(cfg.ckpt.save_path, "critic"))
    dist.barrier()  # the critic is written before the actor's export moves it into place
    if launch.is_rank0:
        headline = "eval_reward" if eval_prompts else "reward"
        logged = {k for r in read_metrics(metrics_path) for k in r}
        # What says at a glance whether RL is learning: the rewards, whether groups still carry
        # signal (pass@n, zero-variance groups), and how far and how sharp the policy went.
        diagnostics = [f"pass_at_{rollout.n_samples_per_prompt}", "group_zero_std", "entropy", "kl"]
        keys = ["reward"] + (["eval_reward"] if eval_prompts else []) + [k for k in diagnostics if k in logged]
        png = plot_metrics(metrics_path, keys, os.path.join(cfg.ckpt.save_path, "reward_curve.png"))
        steps, values = metric_series(read_metrics(metrics_path), headline)
        print(f"{headline} by step: " + ", ".join(f"{s}: {v:.3f}" for s, v in zip(steps, values)) + f"  (plot: {png})", flush=True)
    with ema.swapped_in() if ema is not None else contextlib.nullcontext():  # --enable_ema exports the average
        finish(actor, tokenizer, cfg, launch)


if __name__ == "__main__":
    run_program(main)
