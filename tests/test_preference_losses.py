"""Preference losses (rlhf/algos/preference.py): hand-worked values, peer oracles, sharding.

Oracles (see tests/oracles.py; installed by `bash launch/install.sh --test`):
- OpenRLHF 0.11.2 ``models/loss.py``: PairWiseLoss, LogExpLoss, DPOLoss(beta, label_smoothing,
  ipo). OpenRLHF returns MEANS over the batch, so we compare with normaliser = batch size.
  Its IPO branch is (h - 1/(2 beta))^2 on whatever log-probs it gets, and its DPO trainer
  passes SUMMED log-probs (``all_logps_sum``) for IPO too: the same convention as ours, so the
  comparison needs no adjustment. (TRL instead feeds IPO per-token MEAN log-probs; callers of
  ``dpo_loss`` get that by passing mean log-probs: see ``test_ipo_trl_length_normalisation``.)
  Its DPOLoss ignores label_smoothing when ipo=True; ours refuses the combination.
- OpenRLHF 0.9.5 ``models/loss.py``: KTOLoss (KTO was removed from later releases). It takes
  desirable and undesirable completions as separate tensors and computes z0 itself from the
  mismatched (``KL``) log-probs: mean, ``dist.all_reduce`` (SUM) / world_size, clamp at 0. We
  run it in a ONE-process gloo group, where that all-reduce is the identity, and give ours the
  same z0 = clamp(kto_kl_estimate(...), 0); its returned KL is checked against our z0.
  It returns the mean over all completions (both labels): normaliser = batch size.

Precision: the peers run in float64 on the same inputs (fp32 values, exactly representable),
which gives the exact math; ours runs in fp32 and must agree to 1e-6. Comparing fp32 with fp32
would measure rounding, not math: OpenRLHF forms DPO's margin as (pc - pr) - (rc - rr), where
summed log-probs of tens of nats lose ~3e-6 to rounding (seen on IPO with beta = 0.5); we form
(pc - rc) - (pr - rr), whose differences of nearby numbers are exact in fp32.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from oracles import INSTALL_HINT, OracleMissing, load_peer_file, openrlhf_loss, openrlhf_utils
from torch.testing import assert_close

from rlhf.algos.preference import (
    dpo_loss,
    kto_kl_estimate,
    kto_loss,
    packed_sequence_logprobs,
    pairwise_logexp_loss,
    pairwise_sigmoid_loss,
    sequence_logprobs,
)

TOL = dict(rtol=1e-6, atol=1e-6)
BATCH_SIZES = [1, 2, 7, 64]


def f64(*tensors):
    """The same values in float64, for running a peer as the exact reference."""
    return [x.double() for x in tensors]


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def rewards(batch: int, seed: int):
    """Reward-model scores and margins [B], fp32."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, generator=g) * 2, torch.randn(batch, generator=g) * 2, torch.rand(batch, generator=g)


