"""PPO math (rlhf/algos/ppo.py): hand-worked values, peer oracles, sharding, errors.

Oracles (see tests/oracles.py; installed by `bash launch/install.sh --test`):
- OpenRLHF 0.11.2 ``models/utils.py``: compute_approx_kl, compute_reward, masked_mean,
  compute_entropy; ``models/loss.py``: PolicyLoss, ValueLoss; ``trainer/ppo_utils/
  kl_controller.py``; and the advantage methods of ``RemoteExperienceMaker`` (extracted from
  ``experience_maker.py``, which imports Ray: see ``oracles.openrlhf_advantage_maker``), run end
  to end: group baseline -> compute_reward (KL penalty) -> GAE / return-to-go -> whitening.
- torchtune 0.6.1 ``rlhf/rewards.py``: get_rewards_ppo, estimate_advantages, masked_mean, whiten.

Stated differences, each checked by a test here:
- OpenRLHF clamps every KL estimate's value to [-10, 10]; we only clamp k3's log-ratio before
  exp (``test_kl_value_clamp_difference``).
- OpenRLHF and torchtune leave -kl_coef * kl (and OpenRLHF the whitened mean) on padding
  tokens; ours are 0 there. Comparisons are on action tokens (peer * mask).
- torchtune whitens GAE advantages with the unbiased variance and ADDS THE MEAN BACK (its
  ``shift_mean=True`` default means the opposite of TRL's); our ``gae`` estimator whitens like
  OpenRLHF (biased variance, zero mean). The torchtune comparison goes through
  ``gae_advantages`` + ``masked_whiten(shift_mean=False, unbiased=True)``.

Precision: peers run in float64 on the same fp32 inputs (the exact math); ours runs in fp32 and
must agree to 1e-6 (OpenRLHF's whitening itself runs in fp32: ``.float()`` on the advantages).
"""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch
from oracles import openrlhf_advantage_maker, openrlhf_kl_controller, openrlhf_loss, openrlhf_utils, torchtune_rewards
from torch.testing import assert_close

from rlhf.algos.ppo import (
    ADVANTAGE_ESTIMATORS,
    AdaptiveKLController,
    AdvantageInputs,
    FixedKLController,
    discounted_returns,
    entropy_from_logits,
    gae_advantages,
    get_estimator,
    kl_estimate,
    masked_mean,
    masked_sum,
    masked_whiten,
    overlong_penalty,
    policy_loss,
    token_rewards,
    value_loss,
)
from rlhf.errors import UserError

TOL = dict(rtol=1e-6, atol=1e-6)
ESTIMATORS = ["gae", "reinforce", "rloo", "reinforce_baseline", "group_norm", "dr_grpo"]


def t(*rows):
    """t(1.0, 2.0) -> [2]; t([1, 2, 3]) -> [1, 3] (one row)."""
    return torch.tensor(rows, dtype=torch.float32)


def rollout(batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    """A random rollout batch, fp32: response lengths 1..T (row 0 full), plausible log-probs.

    |logp - ref_logp| <= 2 and |logp - old_logp| <= 0.6, so neither peer's clamps bite.
    """
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    lengths[0] = length
    mask = (torch.arange(length) < lengths[:, None]).float()  # [B, T]
    logp = -3 * torch.rand(batch, length, generator=g)
    return dict(
        mask=mask,
        logp=logp,
        ref_logp=logp + (0.7 * torch.randn(batch, length, generator=g)).clamp(-2, 2),
        old_logp=logp + (0.2 * torch.randn(batch, length, generator=g)).clamp(-0.6, 0.6),
        values=torch.randn(batch, length, generator=g),
        old_values=torch.randn(batch, length, generator=g),
        returns=torch.randn(batch, length, generator=g),
        advantages=torch.randn(batch, length, generator=g),
        seq_rewards=2 * torch.randn(batch, generator=g),
    )


# ----------------------------------------------------------------------------------------------
# Hand-worked values


def test_masked_reductions_hand_values():
    x = t([1, 2, 3], [4, 5, 6])
    mask = t([1, 1, 0], [0, 0, 0])  # row 1 is empty
    assert masked_mean(x, mask).item() == pytest.approx(1.5)  # (1 + 2) / 2
    assert masked_mean(x, mask, dim=-1).tolist() == pytest.approx([1.5, 0.0])  # empty row -> 0, not nan
    assert masked_sum(x, mask).item() == pytest.approx(3.0)
    assert masked_sum(x, mask, dim=-1).tolist() == pytest.approx([3.0, 0.0])
    assert masked_mean(x, torch.zeros_like(x)).item() == 0.0


def test_masked_whiten_hand_values():
    x, mask = t([1, 2, 3, 100]), t([1, 1, 1, 0])  # 100 is padding
    # mean 2; biased var (1 + 0 + 1) / 3 = 2/3, std 0.816497: [-1.224745, 0, 1.224745]
    assert masked_whiten(x, mask)[0, :3].tolist() == pytest.approx([-1.224745, 0.0, 1.224745], abs=1e-6)
    # unbiased var 2 / 2 = 1: [-1, 0, 1]; adding the mean back: [1, 2, 3]
    assert masked_whiten(x, mask, unbiased=True)[0, :3].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-6)
    assert masked_whiten(x, mask, shift_mean=False, unbiased=True)[0, :3].tolist() == pytest.approx([1.0, 2.0, 3.0], abs=1e-6)
    # constant values: var 0 is floored at 1e-8, so the result is 0, not nan
    assert masked_whiten(t(5, 5, 5), t(1, 1, 1)).tolist() == [0.0, 0.0, 0.0]


