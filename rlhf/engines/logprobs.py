"""Token log-probs (and entropy) of a causal LM's forward, without the [B, T, V] logits when that is safe.

    out = lm_logprobs(engine, batch, temperature=0.7, with_entropy=True)
    out.logp, out.entropy  # [B, T-1] fp32 each; entry t-1 scores token t

``forward`` is whatever runs the model (a ``TrainEngine``, a ``FrozenEngine``, a PEFT or plain HF
model, ``adapter_off``); its ``.module`` (or the object itself) is the model that is inspected.
The forward runs as usual, but a pre-hook on the LM head takes the final hidden states it is
given and hands the head an empty sequence, so the model makes no logits; the log-probs are then
taken from the hidden states chunk by chunk (``head_next_token_logprobs``), in the forward and in
the backward. The hidden states are exactly what the head would have read, so the result is the
full-logits path's.

The full-logits path is kept where chunking could be wrong (``chunkable_head``): a model type
whose forward does more after the head (Gemma2's soft-capping, Cohere's logit scale, Granite's
scaling ...), a head that is not a plain ``nn.Linear`` (LoRA on ``lm_head``, ``modules_to_save``),
and a ZeRO-3 partitioned head (its weight is an empty placeholder outside the head's own forward
hooks, so a raw matmul on it would be wrong).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional

import torch

from rlhf.algos.losses import head_next_token_logprobs, next_token_logprobs
from rlhf.algos.ppo import entropy_from_logits

# Model types whose causal-LM forward is ``logits = self.lm_head(hidden_states[:, keep, :])`` and
# nothing more before the logits are returned (checked against transformers 5.19's sources). Any
# other type takes the full-logits path: slower in memory, never wrong.
CHUNKABLE_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral", "mixtral", "qwen2_moe", "qwen3_moe", "phi3", "gemma"})


@dataclass
class TokenLogProbs:
    logp: torch.Tensor  # [B, T-1] fp32: log p(token t | tokens < t) at the temperature
    entropy: Optional[torch.Tensor]  # [B, T-1] fp32 entropy of the same distribution, or None
    aux_loss: Optional[torch.Tensor]  # the model output's MoE router loss, if it has one


def chunkable_head(model: torch.nn.Module) -> Optional[torch.nn.Linear]:
    """The model's LM head if log-probs may be computed from the hidden states with a plain
    linear map of its weight; None where the full logits must be made."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in CHUNKABLE_MODEL_TYPES:
        return None
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:  # e.g. a PEFT-wrapped head: its output is not linear(weight)
        return None
    if hasattr(head.weight, "ds_id"):  # ZeRO-3 partitioned: the weight is gathered only inside the head's forward
        return None
    return head


@contextlib.contextmanager
def _head_input_taken(head: torch.nn.Module):
    """Inside: a forward of the model leaves the hidden states the head reads [B, T, H] in the
    yielded dict and makes logits of an empty sequence [B, 0, V] instead of [B, T, V]."""
    taken: dict[str, torch.Tensor] = {}

    def take(module, args):
        taken["hidden"] = args[0]
        return (args[0][:, :0],)

    handle = head.register_forward_pre_hook(take)
    try:
        yield taken
    finally:
        handle.remove()


def lm_logprobs(
    forward: Any,
    inputs: dict[str, torch.Tensor],
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> TokenLogProbs:
    """Log-probs [B, T-1] of ``inputs["input_ids"]`` under softmax(logits / temperature), and with
    ``with_entropy`` that distribution's entropy [B, T-1] (differentiable only with ``entropy_grad``).

    ``inputs`` are the model inputs (input_ids [B, T] and attention_mask or position_ids).
    """
    model = getattr(forward, "module", forward)
    input_ids = inputs["input_ids"]
    head = chunkable_head(model)
    if head is not None:
        with _head_input_taken(head) as taken:
            out = forward(**inputs, use_cache=False)
        # A forward run without a graph (a reference, a frozen engine) gets log-probs without one,
        # as its logits would have been, even where the head's weight itself is trainable.
        with contextlib.nullcontext() if out.logits.requires_grad else torch.no_grad():
            logp, entropy = head_next_token_logprobs(taken["hidden"], head.weight, head.bias, input_ids, temperature, with_entropy)
        if entropy is not None and not entropy_grad:
            entropy = entropy.detach()
        return TokenLogProbs(logp, entropy, getattr(out, "aux_loss", None))
    out = forward(**inputs, use_cache=False)
    logits = out.logits  # [B, T, V]
    if temperature != 1.0:
        logits = logits / temperature
    logp = next_token_logprobs(logits, input_ids)
    entropy = None
    if with_entropy:
        with contextlib.nullcontext() if entropy_grad else torch.no_grad():  # a metric only: no graph over [B, T, V]
            # One row at a time: the softmax temporaries are then [1, T, V] each, not [B, T, V].
            entropy = torch.cat([entropy_from_logits(logits[i : i + 1, :-1]) for i in range(logits.size(0))])
    return TokenLogProbs(logp, entropy, getattr(out, "aux_loss", None))
