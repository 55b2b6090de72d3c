"""PPO and its critic-free cousins (GRPO, Dr. GRPO, RLOO, REINFORCE++) as pure tensor math.

Conventions (as in ``rlhf.algos.losses``): every per-token tensor is [B, T] over the RESPONSE
tokens, with an ``action_mask`` [B, T] (1 = a generated token, 0 = padding after EOS); the mask
is assumed to be a prefix of ones per row. A sequence reward [B] is placed on the last valid
token of its row. Arithmetic runs in fp32 (or fp64 if given fp64); log-ratios are clamped before
``exp``; no division by a count that can be zero. Nothing in here talks to ``torch.distributed``:

- Losses (``policy_loss``, ``value_loss``) are token SUMS divided by ``normaliser`` = action
  tokens in the GLOBAL batch, passed in by the caller, so the losses of data-parallel shards add
  up to the loss of the whole batch (the caller multiplies by the data-parallel size if its
  engine averages gradients over ranks). Their metrics (clip fraction, approx KL) are
  normalised the same way, so an all-reduce SUM gives the global value.
- Advantage estimators see the batch they are given: the group baselines need all
  ``n_samples_per_prompt`` samples of a prompt in it (rows ``i*n .. i*n+n-1`` belong to prompt
  ``i``), and the whitening of ``gae`` / ``reinforce`` / ``reinforce_baseline`` uses the
  statistics of that batch (OpenRLHF whitens over the whole rollout batch: pass that batch).

Estimators are looked up by name in ``ADVANTAGE_ESTIMATORS`` through ``get_estimator``;
they all take one ``AdvantageInputs`` and return ``(advantages [B, T], returns [B, T])``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Literal

import torch

from rlhf.algos.estimators import ESTIMATORS, discounted_estimators, estimator_traits
from rlhf.errors import UserError

KL_LOG_RATIO_CLAMP = 10.0  # |log pi - log ref| bound before exp in the k3 estimator
POLICY_LOG_RATIO_CLAMP = 20.0  # |log pi - log pi_old| bound before exp in the PPO ratio (as OpenRLHF)
WHITEN_VAR_EPS = 1e-8  # variance floor of whitening: rsqrt(max(var, eps))
GROUP_STD_EPS = 1e-9  # GRPO's std offset: (r - mean) / (std + eps), as OpenRLHF

KL_ESTIMATORS = ("k1", "k2", "k3")


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """At least fp32: bf16/fp16 are upcast, fp32/fp64 kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_normaliser(normaliser: float) -> None:
    if not normaliser > 0:
        raise ValueError(f"normaliser must be > 0 (action tokens in the global batch), got {normaliser}")


# ----------------------------------------------------------------------------------------------
# Masked reductions


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * mask) over ``dim`` (all dims if None). x, mask [B, T] -> scalar, or [B, T] reduced on dim."""
    x = _fp32(x)
    return (x * mask.to(x.dtype)).sum() if dim is None else (x * mask.to(x.dtype)).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x where mask is 1, over ``dim`` (all dims if None); 0 where the mask is empty.

    x, mask [B, T] -> scalar (dim None) or [B, T] reduced on dim. Exact division by the mask sum
    (OpenRLHF's ``masked_mean``; torchtune's adds 1e-8 to the count instead of guarding zero).
    """
    x = _fp32(x)
    m = mask.to(x.dtype)
    total = (x * m).sum() if dim is None else (x * m).sum(dim)
    count = m.sum() if dim is None else m.sum(dim)
    return total / torch.where(count > 0, count, torch.ones_like(count))


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, unbiased: bool = False) -> torch.Tensor:
    """(x - mean) / std with the mean and variance taken over the masked entries (all dims).

    x, mask [B, T] -> [B, T] (fp32; entries where mask = 0 are transformed too, not zeroed).
    shift_mean=True gives zero mean; shift_mean=False adds the mean back, keeping x's mean
    (only the spread is normalised): TRL's ``whiten`` semantics. unbiased: Bessel's
    correction n / (n - 1) on the variance. The std is sqrt(max(var, 1e-8)).

    Peers: OpenRLHF's advantage normalisation = ours with shift_mean=True, unbiased=False.
    torchtune 0.6.1's ``rlhf.whiten`` INVERTS the flag: its default shift_mean=True adds the
    mean back, so torchtune ``whiten(x, m, shift_mean=True)`` = ours(shift_mean=False,
    unbiased=True) and torchtune ``whiten(x, m, shift_mean=False)`` = ours(shift_mean=True,
    unbiased=True); its PPO advantages (``estimate_advantages``) therefore keep their mean.
    """
    x = _fp32(x)
    m = mask.to(x.dtype)
    mean = masked_mean(x, m)  # scalar
    var = masked_mean((x - mean) ** 2, m)  # scalar, biased
    if unbiased:
        n = m.sum()
        var = var * n / (n - 1).clamp(min=1)
    whitened = (x - mean) * var.clamp(min=WHITEN_VAR_EPS).rsqrt()
    return whitened if shift_mean else whitened + mean


