"""Batch inference over a dataset (OpenRLHF's batch_inference): generate, or score with reward models.

    torchrun --nproc_per_node 2 -m rlhf.generate --pretrain ./outputs/sft_tiny/model \\
        --dataset embedded:arith/prompts_eval.jsonl --input_key input --best_of_n 4 \\
        --generate_max_len 8 --output_path ./outputs/generations.jsonl
    ... --eval_task generate_vllm                     (the same with vLLM engines)
    ... --eval_task rm --reward_pretrain ./outputs/rm_tiny/model --dataset generations.jsonl \\
        --input_key input --output_key output         (score existing responses)

Rows are dealt to ranks round-robin, processed there, and gathered back on rank 0, which writes
one JSON line per (row, sample) in input order: the row's fields, ``prompt`` (as the model saw
it), ``output``, ``finished`` (ended with EOS), and with rewards ``reward`` (the combined score),
``rewards`` (per source) and ``best`` (the best-scored sample of its row). The file is written
atomically. Generating with reward models or a reward function given scores as it goes.

Steps: 1 launch, 2 data, 3 generate or read responses, 4 score, 5 gather and write.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

from rlhf.config import GenerateConfig, answer_help_early, parse_config

if __name__ == "__main__":
    answer_help_early(GenerateConfig, "python -m rlhf.generate")  # before torch and DeepSpeed are imported

import torch
import torch.distributed as dist

from rlhf.data.prompts import Prompt, load_prompts
from rlhf.distributed.collectives import gather_in_order
from rlhf.distributed.env import device, init_distributed
from rlhf.errors import UserError, exit_on_user_error, run_program
from rlhf.io.jsonl import write_jsonl_atomic
from rlhf.models.loading import load_causal_lm, load_tokenizer, resolve_model_path
from rlhf.rewards import inference_reward_sources
from rlhf.rollout.hf import HFGenerator
from rlhf.rollout.vllm_engine import VLLMGenerator, engine_tp_group


def make_generator(cfg: GenerateConfig, tokenizer, world_size: int, rank: int):
    """transformers or vLLM, on this rank (vLLM: one engine per --vllm_tensor_parallel_size ranks)."""
    if cfg.task.eval_task == "generate_vllm":
        tp_group = engine_tp_group(world_size, rank, cfg.rollout.vllm_tensor_parallel_size)
        dtype = torch.bfloat16 if cfg.model.bf16 else torch.float32
        return VLLMGenerator(
            resolve_model_path(cfg.model.pretrain),
            tokenizer,
            cfg.rollout,
            max_model_len=cfg.task.prompt_max_len + cfg.rollout.generate_max_len,
            dtype=dtype,
            seed=cfg.seed,
            tp_group=tp_group,
        )
    model = load_causal_lm(dataclasses.replace(cfg.model, gradient_checkpointing=False)).to(device()).eval()
    return HFGenerator(model, tokenizer, cfg.rollout)


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg = parse_config(GenerateConfig, argv, prog="python -m rlhf.generate")
    task = cfg.task

    # 1. Launch.
    launch = init_distributed()
    rank, world = launch.rank, launch.world_size
    torch.manual_seed(cfg.seed + rank)

    # 2. Data: every rank reads the rows, takes every world-th one.
    tokenizer = load_tokenizer(cfg.model)
    prompts = load_prompts(task.dataset, task.dataset_probs, tokenizer, task.prompt_data(), cfg.seed)
    if task.iter is not None:  # round K of an iterative loop takes its own slice of the rows
        size = cfg.rollout.rollout_batch_size
        prompts = prompts[task.iter * size : (task.iter + 1) * size]
        if not prompts:
            raise UserError(f"--iter {task.iter} x --rollout_batch_size {size}: past the end of the dataset")
    mine = list(range(rank, len(prompts), world))

    # 3. Responses: generated (best_of_n per row), or read from --output_key.
    if task.eval_task == "rm":
        jobs = [(i, 0) for i in mine]
        responses = [responses_from_row(prompts[i], task.output_key, tokenizer, cfg.max_len) for i in mine]
        finished = [True] * len(jobs)
    else:
        generator = make_generator(cfg, tokenizer, world, rank)
        jobs = [(i, k) for i in mine for k in range(task.best_of_n)]
        gen = generator.generate([prompts[i].ids for i, _ in jobs], greedy=cfg.rollout.temperature == 0)
        responses, finished = gen.responses, gen.finished

    # 4. Scores.
    sources = inference_reward_sources(task, cfg.model, tokenizer)
    records = []
    for (i, k), response, done in zip(jobs, responses, finished):
        # `input` is the prompt as the model saw it unless the row has its own (OpenRLHF's layout:
        # the file feeds --eval_task rm and rlhf.sft with their default keys).
        records.append(
            {
                "input": prompts[i].text,
                **prompts[i].row,
                "prompt": prompts[i].text,
                "output": tokenizer.decode(response, skip_special_tokens=True),
                "finished": done,
                "_row": i,
                "_sample": k,
            }
        )
    if sources.active and jobs:
        reward, per_source = sources.score([prompts[i] for i, _ in jobs], responses, tokenizer, task.micro_batch_size)
        for record, r, *each in zip(records, reward.tolist(), *(v.tolist() for v in per_source.values())):
            record.update(reward=r, rewards=each)

    # 5. Gather in input order; rank 0 writes.
    everything = gather_in_order(records, world)
    if sources.active and task.best_of_n > 1:
        mark_best(everything)
    if launch.is_rank0:
        rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in everything]
        if task.post_processor:
            rows = POST_PROCESSORS[task.post_processor](rows, task)
        write_jsonl_atomic(task.output_path, rows)
        print(f"wrote {len(rows)} records to {task.output_path}", flush=True)
    dist.barrier()


def responses_from_row(prompt: Prompt, key: str, tokenizer, max_len: Optional[int] = None) -> list[int]:
    """The row's response text as token ids, ending with EOS as a generated one would; with
    ``max_len``, cut so that prompt + response fit, the last kept token replaced by EOS."""
    text = prompt.row.get(key)
    if not isinstance(text, str):
        raise UserError(f"--output_key {key!r}: row has no text field of that name (fields: {', '.join(sorted(prompt.row))})")
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]  # it continues the prompt: no BOS
    if max_len is not None and len(prompt.ids) + len(ids) > max_len:
        ids = ids[: max(1, max_len - len(prompt.ids)) - 1] + [tokenizer.eos_token_id]
    return ids


# ----------------------------------------------------------------------------------------------
# --post_processor: OpenRLHF's rewrites of scored rows (rejection sampling, conditional SFT,
# iterative DPO). Rows are grouped by `prompt`, the text the model saw; ties keep the first.


def best_per_prompt(rows: list[dict], task) -> list[dict]:
    """rs: each prompt's highest-reward response, as SFT rows {input, output, reward}."""
    best: dict[str, dict] = {}
    for r in rows:
        if r["prompt"] not in best or r["reward"] > best[r["prompt"]]["reward"]:
            best[r["prompt"]] = r
    return [{"input": r["prompt"], "output": r["output"], "reward": r["reward"]} for r in best.values()]


