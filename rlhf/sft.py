"""Supervised fine-tuning, continued pre-training and conditional SFT.

    torchrun --nproc_per_node 2 -m rlhf.sft --config configs/sft_tiny.yaml
    torchrun --nproc_per_node 8 -m rlhf.sft --pretrain Qwen/Qwen2.5-0.5B --dataset my.jsonl \\
        --input_key question --output_key answer --apply_chat_template --zero_stage 2 --bf16

Steps: 1 launch, 2 data, 3 model and engine, 4 resume, 5 train loop (eval, checkpoints),
6 export. The loss is the mean NLL over every target token of the global batch, whatever the
sharding or packing.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from rlhf.algos.losses import sft_nll_sum
from rlhf.config import SFTConfig, parse_config
from rlhf.data.batching import plan_epoch, shard_for_eval, step_micro_batches, steps_in_epoch
from rlhf.data.sft import Sample, collate_packed, collate_padded, tokenize_sft
from rlhf.data.sources import holdout_split, load_mixture
from rlhf.dist.env import device, init_distributed
from rlhf.dist.topology import Topology
from rlhf.engines.train_engine import TrainEngine
from rlhf.errors import UserError, exit_on_user_error
from rlhf.io.checkpoint import export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
from rlhf.metrics import MetricsLogger
from rlhf.models.loading import load_causal_lm, load_tokenizer


def load_samples(cfg: SFTConfig, tokenizer) -> tuple[list[Sample], list[Sample]]:
    """Rows from the configured sources -> tokenized train and eval samples."""
    data = cfg.data
    rows = load_mixture(data.dataset, data.dataset_probs, data.train_split, data.max_samples, cfg.train.seed)
    if data.eval_dataset:
        eval_rows = load_mixture(data.eval_dataset, None, data.eval_split, data.max_samples, cfg.train.seed)
    else:
        rows, eval_rows = holdout_split(rows, data.eval_holdout_ratio, cfg.train.seed)
    return tokenize_sft(rows, tokenizer, data), tokenize_sft(eval_rows, tokenizer, data) if eval_rows else []


def batch_tensors(samples: list[Sample], pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """Model inputs for one micro-batch: padded [B, T] or one packed row [1, sum T]."""
    batch = collate_packed(samples, pad_id) if packed else collate_padded(samples, pad_id)
    batch.pop("sample_ids", None)
    return {k: v.to(device()) for k, v in batch.items()}


def forward_nll(engine: TrainEngine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Summed NLL of the batch's target tokens, and the MoE router loss if the model has one."""
    loss_mask = batch.pop("loss_mask")
    out = engine(**batch, use_cache=False)
    return sft_nll_sum(out.logits, batch["input_ids"], loss_mask), getattr(out, "aux_loss", None)


def target_tokens(samples: Sequence[Sample]) -> int:
    return sum(sum(s.loss_mask) for s in samples)


