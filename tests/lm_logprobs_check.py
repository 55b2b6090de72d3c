"""rlhf.engines.logprobs.lm_logprobs through DeepSpeed engines, one process (gloo world of 1):
a ZeRO-2 TrainEngine takes the chunked path, ZeRO-3 engines (TrainEngine and FrozenEngine, with the
gathering forced on every forward) fall back to the full logits; each against a plain copy of the
model with the full-logits path: largest relative log-prob gap, and for the trainable engines the
relative gap of the full gradients (``safe_get_full_grad``). Prints one JSON line.

    python tests/lm_logprobs_check.py
"""

import json
import os
import socket
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rlhf.algos.losses as losses  # noqa: E402
from rlhf.algos.losses import next_token_logprobs  # noqa: E402
from rlhf.algos.ppo import entropy_from_logits  # noqa: E402
from rlhf.config import TrainConfig  # noqa: E402
from rlhf.distributed.env import init_distributed  # noqa: E402
from rlhf.engines.frozen_engine import FrozenEngine  # noqa: E402
from rlhf.engines.logprobs import chunkable_head, lm_logprobs  # noqa: E402
from rlhf.engines.train_engine import TrainEngine  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import ZERO3_FORCE_GATHER  # noqa: E402

TINY = Path(__file__).resolve().parents[1] / "rlhf" / "assets" / "tiny-qwen2"
TEMPERATURE = 0.7


def model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def loss_of(logp, entropy, mask):
    target = mask[:, 1:].float()
    return -(logp * target).sum() - 0.3 * (entropy * target).sum()


def plain_reference(inputs):
    """Full-logits log-probs and parameter gradients of a plain copy."""
    plain = model()
    logits = plain(**inputs, use_cache=False).logits / TEMPERATURE
    logp, ent = next_token_logprobs(logits, inputs["input_ids"]), entropy_from_logits(logits[:, :-1])
    loss_of(logp, ent, inputs["attention_mask"]).backward()
    return logp.detach(), {n: p.grad.clone() for n, p in plain.named_parameters()}


def trainable(stage: int, inputs, expected_logp, expected_grads) -> dict:
    from deepspeed.utils import safe_get_full_grad

    cfg = TrainConfig(zero_stage=stage, micro_train_batch_size=inputs["input_ids"].size(0), train_batch_size=inputs["input_ids"].size(0))
    if stage == 3:
        cfg.ds_config = ZERO3_FORCE_GATHER
    engine = TrainEngine(model(), cfg, bf16=False, total_steps=1, dp_size=1)
    chunked = chunkable_head(engine.module) is not None
    out = lm_logprobs(engine, inputs, TEMPERATURE, with_entropy=True, entropy_grad=True)
    engine.backward(loss_of(out.logp, out.entropy, inputs["attention_mask"]))
    grads = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters()}
    gaps = [rel(grads[n], expected_grads[n]) for n in expected_grads]
    return {
        "chunked": chunked,
        "logp": rel(out.logp.detach(), expected_logp),
        "grad": max(gaps),
        "grad_norm": sum(g.norm().item() for g in grads.values()),
    }


def frozen_zero3(inputs, expected_logp) -> dict:
    cfg = TrainConfig(zero_stage=3, micro_train_batch_size=2, train_batch_size=2, ds_config=ZERO3_FORCE_GATHER)
    ref = FrozenEngine(model(), cfg, bf16=False, dp_size=1)
    head = ref.module.get_output_embeddings()
    return {
        "chunked": chunkable_head(ref.module) is not None,
        "head_numel_outside_forward": head.weight.numel(),
        "logp": rel(lm_logprobs(ref, inputs, TEMPERATURE).logp, expected_logp),
    }


def main() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.setdefault("MASTER_PORT", str(s.getsockname()[1]))
    init_distributed()
    torch.manual_seed(1)
    ids = torch.randint(0, 200, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    losses.LOGITS_CHUNK_BYTES = 4 * 264 * 5  # 5 tokens per chunk: several chunks per row
    expected_logp, expected_grads = plain_reference(inputs)
    result = {
        "zero2": trainable(2, inputs, expected_logp, expected_grads),
        "zero3_train": trainable(3, inputs, expected_logp, expected_grads),
        "zero3_frozen": frozen_zero3(inputs, expected_logp),
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
