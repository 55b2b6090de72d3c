"""Preference-learning losses as pure functions: reward-model pairs, DPO / cDPO / IPO, KTO.

Conventions (as in ``rlhf.algos.losses``): every score and log-probability is [B] and is cast
to fp32 here; a ``normaliser`` is the number of examples (pairs for RM and DPO, completions for
KTO) in the GLOBAL batch, passed in by the caller. Each loss is a SUM over the local examples
divided by that normaliser, so the losses of the data-parallel shards add up to the loss of the
whole batch (the caller multiplies by the data-parallel size if its engine averages gradients
over ranks). Nothing in here talks to ``torch.distributed``: KTO's KL reference point, which is
a cross-rank average, is computed by the caller from ``kto_kl_estimate`` and passed in.

Reading guide: ``h`` below is DPO's implicit reward margin
    h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from rlhf.algos.losses import next_token_logprobs, per_sample_nll

DPO_LOSS_TYPES = ("sigmoid", "ipo")


def _check_normaliser(normaliser: float) -> None:
    if not normaliser > 0:
        raise ValueError(f"normaliser must be > 0 (examples in the global batch), got {normaliser}")


# ----------------------------------------------------------------------------------------------
# Reward model


def pairwise_sigmoid_loss(
    chosen_reward: torch.Tensor, rejected_reward: torch.Tensor, margin: torch.Tensor | None, normaliser: float
) -> torch.Tensor:
    """Bradley-Terry pairwise loss: sum_i -log sigmoid(r_c,i - r_r,i - m_i) / normaliser.

    chosen_reward, rejected_reward [B], margin [B] or None (no margin) -> scalar (fp32).
    The margin (Llama 2, arXiv 2307.09288 eq. 2) asks the chosen score to win by at least m_i.
    """
    _check_normaliser(normaliser)
    diff = chosen_reward.float() - rejected_reward.float()  # [B]
    if margin is not None:
        diff = diff - margin.float()
    return -F.logsigmoid(diff).sum() / normaliser


def pairwise_logexp_loss(chosen_reward: torch.Tensor, rejected_reward: torch.Tensor, normaliser: float) -> torch.Tensor:
    """sum_i log(1 + exp(r_r,i - r_c,i)) / normaliser (Anthropic HH, arXiv 2204.05862).

    chosen_reward, rejected_reward [B] -> scalar (fp32). Computed as softplus, finite for any
    score gap. Mathematically the same as ``pairwise_sigmoid_loss`` without a margin
    (softplus(-x) = -log sigmoid(x)); it exists so OpenRLHF's ``--loss logexp`` keeps working.
    """
    _check_normaliser(normaliser)
    return F.softplus(rejected_reward.float() - chosen_reward.float()).sum() / normaliser


# ----------------------------------------------------------------------------------------------
# DPO family


def dpo_loss(
    policy_chosen_logp: torch.Tensor,
    policy_rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    beta: float,
    loss_type: Literal["sigmoid", "ipo"],
    label_smoothing: float,
    normaliser: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO, cDPO and IPO on sequence log-probabilities of the responses.

    All four log-probs [B] (policy ones carry gradients; reference ones are constants) ->
    (loss scalar, chosen_rewards [B], rejected_rewards [B]), all fp32. The rewards are DPO's
    implicit rewards beta * (log pi - log ref), detached, for logging (accuracy, margins).

    With h the implicit reward margin (see the module docstring):
      sigmoid, eps = 0: DPO, arXiv 2305.18290 eq. 7:   -log sigmoid(beta h)
      sigmoid, eps > 0: conservative DPO (cDPO, Mitchell 2023, "A note on DPO with noisy
                        preferences", eq. 3), labels flipped with probability eps:
                        -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
      ipo:              IPO, arXiv 2310.12036 eq. 17:  (h - 1 / (2 beta))^2,
                        with beta playing IPO's tau (the regularisation strength).
    Each per-pair loss is summed and divided by ``normaliser`` (pairs in the global batch).

    Length normalisation of IPO: this function takes whatever log-probs it is given. The IPO
    paper and TRL use the MEAN log-prob per response token; OpenRLHF (and our trainer) pass
    SUMMED log-probs, which makes 1 / (2 beta) a target for the summed margin. To get TRL's
    behaviour pass per-token mean log-probs (``sequence_logprobs`` divided by the number of
    response tokens) for all four inputs; no flag is needed.
    """
    _check_normaliser(normaliser)
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of {', '.join(DPO_LOSS_TYPES)}")
    if loss_type == "ipo" and label_smoothing != 0:
        raise ValueError("label_smoothing (cDPO) applies to loss_type 'sigmoid' only")
    chosen_logratio = policy_chosen_logp.float() - ref_chosen_logp.float()  # [B]
    rejected_logratio = policy_rejected_logp.float() - ref_rejected_logp.float()  # [B]
    h = chosen_logratio - rejected_logratio  # [B]
    if loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2  # [B]
    else:
        eps = label_smoothing
        losses = -(1.0 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)  # [B]
    chosen_rewards = beta * chosen_logratio.detach()  # [B]
    rejected_rewards = beta * rejected_logratio.detach()  # [B]
    return losses.sum() / normaliser, chosen_rewards, rejected_rewards