@torch.no_grad()
def evaluate(engine: TrainEngine, samples: list[Sample], cfg: SFTConfig, pad_id: int, rank: int, dp: int) -> float:
    """Mean NLL per target token over the eval set (all ranks take part)."""
    engine.eval()
    micro = cfg.train.micro_eval_batch_size or cfg.train.micro_train_batch_size
    totals = torch.zeros(2, dtype=torch.float64, device=device())  # [nll sum, target tokens]
    for indices in shard_for_eval(len(samples), micro, dp)[rank]:
        chosen = [samples[i] for i in indices] or [samples[0]]  # empty: keep ZeRO-3 collectives in step
        nll, _ = forward_nll(engine, batch_tensors(chosen, pad_id, cfg.data.packing_samples))
        if indices:
            totals += torch.tensor([nll.item(), target_tokens(chosen)], dtype=torch.float64, device=totals.device)
    dist.all_reduce(totals)
    engine.train()
    return (totals[0] / totals[1].clamp(min=1)).item()


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg = parse_config(SFTConfig, argv, prog="python -m rlhf.sft")

    # 1. Launch: one process group; SFT uses the actor role on every rank.
    launch = init_distributed()
    topology = Topology.colocated(launch.world_size, ("actor",))
    dp, rank = topology.dp_size("actor"), launch.rank
    torch.manual_seed(cfg.train.seed)

    # 2. Data, and the plan of micro-batches every rank computes alike.
    tokenizer = load_tokenizer(cfg.model)
    train_samples, eval_samples = load_samples(cfg, tokenizer)
    accumulation = cfg.train.grad_accumulation_steps(dp)
    pack_tokens = cfg.train.micro_train_batch_size * cfg.data.max_len if cfg.data.packing_samples else None
    lengths = [len(s.input_ids) for s in train_samples]

    def epoch_plan(epoch: int) -> list[list[int]]:
        return plan_epoch(lengths, micro_batch_size=cfg.train.micro_train_batch_size, seed=cfg.train.seed, epoch=epoch, pack_max_tokens=pack_tokens)

    per_epoch = steps_in_epoch(len(epoch_plan(0)), dp, accumulation)
    if per_epoch == 0:
        raise UserError(f"--dataset has {len(train_samples)} usable samples, fewer than one --train_batch_size {cfg.train.train_batch_size}")
    total_steps = per_epoch * cfg.train.max_epochs
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)

    # 3. Model and engine.
    model = load_causal_lm(cfg.model)
    engine = TrainEngine(model, cfg.train, bf16=cfg.model.bf16, total_steps=total_steps, dp_size=dp)

    # 4. Resume: engine, optimizer, schedule, RNG and the data position.
    start_step = 0
    if cfg.ckpt.load_checkpoint and (folder := latest_checkpoint(cfg.ckpt.ckpt_path)) is not None:
        start_step = load_checkpoint(folder, {"actor": engine})["step"]
        if start_step >= total_steps and launch.is_rank0:
            print(f"checkpoint {folder} is at step {start_step}, already at the end of training ({total_steps} steps): exporting only", flush=True)

    # 5. Train.
    metrics_path = cfg.log.metrics_path or os.path.join(cfg.ckpt.save_path, "metrics.jsonl")
    logger = MetricsLogger(metrics_path, cfg.log, dataclasses.asdict(cfg), "sft", total_steps, enabled=launch.is_rank0)
    if start_step:
        logger.log(start_step, {"resumed_from_step": start_step})
    pad_id = tokenizer.pad_token_id
    plan, plan_epoch_id = None, -1
    engine.train()
    for step in range(start_step, total_steps):
        epoch, step_in_epoch = divmod(step, per_epoch)
        if epoch != plan_epoch_id:
            plan, plan_epoch_id = epoch_plan(epoch), epoch
        started = time.perf_counter()
        step_batches = step_micro_batches(plan, step_in_epoch, dp, accumulation)  # [rank][k] -> indices
        global_tokens = sum(target_tokens([train_samples[i] for i in mb]) for r in step_batches for mb in r)
        nll_local, aux_local = 0.0, 0.0
        for indices in step_batches[rank]:
            nll, aux = forward_nll(engine, batch_tensors([train_samples[i] for i in indices], pad_id, cfg.data.packing_samples))
            loss = nll / global_tokens * engine.grad_scale  # DeepSpeed divides by dp x accumulation
            if aux is not None and cfg.model.aux_loss_coef > 0:
                loss = loss + cfg.model.aux_loss_coef * aux  # a mean-type term: DeepSpeed averages it
                aux_local += aux.item() / accumulation
            engine.backward(loss)
            engine.step()
            nll_local += nll.item()
        nll_total = torch.tensor(nll_local, dtype=torch.float64, device=device())
        dist.all_reduce(nll_total)
        elapsed = time.perf_counter() - started
        step_tokens = sum(len(train_samples[i].input_ids) for r in step_batches for mb in r for i in mb)
        record = {"loss": nll_total.item() / global_tokens, "lr": engine.lr, "grad_norm": engine.grad_norm, "epoch": epoch, "tokens_per_s": step_tokens / elapsed}
        if cfg.model.aux_loss_coef > 0:
            aux_mean = torch.tensor(aux_local, dtype=torch.float64, device=device())
            dist.all_reduce(aux_mean)
            record["aux_loss"] = aux_mean.item() / dp
        done = step + 1
        end_of_epoch = done % per_epoch == 0 or done == total_steps
        if eval_samples and ((cfg.train.eval_steps > 0 and done % cfg.train.eval_steps == 0) or end_of_epoch):
            record["eval_loss"] = evaluate(engine, eval_samples, cfg, pad_id, rank, dp)
        if done % cfg.log.logging_steps == 0 or "eval_loss" in record or done == total_steps:
            logger.log(done, record)
        if cfg.ckpt.save_steps > 0 and done % cfg.ckpt.save_steps == 0 and done < total_steps:
            save_checkpoint(cfg.ckpt.ckpt_path, done, {"actor": engine}, {"epoch": epoch}, cfg.ckpt.max_ckpt_num)
    logger.close()

    # 6. Export a Hugging Face folder (or the LoRA adapter), then upload it if asked.
    export_hf(engine, tokenizer, cfg.ckpt.save_path)
    if cfg.ckpt.s3_save_path and launch.is_rank0:
        from rlhf.io.s3 import upload_folder

        upload_folder(cfg.ckpt.save_path, cfg.ckpt.s3_save_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