def seq_logps(batch: int, seed: int, n: int = 4):
    """n tensors [B] of plausible summed sequence log-probs: policy near reference, in about [-60, -2]."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n // 2):
        policy = -2 - 58 * torch.rand(batch, generator=g)
        out += [policy, policy + 0.5 * torch.randn(batch, generator=g)]
    return out  # [policy_a, ref_a, policy_b, ref_b, ...]


# ----------------------------------------------------------------------------------------------
# Hand-worked values


def test_pairwise_sigmoid_hand_values():
    # rc=1, rr=0: -log sigmoid(1) = log(1 + e^-1) = 0.313262
    assert pairwise_sigmoid_loss(t(1.0), t(0.0), None, 1) == pytest.approx(0.313262, abs=1e-6)
    # with margin 1: -log sigmoid(1 - 0 - 1) = log 2 = 0.693147
    assert pairwise_sigmoid_loss(t(1.0), t(0.0), t(1.0), 1) == pytest.approx(math.log(2), abs=1e-6)
    # pairs (1, 0) and (0, 1) over a global batch of 4 pairs: (0.313262 + 1.313262) / 4 = 0.406631
    assert pairwise_sigmoid_loss(t(1.0, 0.0), t(0.0, 1.0), None, 4) == pytest.approx(0.406631, abs=1e-6)


def test_pairwise_logexp_hand_values_and_stability():
    # rc=1, rr=0: log(1 + e^(0 - 1)) = 0.313262, the sigmoid loss without margin
    assert pairwise_logexp_loss(t(1.0), t(0.0), 1) == pytest.approx(0.313262, abs=1e-6)
    # rr - rc = 100: log(1 + e^100) = 100 (+ 4e-44); exp(100) overflows fp32, softplus does not
    assert pairwise_logexp_loss(t(0.0), t(100.0), 1).item() == pytest.approx(100.0)
    # rc - rr = 100: log(1 + e^-100) = 3.7e-44, finite and ~0
    assert pairwise_logexp_loss(t(100.0), t(0.0), 1).item() == pytest.approx(0.0, abs=1e-30)


def test_dpo_hand_values():
    # policy chosen -1, rejected -2; reference both -1.5:
    # h = (-1 + 1.5) - (-2 + 1.5) = 0.5 + 0.5 = 1.0
    pc, pr, rc, rr = t(-1.0), t(-2.0), t(-1.5), t(-1.5)
    loss, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, 0.1, "sigmoid", 0.0, 1)
    # DPO: -log sigmoid(0.1) = log(1 + e^-0.1) = 0.644397
    assert loss.item() == pytest.approx(0.644397, abs=1e-6)
    # rewards: 0.1 * 0.5 = 0.05 and 0.1 * -0.5 = -0.05
    assert chosen_r.tolist() == pytest.approx([0.05]) and rejected_r.tolist() == pytest.approx([-0.05])
    # cDPO eps=0.1: 0.9 * 0.644397 + 0.1 * log(1 + e^0.1) = 0.9 * 0.644397 + 0.1 * 0.744397 = 0.654397
    assert dpo_loss(pc, pr, rc, rr, 0.1, "sigmoid", 0.1, 1)[0].item() == pytest.approx(0.654397, abs=1e-6)
    # IPO beta=0.1: (1 - 1/0.2)^2 = (1 - 5)^2 = 16; beta=0.5: (1 - 1)^2 = 0
    assert dpo_loss(pc, pr, rc, rr, 0.1, "ipo", 0.0, 1)[0].item() == pytest.approx(16.0)
    assert dpo_loss(pc, pr, rc, rr, 0.5, "ipo", 0.0, 1)[0].item() == pytest.approx(0.0)


def test_kto_hand_values():
    # z0 from mismatched pairs: mean((-1 + 1.5), (-2 + 3)) = mean(0.5, 1.0) = 0.75
    assert kto_kl_estimate(t(-1.0, -2.0), t(-1.5, -3.0)).item() == pytest.approx(0.75)
    # z0 = 0.5, beta = 0.1, w_D = 1, w_U = 2, global batch of 2
    # desirable, r = 1.5:   1 * (1 - sigmoid(0.1 * (1.5 - 0.5))) = 1 - sigmoid(0.1) = 0.475021
    # undesirable, r = 2.5: 2 * (1 - sigmoid(0.1 * (0.5 - 2.5))) = 2 * sigmoid(0.2) = 1.099668
    # loss = (0.475021 + 1.099668) / 2 = 0.787345
    loss, r = kto_loss(t(-1.0, -1.0), t(-2.5, -3.5), torch.tensor([True, False]), torch.tensor(0.5), 0.1, 1.0, 2.0, 2)
    assert loss.item() == pytest.approx(0.787345, abs=1e-6)
    assert r.tolist() == pytest.approx([0.15, 0.25])
    # a negative z0 is clamped to 0: desirable r = 0 -> 1 - sigmoid(0) = 0.5
    loss, _ = kto_loss(t(0.0), t(0.0), torch.tensor([True]), torch.tensor(-3.0), 0.1, 1.0, 1.0, 1)
    assert loss.item() == pytest.approx(0.5)


def test_sequence_logprobs_hand_values():
    # uniform logits over V=4: every token has log p = -log 4 = -1.386294
    logits = torch.zeros(2, 4, 4)
    ids = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])  # 2 and 3 response tokens
    assert sequence_logprobs(logits, ids, mask).tolist() == pytest.approx([-2 * math.log(4), -3 * math.log(4)])
    # make token 3 certain at position 3 of row 0 (logits at position 2 predict it): log p ~ 0
    logits[0, 2, 3] = 100.0
    assert sequence_logprobs(logits, ids, mask)[0].item() == pytest.approx(-math.log(4), abs=1e-6)


def test_packed_sequence_logprobs_equals_unpacked():
    g = torch.Generator().manual_seed(3)
    lengths, vocab, pad = [5, 7], 11, 3
    total = sum(lengths) + pad
    logits = torch.randn(1, total, vocab, generator=g)
    ids = torch.randint(vocab, (1, total), generator=g)
    sample_ids = torch.tensor([[0] * 5 + [1] * 7 + [-1] * pad])
    mask = torch.tensor([[0, 0, 1, 1, 1] + [0, 0, 0, 1, 1, 1, 1] + [0] * pad])  # each sample opens with its prompt
    packed = packed_sequence_logprobs(logits, ids, mask, sample_ids, 2)
    starts = [0, 5]
    for k, (s, n) in enumerate(zip(starts, lengths)):
        alone = sequence_logprobs(logits[:, s : s + n], ids[:, s : s + n], mask[:, s : s + n])
        assert_close(packed[k], alone[0], **TOL)


def test_argument_errors():
    x = t(-1.0)
    with pytest.raises(ValueError, match="unknown DPO loss_type 'hinge'"):
        dpo_loss(x, x, x, x, 0.1, "hinge", 0.0, 1)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, 0.1, "ipo", 0.1, 1)
    with pytest.raises(ValueError, match="normaliser must be > 0"):
        pairwise_sigmoid_loss(x, x, None, 0)
    with pytest.raises(ValueError, match="normaliser must be > 0"):
        kto_loss(x, x, torch.tensor([True]), torch.tensor(0.0), 0.1, 1.0, 1.0, 0)


def test_rewards_are_detached_and_loss_has_gradients():
    pc, rc, pr, rr = seq_logps(4, seed=0)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    loss, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, 0.1, "sigmoid", 0.0, 4)
    assert loss.requires_grad and not chosen_r.requires_grad and not rejected_r.requires_grad
    policy = pc.detach().clone().requires_grad_(True)
    kl = kto_kl_estimate(policy, rc)  # no gradient through z0
    assert not kl.requires_grad
    loss, r = kto_loss(policy, rc, torch.tensor([True, False, True, False]), kl, 0.1, 1.0, 1.0, 4)
    assert loss.requires_grad and not r.requires_grad


def test_missing_oracle_fails_with_install_hint():
    with pytest.raises(OracleMissing, match="launch/install.sh --test"):
        load_peer_file("openrlhf-0.0.0", "openrlhf/models/loss.py")
    assert "launch/install.sh --test" in INSTALL_HINT


# ----------------------------------------------------------------------------------------------
# Oracles: OpenRLHF 0.11.2


@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("with_margin", [False, True])
def test_pairwise_sigmoid_matches_openrlhf(batch, with_margin):
    peer = openrlhf_loss("0.11.2")
    chosen, rejected, margin = rewards(batch, seed=batch)
    margin = margin if with_margin else None
    theirs = peer.PairWiseLoss()(*f64(chosen, rejected), None if margin is None else margin.double())
    assert_close(pairwise_sigmoid_loss(chosen, rejected, margin, batch), theirs.float(), **TOL)


@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_pairwise_logexp_matches_openrlhf(batch):
    peer = openrlhf_loss("0.11.2")
    chosen, rejected, _ = rewards(batch, seed=100 + batch)
    assert_close(pairwise_logexp_loss(chosen, rejected, batch), peer.LogExpLoss()(*f64(chosen, rejected)).float(), **TOL)


DPO_CASES = [  # (beta, loss_type, label_smoothing) and OpenRLHF's DPOLoss(beta, label_smoothing, ipo)
    (0.1, "sigmoid", 0.0),  # DPO
    (0.1, "sigmoid", 0.1),  # cDPO
    (0.1, "ipo", 0.0),  # IPO, summed log-probs on both sides
    (0.5, "ipo", 0.0),
]


@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("beta,loss_type,eps", DPO_CASES)
def test_dpo_matches_openrlhf(batch, beta, loss_type, eps):
    peer = openrlhf_loss("0.11.2").DPOLoss(beta, eps, loss_type == "ipo")
    pc, rc, pr, rr = seq_logps(batch, seed=200 + batch)
    ours_in = [x.clone().requires_grad_(True) for x in (pc, pr)]
    peer_in = [x.double().requires_grad_(True) for x in (pc, pr)]
    ours = dpo_loss(ours_in[0], ours_in[1], rc, rr, beta, loss_type, eps, batch)
    theirs = peer(peer_in[0], peer_in[1], *f64(rc, rr))
    for a, b in zip(ours, theirs):  # loss, chosen rewards, rejected rewards
        assert_close(a, b.float(), **TOL)
    for a, b in zip(torch.autograd.grad(ours[0], ours_in), torch.autograd.grad(theirs[0], peer_in)):
        assert_close(a, b.float(), **TOL)


def test_ipo_trl_length_normalisation():
    """TRL's IPO = ours fed mean log-probs; OpenRLHF's = ours fed summed log-probs."""
    peer = openrlhf_loss("0.11.2").DPOLoss(0.1, 0.0, True)
    g = torch.Generator().manual_seed(7)
    logits, ref_logits = torch.randn(2, 2, 4, 9, 5, generator=g)  # policy, ref: [chosen/rejected, B, T, V]
    ids = torch.randint(5, (2, 4, 9), generator=g)
    mask = (torch.arange(9) >= torch.randint(1, 6, (2, 4, 1), generator=g)).long()  # response = a suffix
    summed = [sequence_logprobs(lg[i], ids[i], mask[i]) for lg in (logits, ref_logits) for i in (0, 1)]
    mean = [s / mask[i, :, 1:].sum(-1) for s, i in zip(summed, (0, 1, 0, 1))]
    pc, pr, rc, rr = summed
    assert_close(dpo_loss(pc, pr, rc, rr, 0.1, "ipo", 0.0, 4)[0], peer(*f64(pc, pr, rc, rr))[0].float(), **TOL)
    pc, pr, rc, rr = mean
    h = (pc - rc) - (pr - rr)  # TRL: the IPO target 1/(2 beta) applies to the per-token margin
    assert_close(dpo_loss(pc, pr, rc, rr, 0.1, "ipo", 0.0, 4)[0], ((h - 5.0) ** 2).mean(), **TOL)


@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_sequence_logprobs_matches_openrlhf(batch):
    peer = openrlhf_utils("0.11.2")
    g = torch.Generator().manual_seed(300 + batch)
    logits = torch.randn(batch, 12, 17, generator=g) * 3
    ids = torch.randint(17, (batch, 12), generator=g)
    mask = (torch.arange(12) >= torch.randint(1, 10, (batch, 1), generator=g)).long()
    per_token = peer.log_probs_from_logits(logits[:, :-1].double(), ids[:, 1:])  # [B, T-1]
    assert_close(sequence_logprobs(logits, ids, mask), (per_token * mask[:, 1:]).sum(-1).float(), **TOL)


# ----------------------------------------------------------------------------------------------
# Oracle: OpenRLHF 0.9.5 KTOLoss (it all-reduces its KL estimate: run it in a 1-rank gloo group)


@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    if dist.is_initialized():
        assert dist.get_world_size() == 1, "the KTO oracle needs a world of one rank"
        yield
        return
    store = tmp_path_factory.mktemp("gloo") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("kl_shift", [0.3, -0.3])  # z0 > 0, and a negative estimate clamped to 0
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33)])
def test_kto_matches_openrlhf_095(one_rank_group, batch, kl_shift, weights):
    loss_mod = openrlhf_loss("0.9.5")
    beta, w_d, w_u = 0.1, *weights
    peer = loss_mod.KTOLoss(beta, w_d, w_u, world_size=1, device=torch.device("cpu"))
    policy, ref, policy_kl, ref_kl = seq_logps(batch, seed=400 + batch)
    ref_kl = policy_kl - kl_shift - 0.05 * torch.randn(batch, generator=torch.Generator().manual_seed(batch))
    labels = torch.rand(batch, generator=torch.Generator().manual_seed(500 + batch)) < 0.6
    if batch > 1:
        labels[0], labels[1] = True, False  # both kinds present (the peer also handles an empty side)

    z0 = kto_kl_estimate(policy_kl, ref_kl).clamp(min=0)  # what the caller does after its all-reduce
    ours_in = policy.clone().requires_grad_(True)
    loss, r = kto_loss(ours_in, ref, labels, z0, beta, w_d, w_u, batch)

    peer_in = policy.double().requires_grad_(True)
    ref64, policy_kl64, ref_kl64 = f64(ref, policy_kl, ref_kl)
    # the peer wants desirable and undesirable completions as separate tensors
    p_loss, p_chosen_r, p_rejected_r, p_kl = peer(peer_in[labels], peer_in[~labels], policy_kl64, ref64[labels], ref64[~labels], ref_kl64)

    assert_close(z0, p_kl.float(), **TOL)
    assert_close(loss, p_loss.float(), **TOL)
    assert_close(r[labels], p_chosen_r.float(), **TOL)
    assert_close(r[~labels], p_rejected_r.float(), **TOL)
    assert_close(torch.autograd.grad(loss, ours_in)[0], torch.autograd.grad(p_loss, peer_in)[0].float(), **TOL)


# ----------------------------------------------------------------------------------------------
# Sharding: loss(shard A, normaliser=B) + loss(shard B, normaliser=B) == loss(whole batch)

SPLITS = [1, 5, 9]  # of a global batch of 10


@pytest.mark.parametrize("split", SPLITS)
def test_pairwise_losses_shard_sum(split):
    chosen, rejected, margin = rewards(10, seed=600)
    a, b = slice(0, split), slice(split, None)
    for fn in (
        lambda c, r, m: pairwise_sigmoid_loss(c, r, m, 10),
        lambda c, r, m: pairwise_sigmoid_loss(c, r, None, 10),
        lambda c, r, m: pairwise_logexp_loss(c, r, 10),
    ):
        assert_close(fn(chosen[a], rejected[a], margin[a]) + fn(chosen[b], rejected[b], margin[b]), fn(chosen, rejected, margin), **TOL)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("beta,loss_type,eps", DPO_CASES)
def test_dpo_shard_sum(split, beta, loss_type, eps):
    pc, rc, pr, rr = seq_logps(10, seed=700)
    a, b = slice(0, split), slice(split, None)
    whole = dpo_loss(pc, pr, rc, rr, beta, loss_type, eps, 10)
    part_a = dpo_loss(pc[a], pr[a], rc[a], rr[a], beta, loss_type, eps, 10)
    part_b = dpo_loss(pc[b], pr[b], rc[b], rr[b], beta, loss_type, eps, 10)
    assert_close(part_a[0] + part_b[0], whole[0], **TOL)
    assert_close(torch.cat([part_a[1], part_b[1]]), whole[1], **TOL)
    assert_close(torch.cat([part_a[2], part_b[2]]), whole[2], **TOL)


@pytest.mark.parametrize("split", SPLITS)
def test_kto_shard_sum(split):
    policy, ref, policy_kl, ref_kl = seq_logps(10, seed=800)
    labels = torch.tensor([True, False, True, True, False, False, True, False, True, True])
    a, b = slice(0, split), slice(split, None)
    # every rank uses the same z0, the mean of the rank estimates (as after the all-reduce)
    z0 = ((kto_kl_estimate(policy_kl[a], ref_kl[a]) + kto_kl_estimate(policy_kl[b], ref_kl[b])) / 2).clamp(min=0)
    whole, r = kto_loss(policy, ref, labels, z0, 0.1, 1.0, 1.5, 10)
    la, ra = kto_loss(policy[a], ref[a], labels[a], z0, 0.1, 1.0, 1.5, 10)
    lb, rb = kto_loss(policy[b], ref[b], labels[b], z0, 0.1, 1.0, 1.5, 10)
    assert_close(la + lb, whole, **TOL)
    assert_close(torch.cat([ra, rb]), r, **TOL)
