"""PPO and its critic-free cousins (GRPO, RLOO, REINFORCE++, Dr. GRPO) as one SPMD program.

    torchrun --nproc_per_node 2 -m rlhf.ppo --config configs/grpo_tiny.yaml
    torchrun --nproc_per_node 8 -m rlhf.ppo --pretrain OpenRLHF/Llama-3-8b-sft-mixture \\
        --reward_pretrain OpenRLHF/Llama-3-8b-rm-mixture --advantage_estimator gae \\
        --prompt_data OpenRLHF/prompt-collection-v0.1 --input_key context_messages --apply_chat_template \\
        --rollout_batch_size 1024 --micro_rollout_batch_size 16 --train_batch_size 128 \\
        --micro_train_batch_size 4 --zero_stage 3 --bf16 --actor_learning_rate 5e-7 --critic_learning_rate 9e-6

Placement: colocated. Every rank holds a shard of every role (actor, critic, reference, reward)
and the phases of a step time-share the ranks: generate (HF generate on the actor's live
weights, so no weight sync is needed), score (reference log-probs, critic values, rewards),
advantages (pure functions chosen by --advantage_estimator), train (actor and critic).

Steps: 1 launch, 2 data, 3 engines, 4 resume, 5 loop (experience -> advantages -> train ->
eval -> log -> checkpoint), 6 export.
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from rlhf.algos.losses import next_token_logprobs
from rlhf.algos import ppo as ppo_math
from rlhf.config import ModelConfig, PPOConfig, parse_config
from rlhf.data.prompts import Prompt, load_prompts
from rlhf.data.sft import Sample, collate_padded
from rlhf.dist.env import device, init_distributed
from rlhf.dist.topology import Topology
from rlhf.engines.frozen_engine import FrozenEngine
from rlhf.engines.train_engine import TrainEngine
from rlhf.errors import UserError, exit_on_user_error, run_program
from rlhf.io.checkpoint import export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
from rlhf.metrics import MetricsLogger, metric_series, plot_metrics, read_metrics
from rlhf.models.loading import load_causal_lm, load_reward_model, load_tokenizer
from rlhf.rewards import RemoteReward, RewardFunction, combine, normalise_score, parse_weights
from rlhf.rollout.hf import HFGenerator
from rlhf.trainer import all_reduce_sums, finish

CRITIC_ESTIMATORS = ("gae",)


@dataclass
class Experience:
    """One rank's rollout batch. Per-token tensors are [B, T-1]: entry t-1 scores token t."""

    batch: dict[str, torch.Tensor]  # input_ids, attention_mask [B, T]; loss_mask = action tokens
    action_mask: torch.Tensor  # [B, T-1]
    old_logp: torch.Tensor  # [B, T-1]
    ref_logp: torch.Tensor  # [B, T-1]
    values: Optional[torch.Tensor]  # [B, T-1] (gae only)
    advantages: torch.Tensor  # [B, T-1]
    returns: torch.Tensor  # [B, T-1]


# ----------------------------------------------------------------------------------------------
# Forward passes


