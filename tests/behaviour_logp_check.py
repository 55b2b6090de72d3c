"""One PPO update of the same rollout two ways, on two identical actors: with behaviour log-probs
from a separate forward (ActorBatch.old_logp given) and from the training forward itself
(old_logp None, what rlhf.ppo does when behaviour_logp_from_training holds); plain, and with a
generating engine's log-probs and truncated importance weights (vLLM). Prints one JSON line with
the largest differences in the step's metrics and in the updated weights.

    python tests/behaviour_logp_check.py MODEL_FOLDER
"""

import json
import sys

import torch

from rlhf.algos import ppo as ppo_math
from rlhf.config import PPOConfig, parse_config
from rlhf.data.prompts import load_prompts
from rlhf.data.sft import Sample
from rlhf.distributed.env import init_distributed
from rlhf.engines.train_engine import TrainEngine
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.rl.experience import ActorBatch, behaviour_logp_from_training
from rlhf.rl.forward import policy_logp, to_batch
from rlhf.rl.update import train_actor
from rlhf.rollout.hf import HFGenerator


def one_update_both_ways(model: str, extra: list[str]) -> dict:
    cfg = parse_config(
        PPOConfig,
        [
            "--pretrain",
            model,
            "--prompt_data",
            "embedded:arith/prompts_train.jsonl",
            "--reward_func",
            "rlhf.rewards:exact_match",
            "--rollout_batch_size",
            "4",
            "--n_samples_per_prompt",
            "4",
            "--train_batch_size",
            "16",
            "--micro_train_batch_size",
            "8",
            "--use_kl_loss",
            "--init_kl_coef",
            "0.05",
            "--kl_estimator",
            "k3",
            "--generate_max_len",
            "6",
            "--learning_rate",
            "1e-3",
            "--lr_warmup_ratio",
            "0",
            "--zero_stage",
            "2",
            *extra,
        ],
    )
    assert behaviour_logp_from_training(cfg)
    tokenizer = load_tokenizer(cfg.model)
    torch.manual_seed(0)
    actors = [TrainEngine(load_causal_lm(cfg.model), cfg.train, bf16=False, total_steps=1, dp_size=1) for _ in range(2)]
    prompts = [p.ids for p in load_prompts("embedded:arith/prompts_train.jsonl", None, tokenizer, cfg.data, 0)[:4] for _ in range(4)]
    responses = HFGenerator(actors[0].module, tokenizer, cfg.rollout).generate(prompts).responses
    batch = to_batch([Sample(p + r, [0] * len(p) + [1] * len(r)) for p, r in zip(prompts, responses)], tokenizer.pad_token_id)
    action_mask = batch["loss_mask"][:, 1:].float()
    with torch.no_grad():
        old_logp = policy_logp(actors[0], batch, cfg.rollout.temperature)[0]
    ref_logp = old_logp + 0.1 * torch.randn_like(old_logp)  # a reference a little away from the policy
    advantages = torch.randn(old_logp.size(0), 1).expand_as(old_logp) * action_mask
    engine_logp, is_weights = None, None
    if cfg.rollout.vllm_is_truncation is not None:  # a generating engine whose numerics differ a little
        engine_logp = (old_logp + 0.3 * torch.randn_like(old_logp)) * action_mask
        is_weights = ppo_math.truncated_is_weights(old_logp, engine_logp, cfg.rollout.vllm_is_truncation, action_mask)
    separate = ActorBatch(batch, action_mask, old_logp, ref_logp, advantages, is_weights, engine_logp)
    fused = ActorBatch(batch, action_mask, None, ref_logp, advantages, None, engine_logp)
    results = [
        train_actor(cfg, exp, actor, None, 0.05, 7, None, 0, None, tokenizer.pad_token_id) for actor, exp in zip(actors, (separate, fused))
    ]
    kl_separate = (torch.exp(ref_logp - old_logp) - (ref_logp - old_logp) - 1) * action_mask  # k3, as the experience phase measures it
    gap_separate = ((old_logp - engine_logp).abs() * action_mask).sum().item() if engine_logp is not None else 0.0
    weights = [dict(a.module.named_parameters()) for a in actors]
    start = dict(load_causal_lm(cfg.model).named_parameters())
    return {
        "policy_loss": abs(results[0]["policy_loss"] - results[1]["policy_loss"]),
        "entropy": abs(results[0]["entropy"] - results[1]["entropy"]),
        "kl_in_training": results[1]["kl"],
        "kl_separate": kl_separate.sum().item(),
        "gap_in_training": results[1]["rollout_logp_gap"],
        "gap_separate": gap_separate,
        "weights": max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0]),
        "update": max((weights[0][k] - start[k].detach()).abs().max().item() for k in weights[0]),
    }


def main() -> None:
    init_distributed()
    result = {
        "hf": one_update_both_ways(sys.argv[1], []),
        "vllm_is": one_update_both_ways(sys.argv[1], ["--rollout_backend", "vllm", "--vllm_is_truncation", "1.5"]),
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