def test_kl_estimate_hand_values():
    # d = logp - ref = 1: k1 = 1, k2 = 1/2, k3 = e^-1 - 1 + 1 = 0.367879
    logp, ref = t([0.0]), t([-1.0])
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(1.0)
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(0.5)
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(0.367879, abs=1e-6)
    # d = -1: k1 = -1 (k1 can be negative), k3 = e - 1 - 1 = 0.718282
    assert kl_estimate(ref, logp, "k1").item() == pytest.approx(-1.0)
    assert kl_estimate(ref, logp, "k3").item() == pytest.approx(0.718282, abs=1e-6)
    # k3 clamps d to [-10, 10]: d = -20 -> e^10 - 1 - 10 = 22015.465795; d = 20 -> e^-10 - 1 + 10 = 9.0000454
    assert kl_estimate(t([-20.0]), t([0.0]), "k3").item() == pytest.approx(22015.465795, rel=1e-6)
    assert kl_estimate(t([20.0]), t([0.0]), "k3").item() == pytest.approx(9.0000454, abs=1e-6)


def test_token_rewards_hand_values():
    # kl [0.1, 0.2, 0.3], coef 0.5, reward 1, mask [1, 1, 0]:
    # [-0.05, -0.1 + 1, 0] = [-0.05, 0.9, 0] (the padding token gets neither KL nor reward)
    out = token_rewards(t(1.0), t([0.1, 0.2, 0.3]), t([1, 1, 0]), 0.5)
    assert out.tolist() == [pytest.approx([-0.05, 0.9, 0.0])]
    # a row without action tokens gets nothing
    assert token_rewards(t(1.0), t([0.1, 0.2]), t([0, 0]), 0.5).tolist() == [[0.0, 0.0]]


def test_overlong_penalty_hand_values():
    # rewards [1, 2], only the second hit the limit: [1, 2 - 0.5]
    assert overlong_penalty(t(1.0, 2.0), torch.tensor([False, True]), 0.5).tolist() == [1.0, 1.5]


def test_discounted_returns_hand_values():
    # r = [1, 0, 2], gamma = 0.5: G2 = 2, G1 = 0 + 0.5 * 2 = 1, G0 = 1 + 0.5 * 1 = 1.5
    assert discounted_returns(t([1, 0, 2]), t([1, 1, 1]), 0.5).tolist() == [[1.5, 1.0, 2.0]]
    # the padding reward (5) is ignored and its return is 0: G1 = 2, G0 = 1 + 2 = 3
    assert discounted_returns(t([1, 2, 5]), t([1, 1, 0]), 1.0).tolist() == [[3.0, 2.0, 0.0]]


def test_gae_hand_values():
    r, v, m = t([0, 0, 1]), t([0.5, 0.6, 0.7]), t([1, 1, 1])
    # gamma = lambda = 1: A = G - V with G = [1, 1, 1]: A = [0.5, 0.4, 0.3], returns = G
    adv, ret = gae_advantages(r, v, m, 1.0, 1.0)
    assert adv.tolist() == [pytest.approx([0.5, 0.4, 0.3])] and ret.tolist() == [pytest.approx([1.0, 1.0, 1.0])]
    # gamma = lambda = 0.5: delta = [0 + 0.5*0.6 - 0.5, 0 + 0.5*0.7 - 0.6, 1 - 0.7] = [-0.2, -0.25, 0.3]
    # A2 = 0.3; A1 = -0.25 + 0.25*0.3 = -0.175; A0 = -0.2 + 0.25*(-0.175) = -0.24375; R = A + V
    adv, ret = gae_advantages(r, v, m, 0.5, 0.5)
    assert adv.tolist() == [pytest.approx([-0.24375, -0.175, 0.3])]
    assert ret.tolist() == [pytest.approx([0.25625, 0.425, 1.0])]
    # lambda = 0: the one-step TD errors
    assert gae_advantages(r, v, m, 0.5, 0.0)[0].tolist() == [pytest.approx([-0.2, -0.25, 0.3])]
    # padding: r = [0, 1, (5)], V = [0.5, 0.6, (9)], mask [1, 1, 0], gamma = lambda = 1:
    # the last action token is terminal: delta1 = 1 - 0.6 = 0.4, delta0 = 0.6 - 0.5 = 0.1 -> A = [0.5, 0.4, 0]
    adv, ret = gae_advantages(t([0, 1, 5]), t([0.5, 0.6, 9]), t([1, 1, 0]), 1.0, 1.0)
    assert adv.tolist() == [pytest.approx([0.5, 0.4, 0.0])] and ret.tolist() == [pytest.approx([1.0, 1.0, 0.0])]