def policy_logp(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs [B, T-1] of the batch's tokens and the logits [B, T, V] they came from."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
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


# ----------------------------------------------------------------------------------------------
# Experience


class Scorer:
    """Everything that scores a rollout: reference, critic, reward models, reward function."""

    def __init__(self, cfg: PPOConfig, tokenizer, reference, critic, reward_models, remote, reward_fn, kl_ctl):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.reference, self.critic, self.reward_models, self.kl_ctl = reference, critic, reward_models, kl_ctl
        self.text_sources = {name: fn for name, fn in (("reward_remote", remote), ("reward_func", reward_fn)) if fn is not None}
        self.weights = parse_weights(cfg.algo.reward_weights, len(reward_models) + len(self.text_sources))

    def rewards(self, prompts: list[Prompt], responses: list[list[int]], batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Combined sequence rewards [B] and each source's [B]."""
        per_source: dict[str, torch.Tensor] = {}
        for k, rm in enumerate(self.reward_models):
            scores = []
            for _, mb in in_micro_batches(batch, self.cfg.rollout.micro_rollout_batch_size):
                scores.append(rm(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits.squeeze(-1).float())
            score = torch.cat(scores).cpu()
            if self.cfg.algo.normalize_reward:
                score = normalise_score(score, rm.module.config)
            per_source[f"reward_model{k}"] = score
        if self.text_sources:
            texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in responses]
            for name, source in self.text_sources.items():
                per_source[name] = source([p.text for p in prompts], texts, [p.label for p in prompts])
        return combine(list(per_source.values()), self.weights, self.cfg.algo.reward_clip_range), per_source


def make_experience(cfg: PPOConfig, actor: TrainEngine, generator: HFGenerator, scorer: Scorer, prompts: list[Prompt], pad_id: int, timings: dict) -> tuple[Experience, dict[str, float]]:
    """Generate n responses per prompt, score them, and turn rewards into advantages."""
    n = cfg.rollout.n_samples_per_prompt
    expanded = [p for p in prompts for _ in range(n)]  # the n samples of a prompt stay together
    started = time.perf_counter()
    gen = generator.generate([p.ids for p in expanded])
    timings["generate"] = time.perf_counter() - started

    started = time.perf_counter()
    samples = [Sample(p.ids + r, [0] * len(p.ids) + [1] * len(r)) for p, r in zip(expanded, gen.responses)]
    batch = {k: v.to(device()) for k, v in collate_padded(samples, pad_id).items()}
    action_mask = batch["loss_mask"][:, 1:].float()  # [B, T-1]
    with torch.no_grad():
        old_logp, ref_logp, values = [], [], []
        for _, mb in in_micro_batches(batch, cfg.rollout.micro_rollout_batch_size):
            old_logp.append(policy_logp(actor, mb)[0])
            if scorer.reference is not None:
                ref_logp.append(policy_logp(scorer.reference, mb)[0])
            else:  # LoRA: the reference is the base model, i.e. the actor with its adapter off
                with actor.module.disable_adapter():
                    ref_logp.append(policy_logp(actor, mb)[0])
            if scorer.critic is not None:
                values.append(token_values(scorer.critic, mb))
        old_logp, ref_logp = torch.cat(old_logp), torch.cat(ref_logp)
        values_t = torch.cat(values) if values else None
        seq_reward, per_source = scorer.rewards(expanded, gen.responses, batch)
    hit_limit = torch.tensor([not f for f in gen.finished])
    seq_reward = ppo_math.overlong_penalty(seq_reward, hit_limit, cfg.algo.overlong_penalty).to(device())

    kl = ppo_math.kl_estimate(old_logp, ref_logp, cfg.algo.kl_estimator) * action_mask  # [B, T-1]
    kl_coef = 0.0 if cfg.algo.use_kl_loss else scorer.kl_ctl.value  # GRPO puts the KL in the loss instead
    estimator = ppo_math.get_estimator(cfg.algo.advantage_estimator)
    advantages, returns = estimator(
        ppo_math.AdvantageInputs(
            token_rewards=ppo_math.token_rewards(seq_reward, kl, action_mask, kl_coef), seq_rewards=seq_reward,
            action_mask=action_mask, values=values_t, n_samples_per_prompt=n, gamma=cfg.algo.gamma, lambd=cfg.algo.lambd,
        )
    )
    timings["score"] = time.perf_counter() - started

    lengths = action_mask.sum(-1)
    stats = {
        "reward": seq_reward.sum().item(),
        "kl": (kl.sum(-1)).sum().item(),
        "response_length": lengths.sum().item(),
        "truncated": hit_limit.float().sum().item(),
        "samples": float(len(samples)),
    }
    stats.update({name: r.sum().item() for name, r in per_source.items()})
    experience = Experience(batch, action_mask, old_logp, ref_logp, values_t, advantages.detach(), returns.detach())
    return experience, stats


# ----------------------------------------------------------------------------------------------
# Training on one rollout batch


def train_on(cfg: PPOConfig, exp: Experience, actor: TrainEngine, critic: Optional[TrainEngine], kl_coef: float, train_actor: bool, seed: int) -> dict[str, float]:
    """``--ppo_epochs`` passes of optimizer steps over this rank's experience; metric sums."""
    n_local = exp.action_mask.size(0)
    per_step = cfg.train.train_batch_size // actor.dp_size  # samples per rank per optimizer step
    micro = cfg.train.micro_train_batch_size
    lo, hi = cfg.algo.eps_clip_low_high
    sums = {"policy_loss": 0.0, "clip_fraction": 0.0, "approx_kl": 0.0, "entropy": 0.0, "value_loss": 0.0, "optimizer_steps": 0.0}
    rng = random.Random(seed)
    for _ in range(cfg.algo.ppo_epochs):
        order = list(range(n_local))
        rng.shuffle(order)
        for start in range(0, n_local, per_step):
            chosen = order[start : start + per_step]
            step_tokens = all_reduce_sums({"t": exp.action_mask[chosen].sum().item()})["t"]  # normaliser: global action tokens
            for m in range(0, len(chosen), micro):
                idx = torch.tensor(chosen[m : m + micro], device=exp.action_mask.device)
                mb = {k: v[idx] for k, v in exp.batch.items()}
                mask = exp.action_mask[idx]
                if train_actor:
                    logp, logits = policy_logp(actor, mb)
                    loss, clip_frac, approx_kl = ppo_math.policy_loss(logp, exp.old_logp[idx], exp.advantages[idx], mask, lo, hi, cfg.algo.dual_clip, step_tokens)
                    entropy = ppo_math.masked_sum(ppo_math.entropy_from_logits(logits[:, :-1]), mask) / step_tokens
                    if cfg.algo.entropy_coef:
                        loss = loss - cfg.algo.entropy_coef * entropy
                    if cfg.algo.use_kl_loss:
                        kl = ppo_math.kl_estimate(logp, exp.ref_logp[idx], cfg.algo.kl_estimator)
                        loss = loss + kl_coef * ppo_math.masked_sum(kl, mask) / step_tokens
                    actor.backward(loss * actor.grad_scale)
                    actor.step()
                    sums["policy_loss"] += loss.item()
                    sums["clip_fraction"] += clip_frac.item() * mask.sum().item() / step_tokens
                    sums["approx_kl"] += approx_kl.item() * mask.sum().item() / step_tokens
                    sums["entropy"] += entropy.item()
                if critic is not None:
                    values = token_values(critic, mb)
                    vloss = ppo_math.value_loss(values, exp_values(exp)[idx], exp.returns[idx], mask, cfg.algo.value_clip, step_tokens)
                    critic.backward(vloss * critic.grad_scale)
                    critic.step()
                    sums["value_loss"] += vloss.item()
            sums["optimizer_steps"] += 1
    return sums


def exp_values(exp: Experience) -> torch.Tensor:
    assert exp.values is not None, "value loss without critic values"
    return exp.values


# ----------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def eval_reward(generator: HFGenerator, scorer: Scorer, prompts: list[Prompt], rank: int, dp: int, pad_id: int) -> float:
    """Mean combined reward of greedy responses to the held-out prompts (all ranks take part)."""
    mine = prompts[rank::dp]
    most = -(-len(prompts) // dp)
    padded = mine + [prompts[0]] * (most - len(mine))  # equal counts keep ZeRO-3 collectives in step
    gen = generator.generate([p.ids for p in padded], greedy=True)
    samples = [Sample(p.ids + r, [0] * len(p.ids) + [1] * len(r)) for p, r in zip(padded, gen.responses)]
    batch = {k: v.to(device()) for k, v in collate_padded(samples, pad_id).items()}
    reward, _ = scorer.rewards(padded, gen.responses, batch)
    totals = all_reduce_sums({"reward": reward[: len(mine)].sum().item(), "n": float(len(mine))})
    return totals["reward"] / max(totals["n"], 1)


# ----------------------------------------------------------------------------------------------


def frozen_model_cfg(cfg: PPOConfig, pretrain: str) -> ModelConfig:
    """A frozen model like the actor's, without adapters or 4-bit."""
    return dataclasses.replace(cfg.model, pretrain=pretrain, lora_rank=0, load_in_4bit=False, gradient_checkpointing=False)


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg = parse_config(PPOConfig, argv, prog="python -m rlhf.ppo")
    algo, rollout = cfg.algo, cfg.rollout
    ppo_math.get_estimator(algo.advantage_estimator)  # an unknown name fails before any work
    if algo.gamma != 1.0 and algo.advantage_estimator not in ppo_math.DISCOUNTED_ESTIMATORS:
        raise UserError(f"--gamma {algo.gamma}: --advantage_estimator {algo.advantage_estimator} needs gamma 1 (discounting works with {', '.join(ppo_math.DISCOUNTED_ESTIMATORS)})")

    # 1. Launch: every role on every rank.
    launch = init_distributed()
    use_critic = algo.advantage_estimator in CRITIC_ESTIMATORS
    reward_paths = algo.reward_pretrain.split(",") if algo.reward_pretrain else []
    roles = ("actor", "reference") + (("critic",) if use_critic else ()) + (("reward",) if reward_paths else ())
    topology = Topology.colocated(launch.world_size, roles)
    dp, rank = topology.dp_size("actor"), launch.rank
    topology.check_divides("actor", rollout.rollout_batch_size, "--rollout_batch_size")
    torch.manual_seed(cfg.train.seed)

    # 2. Data: each step takes --rollout_batch_size prompts; a rank gets every dp-th one.
    tokenizer = load_tokenizer(cfg.model)
    prompts = load_prompts(cfg.data.prompt_data, cfg.data.prompt_data_probs, tokenizer, cfg.data, cfg.train.seed)
    eval_prompts = load_prompts(cfg.data.eval_prompt_data, None, tokenizer, cfg.data, cfg.train.seed) if cfg.data.eval_prompt_data else []
    per_episode = len(prompts) // rollout.rollout_batch_size
    if per_episode == 0:
        raise UserError(f"--prompt_data has {len(prompts)} prompts, fewer than --rollout_batch_size {rollout.rollout_batch_size}")
    total_steps = per_episode * algo.num_episodes
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    updates_per_step = algo.ppo_epochs * rollout.rollout_batch_size * rollout.n_samples_per_prompt // cfg.train.train_batch_size

    # 3. Engines: actor (+ critic) train; reference and reward models are frozen.
    actor_train = dataclasses.replace(cfg.train, learning_rate=algo.actor_learning_rate or cfg.train.learning_rate)
    actor = TrainEngine(load_causal_lm(cfg.model), actor_train, bf16=cfg.model.bf16, total_steps=total_steps * updates_per_step, dp_size=dp)
    reference = None if cfg.model.lora_rank > 0 else FrozenEngine(load_causal_lm(frozen_model_cfg(cfg, cfg.model.pretrain)), cfg.train, bf16=cfg.model.bf16, dp_size=dp)
    reward_models = [FrozenEngine(load_reward_model(frozen_model_cfg(cfg, p), pad_token_id=tokenizer.pad_token_id), cfg.train, bf16=cfg.model.bf16, dp_size=dp) for p in reward_paths]
    critic = None
    if use_critic:
        critic_cfg = dataclasses.replace(cfg.model, pretrain=algo.critic_pretrain or (reward_paths[0] if reward_paths else cfg.model.pretrain))
        critic_train = dataclasses.replace(cfg.train, learning_rate=algo.critic_learning_rate or cfg.train.learning_rate)
        critic = TrainEngine(load_reward_model(critic_cfg, pad_token_id=tokenizer.pad_token_id), critic_train, bf16=cfg.model.bf16, total_steps=total_steps * updates_per_step, dp_size=dp)
    reward_fn = RewardFunction(algo.reward_func) if algo.reward_func else None
    remote = RemoteReward(algo.remote_rm_url, algo.remote_rm_timeout, algo.remote_rm_retries) if algo.remote_rm_url else None
    kl_ctl = ppo_math.AdaptiveKLController(algo.init_kl_coef, algo.kl_target, algo.kl_horizon) if algo.kl_target else ppo_math.FixedKLController(algo.init_kl_coef)
    generator = HFGenerator(actor.module, tokenizer, rollout, cfg.train.zero_stage)
    scorer = Scorer(cfg, tokenizer, reference, critic, reward_models, remote, reward_fn, kl_ctl)
    engines = {"actor": actor, **({"critic": critic} if critic is not None else {})}
    pad_id = tokenizer.pad_token_id

    # 4. Resume: engines, RNG, KL controller, step.
    start_step = 0
    if cfg.ckpt.load_checkpoint and (folder := latest_checkpoint(cfg.ckpt.ckpt_path)) is not None:
        state = load_checkpoint(folder, engines)
        start_step = state["step"]
        kl_ctl.load_state_dict(state["kl_ctl"])

    # 5. Loop.
    metrics_path = cfg.log.metrics_path or os.path.join(cfg.ckpt.save_path, "metrics.jsonl")
    logger = MetricsLogger(metrics_path, cfg.log, dataclasses.asdict(cfg), "ppo", total_steps, enabled=launch.is_rank0)
    if start_step:
        logger.log(start_step, {"resumed_from_step": start_step})
    elif eval_prompts:
        logger.log(0, {"eval_reward": eval_reward(generator, scorer, eval_prompts, rank, dp, pad_id)})
    for step in range(start_step, total_steps):
        episode, step_in_episode = divmod(step, per_episode)
        order = list(range(len(prompts)))
        random.Random(cfg.train.seed * 1000 + episode).shuffle(order)
        window = order[step_in_episode * rollout.rollout_batch_size : (step_in_episode + 1) * rollout.rollout_batch_size]
        my_prompts = [prompts[i] for i in window[rank::dp]]

        timings: dict[str, float] = {}
        exp, exp_stats = make_experience(cfg, actor, generator, scorer, my_prompts, pad_id, timings)
        started = time.perf_counter()
        train_sums = train_on(cfg, exp, actor, critic, kl_ctl.value, train_actor=step >= algo.freezing_actor_steps, seed=cfg.train.seed * 7919 + step)
        timings["train"] = time.perf_counter() - started

        totals = all_reduce_sums({**exp_stats, **train_sums})
        n_samples, n_tokens = totals["samples"], max(totals["response_length"], 1.0)
        steps_done = max(totals["optimizer_steps"] / dp, 1.0)
        record = {"reward": totals["reward"] / n_samples, "kl": totals["kl"] / n_samples, "response_length": n_tokens / n_samples, "truncated": totals["truncated"] / n_samples}
        record.update({k: totals[k] / n_samples for k in exp_stats if k.startswith("reward_")})
        record.update({k: totals[k] / steps_done / dp for k in ("policy_loss", "clip_fraction", "approx_kl", "entropy", "value_loss")})
        record.update({f"time_{k}": v for k, v in timings.items()}, time_sync=0.0, kl_coef=kl_ctl.value, lr=actor.lr)
        kl_ctl.update(record["kl"], rollout.rollout_batch_size * rollout.n_samples_per_prompt)

        done = step + 1
        if eval_prompts and (done % algo.eval_every == 0 or done == total_steps):
            record["eval_reward"] = eval_reward(generator, scorer, eval_prompts, rank, dp, pad_id)
        logger.log(done, record)
        if cfg.ckpt.save_steps > 0 and done % cfg.ckpt.save_steps == 0 and done < total_steps:
            save_checkpoint(cfg.ckpt.ckpt_path, done, engines, {"episode": episode, "kl_ctl": kl_ctl.state_dict()}, cfg.ckpt.max_ckpt_num)
    logger.close()

    # 6. Export: the critic and the reward curve beside the actor, then the actor (and upload).
    if critic is not None:
        export_hf(critic, tokenizer, os.path.join(cfg.ckpt.save_path, "critic"))
    if launch.is_rank0:
        keys = ["reward"] + (["eval_reward"] if eval_prompts else [])
        png = plot_metrics(metrics_path, keys, os.path.join(cfg.ckpt.save_path, "reward_curve.png"))
        steps, values = metric_series(read_metrics(metrics_path), keys[-1])
        print(f"{keys[-1]} by step: " + ", ".join(f"{s}: {v:.3f}" for s, v in zip(steps, values)) + f"  (plot: {png})", flush=True)
    finish(actor, tokenizer, cfg, launch)


if __name__ == "__main__":
    run_program(main)