def score_in_prompt(rows: list[dict], task) -> list[dict]:
    """csft: every row with its score written after the prompt (z-scored over the rows with
    --normalize_reward, as OpenRLHF's processor does)."""
    rewards = torch.tensor([float(r["reward"]) for r in rows], dtype=torch.float64)
    if task.normalize_reward and len(rows) > 1:
        rewards = (rewards - rewards.mean()) / rewards.std().clamp(min=1e-12)
    return [
        {"input": f"{r['prompt']} <rm_score>: {reward:.2f} ", "output": r["output"], "reward": reward}
        for r, reward in zip(rows, rewards.tolist())
    ]


def best_and_worst_pair(rows: list[dict], task) -> list[dict]:
    """iter_dpo: each prompt's best and worst response as a preference pair."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["prompt"], []).append(r)
    pairs = []
    for prompt, group in groups.items():
        chosen = max(group, key=lambda r: r["reward"])  # max/min keep the first of equal rewards
        rejected = min(group, key=lambda r: r["reward"])
        pairs.append(
            {
                "prompt": prompt,
                "chosen": chosen["output"],
                "chosen_reward": chosen["reward"],
                "rejected": rejected["output"],
                "rejected_reward": rejected["reward"],
            }
        )
    return pairs


POST_PROCESSORS = {"rs": best_per_prompt, "csft": score_in_prompt, "ca": score_in_prompt, "iter_dpo": best_and_worst_pair}


def mark_best(records: list[dict]) -> None:
    """``best`` = True on the highest-reward sample of each row."""
    best: dict[Any, dict] = {}
    for r in records:
        if r["_row"] not in best or r["reward"] > best[r["_row"]]["reward"]:
            best[r["_row"]] = r
    for r in records:
        r["best"] = best[r["_row"]] is r


if __name__ == "__main__":
    run_program(main)
