"""Reward-model training: a causal-LM backbone with a scalar head, trained on preference pairs.

    torchrun --nproc_per_node 2 -m rlhf.rm --config configs/rm_tiny.yaml
    torchrun --nproc_per_node 8 -m rlhf.rm --pretrain OpenRLHF/Llama-3-8b-sft-mixture \\
        --dataset OpenRLHF/preference_dataset_mixture2_and_safe_pku --apply_chat_template \\
        --chosen_key chosen --rejected_key rejected --prompt_key None --bf16 --zero_stage 3

The model is transformers' ``AutoModelForSequenceClassification`` with one label; its score is
read at each sequence's last non-pad token. Chosen and rejected go through one concatenated
forward. After training, the mean and std of the reward over the eval set are stored with the
model (``config.json`` keys ``reward_mean``/``reward_std`` and ``reward_stats.json``) so PPO can
normalise rewards.

Steps: 1 launch, 2 data, 3 model and engine, 4 train, 5 reward statistics, 6 export.
"""

from __future__ import annotations

import json
import math
from typing import Optional, Sequence

from rlhf.config import RMConfig, answer_help_early, parse_config

if __name__ == "__main__":
    answer_help_early(RMConfig, "python -m rlhf.rm")  # before torch and DeepSpeed are imported

import torch

from rlhf.algos.preference import pairwise_logexp_loss, pairwise_sigmoid_loss
from rlhf.data.batching import shard_for_eval
from rlhf.data.preference import PairSample, collate_pairs, load_pairs
from rlhf.distributed.collectives import all_reduce_sums
from rlhf.distributed.env import device, init_distributed
from rlhf.distributed.topology import Topology
from rlhf.engines.train_engine import TrainEngine
from rlhf.errors import exit_on_user_error, run_program
from rlhf.models.loading import load_reward_model, load_tokenizer
from rlhf.trainer import Loop, finish, plan_total_steps, run


def pair_rewards(engine: TrainEngine, pairs: list[PairSample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores of chosen [B] and rejected [B] from one concatenated forward, and margins [B]."""
    batch = collate_pairs(pairs, pad_id)
    scores = engine(input_ids=batch["input_ids"].to(device()), attention_mask=batch["attention_mask"].to(device())).logits
    scores = scores.squeeze(-1).float()  # [2B]
    n = len(pairs)
    return scores[:n], scores[n:], batch["margin"].to(device()).float()


def pair_loss_sum(cfg: RMConfig, chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Summed pairwise loss over the pairs (normaliser 1)."""
    if cfg.loss == "logexp":
        return pairwise_logexp_loss(chosen, rejected, normaliser=1.0)
    return pairwise_sigmoid_loss(chosen, rejected, margin if cfg.data.margin_key else None, normaliser=1.0)


def pair_metrics(loss_sum: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Sums over the pairs; the loop divides them by the number of pairs."""
    return {
        "loss": loss_sum.item(),
        "acc": (chosen > rejected).float().sum().item(),
        "margin": (chosen - rejected).sum().item(),
        "chosen_reward": chosen.sum().item(),
        "rejected_reward": rejected.sum().item(),
    }


@torch.no_grad()
def evaluate(engine: TrainEngine, pairs: list[PairSample], cfg: RMConfig, pad_id: int, rank: int, dp: int) -> dict[str, float]:
    """Pair accuracy, loss, margin, and mean/std of every eval reward (chosen and rejected)."""
    micro = cfg.train.micro_eval_batch_size or cfg.train.micro_train_batch_size
    sums = {"loss": 0.0, "acc": 0.0, "margin": 0.0, "chosen_reward": 0.0, "rejected_reward": 0.0, "pairs": 0.0, "r_sum": 0.0, "r_sq": 0.0}
    for indices in shard_for_eval(len(pairs), micro, dp)[rank]:
        chosen_pairs = [pairs[i] for i in indices] or [pairs[0]]  # empty: keep ZeRO-3 collectives in step
        chosen, rejected, margin = pair_rewards(engine, chosen_pairs, pad_id)
        if not indices:
            continue
        for key, value in pair_metrics(pair_loss_sum(cfg, chosen, rejected, margin), chosen, rejected).items():
            sums[key] += value
        both = torch.cat([chosen, rejected]).double()
        sums["pairs"] += len(indices)
        sums["r_sum"] += both.sum().item()
        sums["r_sq"] += (both * both).sum().item()
    totals = all_reduce_sums(sums)
    n_pairs, n_rewards = max(totals["pairs"], 1.0), max(2 * totals["pairs"], 1.0)
    mean = totals["r_sum"] / n_rewards
    out = {k: totals[k] / n_pairs for k in ("loss", "acc", "margin", "chosen_reward", "rejected_reward")}
    out.update(reward_mean=mean, reward_std=math.sqrt(max(totals["r_sq"] / n_rewards - mean * mean, 0.0)))
    return out


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg = parse_config(RMConfig, argv, prog="python -m rlhf.rm")

    # 1. Launch: the reward model is trained on every rank.
    launch = init_distributed()
    topology = Topology.colocated(launch.world_size, ("actor",))
    dp, rank = topology.dp_size("actor"), launch.rank
    torch.manual_seed(cfg.train.seed)

    # 2. Data: pairs, each side masked on its response; the plan counts both sides' tokens.
    tokenizer = load_tokenizer(cfg.model)
    train_pairs, eval_pairs = load_pairs(cfg.data, tokenizer, cfg.train.seed)
    lengths = [len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in train_pairs]
    per_epoch, total_steps = plan_total_steps(cfg, lengths, dp, len(train_pairs))

    # 3. Model and engine.
    model = load_reward_model(cfg.model, pad_token_id=tokenizer.pad_token_id)
    engine = TrainEngine(model, cfg.train, bf16=cfg.model.bf16, total_steps=total_steps, dp_size=dp)
    pad_id = tokenizer.pad_token_id

    # 4. Train: the loss of a step is the mean pairwise loss over all its pairs.
    def micro_step(pairs: list[PairSample], step_pairs: float) -> dict[str, float]:
        chosen, rejected, margin = pair_rewards(engine, pairs, pad_id)
        loss_sum = pair_loss_sum(cfg, chosen, rejected, margin)
        engine.backward(loss_sum / step_pairs * engine.grad_scale)
        engine.step()
        return pair_metrics(loss_sum.detach(), chosen.detach(), rejected.detach())

    evaluate_now = (lambda: evaluate(engine, eval_pairs, cfg, pad_id, rank, dp)) if eval_pairs else None
    loop = Loop(
        name="rm",
        cfg=cfg,
        launch=launch,
        dp_size=dp,
        items=train_pairs,
        lengths=lengths,
        micro_step=micro_step,
        step_normaliser=len,
        evaluate=evaluate_now,
    )
    run(loop, engine, total_steps, per_epoch)

    # 5. Reward statistics for PPO's normalisation (over the eval set, else the training pairs).
    engine.eval()
    stats_pairs = eval_pairs or train_pairs
    final = evaluate(engine, stats_pairs, cfg, pad_id, rank, dp)
    stats = {"reward_mean": final["reward_mean"], "reward_std": final["reward_std"], "pairs": len(stats_pairs)}
    hf_config = getattr(engine.module, "get_base_model", lambda: engine.module)().config
    hf_config.reward_mean, hf_config.reward_std = stats["reward_mean"], stats["reward_std"]

    # 6. Export: loads with AutoModelForSequenceClassification (num_labels=1).
    finish(engine, tokenizer, cfg, launch, extra_files={"reward_stats.json": json.dumps(stats, indent=1)})


if __name__ == "__main__":
    run_program(main)
