"""Chunked log-probs / entropy (rlhf.algos.losses.head_next_token_logprobs, rlhf.engines.logprobs):
the same values and gradients as the full-logits path, no [B, T, V] tensor on the way, and the
full-logits fallback where chunking would be wrong (LoRA on the head, soft-capped models, ZeRO-3)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import REPO
from torch.utils._python_dispatch import TorchDispatchMode

import rlhf.algos.losses as losses
from rlhf.algos.losses import head_next_token_logprobs, next_token_logprobs
from rlhf.algos.ppo import entropy_from_logits
from rlhf.engines.logprobs import chunkable_head, lm_logprobs

TINY = REPO / "rlhf" / "assets" / "tiny-qwen2"
TEMPERATURE = 0.7


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative distance ||a - b|| / ||b|| (0 when both are 0)."""
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def full_path(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: scaled [B, T, V] logits -> (log-probs, entropy) [B, T-1], as before chunking."""
    logits = logits / TEMPERATURE
    return next_token_logprobs(logits, input_ids), entropy_from_logits(logits[:, :-1])


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_head_logprobs_and_gradients_equal_full_logits(chunk):
    torch.manual_seed(0)
    b, t, h, v = 3, 9, 16, 50
    hidden = torch.randn(b, t, h, requires_grad=True)
    weight = (0.5 * torch.randn(v, h)).requires_grad_()
    bias = torch.randn(v, requires_grad=True)
    ids = torch.randint(0, v, (b, t))
    g_logp, g_ent = torch.randn(b, t - 1), torch.randn(b, t - 1)  # arbitrary upstream gradients: both terms matter

    logp, ent = full_path(F.linear(hidden, weight, bias), ids)
    expected = torch.autograd.grad((logp * g_logp).sum() + (ent * g_ent).sum(), (hidden, weight, bias))
    got_logp, got_ent = head_next_token_logprobs(hidden, weight, bias, ids, TEMPERATURE, with_entropy=True, chunk_tokens=chunk)
    got = torch.autograd.grad((got_logp * g_logp).sum() + (got_ent * g_ent).sum(), (hidden, weight, bias))

    assert rel(got_logp, logp) < 1e-6 and rel(got_ent, ent) < 1e-6
    for name, e, g in zip(("hidden", "weight", "bias"), expected, got):
        assert rel(g, e) < 1e-6, name
    # The log-prob term alone (no entropy asked for: its gradient is None in the backward).
    logp, _ = full_path(F.linear(hidden, weight, bias), ids)
    lp, _ = head_next_token_logprobs(hidden, weight, bias, ids, TEMPERATURE, chunk_tokens=chunk)
    assert rel(torch.autograd.grad((lp * g_logp).sum(), weight)[0], torch.autograd.grad((logp * g_logp).sum(), weight)[0]) < 1e-6


def test_entropy_gradient_is_finite_with_masked_vocabulary():
    """A -inf logit (a masked vocabulary entry) contributes 0 to the entropy and its gradient, not
    nan: the gradients are those of the vocabulary without that entry (the full-logits path's own
    backward gives nan here: 0 * -inf in the entropy's product rule)."""
    hidden = torch.randn(1, 4, 3, requires_grad=True)
    weight = torch.randn(5, 3)
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, -float("inf")])
    ids = torch.tensor([[0, 1, 2, 3]])
    logp, ent = head_next_token_logprobs(hidden, weight, bias, ids, TEMPERATURE, with_entropy=True, chunk_tokens=2)
    (grad,) = torch.autograd.grad(ent.sum() + logp.sum(), hidden)
    ref_logp, ref_ent = full_path(F.linear(hidden, weight[:4], bias[:4]), ids)  # the same distribution over 4 entries
    (ref_grad,) = torch.autograd.grad(ref_ent.sum() + ref_logp.sum(), hidden)
    assert torch.isfinite(grad).all() and rel(grad, ref_grad) < 1e-6


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor with a last dimension of ``vocab`` (logits-like) that
    an op produces, forward and backward (the head's weight and its gradient are [V, H]: not counted)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.numel = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):  # a view or an in-place op: no new memory
            return out
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor) and x.dim() and x.size(-1) == self.vocab:
                self.numel = max(self.numel, x.numel())
        return out


def tiny_model():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)


def model_inputs(model, b=3, t=12):
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (b, t))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # a padded row
    return {"input_ids": ids, "attention_mask": mask}


def loss_of(logp, entropy, inputs):
    target = inputs["attention_mask"][:, 1:].float()
    return -(logp * target).sum() - 0.3 * (entropy * target).sum()


