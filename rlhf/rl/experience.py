"""The experience phase of a PPO step: generate, score, turn rewards into advantages.

    rollouts = generate(...)             prompts -> Rollout per response, on the actor's ranks
    scores = scorer.score(samples, ...)  reference log-probs, critic values, reward-model scores,
                                         each computed on its role's ranks and sent back
    reward, per_source = scorer.rewards(rollouts, scores)    + the text sources, on actor ranks
    make_experience(...)                 all of it -> ActorBatch (actor ranks), CriticBatch (critic ranks)

Every function here marked "Collective" must be called by every rank, in the same order: in a
split placement the roles' ranks exchange samples and results (rlhf.distributed.exchange).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from rlhf.algos import ppo as ppo_math
from rlhf.config import PPOConfig
from rlhf.data.prompts import Prompt
from rlhf.data.sft import Sample
from rlhf.distributed.collectives import all_reduce_sums, all_reduce_tensor
from rlhf.distributed.env import device
from rlhf.rewards import RewardSources
from rlhf.rl.forward import MicroBatching, padded, per_token_rows, policy_logp, to_batch, token_values
from rlhf.rl.roles import RoleEngines
from rlhf.rollout.vllm_engine import VLLMGenerator


@dataclass
class Rollout:
    """One generated response to one prompt."""

    prompt: Prompt
    response: list[int]  # token ids, ending with the end-of-turn id when finished
    finished: bool  # ended with an end id; False: stopped at --generate_max_len
    engine_logp: Optional[list[float]] = None  # the generating engine's log-probs of the response tokens (vLLM); None with transformers
    tag: Any = None  # the caller's, carried along (eval: whether the sample counts)

    @property
    def sample(self) -> Sample:
        """prompt + response, loss on the response tokens."""
        return Sample(self.prompt.ids + self.response, [0] * len(self.prompt.ids) + [1] * len(self.response))


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


@dataclass
class Scores:
    """What the scoring roles computed for a rollout. On actor ranks, for the rank's own samples
    (a role that was not scored is None); per-token rows are [len(sample) - 1] each."""

    reference_logp: Optional[list[torch.Tensor]] = None  # the reference model's log-probs
    values: Optional[list[torch.Tensor]] = None  # the critic's values
    reward_model_scores: Optional[list[torch.Tensor]] = None  # [num_models] per sample
    critic_samples: list[Sample] = field(default_factory=list)  # critic ranks: the share this rank valued (what it trains on) ...
    critic_values: list[torch.Tensor] = field(default_factory=list)  # ... and its values of that share


class Scorer:
    """Everything that scores a rollout: reference, critic, and the reward sources.

    ``score`` is collective: the actor ranks' samples go to the ranks of each scoring role and the
    results come back (``SampleRouter``); text rewards run on the actor ranks, which hold the prompts.
    """

    def __init__(self, cfg: PPOConfig, tokenizer, roles: RoleEngines, kl_ctl):
        self.cfg, self.tokenizer, self.roles, self.kl_ctl = cfg, tokenizer, roles, kl_ctl
        self.pad_id = tokenizer.pad_token_id
        self.sources: RewardSources = roles.reward_sources

    @property
    def source_names(self) -> list[str]:
        return self.sources.names

    def score(self, samples: list[Sample], roles: Sequence[str]) -> Scores:
        """Collective. Run each of ``roles`` (reference, critic, reward) on its ranks' share of the
        actor ranks' ``samples``; the results for this actor rank's samples come back."""
        cfg, temperature, r = self.cfg, self.cfg.rollout.temperature, self.roles
        shares = r.router.share(samples, roles)
        results: dict[str, list] = {}
        if "reference" in shares:
            results["reference"] = per_token_rows(
                lambda mb: policy_logp(r.reference, mb, temperature)[0],
                shares["reference"],
                self.pad_id,
                MicroBatching.for_scoring(cfg, r.group("reference")),
            )
        if "critic" in shares:
            batching = MicroBatching.for_scoring(cfg, r.group("critic"))
            results["critic"] = per_token_rows(lambda mb: token_values(r.critic, mb), shares["critic"], self.pad_id, batching)
        if "reward" in shares:  # scores are read at each row's last token: reward models see padded rows
            batching = MicroBatching.for_scoring(cfg, r.group("reward"), packable=False)
            groups = batching.groups([len(s) for s in shares["reward"]])  # collective with a token budget
            results["reward"] = list(self.sources.model_scores(shares["reward"], self.pad_id, groups)) if shares["reward"] else []
        back = r.router.collect(results, roles)
        return Scores(
            reference_logp=back.get("reference"),
            values=back.get("critic"),
            reward_model_scores=back.get("reward"),
            critic_samples=shares.get("critic", []),
            critic_values=results.get("critic", []),
        )

    def rewards(self, rollouts: list[Rollout], scores: Scores) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """On actor ranks: combined sequence rewards [B] and each source's [B]."""
        rows = scores.reward_model_scores
        model_scores = torch.stack(rows) if rows else torch.zeros(len(rollouts), self.sources.num_models)  # [B, num_models]
        texts = [self.tokenizer.decode(r.response, skip_special_tokens=True) for r in rollouts] if self.sources.text else []
        return self.sources.combine(model_scores, [r.prompt for r in rollouts], texts)