def test_gae_lambda_one_equals_returns_minus_values():
    x = rollout(5, 7, seed=1)
    rewards = token_rewards(x["seq_rewards"], kl_estimate(x["logp"], x["ref_logp"], "k1"), x["mask"], 0.1)
    adv, ret = gae_advantages(rewards, x["values"], x["mask"], 0.9, 1.0)
    assert_close(ret, discounted_returns(rewards, x["mask"], 0.9), **TOL)
    assert_close(adv, (ret - x["values"]) * x["mask"], **TOL)


def _inputs(seq, n, **kw):
    """Rewards ``seq`` on two action tokens each, no KL penalty."""
    seq, mask = t(*seq), torch.ones(len(seq), 2)
    return AdvantageInputs(token_rewards(seq, torch.zeros(len(seq), 2), mask, 0.0), seq, mask, n_samples_per_prompt=n, **kw)


def test_group_estimators_hand_values():
    # RLOO, n = 3, rewards [1, 2, 6]: baselines [(2+6)/2, (1+6)/2, (1+2)/2] = [4, 3.5, 1.5]
    # -> [-3, -1.5, 4.5]; the reward sits on the last token and the return-to-go copies it to both tokens
    adv, ret = get_estimator("rloo")(_inputs([1, 2, 6], 3))
    assert adv[:, 0].tolist() == pytest.approx([-3.0, -1.5, 4.5]) and adv[:, 1].tolist() == pytest.approx([-3.0, -1.5, 4.5])
    assert_close(ret, adv)
    # GRPO, n = 2, rewards [0, 1]: mean 0.5, unbiased std sqrt(0.5) = 0.707107 -> [-0.707107, 0.707107]
    adv, _ = get_estimator("group_norm")(_inputs([0, 1], 2))
    assert adv[:, 0].tolist() == pytest.approx([-0.707107, 0.707107], abs=1e-6)
    # Dr. GRPO: no std: [-0.5, 0.5]
    adv, _ = get_estimator("dr_grpo")(_inputs([0, 1], 2))
    assert adv[:, 0].tolist() == pytest.approx([-0.5, 0.5])
    # REINFORCE++-baseline, n = 2, rewards [0, 1 | 3, 3]: centred [-0.5, 0.5, 0, 0] on every token;
    # whitened over the 8 tokens: mean 0, var (4 * 0.25) / 8 = 0.125, std 0.353553 -> [-1.414214, 1.414214, 0, 0]
    adv, ret = get_estimator("reinforce_baseline")(_inputs([0, 1, 3, 3], 2))
    assert adv[:, 0].tolist() == pytest.approx([-1.414214, 1.414214, 0.0, 0.0], abs=1e-6)
    assert ret[:, 0].tolist() == pytest.approx([-0.5, 0.5, 0.0, 0.0])
    # ... and with no_std_norm only the mean (0) is removed
    adv, _ = get_estimator("reinforce_baseline")(_inputs([0, 1, 3, 3], 2, no_std_norm=True))
    assert adv[:, 0].tolist() == pytest.approx([-0.5, 0.5, 0.0, 0.0])
    # equal rewards in a group: GRPO gives 0, not nan
    adv, _ = get_estimator("group_norm")(_inputs([2, 2], 2))
    assert adv.tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_reinforce_hand_values():
    # token rewards [-0.05, 0.9, 0] (see test_token_rewards_hand_values), gamma 1: returns [0.85, 0.9, 0];
    # whitened over the 2 action tokens: mean 0.875, std 0.025 -> [-1, 1, 0]
    mask = t([1, 1, 0])
    inputs = AdvantageInputs(token_rewards(t(1.0), t([0.1, 0.2, 0.3]), mask, 0.5), t(1.0), mask)
    adv, ret = get_estimator("reinforce")(inputs)
    assert ret.tolist() == [pytest.approx([0.85, 0.9, 0.0])]
    assert adv.tolist() == [pytest.approx([-1.0, 1.0, 0.0], abs=1e-5)]


def test_policy_loss_hand_values():
    logp = torch.log(t([1.5, 1.5, 0.5]))  # ratios 1.5, 1.5, 0.5 against old_logp = 0
    old, adv, mask = torch.zeros(1, 3), t([1.0, -1.0, -1.0]), torch.ones(1, 3)
    # eps 0.2 / 0.2, per token -min(rho A, clip(rho, 0.8, 1.2) A):
    #   rho 1.5, A +1: min(1.5, 1.2) = 1.2   -> -1.2 (clipped)
    #   rho 1.5, A -1: min(-1.5, -1.2) = -1.5 -> 1.5
    #   rho 0.5, A -1: min(-0.5, -0.8) = -0.8 -> 0.8 (clipped)
    # global batch of 4 tokens: (-1.2 + 1.5 + 0.8) / 4 = 0.275; clip fraction 2/4;
    # approx KL = -(ln 1.5 + ln 1.5 + ln 0.5) / 4 = -0.117783 / 4 = -0.029446
    loss, clip_frac, kl = policy_loss(logp, old, adv, mask, 0.2, 0.2, None, 4)
    assert (loss.item(), clip_frac.item(), kl.item()) == pytest.approx((0.275, 0.5, -0.029446), abs=1e-6)
    # clip-higher, eps_high 0.6: clip(1.5, 0.8, 1.6) = 1.5, token 0 is no longer clipped:
    # (-1.5 + 1.5 + 0.8) / 4 = 0.2, clip fraction 1/4
    loss, clip_frac, _ = policy_loss(logp, old, adv, mask, 0.2, 0.6, None, 4)
    assert (loss.item(), clip_frac.item()) == pytest.approx((0.2, 0.25), abs=1e-6)
    # dual clip c = 3, rho 5, A -1: -max(min(-5, -1.2), -3) = 3 (5 without dual clip)
    logp5 = torch.log(t([5.0]))
    assert policy_loss(logp5, torch.zeros(1, 1), t([-1.0]), torch.ones(1, 1), 0.2, 0.2, 3.0, 1)[0].item() == pytest.approx(3.0)
    assert policy_loss(logp5, torch.zeros(1, 1), t([-1.0]), torch.ones(1, 1), 0.2, 0.2, None, 1)[0].item() == pytest.approx(5.0)
    # ... dual clip leaves positive advantages alone: rho 5, A +1 -> -1.2
    assert policy_loss(logp5, torch.zeros(1, 1), t([1.0]), torch.ones(1, 1), 0.2, 0.2, 3.0, 1)[0].item() == pytest.approx(-1.2)


