"""The supervised training loop shared by SFT, reward models, DPO and KTO.

A trainer supplies what differs (how one micro-batch becomes a loss, what normalises the loss
of a step, how to evaluate); the loop does what is common: the micro-batch plan every rank
computes alike, gradient accumulation, metrics, eval, atomic checkpoints, exact resume.

Loss normalisation. ``step_normaliser(items of the whole step, all ranks)`` returns the count
the step's loss is averaged over (target tokens for SFT, pairs for RM/DPO, examples for KTO).
``micro_step(items, normaliser)`` must backpropagate ``loss_sum / normaliser`` for its items
(the engine's ``grad_scale`` is applied here) and return metric *sums* over its items; the loop
adds them over micro-batches and ranks and divides by the normaliser. Names listed in
``MICRO_MEANS`` are per-micro-batch means instead (e.g. a router loss) and are averaged.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch.distributed as dist

from rlhf.data.batching import plan_epoch, step_micro_batches, steps_in_epoch
from rlhf.distributed.collectives import all_reduce_sums
from rlhf.distributed.env import LaunchEnv
from rlhf.engines.train_engine import TrainEngine
from rlhf.errors import UserError
from rlhf.io.checkpoint import export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
from rlhf.io.preemption import PreemptionWatch
from rlhf.metrics import MetricsLogger

MICRO_MEANS = ("aux_loss",)


@dataclass
class Loop:
    """Everything the loop needs from a trainer."""

    name: str  # trainer name for logs ("sft", "rm", ...)
    cfg: Any  # a config with .train, .ckpt, .log and .data sections
    launch: LaunchEnv
    dp_size: int
    items: Sequence[Any]  # training examples (samples, pairs ...)
    lengths: Sequence[int]  # tokens per item, for packing and throughput
    micro_step: Callable[[list, float], dict[str, float]]
    step_normaliser: Callable[[list], float]
    evaluate: Optional[Callable[[], dict[str, float]]] = None


def plan_total_steps(cfg: Any, lengths: Sequence[int], dp_size: int, num_items: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps) for the run; raises when no step fits."""
    accumulation = cfg.train.grad_accumulation_steps(dp_size)
    per_epoch = steps_in_epoch(len(_epoch_plan(cfg, lengths, 0)), dp_size, accumulation)
    if per_epoch == 0:
        raise UserError(f"--dataset has {num_items} usable examples, fewer than one --train_batch_size {cfg.train.train_batch_size}")
    total = per_epoch * cfg.train.max_epochs
    if cfg.train.max_steps is not None:
        total = min(total, cfg.train.max_steps)
    return per_epoch, total


def _epoch_plan(cfg: Any, lengths: Sequence[int], epoch: int) -> list[list[int]]:
    return plan_epoch(lengths, micro_batch_size=cfg.train.micro_train_batch_size, seed=cfg.train.seed, epoch=epoch)