def scoring_roles(cfg: PPOConfig, roles: RoleEngines) -> list[str]:
    """The placed roles that score a rollout; with LoRA the reference is the actor's base, no engine."""
    use_reference_engine = cfg.model.lora_rank == 0
    placed = roles.groups.topology.roles
    return [role for role in ("reference", "critic", "reward") if role in placed and (role != "reference" or use_reference_engine)]


def generate(cfg: PPOConfig, roles: RoleEngines, prompts: list[Prompt], tags: list, greedy: bool, timings: dict) -> list[Rollout]:
    """Collective. Sync the actor's weights to the generating ranks if they are apart, generate
    for ``prompts`` (this generating rank's share; ``tags`` ride along), and return this actor
    rank's share of the rollouts."""
    rollouts: list[Rollout] = []
    started = time.perf_counter()
    if roles.weight_sync is not None:
        roles.weight_sync.send(cfg.train.zero_stage == 3) if roles.actor is not None else roles.weight_sync.receive()
    elif isinstance(roles.generator, VLLMGenerator):
        roles.generator.refresh(roles.actor)
    sync = time.perf_counter() - started
    if roles.generator is not None:
        gen = roles.generator.generate([p.ids for p in prompts], greedy=greedy)
        rollouts = [Rollout(*fields) for fields in zip(prompts, gen.responses, gen.finished, gen.logprobs or [None] * len(prompts), tags)]
        sync += gen.sync_seconds  # ZeRO-3: gathering the actor's shards for generation
        if isinstance(roles.generator, VLLMGenerator):
            roles.generator.sleep()  # --vllm_enable_sleep: give the memory back to training
    if roles.generating_role == "rollout":
        rollouts = roles.router.share(rollouts, ["actor"], source="rollout").get("actor", [])
    timings["sync"], timings["generate"] = sync, time.perf_counter() - started - sync
    return rollouts


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


