"""Rejection sampling (best-of-n fine-tuning), rounds of: generate n responses per prompt with the
current policy, score them (reward models and/or a reward function), keep the best of each
prompt (or all above a threshold), write them as an SFT dataset, and fine-tune on them.

    torchrun --nproc_per_node 2 -m rlhf.rejection_sampling --pretrain ./outputs/sft_tiny/model \\
        --dataset embedded:arith/prompts_train.jsonl --input_key input --label_key label \\
        --reward_func rlhf.rewards:exact_match --best_of_n 8 --iterations 1 \\
        --eval_dataset embedded:arith/prompts_eval.jsonl --output_dir ./outputs/rs

Prompts are dealt to ranks round-robin, so the n samples of a prompt are scored and selected on
one rank; the kept samples are gathered on every rank and trained on as one SFT dataset (mean
NLL over the response tokens of each global batch), with the policy's DeepSpeed engine and
optimizer kept across rounds. With --eval_task generate_vllm, vLLM generates and receives the
policy's weights before every round. Outputs in --output_dir: round_K.jsonl (kept samples:
the row, prompt, output, reward), metrics.jsonl, and model/ (Hugging Face folder).

Steps: 1 launch, 2 data, 3 engines, 4 rounds (eval -> generate -> score -> keep -> write -> SFT), 5 export.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
from typing import Optional, Sequence

from rlhf.config import RejectionSamplingConfig, answer_help_early, parse_config

if __name__ == "__main__":
    answer_help_early(RejectionSamplingConfig, "python -m rlhf.rejection_sampling")  # before torch and DeepSpeed are imported

import torch

from rlhf.data.batching import plan_epoch, step_micro_batches, steps_in_epoch
from rlhf.data.prompts import Prompt, load_prompts
from rlhf.data.sft import Sample
from rlhf.distributed.collectives import all_reduce_sums, gather_in_order
from rlhf.distributed.env import init_distributed
from rlhf.engines.sft_forward import batch_tensors, forward_nll, target_tokens
from rlhf.engines.train_engine import TrainEngine
from rlhf.errors import exit_on_user_error, run_program
from rlhf.io.checkpoint import export_hf
from rlhf.io.jsonl import write_jsonl_atomic
from rlhf.metrics import MetricsLogger
from rlhf.models.loading import load_causal_lm, load_tokenizer, resolve_model_path
from rlhf.rewards import RewardSources, inference_reward_sources
from rlhf.rollout.hf import HFGenerator
from rlhf.rollout.vllm_engine import VLLMGenerator, engine_tp_group


def keep(cfg: RejectionSamplingConfig, rewards: list[float], n: int) -> list[int]:
    """Indices of the kept samples; rows i*n .. i*n+n-1 are the samples of one prompt."""
    if cfg.select.keep == "threshold":
        return [j for j, r in enumerate(rewards) if r >= cfg.select.reward_threshold]
    return [start + max(range(n), key=lambda k: rewards[start + k]) for start in range(0, len(rewards), n)]


def sft_round(
    engine: TrainEngine, samples: list[Sample], cfg: RejectionSamplingConfig, pad_id: int, rank: int, dp: int, seed: int
) -> dict[str, float]:
    """--max_epochs passes over the kept samples (the same list on every rank); loss = mean NLL per response token of each global batch."""
    lengths = [len(s) for s in samples]
    accumulation = engine.accumulation_steps
    nll_sum, tokens, steps = 0.0, 0.0, 0
    for epoch in range(cfg.train.max_epochs):
        plan = plan_epoch(lengths, micro_batch_size=cfg.train.micro_train_batch_size, seed=seed, epoch=epoch)
        for step in range(steps_in_epoch(len(plan), dp, accumulation)):
            batches = step_micro_batches(plan, step, dp, accumulation)
            step_tokens = target_tokens([samples[i] for per_rank in batches for mb in per_rank for i in mb])
            for mb in batches[rank]:
                nll, _ = forward_nll(engine, batch_tensors([samples[i] for i in mb], pad_id, packed=False))
                engine.backward(nll / step_tokens * engine.grad_scale)
                engine.step()
                nll_sum += nll.item()
            tokens += step_tokens
            steps += 1
    total = all_reduce_sums({"nll": nll_sum})["nll"]
    return {"sft_loss": total / max(tokens, 1.0), "sft_steps": float(steps)}


@torch.no_grad()
def mean_greedy_reward(generator, sources: RewardSources, prompts: list[Prompt], tokenizer, micro: int, rank: int, world: int) -> float:
    """Mean reward of greedy responses to ``prompts`` (sharded over ranks)."""
    mine = prompts[rank::world]
    total = 0.0
    if mine:
        responses = generator.generate([p.ids for p in mine], greedy=True).responses
        total = sources.score(mine, responses, tokenizer, micro)[0].sum().item()
    sums = all_reduce_sums({"reward": total, "n": float(len(mine))})
    return sums["reward"] / max(sums["n"], 1.0)


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg = parse_config(RejectionSamplingConfig, argv, prog="python -m rlhf.rejection_sampling")
    task, select = cfg.task, cfg.select
    n = task.best_of_n

    # 1. Launch: the policy on every rank (data parallel).
    launch = init_distributed()
    rank, world = launch.rank, launch.world_size
    torch.manual_seed(cfg.train.seed)

    # 2. Data.
    tokenizer = load_tokenizer(cfg.model)
    prompts = load_prompts(task.dataset, task.dataset_probs, tokenizer, task.prompt_data(), cfg.train.seed)
    eval_prompts = load_prompts(select.eval_dataset, None, tokenizer, task.prompt_data(), cfg.train.seed) if select.eval_dataset else []
    mine = list(range(rank, len(prompts), world))

    # 3. Engines: the policy (trained between rounds), its generator, the scorer.
    kept_bound = len(prompts) * (n if select.keep == "threshold" else 1)
    schedule_steps = max(1, select.iterations * cfg.train.max_epochs * math.ceil(kept_bound / cfg.train.train_batch_size))
    engine = TrainEngine(load_causal_lm(cfg.model), cfg.train, bf16=cfg.model.bf16, total_steps=schedule_steps, dp_size=world)
    if task.eval_task == "generate_vllm":
        tp_group = engine_tp_group(world, rank, cfg.rollout.vllm_tensor_parallel_size)
        generator = VLLMGenerator(
            resolve_model_path(cfg.model.pretrain),
            tokenizer,
            cfg.rollout,
            max_model_len=task.prompt_max_len + cfg.rollout.generate_max_len,
            dtype=torch.bfloat16 if cfg.model.bf16 else torch.float32,
            seed=cfg.train.seed,
            tp_group=tp_group,
        )
    else:
        generator = HFGenerator(engine.module, tokenizer, cfg.rollout, engine.unpartitioned)
    sources = inference_reward_sources(task, cfg.model, tokenizer)
    metrics_path = cfg.log.metrics_path or os.path.join(select.output_dir, "metrics.jsonl")
    logger = MetricsLogger(
        metrics_path, cfg.log, dataclasses.asdict(cfg), "rejection_sampling", max(select.iterations, 1), enabled=launch.is_rank0
    )

    # 4. Rounds.
    if eval_prompts:
        logger.log(0, {"eval_reward": _eval(generator, engine, sources, eval_prompts, tokenizer, task.micro_batch_size, rank, world)})
    for round_ in range(max(select.iterations, 1)):
        if isinstance(generator, VLLMGenerator):
            generator.refresh(engine)
        jobs = [(i, k) for i in mine for k in range(n)]
        responses = generator.generate([prompts[i].ids for i, _ in jobs]).responses if jobs else []
        rewards = sources.score([prompts[i] for i, _ in jobs], responses, tokenizer, task.micro_batch_size)[0].tolist() if jobs else []
        chosen = keep(cfg, rewards, n)
        records = [
            {
                **prompts[jobs[j][0]].row,
                "prompt": prompts[jobs[j][0]].text,
                "output": tokenizer.decode(responses[j], skip_special_tokens=True),
                "reward": rewards[j],
                "_row": jobs[j][0],
                "_sample": jobs[j][1],
                "_ids": prompts[jobs[j][0]].ids + responses[j],
                "_prompt_len": len(prompts[jobs[j][0]].ids),
            }
            for j in chosen
        ]
        kept = gather_in_order(records, world)
        sums = all_reduce_sums({"reward": sum(rewards), "samples": float(len(rewards))})
        record = {
            "sample_reward": sums["reward"] / max(sums["samples"], 1.0),
            "kept": float(len(kept)),
            "kept_reward": sum(r["reward"] for r in kept) / max(len(kept), 1),
        }
        if launch.is_rank0:
            write_jsonl_atomic(
                os.path.join(select.output_dir, f"round_{round_ + 1}.jsonl"),
                [{k: v for k, v in r.items() if not k.startswith("_")} for r in kept],
            )
        if select.iterations > 0:
            samples = [Sample(r["_ids"], [0] * r["_prompt_len"] + [1] * (len(r["_ids"]) - r["_prompt_len"])) for r in kept]
            random.Random(cfg.train.seed + round_).shuffle(samples)
            record.update(sft_round(engine, samples, cfg, tokenizer.pad_token_id, rank, world, cfg.train.seed + round_))
            if eval_prompts:
                record["eval_reward"] = _eval(generator, engine, sources, eval_prompts, tokenizer, task.micro_batch_size, rank, world)
        logger.log(round_ + 1, record)
    logger.close()

    # 5. Export the fine-tuned policy.
    if select.iterations > 0:
        export_hf(engine, tokenizer, os.path.join(select.output_dir, "model"))


def _eval(
    generator, engine: TrainEngine, sources: RewardSources, prompts: list[Prompt], tokenizer, micro: int, rank: int, world: int
) -> float:
    if isinstance(generator, VLLMGenerator):
        generator.refresh(engine)
    return mean_greedy_reward(generator, sources, prompts, tokenizer, micro, rank, world)


if __name__ == "__main__":
    run_program(main)
