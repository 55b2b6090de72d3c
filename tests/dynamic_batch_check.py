"""The same PPO updates and scoring forwards with fixed-count and token-budget micro-batches,
padded and packed, on the data-parallel ranks of a torchrun job. Prints one JSON line (rank 0):
for each way, the largest differences from the fixed padded way in the updated actor and critic
weights, the step metrics and the gradient norm, and how far the weights moved at all.

    torchrun --nproc_per_node 2 tests/dynamic_batch_check.py [--zero_stage N] [MORE FLAGS FOR EVERY WAY]

The ranks hold differently long samples on purpose (rank 0 long prompts and responses, rank 1
short ones), so the token-budget plan moves samples between ranks and the ranks' micro-batch
counts differ before they are evened out.
"""

import json
import sys

import torch
import torch.distributed as dist

from rlhf.config import PPOConfig, parse_config
from rlhf.data.sft import Sample
from rlhf.distributed.collectives import all_reduce_sums
from rlhf.distributed.env import init_distributed
from rlhf.engines.train_engine import TrainEngine
from rlhf.models.loading import load_causal_lm, load_reward_model, load_tokenizer
from rlhf.rl.experience import ActorBatch, CriticBatch
from rlhf.rl.forward import MicroBatching, per_token_rows, policy_logp, to_batch, token_values
from rlhf.rl.update import train_actor, train_critic

WAYS = {
    "fixed": [],
    "fixed_packed": ["--packing_samples"],
    "dynamic": ["--use_dynamic_batch", "--train_max_tokens_per_gpu", "150"],
    "dynamic_packed": ["--use_dynamic_batch", "--packing_samples", "--train_max_tokens_per_gpu", "150"],
}


# Flags after the script's own (--zero_stage N) go to every way, e.g. --adam_offload.
EXTRA_FLAGS = [a for i, a in enumerate(sys.argv[1:]) if a != "--zero_stage" and (i == 0 or sys.argv[i] != "--zero_stage")]


def config(extra: list[str], zero_stage: str) -> PPOConfig:
    return parse_config(
        PPOConfig,
        [
            "--pretrain",
            "embedded:tiny-qwen2",
            "--reward_func",
            "rlhf.rewards:exact_match",
            "--advantage_estimator",
            "gae",
            "--rollout_batch_size",
            "8",
            "--n_samples_per_prompt",
            "2",
            "--train_batch_size",
            "8",  # two optimizer steps over the 16 samples
            "--micro_train_batch_size",
            "2",
            "--use_kl_loss",
            "--kl_estimator",
            "k3",
            "--entropy_coef",
            "0.01",
            "--learning_rate",
            "1e-3",
            "--lr_warmup_ratio",
            "0",
            "--lr_scheduler",
            "constant",
            "--zero_stage",
            zero_stage,
            *extra,
            *EXTRA_FLAGS,
        ],
    )


def skewed_samples(rank: int, vocab: int) -> list[Sample]:
    """8 samples; rank 0's prompts 30-60 tokens and responses 10-40, rank 1's 3-8 and 2-10."""
    g = torch.Generator().manual_seed(100 + rank)
    (p_lo, p_hi), (r_lo, r_hi) = ((30, 60), (10, 40)) if rank == 0 else ((3, 8), (2, 10))
    samples = []
    for _ in range(8):
        p = int(torch.randint(p_lo, p_hi + 1, (1,), generator=g))
        r = int(torch.randint(r_lo, r_hi + 1, (1,), generator=g))
        ids = torch.randint(3, vocab, (p + r,), generator=g).tolist()
        samples.append(Sample(ids, [0] * p + [1] * r))
    return samples


def weights(engine: TrainEngine) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in engine.gathered_state_dict().items() if v.is_floating_point()}