def make_experience(
    cfg: PPOConfig, roles: RoleEngines, scorer: Scorer, prompts: list[Prompt], timings: dict
) -> tuple[Optional[ActorBatch], Optional[CriticBatch], dict[str, float]]:
    """Collective. Generate n responses per prompt (``prompts``: this generating rank's share),
    score them on every role's ranks, and turn rewards into advantages (actor ranks) and returns
    (critic ranks). The stats are this rank's sums (zeros on ranks without an actor)."""
    n, pad_id, actor = cfg.rollout.n_samples_per_prompt, scorer.pad_id, roles.actor
    expanded = [p for p in prompts for _ in range(n)]  # the n samples of a prompt stay together
    rollouts = generate(cfg, roles, expanded, [None] * len(expanded), greedy=False, timings=timings)
    samples = [r.sample for r in rollouts]
    stats: dict[str, float] = dict.fromkeys(
        ["reward", "kl", "response_length", "truncated", "samples", "rollout_logp_gap", *scorer.source_names, *ppo_math.DIAGNOSTIC_SUMS],
        0.0,
    )

    started = time.perf_counter()
    score_roles = scoring_roles(cfg, roles)
    scores = scorer.score(samples, score_roles)
    actor_batch = None
    returns_rows: list[torch.Tensor] = []
    if actor is not None:
        batch = to_batch(samples, pad_id)
        action_mask = batch["loss_mask"][:, 1:].float()  # [B, T-1]
        width = action_mask.size(1)
        batching = MicroBatching.for_scoring(cfg, roles.group("actor"))

        def actor_logp() -> torch.Tensor:  # [B, T-1]
            return padded(per_token_rows(lambda mb: policy_logp(actor, mb, cfg.rollout.temperature)[0], samples, pad_id, batching), width)

        with torch.no_grad():
            old_logp = None  # from the training forward (behaviour_logp_from_training)
            if not behaviour_logp_from_training(cfg):
                old_logp = actor_logp()
            if scores.reference_logp is not None:
                ref_logp = padded(scores.reference_logp, width)
            else:  # LoRA: the reference is the base model, i.e. the actor with its adapter off
                with actor.module.disable_adapter():
                    ref_logp = actor_logp()
        values = padded(scores.values, width) if scores.values is not None else None
        is_weights, engine_logp = None, None
        if rollouts and rollouts[0].engine_logp is not None:  # the engine's own log-probs: how far its numerics are from the actor's
            engine_logp = padded([torch.tensor([0.0] * (len(r.prompt.ids) - 1) + r.engine_logp) for r in rollouts], width)
            if old_logp is not None:  # else both are measured against the training forward
                stats["rollout_logp_gap"] = ((old_logp - engine_logp).abs() * action_mask).sum().item()
                if cfg.rollout.vllm_is_truncation is not None:
                    is_weights = ppo_math.truncated_is_weights(old_logp, engine_logp, cfg.rollout.vllm_is_truncation, action_mask)
        seq_reward, per_source = scorer.rewards(rollouts, scores)
        hit_limit = torch.tensor([not r.finished for r in rollouts])
        seq_reward = ppo_math.overlong_penalty(seq_reward, hit_limit, cfg.algo.overlong_penalty).to(device())

        # [B, T-1]; without behaviour log-probs yet the KL is measured in training (it is not in the reward then)
        kl = (
            ppo_math.kl_estimate(old_logp, ref_logp, cfg.algo.kl_estimator) * action_mask
            if old_logp is not None
            else torch.zeros_like(action_mask)
        )
        kl_coef = 0.0 if cfg.algo.use_kl_loss else scorer.kl_ctl.value  # GRPO puts the KL in the loss instead
        estimator = ppo_math.get_estimator(cfg.algo.advantage_estimator)
        advantages, returns = estimator(
            ppo_math.AdvantageInputs(
                token_rewards=ppo_math.token_rewards(seq_reward, kl, action_mask, kl_coef),
                seq_rewards=seq_reward,
                action_mask=action_mask,
                values=values,
                n_samples_per_prompt=n,
                gamma=cfg.algo.gamma,
                lambd=cfg.algo.lambd,
                sum_over_shards=lambda t: all_reduce_tensor(t, roles.group("actor")),
            )
        )
        actor_batch = ActorBatch(batch, action_mask, old_logp, ref_logp, advantages.detach(), is_weights, engine_logp)
        returns_rows = [returns[i, : len(s) - 1].cpu() for i, s in enumerate(samples)] if values is not None else []
        stats.update(
            reward=seq_reward.sum().item(),
            kl=kl.sum().item(),
            response_length=action_mask.sum().item(),
            truncated=hit_limit.float().sum().item(),
            samples=float(len(samples)),
            **{name: r.sum().item() for name, r in per_source.items()},
            **ppo_math.rollout_diagnostics(seq_reward, advantages, action_mask, n),
        )

    critic_batch = None
    if "critic" in score_roles:  # the returns go to the critic's ranks, which kept their share
        critic_returns = roles.router.share(returns_rows, ["critic"])
        if roles.critic is not None:
            batch = to_batch(scores.critic_samples, pad_id)
            width = batch["input_ids"].size(1) - 1
            critic_batch = CriticBatch(
                batch, batch["loss_mask"][:, 1:].float(), padded(scores.critic_values, width), padded(critic_returns["critic"], width)
            )
    timings["score"] = time.perf_counter() - started
    return actor_batch, critic_batch, stats


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
    rollouts = generate(cfg, roles, mine, counted, greedy=True, timings={})
    scores = scorer.score([r.sample for r in rollouts], [r for r in ("reward",) if r in roles.groups.topology.roles])
    total, n = 0.0, 0.0
    if roles.actor is not None and rollouts:
        reward, _ = scorer.rewards(rollouts, scores)
        keep = torch.tensor([r.tag for r in rollouts])
        total, n = reward[keep].sum().item(), float(keep.sum().item())
    totals = all_reduce_sums({"reward": total, "n": n})
    return totals["reward"] / max(totals["n"], 1)
