"""Supervised fine-tuning, continued pre-training and conditional SFT.

    torchrun --nproc_per_node 2 -m rlhf.sft --config configs/sft_tiny.yaml
    torchrun --nproc_per_node 8 -m rlhf.sft --pretrain Qwen/Qwen2.5-0.5B --dataset my.jsonl \\
        --input_key question --output_key answer --apply_chat_template --zero_stage 2 --bf16

Steps: 1 launch, 2 data, 3 model and engine, 4 train (rlhf.trainer: eval, checkpoints,
resume), 5 export. The loss is the mean NLL over every target token of the global batch, whatever the
sharding or packing.
"""

from __future__ import annotations

from typing import Optional, Sequence

from rlhf.config import SFTConfig, answer_help_early, parse_config

if __name__ == "__main__":
    answer_help_early(SFTConfig, "python -m rlhf.sft")  # before torch and DeepSpeed are imported

import torch

from rlhf.data.batching import shard_for_eval
from rlhf.data.sft import Sample, tokenize_sft
from rlhf.data.sources import load_train_eval
from rlhf.distributed.collectives import all_reduce_sums
from rlhf.distributed.env import init_distributed
from rlhf.distributed.topology import Topology
from rlhf.engines.sft_forward import batch_tensors, forward_nll, target_tokens
from rlhf.engines.train_engine import TrainEngine
from rlhf.errors import exit_on_user_error, run_program
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.trainer import Loop, finish, plan_total_steps, run


def load_samples(cfg: SFTConfig, tokenizer) -> tuple[list[Sample], list[Sample]]:
    """Rows from the configured sources -> tokenized train and eval samples."""
    return load_train_eval(cfg.data, cfg.train.seed, lambda rows: tokenize_sft(rows, tokenizer, cfg.data))


@torch.no_grad()
def evaluate(engine: TrainEngine, samples: list[Sample], cfg: SFTConfig, pad_id: int, rank: int, dp: int) -> dict[str, float]:
    """Mean NLL per target token over the eval set (all ranks take part)."""
    micro = cfg.train.micro_eval_batch_size or cfg.train.micro_train_batch_size
    sums = {"loss": 0.0, "tokens": 0.0}
    for indices in shard_for_eval(len(samples), micro, dp)[rank]:
        chosen = [samples[i] for i in indices] or [samples[0]]  # empty: keep ZeRO-3 collectives in step
        nll, _ = forward_nll(engine, batch_tensors(chosen, pad_id, cfg.data.packing_samples))
        if indices:
            sums["loss"] += nll.item()
            sums["tokens"] += target_tokens(chosen)
    totals = all_reduce_sums(sums)
    return {"loss": totals["loss"] / max(totals["tokens"], 1)}


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg = parse_config(SFTConfig, argv, prog="python -m rlhf.sft")

    # 1. Launch: one process group; SFT uses the actor role on every rank.
    launch = init_distributed()
    topology = Topology.colocated(launch.world_size, ("actor",))
    dp, rank = topology.dp_size("actor"), launch.rank
    torch.manual_seed(cfg.train.seed)

    # 2. Data and the step plan.
    tokenizer = load_tokenizer(cfg.model)
    train_samples, eval_samples = load_samples(cfg, tokenizer)
    lengths = [len(s.input_ids) for s in train_samples]
    per_epoch, total_steps = plan_total_steps(cfg, lengths, dp, len(train_samples))

    # 3. Model and engine.
    model = load_causal_lm(cfg.model)
    engine = TrainEngine(model, cfg.train, bf16=cfg.model.bf16, total_steps=total_steps, dp_size=dp)
    pad_id = tokenizer.pad_token_id

    # 4. Train: the loss of a step is the mean NLL over all its target tokens.
    def micro_step(samples: list[Sample], step_tokens: float) -> dict[str, float]:
        nll, aux = forward_nll(engine, batch_tensors(samples, pad_id, cfg.data.packing_samples))
        loss = nll / step_tokens * engine.grad_scale  # DeepSpeed divides by dp x accumulation
        metrics = {"loss": nll.item()}
        if aux is not None and cfg.model.aux_loss_coef > 0:
            loss = loss + cfg.model.aux_loss_coef * aux  # a per-micro-batch mean: DeepSpeed averages it
            metrics["aux_loss"] = aux.item()
        engine.backward(loss)
        engine.step()
        return metrics

    loop = Loop(
        name="sft",
        cfg=cfg,
        launch=launch,
        dp_size=dp,
        items=train_samples,
        lengths=lengths,
        micro_step=micro_step,
        step_normaliser=target_tokens,
        evaluate=(lambda: evaluate(engine, eval_samples, cfg, pad_id, rank, dp)) if eval_samples else None,
    )
    run(loop, engine, total_steps, per_epoch)

    # 5. Export a Hugging Face folder (or the LoRA adapter), then upload it if asked.
    finish(engine, tokenizer, cfg, launch)


if __name__ == "__main__":
    run_program(main)