def main() -> None:
    zero_stage = sys.argv[sys.argv.index("--zero_stage") + 1] if "--zero_stage" in sys.argv else "2"
    launch = init_distributed()
    world, rank = launch.world_size, launch.rank
    base = config([], zero_stage)
    tokenizer = load_tokenizer(base.model)
    pad_id = tokenizer.pad_token_id
    vocab = load_causal_lm(base.model).config.vocab_size
    samples = skewed_samples(rank, vocab)
    batch = to_batch(samples, pad_id)
    action_mask = batch["loss_mask"][:, 1:].float()  # [B, T-1]

    def engines(cfg: PPOConfig) -> tuple[TrainEngine, TrainEngine]:
        torch.manual_seed(0)  # the critic's new score head starts alike every way
        actor = TrainEngine(load_causal_lm(cfg.model), cfg.train, bf16=False, total_steps=2, dp_size=world)
        critic = TrainEngine(load_reward_model(cfg.model, pad_id), cfg.train, bf16=False, total_steps=2, dp_size=world)
        return actor, critic

    # One experience batch for every way: the behaviour log-probs and values of the start weights.
    actor0, critic0 = engines(base)
    start_actor, start_critic = weights(actor0), weights(critic0)
    g = torch.Generator().manual_seed(7 + rank)
    with torch.no_grad():
        old_logp = policy_logp(actor0, batch, 1.0)[0] * action_mask
        values = token_values(critic0, batch) * action_mask
    ref_logp = (old_logp + 0.1 * torch.randn(old_logp.shape, generator=g)) * action_mask
    advantages = torch.randn(old_logp.size(0), 1, generator=g).expand_as(old_logp) * action_mask
    returns = values + torch.randn(values.shape, generator=g) * action_mask

    # Scoring forwards: per-sample rows of log-probs, entropy and values, fixed vs token budget / packed.
    def score_rows(batching: MicroBatching) -> dict[str, list[torch.Tensor]]:
        return {
            "logp": per_token_rows(lambda mb: policy_logp(actor0, mb, 1.0)[0], samples, pad_id, batching),
            "entropy": per_token_rows(lambda mb: policy_logp(actor0, mb, 1.0, with_entropy=True)[1], samples, pad_id, batching),
            "values": per_token_rows(lambda mb: token_values(critic0, mb), samples, pad_id, batching),
        }

    scored = {
        "fixed": score_rows(MicroBatching(size=3)),
        "budget": score_rows(MicroBatching(size=3, max_tokens=100, group=None)),
        "budget_packed": score_rows(MicroBatching(size=3, max_tokens=100, packed=True, group=None)),
    }
    scoring = {
        way: max((a - b).abs().max().item() for key in rows for a, b in zip(rows[key], scored["fixed"][key]))
        for way, rows in scored.items()
    }
    groups = MicroBatching(size=3, max_tokens=100).groups([len(s) for s in samples])
    forwards = [None] * world
    dist.all_gather_object(forwards, len(groups))

    results: dict = {"scoring": scoring, "scoring_forwards_per_rank": forwards}
    for way, extra in WAYS.items():
        cfg = config(extra, zero_stage)
        actor, critic = engines(cfg)
        exp = ActorBatch(batch, action_mask, old_logp, ref_logp, advantages)
        actor_sums = all_reduce_sums(train_actor(cfg, exp, actor, None, 0.05, 11, None, 0, None, pad_id))
        critic_sums = all_reduce_sums(train_critic(cfg, CriticBatch(batch, action_mask, values, returns), critic, None, 11, pad_id))
        results[way] = {
            "sums": {**actor_sums, **critic_sums},
            "grad_norm": actor.grad_norm,
            "critic_grad_norm": critic.grad_norm,
            "actor": weights(actor),
            "critic": weights(critic),
        }
    fixed = results["fixed"]
    report = {"scoring": scoring, "scoring_forwards_per_rank": forwards}
    report["moved"] = {
        "actor": max((fixed["actor"][k] - start_actor[k]).abs().max().item() for k in start_actor),
        "critic": max((fixed["critic"][k] - start_critic[k]).abs().max().item() for k in start_critic),
    }
    for way in WAYS:
        r = results[way]
        report[way] = {
            "actor": max((r["actor"][k] - fixed["actor"][k]).abs().max().item() for k in fixed["actor"]),
            "critic": max((r["critic"][k] - fixed["critic"][k]).abs().max().item() for k in fixed["critic"]),
            "grad_norm": abs(r["grad_norm"] - fixed["grad_norm"]) / fixed["grad_norm"],
            "critic_grad_norm": abs(r["critic_grad_norm"] - fixed["critic_grad_norm"]) / fixed["critic_grad_norm"],
            "sums": {k: abs(r["sums"][k] - fixed["sums"][k]) for k in fixed["sums"]},
        }
    report["fixed_sums"] = fixed["sums"]
    if rank == 0:
        print("RESULT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