def test_value_loss_hand_values():
    v, old, ret, mask = t([1.5, 1.0]), t([1.0, 1.0]), t([2.0, 0.0]), torch.ones(1, 2)
    # clip 0.2: token 0: clipped V 1.2, max((1.2-2)^2, (1.5-2)^2) = 0.64; token 1: V = old, (1-0)^2 = 1
    # 0.5 * (0.64 + 1) / 2 = 0.41; unclipped: 0.5 * (0.25 + 1) / 2 = 0.3125
    assert value_loss(v, old, ret, mask, 0.2, 2).item() == pytest.approx(0.41)
    assert value_loss(v, old, ret, mask, None, 2).item() == pytest.approx(0.3125)


def test_entropy_hand_values():
    # uniform over 4: log 4; two equal logits far above the rest: log 2, also at logit scale 1e4 in fp32
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, -100.0, -100.0], [1e4, 1e4, 0.0, 0.0]]])
    out = entropy_from_logits(logits.bfloat16()[:, :2]).tolist() + entropy_from_logits(logits).tolist()
    assert out[0] == pytest.approx([math.log(4), math.log(2)], abs=1e-6)
    assert out[1] == pytest.approx([math.log(4), math.log(2), math.log(2)], abs=1e-6)
    assert entropy_from_logits(logits.bfloat16()).dtype == torch.float32
    # -inf logits (a masked vocabulary) count as probability 0: log 2, not nan
    assert entropy_from_logits(torch.tensor([[[0.0, 0.0, -math.inf]]])).item() == pytest.approx(math.log(2))


def test_adaptive_kl_controller_moves_the_right_way():
    ctl = AdaptiveKLController(init_kl_coef=0.2, kl_target=6.0, kl_horizon=10000)
    # KL 12 above target 6: error clip(12/6 - 1, -0.2, 0.2) = 0.2; 1000 steps: x (1 + 0.2 * 0.1) = 1.02 -> 0.204
    ctl.update(12.0, 1000)
    assert ctl.value == pytest.approx(0.204)
    # KL 3 below target: error -0.2 -> x 0.98 -> 0.19992
    ctl.update(3.0, 1000)
    assert ctl.value == pytest.approx(0.19992)
    # on target: unchanged
    ctl.update(6.0, 1000)
    assert ctl.value == pytest.approx(0.19992)
    # checkpoint round trip
    other = AdaptiveKLController(0.5, 6.0, 10000)
    other.load_state_dict(ctl.state_dict())
    assert other.value == ctl.value
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 1000)
    fixed.load_state_dict({"value": 0.3})  # a fixed coefficient comes from the config, also on resume
    assert fixed.value == 0.05 and fixed.state_dict() == {"value": 0.05}


# ----------------------------------------------------------------------------------------------
# Registry and argument errors


def test_unknown_estimator_is_user_error_listing_names():
    with pytest.raises(
        UserError, match="unknown advantage estimator 'ppo'; choose one of gae, reinforce, rloo, reinforce_baseline, group_norm, dr_grpo"
    ):
        get_estimator("ppo")
    assert list(ADVANTAGE_ESTIMATORS) == ESTIMATORS


def test_estimator_traits_say_what_each_estimator_does():
    """The traits table (what config validation and the PPO placement decide by) names exactly
    the registered functions, and each trait matches the function's behaviour: grouped ones
    refuse one sample per prompt and gamma != 1, gae needs critic values, discounted ones take gamma."""
    from rlhf.algos.estimators import ESTIMATORS as TRAITS

    assert list(TRAITS) == list(ADVANTAGE_ESTIMATORS)
    values = torch.zeros(2, 2)  # [B, T] like _inputs' action mask
    for name, traits in TRAITS.items():
        inputs = _inputs([0, 1], 2, gamma=0.9) if traits.discounted else _inputs([0, 1], 2)
        if traits.needs_critic:
            inputs.values = values
        get_estimator(name)(inputs)  # the discounted ones run with gamma 0.9
        if traits.grouped:
            with pytest.raises(UserError, match="n_samples_per_prompt >= 2"):
                get_estimator(name)(_inputs([0, 1], 1))
        else:
            with pytest.raises(ValueError, match="needs critic values") if traits.needs_critic else contextlib.nullcontext():
                get_estimator(name)(_inputs([0, 1], 1))