def run(loop: Loop, engine: TrainEngine, total_steps: int, per_epoch: int, checkpointed: Optional[dict] = None) -> None:
    """Train ``engine`` for ``total_steps`` optimizer steps, resuming if asked and possible.

    ``checkpointed``: the trainable engines saved in checkpoints (default: {"actor": engine}).
    """
    cfg, rank = loop.cfg, loop.launch.rank
    engines = checkpointed or {"actor": engine}
    accumulation = engine.accumulation_steps

    start_step = 0
    if cfg.ckpt.load_checkpoint and (folder := latest_checkpoint(cfg.ckpt.ckpt_path)) is not None:
        start_step = load_checkpoint(folder, engines)["step"]
        if start_step >= total_steps and loop.launch.is_rank0:
            print(
                f"checkpoint {folder} is at step {start_step}, already at the end of training ({total_steps} steps): exporting only",
                flush=True,
            )

    metrics_path = cfg.log.metrics_path or os.path.join(cfg.ckpt.save_path, "metrics.jsonl")
    logger = MetricsLogger(
        metrics_path, cfg.log, dataclasses.asdict(cfg), loop.name, total_steps, enabled=loop.launch.is_rank0, resumed=start_step > 0
    )
    if start_step:
        logger.log(start_step, {"resumed_from_step": start_step})
    plan, plan_of_epoch = None, -1
    preemption = PreemptionWatch()
    engine.train()
    for step in range(start_step, total_steps):
        epoch, step_in_epoch = divmod(step, per_epoch)
        if epoch != plan_of_epoch:
            plan, plan_of_epoch = _epoch_plan(cfg, loop.lengths, epoch), epoch
        started = time.perf_counter()
        lr = engine.lr  # the rate this step's update uses (the scheduler moves on inside it)
        step_batches = step_micro_batches(plan, step_in_epoch, loop.dp_size, accumulation)  # [rank][k] -> indices
        normaliser = loop.step_normaliser([loop.items[i] for r in step_batches for mb in r for i in mb])
        sums: dict[str, float] = {}
        for indices in step_batches[rank]:
            for key, value in loop.micro_step([loop.items[i] for i in indices], normaliser).items():
                sums[key] = sums.get(key, 0.0) + value
        record = _reduce_step_metrics(sums, normaliser, loop.dp_size * accumulation)
        elapsed = time.perf_counter() - started
        step_tokens = sum(loop.lengths[i] for r in step_batches for mb in r for i in mb)
        record.update(lr=lr, grad_norm=engine.grad_norm, epoch=epoch, step_seconds=elapsed, tokens_per_s=step_tokens / elapsed)

        done = step + 1
        end_of_epoch = done % per_epoch == 0 or done == total_steps
        if loop.evaluate is not None and ((cfg.train.eval_steps > 0 and done % cfg.train.eval_steps == 0) or end_of_epoch):
            engine.eval()
            record.update({f"eval_{k}": v for k, v in loop.evaluate().items()})
            engine.train()
        if done % cfg.log.logging_steps == 0 or any(k.startswith("eval_") for k in record) or done == total_steps:
            logger.log(done, record)
        saved = cfg.ckpt.save_steps > 0 and done % cfg.ckpt.save_steps == 0
        if saved and done < total_steps:
            save_checkpoint(cfg.ckpt.ckpt_path, done, engines, {"epoch": epoch}, cfg.ckpt.max_ckpt_num)
        if done < total_steps and preemption.stop_requested():
            if not saved:
                save_checkpoint(cfg.ckpt.ckpt_path, done, engines, {"epoch": epoch}, cfg.ckpt.max_ckpt_num)
            logger.close()
            preemption.hand_over()
    logger.close()


def _reduce_step_metrics(sums: dict[str, float], normaliser: float, micro_batches: int) -> dict[str, float]:
    """Sum every rank's metric sums; divide by the step's normaliser (or micro-batch count)."""
    totals = all_reduce_sums(sums)
    return {k: v / (micro_batches if k in MICRO_MEANS else max(normaliser, 1e-12)) for k, v in totals.items()}


def finish(
    engine: Optional[TrainEngine], tokenizer: Any, cfg: Any, launch: LaunchEnv, extra_files: Optional[dict[str, str]] = None
) -> None:
    """Export the trained model to --save_path, upload it to --s3_save_path, end the process group.
    Collective over the world; ``engine`` is None on ranks that do not hold the exported model."""
    if engine is not None:
        export_hf(engine, tokenizer, cfg.ckpt.save_path, extra_files=extra_files)
    if cfg.ckpt.s3_save_path and launch.is_rank0:
        from rlhf.io.s3 import upload_folder

        upload_folder(cfg.ckpt.save_path, cfg.ckpt.s3_save_path)
    dist.barrier()
    if engine is not None:
        engine.engine.destroy()  # drop ZeRO-3 hooks before their process group goes
    dist.destroy_process_group()