# ----------------------------------------------------------------------------------------------
# KTO


def kto_kl_estimate(policy_logp_mismatched: torch.Tensor, ref_logp_mismatched: torch.Tensor) -> torch.Tensor:
    """This rank's estimate of KTO's reference point z0 = KL(pi || ref), detached.

    Log-probs [B] of MISMATCHED pairs (x_i, y_j, j != i: completions shifted within the batch,
    arXiv 2402.01306 sec. 4.1) -> scalar mean(policy - ref) (fp32). The caller averages it over
    the data-parallel ranks and clamps it at 0 before passing it to ``kto_loss``; the clamp
    comes after the average (a negative rank estimate still counts in the mean).
    """
    return (policy_logp_mismatched.float() - ref_logp_mismatched.float()).mean().detach()


def kto_loss(
    policy_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    labels: torch.Tensor,
    kl_reference: torch.Tensor,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
    normaliser: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO, arXiv 2402.01306 eq. 8, summed over completions and divided by ``normaliser``.

    policy_logp, ref_logp [B] sequence log-probs of the completions, labels [B] bool
    (True = desirable), kl_reference scalar z0 (cross-rank mean of ``kto_kl_estimate``, >= 0)
    -> (loss scalar, rewards [B] = beta * (log pi - log ref), detached), fp32.

    With r = log pi(y|x) - log ref(y|x), the per-completion loss is lambda_y - v(x, y):
      desirable:    w_D * (1 - sigmoid(beta * (r - z0)))
      undesirable:  w_U * (1 - sigmoid(beta * (z0 - r)))
    evaluated as w * sigmoid(-.) (the same number, without the cancellation of 1 - sigmoid).
    No gradient flows through z0 (it is detached here too, and the clamp is idempotent).
    ``normaliser`` is the number of completions in the global batch, both labels together.
    """
    _check_normaliser(normaliser)
    z0 = kl_reference.detach().float().clamp(min=0)  # scalar
    logratio = policy_logp.float() - ref_logp.float()  # [B]
    labels = labels.bool()
    sign = torch.where(labels, 1.0, -1.0)  # [B]; +1 desirable, -1 undesirable
    weight = torch.where(labels, desirable_weight, undesirable_weight)  # [B]
    losses = weight * torch.sigmoid(-beta * sign * (logratio - z0))  # [B]; = w (1 - sigmoid(beta s (r - z0)))
    return losses.sum() / normaliser, beta * logratio.detach()


# ----------------------------------------------------------------------------------------------
# Sequence log-probabilities


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's target (response) tokens.

    logits [B, T, V], input_ids [B, T], loss_mask [B, T] (1 = response token to score; position
    0 is never scored) -> [B] (fp32). Divide by ``loss_mask.sum(-1)`` for mean log-probs.
    """
    logp = next_token_logprobs(logits, input_ids)  # [B, T-1]
    return (logp * loss_mask[:, 1:].to(logp.dtype)).sum(-1)


def packed_sequence_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor, sample_ids: torch.Tensor, num_samples: int
) -> torch.Tensor:
    """``sequence_logprobs`` for one packed row holding several samples.

    logits [1, T, V], input_ids, loss_mask and sample_ids [1, T] (sample index per token, -1 for
    padding) -> [num_samples] (fp32). The first token of each sample is predicted from the
    previous sample's last token, so the loss mask must be 0 there (it is: samples start with
    their prompt).
    """
    logp = next_token_logprobs(logits, input_ids)  # [1, T-1]
    return -per_sample_nll(logp, loss_mask, sample_ids, num_samples)
