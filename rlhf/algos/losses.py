"""Loss math as pure functions over tensors (no process groups in here).

Conventions: ``logits`` [B, T, V]; ``input_ids`` and masks [B, T]; a target mask marks tokens
predicted from the tokens before them, so position 0 is never a target. Log-probabilities are
computed in fp32. Normalisers (tokens of the global batch) are arguments, never counted here,
so a loss summed over data-parallel shards equals the loss of the whole batch.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def next_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(input_ids[:, t] | input_ids[:, :t]) for t >= 1.

    logits [B, T, V], input_ids [B, T] -> [B, T - 1] (fp32); entry t-1 scores token t.
    """
    logits = logits[:, :-1].float()  # [B, T-1, V]; the last position predicts nothing we have
    targets = input_ids[:, 1:]  # [B, T-1]
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    return -nll.view_as(targets)


def sft_nll_sum(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of the target tokens.

    logits [B, T, V], input_ids [B, T], loss_mask [B, T] (1 = target) -> scalar (fp32).
    """
    logp = next_token_logprobs(logits, input_ids)  # [B, T-1]
    return -(logp * loss_mask[:, 1:].to(logp.dtype)).sum()


def per_sample_nll(logp: torch.Tensor, loss_mask: torch.Tensor, sample_ids: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Summed NLL per sample of a packed row.

    logp [1, T-1] from ``next_token_logprobs``, loss_mask and sample_ids [1, T] -> [num_samples].
    """
    target = loss_mask[:, 1:].to(logp.dtype)  # [1, T-1]
    owner = sample_ids[:, 1:].clamp(min=0)  # [1, T-1]; padding (-1) has target 0 anyway
    return torch.zeros(num_samples, dtype=logp.dtype, device=logp.device).index_add_(0, owner.reshape(-1), (-logp * target).reshape(-1))


# ----------------------------------------------------------------------------------------------
# Log-probs from the final hidden states, chunked over tokens

# Each chunk's fp32 logits [tokens, V] are at most this big. 64 MiB is 524 tokens of a 32k
# vocabulary and 110 of a 152k one: enough rows for the matmul to run at full speed, while the few
# [chunk, V] temporaries of a chunk stay far below one [B, T, V] tensor (4 x 1024 x 32k fp32 is
# 500 MiB) in the forward and in the backward alike.
LOGITS_CHUNK_BYTES = 64 * 2**20


def logits_chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk so that one chunk's fp32 logits stay within ``LOGITS_CHUNK_BYTES``."""
    return max(1, LOGITS_CHUNK_BYTES // (4 * vocab_size))


def _scaled_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], temperature: float) -> torch.Tensor:
    """hidden [c, H], weight [V, H], bias [V] or None -> fp32 logits / temperature [c, V].

    The matmul runs in the model's dtype (as the LM head does); the scaling and everything after
    it in fp32.
    """
    z = F.linear(hidden, weight, bias).float()  # [c, V]
    if temperature != 1.0:
        z.div_(temperature)
    return z


def _entropy_terms(logp: torch.Tensor) -> torch.Tensor:
    """p log p of log-probs [c, V] -> [c, V], 0 where p is 0 (a -inf logit gives 0, not nan)."""
    p = logp.exp()
    return torch.where(p > 0, p * logp, torch.zeros_like(p))


class _HeadLogProbs(torch.autograd.Function):
    """Target log-probs (and entropy) of flattened tokens from hidden states and the LM head,
    chunk by chunk. Only the per-token log-normaliser is kept for the backward, which recomputes
    each chunk's logits: no [N, V] tensor exists at any time."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk, with_entropy):
        n = hidden.size(0)  # hidden [N, H], targets [N]
        logp = hidden.new_empty(n, dtype=torch.float32)  # [N]
        lse = hidden.new_empty(n, dtype=torch.float32)  # [N] logsumexp of each token's scaled logits
        entropy = hidden.new_empty(n if with_entropy else 0, dtype=torch.float32)  # [N] or [0]
        for s in range(0, n, chunk):
            z = _scaled_logits(hidden[s : s + chunk], weight, bias, temperature)  # [c, V]
            lse[s : s + chunk] = torch.logsumexp(z, -1)
            logp[s : s + chunk] = z.gather(1, targets[s : s + chunk, None]).squeeze(1) - lse[s : s + chunk]
            if with_entropy:
                z -= lse[s : s + chunk, None]  # now log p, in place
                entropy[s : s + chunk] = -_entropy_terms(z).sum(-1)
            del z
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.temperature, ctx.chunk, ctx.with_entropy = temperature, chunk, with_entropy
        ctx.set_materialize_grads(False)
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        n, chunk, temperature = hidden.size(0), ctx.chunk, ctx.temperature
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if needs_bias else None
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            logp_all = _scaled_logits(hidden[s:e], weight, bias, temperature)  # [c, V]
            logp_all -= lse[s:e, None]  # log p
            p = logp_all.exp()  # [c, V]
            grad_z = torch.zeros_like(p)  # d loss / d (logits / temperature), [c, V]
            if grad_logp is not None:  # d log p_y / dz = onehot(y) - p
                g = grad_logp[s:e, None]  # [c, 1]
                grad_z.addcmul_(p, g, value=-1.0)
                grad_z.scatter_add_(1, targets[s:e, None], g)
            if grad_entropy is not None:  # d H / dz = -p (log p + H); 0 where p is 0
                logp_all += entropy[s:e, None]
                grad_z -= torch.where(p > 0, p * logp_all, torch.zeros_like(p)) * grad_entropy[s:e, None]
            del logp_all, p
            if temperature != 1.0:
                grad_z.div_(temperature)  # z = logits / temperature
            grad_z = grad_z.to(weight.dtype)
            if needs_hidden:
                grad_hidden[s:e] = grad_z @ weight  # [c, H]
            if needs_weight:
                grad_weight += (grad_z.t() @ hidden[s:e]).float()  # [V, H]
            if needs_bias:
                grad_bias += grad_z.float().sum(0)
            del grad_z
        return (
            grad_hidden,
            grad_weight.to(weight.dtype) if needs_weight else None,
            grad_bias.to(bias.dtype) if needs_bias else None,
            None,
            None,
            None,
            None,
        )


def head_next_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    input_ids: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_tokens: Optional[int] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``next_token_logprobs`` of ``linear(hidden, weight, bias) / temperature`` (and
    ``entropy_from_logits`` of the same), without ever holding the [B, T, V] logits.

    hidden [B, T, H] final hidden states (what the LM head reads), weight [V, H], bias [V] or None,
    input_ids [B, T] -> (log-probs [B, T-1] fp32, entropy [B, T-1] fp32 or None); entry t-1 scores
    token t. Forward and backward run over chunks of ``chunk_tokens`` tokens (default: see
    ``LOGITS_CHUNK_BYTES``), recomputing each chunk's logits in the backward; gradients flow to
    hidden, weight and bias as through the unchunked path.
    """
    b, t, h = hidden.shape
    flat = hidden[:, :-1].reshape(-1, h)  # [B (T-1), H]
    targets = input_ids[:, 1:].reshape(-1)  # [B (T-1)]
    chunk = chunk_tokens or logits_chunk_tokens(weight.size(0))
    logp, entropy = _HeadLogProbs.apply(flat, weight, bias, targets, float(temperature), chunk, with_entropy)
    return logp.view(b, t - 1), entropy.view(b, t - 1) if with_entropy else None