def test_argument_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(UserError, match="unknown KL estimator 'k4'"):
        kl_estimate(x, x, "k4")
    with pytest.raises(UserError, match="n_samples_per_prompt >= 2"):
        get_estimator("group_norm")(_inputs([0, 1], 1))
    with pytest.raises(UserError, match="set gamma = 1"):
        get_estimator("rloo")(_inputs([0, 1], 2, gamma=0.99))
    with pytest.raises(ValueError, match="not whole groups"):
        get_estimator("rloo")(_inputs([0, 1, 2], 2))
    with pytest.raises(ValueError, match="needs critic values"):
        get_estimator("gae")(_inputs([0, 1], 1))
    with pytest.raises(ValueError, match=r"seq_rewards must be \[2\]"):
        AdvantageInputs(token_rewards=x, seq_rewards=torch.zeros(3), action_mask=x)
    with pytest.raises(ValueError, match="normaliser must be > 0"):
        policy_loss(x, x, x, x, 0.2, 0.2, None, 0)
    with pytest.raises(ValueError, match="normaliser must be > 0"):
        value_loss(x, x, x, x, None, 0)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        policy_loss(x, x, x, x, 0.2, 0.2, 1.0, 1)
    with pytest.raises(ValueError, match="kl_coef must be >= 0"):
        token_rewards(torch.zeros(2), x, x, -0.1)


def test_estimators_return_targets_without_graph():
    x = rollout(4, 5, seed=2)
    values = x["values"].requires_grad_(True)
    for name in ESTIMATORS:
        rewards = token_rewards(x["seq_rewards"], kl_estimate(x["logp"], x["ref_logp"], "k3"), x["mask"], 0.1)
        inputs = AdvantageInputs(rewards, x["seq_rewards"], x["mask"], values=values, n_samples_per_prompt=2)
        adv, ret = get_estimator(name)(inputs)
        assert not adv.requires_grad and not ret.requires_grad
        assert adv.shape == ret.shape == (4, 5) and adv.dtype == ret.dtype == torch.float32
        assert (adv[x["mask"] == 0] == 0).all() and (ret[x["mask"] == 0] == 0).all()


# ----------------------------------------------------------------------------------------------
# Oracles: OpenRLHF 0.11.2


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimate_matches_openrlhf(kind):
    peer = openrlhf_utils("0.11.2")
    x = rollout(6, 11, seed=10)
    logp = x["logp"].clone().requires_grad_(True)
    logp64 = x["logp"].double().requires_grad_(True)
    ours = kl_estimate(logp, x["ref_logp"], kind)
    theirs = peer.compute_approx_kl(logp64, x["ref_logp"].double(), kl_estimator=kind)
    assert_close(ours, theirs.float(), **TOL)
    assert_close(torch.autograd.grad(ours.sum(), logp)[0], torch.autograd.grad(theirs.sum(), logp64)[0].float(), **TOL)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_value_clamp_difference(kind):
    """OpenRLHF clamps each estimate to [-10, 10]; ours does not: for |d| <= 10, peer = clamp(ours)."""
    peer = openrlhf_utils("0.11.2")
    d = torch.linspace(-10, 10, 81, dtype=torch.float64)  # d = logp - ref
    logp, ref = d.float().unsqueeze(0), torch.zeros(1, 81)
    ours = kl_estimate(logp, ref, kind)
    theirs = peer.compute_approx_kl(logp.double(), ref.double(), kl_estimator=kind)
    assert_close(ours.clamp(-10, 10), theirs.float(), **TOL)
    # the clamp bites: k3 at d = -3 is e^3 - 1 - 3 = 16.085537 for us, 10 for OpenRLHF
    assert kl_estimate(t([-3.0]), t([0.0]), "k3").item() == pytest.approx(16.085537, abs=1e-5)


def test_masked_mean_matches_openrlhf():
    peer = openrlhf_utils("0.11.2")
    x = rollout(5, 9, seed=11)
    for dim in (None, -1, 0):
        assert_close(
            masked_mean(x["values"], x["mask"], dim), peer.masked_mean(x["values"].double(), x["mask"].double(), dim).float(), **TOL
        )


@pytest.mark.parametrize("kl_coef", [0.0, 0.05, 1.0])
def test_token_rewards_matches_openrlhf(kl_coef):
    peer = openrlhf_utils("0.11.2")
    x = rollout(7, 10, seed=12)
    kl = kl_estimate(x["logp"], x["ref_logp"], "k3")
    ours = token_rewards(x["seq_rewards"], kl, x["mask"], kl_coef)
    theirs = peer.compute_reward(x["seq_rewards"].double(), kl_coef, kl.double(), action_mask=x["mask"].double())
    assert_close(ours, (theirs * x["mask"]).float(), **TOL)  # they leave -kl_coef * kl on padding


POLICY_CASES = [  # (eps_low, eps_high, dual_clip)
    (0.2, 0.2, None),  # PPO
    (0.2, 0.28, None),  # DAPO clip-higher
    (0.1, 0.3, 3.0),  # dual clip
]