def test_model_gradients_equal_full_logits_and_no_btv_tensor(monkeypatch):
    """Through a real (tied-embedding) Qwen2: the chunked path's parameter gradients equal the
    full-logits path's, and no tensor of B x T x V elements is ever made, forward or backward."""
    model = tiny_model()
    assert chunkable_head(model) is not None and model.config.tie_word_embeddings
    inputs = model_inputs(model)
    b, t = inputs["input_ids"].shape
    v = model.config.vocab_size

    logp, ent = full_path(model(**inputs, use_cache=False).logits, inputs["input_ids"])
    loss_of(logp, ent, inputs).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    monkeypatch.setattr(losses, "LOGITS_CHUNK_BYTES", 4 * v * 5)  # 5 tokens per chunk: several chunks per row
    with LargestTensor(v) as largest:
        out = lm_logprobs(model, inputs, TEMPERATURE, with_entropy=True, entropy_grad=True)
        loss_of(out.logp, out.entropy, inputs).backward()
    assert rel(out.logp, logp) < 1e-6 and rel(out.entropy, ent) < 1e-6
    names = [n for n, _ in model.named_parameters()]
    got = dict(model.named_parameters())
    assert rel(torch.cat([got[n].grad.flatten() for n in names]), torch.cat([expected[n].flatten() for n in names])) < 1e-6
    for n in names:  # each tensor too; fp32 rounding through 4 layers leaves small ones (biases) at ~1e-6
        assert rel(got[n].grad, expected[n]) < 1e-5, n
    assert largest.numel < b * (t - 1) * v / 4, largest.numel  # chunks of 5 tokens: [5, V] temporaries
    with LargestTensor(v) as full:
        full_path(model(**inputs, use_cache=False).logits, inputs["input_ids"])
    assert full.numel >= b * t * v  # the measurement does see a [B, T, V] tensor when there is one


def test_entropy_without_grad_is_a_metric_only():
    model = tiny_model()
    inputs = model_inputs(model)
    out = lm_logprobs(model, inputs, TEMPERATURE, with_entropy=True)
    assert out.logp.requires_grad and not out.entropy.requires_grad
    with torch.no_grad():
        frozen = lm_logprobs(model, inputs, TEMPERATURE)
    assert not frozen.logp.requires_grad and frozen.entropy is None


def test_lora_model_is_chunked_and_a_lora_head_falls_back():
    from peft import LoraConfig, get_peft_model

    inputs = model_inputs(tiny_model())
    for targets, chunked in ((["q_proj", "v_proj"], True), (["q_proj", "lm_head"], False)):
        model = get_peft_model(tiny_model(), LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
        assert (chunkable_head(model) is not None) is chunked, targets
        logp, ent = full_path(model(**inputs, use_cache=False).logits, inputs["input_ids"])
        loss_of(logp, ent, inputs).backward()
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        expected = {n: p.grad.clone() for n, p in trainable.items()}
        model.zero_grad(set_to_none=True)
        out = lm_logprobs(model, inputs, TEMPERATURE, with_entropy=True, entropy_grad=True)
        loss_of(out.logp, out.entropy, inputs).backward()
        assert rel(out.logp, logp) < 1e-6, targets
        for n, p in trainable.items():
            assert rel(p.grad, expected[n]) < 1e-6, (targets, n)
        with model.disable_adapter(), torch.no_grad():  # the reference through the same model
            assert rel(lm_logprobs(model, inputs).logp, next_token_logprobs(model(**inputs).logits, inputs["input_ids"])) < 1e-6


def test_models_with_logit_quirks_fall_back():
    from transformers import AutoModelForCausalLM, CohereConfig, Gemma2Config

    small = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    for config in (Gemma2Config(**small, head_dim=8, final_logit_softcapping=30.0), CohereConfig(**small, logit_scale=0.5)):
        model = AutoModelForCausalLM.from_config(config)
        assert chunkable_head(model) is None, config.model_type
        inputs = {"input_ids": torch.randint(0, 64, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
        with torch.no_grad():
            expected = next_token_logprobs(model(**inputs).logits / TEMPERATURE, inputs["input_ids"])
            assert rel(lm_logprobs(model, inputs, TEMPERATURE).logp, expected) < 1e-6, config.model_type


@pytest.mark.slow
def test_deepspeed_engines_zero2_chunked_zero3_falls_back():
    """Through DeepSpeed: a ZeRO-2 TrainEngine (chunked) and ZeRO-3 engines (partitioned head: the
    full-logits path) give the plain model's log-probs and gradients (tests/lm_logprobs_check.py)."""
    out = subprocess.run([sys.executable, "tests/lm_logprobs_check.py"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[len("RESULT ") :])
    assert result["zero2"]["chunked"] and not result["zero3_train"]["chunked"] and not result["zero3_frozen"]["chunked"]
    assert result["zero3_frozen"]["head_numel_outside_forward"] == 0  # why a raw matmul on the head would be wrong
    for case, r in result.items():
        assert r["logp"] < 1e-6, (case, r)
        if "grad" in r:
            assert r["grad"] < 1e-5 and r["grad_norm"] > 0, (case, r)