# ----------------------------------------------------------------------------------------------
# KL and rewards


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: Literal["k1", "k2", "k3"]) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi (Schulman, http://joschu.net/blog/kl-approx.html).

    logp, ref_logp [B, T] (log-probs of the sampled tokens under the policy and the reference)
    -> [B, T] fp32. With d = logp - ref_logp (so ref/pi = exp(-d)):
      k1 = d                      unbiased, can be negative
      k2 = d^2 / 2                biased, >= 0, low variance
      k3 = exp(-d) - 1 + d        unbiased, >= 0 (the GRPO KL term)
    For k3, d is clamped to [-10, 10] first (both terms, so k3 stays >= 0 and exp finite).

    Difference from OpenRLHF 0.11.2 ``compute_approx_kl``: it also clamps every estimate's VALUE
    to [-10, 10] (k3 already from |d| > ~2.4 with d < 0; k2 from |d| > 4.47; k1 from |d| > 10),
    which zeroes the gradient there; we do not. Where no clamp bites the two agree.
    """
    if kind not in KL_ESTIMATORS:
        raise UserError(f"unknown KL estimator {kind!r}; choose one of {', '.join(KL_ESTIMATORS)}")
    d = _fp32(logp) - _fp32(ref_logp)  # [B, T]
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d**2
    d = d.clamp(-KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)
    return torch.exp(-d) - 1 + d


def last_token_index(action_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row. action_mask [B, T] -> [B] long (T - 1 for an all-zero row)."""
    T = action_mask.size(1)
    return T - 1 - action_mask.long().flip(-1).argmax(-1)


def _on_last_token(x: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """x [B] placed on the last action token of each row: -> [B, T] fp32 (all zero for an empty row)."""
    x = _fp32(x)
    has_action = action_mask.to(torch.float32).sum(-1) > 0  # [B]
    out = torch.zeros(action_mask.shape, dtype=x.dtype, device=x.device)
    return out.scatter(1, last_token_index(action_mask).unsqueeze(1), torch.where(has_action, x, 0.0).unsqueeze(1))


def token_rewards(seq_reward: torch.Tensor, kl: torch.Tensor, action_mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: -kl_coef * kl on every action token, plus the sequence reward on the last one.

    seq_reward [B], kl [B, T] (``kl_estimate``), action_mask [B, T] -> [B, T] fp32, zero where the
    mask is 0 (a row with no action token gets nothing). Ziegler et al. 2019 (arXiv 1909.08593,
    sec. 2): R(x, y) = r(x, y) - beta log(pi(y|x) / ref(y|x)), with the log-ratio spread over tokens.
    OpenRLHF's ``compute_reward`` and torchtune's ``get_rewards_ppo`` leave -kl_coef * kl on
    padding tokens; every estimator masks it out anyway.
    """
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    penalty = -kl_coef * _fp32(kl) * action_mask.to(torch.float32)  # [B, T]
    return penalty + _on_last_token(seq_reward, action_mask)


def overlong_penalty(seq_reward: torch.Tensor, hit_length_limit: torch.Tensor, penalty: float) -> torch.Tensor:
    """Subtract ``penalty`` from the reward of responses cut at the generation limit (no EOS).

    seq_reward [B], hit_length_limit [B] bool -> [B] fp32. A flat penalty for truncation; it is
    neither OpenRLHF's DAPO overlong buffer (a penalty growing linearly over the last
    ``overlong_buffer_len`` tokens) nor its ProRL stop-properly coefficient (scale or replace).
    """
    if penalty < 0:
        raise ValueError(f"overlong penalty must be >= 0 (it is subtracted), got {penalty}")
    return _fp32(seq_reward) - penalty * hit_length_limit.to(torch.float32)


# ----------------------------------------------------------------------------------------------
# Returns and advantages (building blocks)


def discounted_returns(rewards: torch.Tensor, action_mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Return-to-go G_t = sum_{l >= 0} gamma^l r_{t+l} over action tokens.

    rewards, action_mask [B, T] -> [B, T] fp32, zero where the mask is 0. Williams 1992 (REINFORCE).
    """
    m = action_mask.to(torch.float32)
    r = _fp32(rewards) * m  # [B, T]
    returns = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])  # [B]
    for t in reversed(range(r.size(1))):
        running = r[:, t] + gamma * running
        returns[:, t] = running
    return returns * m


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, action_mask: torch.Tensor, gamma: float, lambd: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, Schulman et al. 2015 (arXiv 1506.02438) eq. 16.

    rewards, values, action_mask [B, T] -> (advantages, returns) [B, T] fp32, zero where masked:
      delta_t = r_t + gamma V_{t+1} - V_t        (V = 0 past the last action token: terminal)
      A_t     = sum_{l >= 0} (gamma lambda)^l delta_{t+l}
      R_t     = A_t + V_t                        (the critic's regression target)
    lambda = 1 gives A_t = G_t - V_t (Monte-Carlo return minus baseline); lambda = 0 gives the
    one-step TD error. Values and rewards on padding are zeroed first (as OpenRLHF does).
    """
    m = action_mask.to(torch.float32)
    r = _fp32(rewards) * m  # [B, T]
    v = _fp32(values) * m  # [B, T]
    T = r.size(1)
    advantages = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])  # [B]
    for t in reversed(range(T)):
        next_v = v[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = r[:, t] + gamma * next_v - v[:, t]  # [B]
        running = delta + gamma * lambd * running
        advantages[:, t] = running
    return advantages * m, (advantages + v) * m


# ----------------------------------------------------------------------------------------------
# Advantage estimators, by name


@dataclasses.dataclass
class AdvantageInputs:
    """Everything an advantage estimator may use; each estimator reads the fields it needs.

    token_rewards [B, T]: ``token_rewards(seq_rewards, kl, action_mask, kl_coef)``, i.e. the
    per-token KL penalty plus ``seq_rewards`` on the last action token (kl_coef = 0 when the
    KL is a loss term instead, GRPO's ``use_kl_loss``). seq_rewards [B]: the sequence rewards
    that went into it (reward models + reward functions + penalties). action_mask [B, T].
    values [B, T]: critic values at rollout time (``gae`` only). n_samples_per_prompt: group
    size of the group baselines; rows i*n .. i*n+n-1 are the samples of prompt i. gamma, lambd:
    discount and GAE lambda (the group estimators require gamma = 1). no_std_norm: skip the
    division by the std in the whitening of gae / reinforce / reinforce_baseline (the mean is
    still subtracted), as OpenRLHF's flag of that name. sum_over_shards: when the batch is one
    data-parallel shard of the rollout, a function summing a small tensor over all shards (an
    all-reduce), so whitening uses the statistics of the WHOLE rollout batch; None = this
    batch is the whole batch. (The group estimators need no such help: a prompt's samples are
    never split over shards.)

    The group estimators transform the SEQUENCE reward before the per-token KL penalty is
    added (OpenRLHF's order): they move the last-token reward from r_i to shaped(r)_i, i.e. add
    shaped(r)_i - r_i there, and keep the KL penalty of every token as it is.
    """

    token_rewards: torch.Tensor
    seq_rewards: torch.Tensor
    action_mask: torch.Tensor
    values: torch.Tensor | None = None
    n_samples_per_prompt: int = 1
    gamma: float = 1.0
    lambd: float = 1.0
    no_std_norm: bool = False
    sum_over_shards: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        B, T = self.action_mask.shape
        if tuple(self.seq_rewards.shape) != (B,):
            raise ValueError(f"seq_rewards must be [{B}] (one per row of action_mask {B}x{T}), got {list(self.seq_rewards.shape)}")
        for name in ("token_rewards", "values"):
            x = getattr(self, name)
            if x is not None and tuple(x.shape) != (B, T):
                raise ValueError(f"{name} must be [{B}, {T}] like action_mask, got {list(x.shape)}")


Estimator = Callable[[AdvantageInputs], "tuple[torch.Tensor, torch.Tensor]"]
ADVANTAGE_ESTIMATORS: dict[str, Estimator] = {}  # name -> function, for each name of estimators.ESTIMATORS


def _register(name: str) -> Callable[[Estimator], Estimator]:
    if name not in ESTIMATORS:  # the traits table is the list of names: an estimator without traits is a bug
        raise ValueError(f"advantage estimator {name!r} has no entry in rlhf.algos.estimators.ESTIMATORS")

    def add(fn: Estimator) -> Estimator:
        fn = torch.no_grad()(fn)  # advantages and returns are regression targets: no graph
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return add


def get_estimator(name: str) -> Estimator:
    """The advantage estimator registered under ``name``; an unknown name is a ``UserError`` listing the known ones."""
    estimator_traits(name)
    return ADVANTAGE_ESTIMATORS[name]


def _normalise(advantages: torch.Tensor, inputs: AdvantageInputs) -> torch.Tensor:
    """Whitening of advantages over the action tokens of the whole rollout batch (zero elsewhere):
    ``masked_whiten`` with the mean and biased variance summed over every shard. [B, T] -> [B, T]."""
    total = inputs.sum_over_shards or (lambda t: t)
    x, m = _fp32(advantages), inputs.action_mask.to(torch.float32)
    token_sum, count = total(torch.stack([(x * m).sum(), m.sum()])).unbind()
    count = count.clamp(min=1)
    centred = x - token_sum / count
    if inputs.no_std_norm:
        return centred * m
    var = total((centred**2 * m).sum().unsqueeze(0))[0] / count
    return centred * var.clamp(min=WHITEN_VAR_EPS).rsqrt() * m


def _groups(inputs: AdvantageInputs, name: str) -> torch.Tensor:
    """Sequence rewards viewed per prompt: [B] -> [B / n, n] fp32, after checking the group setup."""
    n, B = inputs.n_samples_per_prompt, inputs.seq_rewards.size(0)
    if n < 2:
        raise UserError(f"advantage estimator {name!r} compares the samples of a prompt: set n_samples_per_prompt >= 2 (got {n})")
    if inputs.gamma != 1.0:
        raise UserError(
            f"advantage estimator {name!r} uses undiscounted returns: set gamma = 1 (got {inputs.gamma}); gamma applies to "
            f"{' and '.join(discounted_estimators())}"
        )
    if B % n:
        raise ValueError(f"batch of {B} sequences is not whole groups of n_samples_per_prompt = {n}")
    return _fp32(inputs.seq_rewards).view(B // n, n)


def _group_returns(inputs: AdvantageInputs, shaped: torch.Tensor) -> torch.Tensor:
    """Undiscounted return-to-go with the sequence reward replaced by ``shaped`` [P, n] -> [B, T]."""
    shift = shaped.reshape(-1) - _fp32(inputs.seq_rewards)  # [B]
    rewards = _fp32(inputs.token_rewards) + _on_last_token(shift, inputs.action_mask)  # [B, T]
    return discounted_returns(rewards, inputs.action_mask, 1.0)


@_register("gae")
def gae(inputs: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO with a critic: GAE (Schulman 2015, arXiv 1506.02438 eq. 16) on the KL-shaped token
    rewards, then the advantages whitened over the batch. Returns = unwhitened A + V."""
    if inputs.values is None:
        raise ValueError("advantage estimator 'gae' needs critic values (AdvantageInputs.values)")
    advantages, returns = gae_advantages(inputs.token_rewards, inputs.values, inputs.action_mask, inputs.gamma, inputs.lambd)
    return _normalise(advantages, inputs), returns


@_register("reinforce")
def reinforce(inputs: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (arXiv 2501.03262, global advantage normalisation): the discounted return-to-go
    of the KL-shaped token rewards, whitened over the batch. Returns = the unwhitened return-to-go."""
    returns = discounted_returns(inputs.token_rewards, inputs.action_mask, inputs.gamma)
    return _normalise(returns, inputs), returns


@_register("rloo")
def rloo(inputs: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO (Ahmadian et al. 2024, arXiv 2402.14740): each sample's reward minus the mean reward of
    the OTHER n - 1 samples of its prompt, r_i - (sum_j r_j - r_i) / (n - 1) = n / (n - 1) (r_i - mean);
    then the per-token KL penalty and the undiscounted return-to-go. No whitening."""
    r = _groups(inputs, "rloo")  # [P, n]
    returns = _group_returns(inputs, r - (r.sum(-1, keepdim=True) - r) / (r.size(1) - 1))
    return returns, returns.clone()


@_register("reinforce_baseline")
def reinforce_baseline(inputs: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++-baseline (arXiv 2501.03262): subtract the group mean of the sequence rewards,
    add the per-token KL penalty, take the undiscounted return-to-go, then whiten over the whole
    batch (the global normalisation of REINFORCE++, as OpenRLHF). Returns = before whitening."""
    r = _groups(inputs, "reinforce_baseline")  # [P, n]
    returns = _group_returns(inputs, r - r.mean(-1, keepdim=True))
    return _normalise(returns, inputs), returns


@_register("group_norm")
def group_norm(inputs: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO outcome supervision (DeepSeekMath, arXiv 2402.03300 sec. 4.1.2):
    (r_i - mean_group) / (std_group + 1e-9), std with Bessel's correction (torch.std, as OpenRLHF
    and TRL); then the per-token KL penalty (usually 0: GRPO puts its KL in the loss) and the
    undiscounted return-to-go, so every token of a response gets its normalised reward."""
    r = _groups(inputs, "group_norm")  # [P, n]
    returns = _group_returns(inputs, (r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + GROUP_STD_EPS))
    return returns, returns.clone()


@_register("dr_grpo")
def dr_grpo(inputs: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Dr. GRPO (arXiv 2503.20783 sec. 3.1): GRPO without the division by the group std,
    r_i - mean_group. Its other half, no per-response length normalisation in the loss, is the
    caller's choice of ``normaliser`` in ``policy_loss`` (a constant such as generate_max_len x
    sequences instead of the token count)."""
    r = _groups(inputs, "dr_grpo")  # [P, n]
    returns = _group_returns(inputs, r - r.mean(-1, keepdim=True))
    return returns, returns.clone()


DIAGNOSTIC_SUMS = (
    "reward_sq",
    "advantage",
    "advantage_sq",
    "advantage_tokens",
    "nonbinary",
    "groups",
    "groups_zero_std",
    "groups_all_right",
    "groups_all_wrong",
    "groups_solved",
)  # the keys rollout_diagnostics returns: a rank without samples adds zeros under them


def rollout_diagnostics(
    seq_reward: torch.Tensor, advantages: torch.Tensor, action_mask: torch.Tensor, n_samples_per_prompt: int
) -> dict[str, float]:
    """Sums over one shard of a rollout that tell whether a step can learn, to be added up over
    the shards and divided by the caller (hence sums, not means).

    seq_reward [B] with the ``n_samples_per_prompt`` samples of each prompt consecutive (B = P x n);
    advantages, action_mask [B, T-1].

    - ``reward_sq``: sum of r^2 (with the reward sum, the batch's reward std).
    - ``advantage``, ``advantage_sq``, ``advantage_tokens``: over action tokens (the advantage std).
    - ``groups``, ``groups_zero_std``: prompts, and prompts whose n rewards all agree: a group-relative
      estimator gives them zero advantage, so they teach nothing.
    - For 0/1 rewards (a verifier): ``groups_all_right``, ``groups_all_wrong`` and ``groups_solved``
      (at least one of n right: pass@n of the rollout); ``nonbinary`` counts samples whose reward is
      neither 0 nor 1, and those three mean nothing unless it sums to 0 over the shards.
    """
    r = seq_reward.detach().float()
    mask = action_mask.float()
    adv = advantages.detach().float() * mask
    out = {
        "reward_sq": (r * r).sum().item(),
        "advantage": adv.sum().item(),
        "advantage_sq": (adv * adv).sum().item(),
        "advantage_tokens": mask.sum().item(),
        "nonbinary": float(((r != 0) & (r != 1)).sum().item()),
    }
    groups = r.view(-1, n_samples_per_prompt)  # [P, n]
    same = (groups == groups[:, :1]).all(-1)  # [P]
    out.update(
        groups=float(groups.size(0)),
        groups_zero_std=float(same.sum().item()),
        groups_all_right=float((same & (groups[:, 0] == 1)).sum().item()),
        groups_all_wrong=float((same & (groups[:, 0] == 0)).sum().item()),
        groups_solved=float((groups == 1).any(-1).sum().item()),
    )
    return out


def diagnostics_record(totals: dict[str, float], n_samples_per_prompt: int) -> dict[str, float]:
    """The per-step figures from ``rollout_diagnostics`` sums added over the shards (and the
    reward sum ``reward`` and sample count ``samples``): reward_std, advantage_std, and with more
    than one sample per prompt the share of zero-variance groups, plus, for 0/1 rewards, the shares
    of groups all right / all wrong and the rollout's pass@n."""
    samples, tokens = max(totals["samples"], 1.0), max(totals["advantage_tokens"], 1.0)
    mean, adv_mean = totals["reward"] / samples, totals["advantage"] / tokens
    record = {
        "reward_std": math.sqrt(max(totals["reward_sq"] / samples - mean * mean, 0.0)),
        "advantage_std": math.sqrt(max(totals["advantage_sq"] / tokens - adv_mean * adv_mean, 0.0)),
    }
    if n_samples_per_prompt > 1:
        groups = max(totals["groups"], 1.0)
        record["group_zero_std"] = totals["groups_zero_std"] / groups
        if totals["nonbinary"] == 0:
            record.update(
                group_all_right=totals["groups_all_right"] / groups,
                group_all_wrong=totals["groups_all_wrong"] / groups,
                **{f"pass_at_{n_samples_per_prompt}": totals["groups_solved"] / groups},
            )
    return record


# ----------------------------------------------------------------------------------------------
# Losses


def truncated_is_weights(actor_logp: torch.Tensor, engine_logp: torch.Tensor, cap: float, action_mask: torch.Tensor) -> torch.Tensor:
    """Truncated importance weights min(pi_actor / pi_engine, cap) per token, [B, T-1] (0 off the mask).

    Corrects the policy loss for the generating engine's (vLLM's) numerics differing from the
    actor's; the log-ratio is clamped before exp so a wild token cannot overflow.
    """
    return (actor_logp - engine_logp).clamp(max=20).exp().clamp(max=cap) * action_mask


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    action_mask: torch.Tensor,
    eps_clip_low: float,
    eps_clip_high: float,
    dual_clip: float | None,
    normaliser: float,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped PPO surrogate (Schulman et al. 2017, arXiv 1707.06347 eq. 7), token-level.

    logp [B, T] (current policy, carries gradients), old_logp [B, T] (rollout policy),
    advantages [B, T], action_mask [B, T] -> (loss, clip_fraction, approx_kl), scalars fp32.
    With ratio rho = exp(clamp(logp - old_logp, -20, 20)) and advantage A, per token:
      L = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)
    eps_high > eps_low is DAPO's clip-higher (arXiv 2503.14476). Dual clip (Ye et al. 2020,
    arXiv 1912.09729), c > 1, bounds the loss of tokens with A < 0: L = -max(min(...), c A).
    loss = sum(L * mask) / normaliser, normaliser = action tokens of the GLOBAL batch.
    clip_fraction = (tokens where the clipped term is the smaller one) / normaliser;
    approx_kl = sum((old_logp - logp) * mask) / normaliser, a k1 estimate of KL(pi_old || pi),
    detached. Both are shard-additive like the loss (OpenRLHF's clip_ratio and ppo_kl).
    token_weights [B, T] (no gradient), if given, multiply each token's L: truncated importance
    sampling min(pi_old / pi_rollout, C) when a different engine (vLLM) generated the tokens
    than the one that scored old_logp.
    """
    _check_normaliser(normaliser)
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    m = action_mask.to(torch.float32)
    log_ratio = _fp32(logp) - _fp32(old_logp)  # [B, T]
    ratio = log_ratio.clamp(-POLICY_LOG_RATIO_CLAMP, POLICY_LOG_RATIO_CLAMP).exp()  # [B, T]
    adv = _fp32(advantages)
    surr1 = ratio * adv  # [B, T]
    surr2 = ratio.clamp(1 - eps_clip_low, 1 + eps_clip_high) * adv  # [B, T]
    objective = torch.min(surr1, surr2)  # [B, T]
    if dual_clip is not None:
        objective = torch.where(adv < 0, torch.max(objective, dual_clip * adv), objective)
    weighted = objective if token_weights is None else objective * _fp32(token_weights).detach()
    loss = -(weighted * m).sum() / normaliser
    clip_fraction = ((surr2 < surr1).to(m.dtype) * m).sum().detach() / normaliser
    approx_kl = (-log_ratio.detach() * m).sum() / normaliser
    return loss, clip_fraction, approx_kl


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    action_mask: torch.Tensor,
    value_clip: float | None,
    normaliser: float,
) -> torch.Tensor:
    """Clipped value loss of PPO's critic (as in OpenAI baselines ppo2 / OpenRLHF ValueLoss).

    values [B, T] (carries gradients), old_values [B, T] (rollout time), returns [B, T],
    action_mask [B, T] -> scalar fp32:
      0.5 * sum(max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2) * mask) / normaliser,
    or 0.5 * sum((V - R)^2 * mask) / normaliser when value_clip is None.
    """
    _check_normaliser(normaliser)
    v, r = _fp32(values), _fp32(returns)
    err = (v - r) ** 2  # [B, T]
    if value_clip is not None:
        old = _fp32(old_values)
        clipped = old + (v - old).clamp(-value_clip, value_clip)  # [B, T]
        err = torch.max(err, (clipped - r) ** 2)
    return 0.5 * (err * action_mask.to(err.dtype)).sum() / normaliser


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution. logits [B, T, V] -> [B, T] fp32.

    H = -sum_v p_v log p_v with log p = log_softmax(z): every term is small and accurate, for any
    logit scale (logsumexp(z) - sum p z, OpenRLHF's form, cancels catastrophically in fp32 when
    logits are large: 1e4 + log 2 - 1e4). A p that is 0 (underflow, or a -inf logit of a masked
    vocabulary entry) contributes 0, not 0 * -inf = nan.
    """
    logp = torch.log_softmax(_fp32(logits), -1)  # [B, T, V]
    p = logp.exp()  # [B, T, V]
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)


# ----------------------------------------------------------------------------------------------
# KL coefficient controllers


class AdaptiveKLController:
    """Adaptive KL coefficient, Ziegler et al. 2019 (arXiv 1909.08593, the adaptive beta schedule):
      e = clip(KL / KL_target - 1, -0.2, 0.2);  beta <- beta (1 + e n_steps / horizon)
    ``update(current_kl, n_steps)``: current_kl is the measured mean KL of the rollout,
    n_steps the number of samples it came from (OpenRLHF: rollout batch x n_samples_per_prompt).
    """

    def __init__(self, init_kl_coef: float, kl_target: float, kl_horizon: float) -> None:
        if not kl_target > 0 or not kl_horizon > 0:
            raise ValueError(f"kl_target and kl_horizon must be > 0, got {kl_target} and {kl_horizon}")
        self.value = float(init_kl_coef)
        self.kl_target = float(kl_target)
        self.kl_horizon = float(kl_horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.kl_target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.kl_horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        value = float(state["value"])
        if not math.isfinite(value):
            raise ValueError(f"KL coefficient in the checkpoint is not finite: {value}")
        self.value = value


class FixedKLController:
    """A constant KL coefficient with the interface of ``AdaptiveKLController``.

    ``load_state_dict`` keeps the configured coefficient: on resume the config wins (there is
    no state to restore), so a run can be resumed with a different fixed coefficient.
    """

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        pass


def kl_controller(init_kl_coef: float, kl_target, kl_horizon: int):
    """--kl_target given: the adaptive controller steering the KL to it; else a fixed coefficient."""
    return AdaptiveKLController(init_kl_coef, kl_target, kl_horizon) if kl_target else FixedKLController(init_kl_coef)