@pytest.mark.parametrize("eps_low,eps_high,dual_clip", POLICY_CASES)
@pytest.mark.parametrize("batch", [1, 4, 16])
def test_policy_loss_matches_openrlhf(batch, eps_low, eps_high, dual_clip):
    peer = openrlhf_loss("0.11.2").PolicyLoss(clip_eps_low=eps_low, clip_eps_high=eps_high, dual_clip=dual_clip, token_level_loss=True)
    x = rollout(batch, 12, seed=20 + batch)
    n_tokens = x["mask"].sum().item()
    logp = x["logp"].clone().requires_grad_(True)
    logp64 = x["logp"].double().requires_grad_(True)
    ours = policy_loss(logp, x["old_logp"], x["advantages"], x["mask"], eps_low, eps_high, dual_clip, n_tokens)
    loss, clip_ratio, ppo_kl, _, _ = peer(
        logp64, x["old_logp"].double(), x["advantages"].double(), action_mask=x["mask"].double(), batch_num_tokens=n_tokens
    )
    for a, b in zip(ours, (loss, clip_ratio, ppo_kl)):
        assert_close(a, b.float(), **TOL)
    assert_close(torch.autograd.grad(ours[0], logp)[0], torch.autograd.grad(loss, logp64)[0].float(), **TOL)


@pytest.mark.parametrize("value_clip", [None, 0.2, 0.5])
@pytest.mark.parametrize("batch", [1, 4, 16])
def test_value_loss_matches_openrlhf(batch, value_clip):
    peer = openrlhf_loss("0.11.2").ValueLoss(value_clip, token_level_loss=True)
    x = rollout(batch, 12, seed=40 + batch)
    n_tokens = x["mask"].sum().item()
    values = x["values"].clone().requires_grad_(True)
    values64 = x["values"].double().requires_grad_(True)
    ours = value_loss(values, x["old_values"], x["returns"], x["mask"], value_clip, n_tokens)
    theirs = peer(values64, x["old_values"].double(), x["returns"].double(), action_mask=x["mask"].double(), batch_num_tokens=n_tokens)
    assert_close(ours, theirs.float(), **TOL)
    assert_close(torch.autograd.grad(ours, values)[0], torch.autograd.grad(theirs, values64)[0].float(), **TOL)


def test_entropy_matches_openrlhf():
    peer = openrlhf_utils("0.11.2")
    logits = 4 * torch.randn(3, 7, 33, generator=torch.Generator().manual_seed(50))
    with torch.compiler.set_stance("force_eager"):  # the peer is @torch.compile'd; eager is the same math
        theirs = peer.compute_entropy(logits.double())
    assert_close(entropy_from_logits(logits), theirs.float(), **TOL)


def test_kl_controllers_match_openrlhf():
    peer = openrlhf_kl_controller("0.11.2")
    ours, theirs = AdaptiveKLController(0.1, 3.0, 5000), peer.AdaptiveKLController(0.1, 3.0, 5000)
    for kl, n in [(6.0, 256), (0.5, 256), (3.3, 512), (2.9, 128), (100.0, 1024), (0.0, 64)]:
        ours.update(kl, n)
        theirs.update(kl, n)
        assert ours.value == pytest.approx(float(theirs.value), rel=1e-12)
    fixed, peer_fixed = FixedKLController(0.02), peer.FixedKLController(0.02)
    fixed.update(9.0, 100)
    peer_fixed.update(9.0, 100)
    assert fixed.value == peer_fixed.value


def _openrlhf_advantages(name, x, kl64, n, kl_coef, gamma, lambd, no_std_norm, split):
    """Run OpenRLHF's compute_advantages_and_returns on the batch cut into two experiences (fp64)."""
    maker = openrlhf_advantage_maker("0.11.2")()
    maker.advantage_estimator = name
    maker.kl_ctl = SimpleNamespace(value=kl_coef)
    advantage = SimpleNamespace(estimator=name, gamma=gamma, lambd=lambd, no_std_norm=no_std_norm)
    maker.strategy = SimpleNamespace(
        args=SimpleNamespace(
            rollout=SimpleNamespace(n_samples_per_prompt=n),
            reward=SimpleNamespace(clip_range=None),
            algo=SimpleNamespace(advantage=advantage),
        )
    )
    B = x["mask"].size(0)
    experiences = [
        SimpleNamespace(
            index=list(range(B))[part],
            rewards=x["seq_rewards"][part].double(),
            action_mask=x["mask"][part].double(),
            kl=kl64[part],
            values=x["values"][part].double(),
            info={},
        )
        for part in (slice(0, split), slice(split, None))
    ]
    experiences = maker.compute_advantages_and_returns(experiences)
    return torch.cat([e.advantages for e in experiences]), torch.cat([e.returns for e in experiences])


@pytest.mark.parametrize("name", ESTIMATORS)
@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
@pytest.mark.parametrize("no_std_norm", [False, True])
def test_advantage_estimators_match_openrlhf(name, kl_coef, no_std_norm):
    n, prompts, T = 4, 3, 9
    x = rollout(n * prompts, T, seed=60)
    gamma, lambd = (0.95, 0.9) if name in ("gae", "reinforce") else (1.0, 1.0)
    kl = kl_estimate(x["logp"], x["ref_logp"], "k3")
    kl64 = openrlhf_utils("0.11.2").compute_approx_kl(x["logp"].double(), x["ref_logp"].double(), kl_estimator="k3")
    inputs = AdvantageInputs(
        token_rewards=token_rewards(x["seq_rewards"], kl, x["mask"], kl_coef), seq_rewards=x["seq_rewards"], action_mask=x["mask"], values=x["values"],
        n_samples_per_prompt=n, gamma=gamma, lambd=lambd, no_std_norm=no_std_norm,
    )  # fmt: skip
    adv, ret = get_estimator(name)(inputs)
    p_adv, p_ret = _openrlhf_advantages(name, x, kl64, n, kl_coef, gamma, lambd, no_std_norm, split=5)
    assert_close(adv, (p_adv * x["mask"]).float(), **TOL)  # they leave -mean/std on padding after whitening
    assert_close(ret, (p_ret * x["mask"]).float(), **TOL)


# ----------------------------------------------------------------------------------------------
# Oracles: torchtune 0.6.1 rlhf/rewards.py


def test_token_rewards_matches_torchtune():
    peer = torchtune_rewards("0.6.1")
    x = rollout(6, 10, seed=70)
    last = (x["mask"].sum(-1) - 1).long()  # the last action token of each row
    total, kl, kl_reward = peer.get_rewards_ppo(x["seq_rewards"].double(), x["logp"].double(), x["ref_logp"].double(), 0.1, last)
    ours = token_rewards(x["seq_rewards"], kl_estimate(x["logp"], x["ref_logp"], "k1"), x["mask"], 0.1)
    assert_close(ours, (total * x["mask"]).float(), **TOL)


@pytest.mark.parametrize("gamma,lambd", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)])
def test_gae_matches_torchtune(gamma, lambd):
    peer = torchtune_rewards("0.6.1")
    x = rollout(8, 11, seed=71)
    mask = x["mask"]
    rewards = token_rewards(x["seq_rewards"], kl_estimate(x["logp"], x["ref_logp"], "k1"), mask, 0.05)
    values = x["values"] * mask  # the torchtune recipe zeroes values on padding before GAE
    p_adv, p_ret = peer.estimate_advantages(values.double(), rewards.double(), gamma, lambd, masks=mask.bool())
    adv, ret = gae_advantages(rewards, x["values"], mask, gamma, lambd)
    assert_close(ret, p_ret.float(), **TOL)
    # torchtune whitens with the unbiased variance and adds the mean back
    assert_close(masked_whiten(adv, mask, shift_mean=False, unbiased=True) * mask, p_adv.float(), **TOL)


def test_masked_mean_and_whiten_match_torchtune():
    peer = torchtune_rewards("0.6.1")
    x = rollout(6, 9, seed=72)
    v, m = x["values"], x["mask"]
    assert_close(masked_mean(v, m), peer.masked_mean(v.double(), m.double()).float(), **TOL)
    # torchtune's flag is inverted with respect to TRL's (and ours): see masked_whiten's docstring
    tt_keep_mean = peer.whiten(v.double(), m.bool(), shift_mean=True)
    tt_zero_mean = peer.whiten(v.double(), m.bool(), shift_mean=False)
    assert_close(masked_whiten(v, m, shift_mean=False, unbiased=True), tt_keep_mean.float(), **TOL)
    assert_close(masked_whiten(v, m, shift_mean=True, unbiased=True), tt_zero_mean.float(), **TOL)


# ----------------------------------------------------------------------------------------------
# Sharding: shard losses with the global normaliser add up to the whole batch's loss

SPLITS = [1, 3, 5]  # of a global batch of 6 rows


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("eps_low,eps_high,dual_clip", POLICY_CASES)
def test_policy_loss_shard_sum(split, eps_low, eps_high, dual_clip):
    x = rollout(6, 8, seed=80)
    n_tokens = x["mask"].sum().item()
    args = (eps_low, eps_high, dual_clip, n_tokens)
    a, b = slice(0, split), slice(split, None)
    logp = x["logp"].clone().requires_grad_(True)
    whole = policy_loss(logp, x["old_logp"], x["advantages"], x["mask"], *args)
    grad_whole = torch.autograd.grad(whole[0], logp)[0]
    parts = [policy_loss(logp[s], x["old_logp"][s], x["advantages"][s], x["mask"][s], *args) for s in (a, b)]
    for k in range(3):  # loss, clip fraction, approx KL
        assert_close(parts[0][k] + parts[1][k], whole[k], **TOL)
    assert_close(torch.autograd.grad(parts[0][0] + parts[1][0], logp)[0], grad_whole, **TOL)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("value_clip", [None, 0.2])
def test_value_loss_shard_sum(split, value_clip):
    x = rollout(6, 8, seed=81)
    n_tokens = x["mask"].sum().item()
    a, b = slice(0, split), slice(split, None)
    whole = value_loss(x["values"], x["old_values"], x["returns"], x["mask"], value_clip, n_tokens)
    parts = [value_loss(x["values"][s], x["old_values"][s], x["returns"][s], x["mask"][s], value_clip, n_tokens) for s in (a, b)]
    assert_close(parts[0] + parts[1], whole, **TOL)


@pytest.mark.parametrize("name", ["gae", "reinforce", "reinforce_baseline"])
@pytest.mark.parametrize("no_std_norm", [False, True])
def test_whitening_over_shards_equals_whole_batch(name, no_std_norm):
    """Two data-parallel shards whitening with summed statistics (a thread-pair all-reduce) get
    exactly the advantages of the whole batch; without the sums they would not."""
    import threading

    x = rollout(8, 6, seed=82)
    seq = torch.randn(8, generator=torch.Generator().manual_seed(83))

    def inputs(rows, sum_over_shards=None):
        return AdvantageInputs(
            token_rewards=token_rewards(seq[rows], torch.zeros(len(seq[rows]), 6), x["mask"][rows], 0.0),
            seq_rewards=seq[rows],
            action_mask=x["mask"][rows],
            values=x["values"][rows],
            n_samples_per_prompt=2,
            lambd=0.9,
            no_std_norm=no_std_norm,
            sum_over_shards=sum_over_shards,
        )

    estimator = get_estimator(name)
    whole, _ = estimator(inputs(slice(None)))
    shards, slots, meet = [slice(0, 4), slice(4, 8)], [None, None], threading.Barrier(2)
    out: list = [None, None]

    def run(i):
        def all_reduce(t):
            slots[i] = t
            meet.wait()
            total = slots[0] + slots[1]
            meet.wait()
            return total

        out[i] = estimator(inputs(shards[i], all_reduce))[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert_close(torch.cat(out), whole, **TOL)
    alone = torch.cat([estimator(inputs(s))[0] for s in shards])
    assert (alone - whole).abs().max() > 1e-3  # local statistics differ: the test can fail


def test_policy_loss_token_weights():
    """Importance weights scale each token's term: ones change nothing, a 2 on one row doubles
    that row's contribution, and they carry no gradient of their own."""
    x = rollout(4, 5, seed=84)
    n = x["mask"].sum().item()
    args = (x["old_logp"], x["advantages"], x["mask"], 0.2, 0.2, None, n)
    plain = policy_loss(x["logp"], *args)[0]
    assert_close(policy_loss(x["logp"], *args, token_weights=torch.ones(4, 5))[0], plain, **TOL)
    w = torch.ones(4, 5)
    w[1] = 2.0
    row1 = policy_loss(x["logp"][1:2], x["old_logp"][1:2], x["advantages"][1:2], x["mask"][1:2], 0.2, 0.2, None, n)[0]
    assert_close(policy_loss(x["logp"], *args, token_weights=w)[0], plain + row1, **TOL)


def test_rollout_diagnostics_count_groups_that_can_teach():
    """Three prompts x 4 samples of a 0/1 reward: all right, all wrong, one of four right.
    Two groups have zero variance (GRPO gives them no advantage); pass@4 is 2/3. Rewards
    [1,1,1,1, 0,0,0,0, 1,0,0,0]: mean 5/12, E[r^2] = 5/12, std = sqrt(5/12 - 25/144) = 0.4930.
    Advantages 1 on 6 tokens and -1 on 2 tokens: mean 0.5, E[a^2] 1, std sqrt(0.75)."""
    from rlhf.algos.ppo import DIAGNOSTIC_SUMS, diagnostics_record, rollout_diagnostics

    reward = torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0])
    mask = torch.zeros(12, 2)
    mask[:4, 0] = 1  # 4 tokens
    mask[8, :] = 1  # 2 more
    mask[9, :] = 1  # 2 more
    adv = torch.zeros(12, 2)
    adv[:4, 0], adv[8, :], adv[9, :] = 1.0, 1.0, -1.0
    adv[10, :] = 5.0  # off the mask: not counted
    # Two shards of the rollout add up to the whole (groups never straddle a shard).
    halves = [rollout_diagnostics(reward[s], adv[s], mask[s], 4) for s in (slice(0, 8), slice(8, 12))]
    sums = {k: halves[0][k] + halves[1][k] for k in halves[0]}
    assert sums == rollout_diagnostics(reward, adv, mask, 4)
    # A rank without samples adds zeros under the same keys (DIAGNOSTIC_SUMS).
    assert tuple(sums) == DIAGNOSTIC_SUMS
    assert rollout_diagnostics(torch.zeros(0), torch.zeros(0, 2), torch.zeros(0, 2), 4) == dict.fromkeys(DIAGNOSTIC_SUMS, 0.0)
    record = diagnostics_record({**sums, "reward": 5.0, "samples": 12.0}, 4)
    assert record["reward_std"] == pytest.approx(math.sqrt(5 / 12 - 25 / 144))
    assert record["advantage_std"] == pytest.approx(math.sqrt(0.75))
    assert record["group_zero_std"] == pytest.approx(2 / 3)
    assert (record["group_all_right"], record["group_all_wrong"], record["pass_at_4"]) == pytest.approx((1 / 3, 1 / 3, 2 / 3))
    # A reward model's scores are not 0/1: no pass@n or all-right shares, only the variance figure.
    scored = rollout_diagnostics(reward * 0.5 + 0.2, adv, mask, 4)
    record = diagnostics_record({**scored, "reward": 0.0, "samples": 12.0}, 4)
    assert "pass_at_4" not in record and record["group_zero_std"] == pytest.approx(2 / 3)
