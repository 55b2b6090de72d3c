"""Run under torchrun by test_vllm.py: vLLM's greedy output equals transformers' for the same
weights, before and after the actor's weights change and are synced into vLLM.

    torchrun --nproc_per_node 2 tests/vllm_parity.py --tp 2 --lora 8 --zero 2 [--sft PATH]

Every rank asks for its own prompts (with TP 2 both ranks of the engine must take part, each
getting back its share). Full fine-tuning: the actor's weights are replaced by the SFT'd
model's; LoRA: the adapters' B matrices (zero at init) are set to random values. Prints one
line per rank and exits non-zero on a mismatch.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import deepspeed
import torch
import torch.distributed as dist

from rlhf.config import ModelConfig, PromptDataConfig, RolloutConfig, TrainConfig
from rlhf.data.prompts import load_prompts
from rlhf.distributed.env import init_distributed
from rlhf.engines.train_engine import TrainEngine
from rlhf.models.loading import load_causal_lm, load_tokenizer, resolve_model_path
from rlhf.rollout.hf import HFGenerator
from rlhf.rollout.vllm_engine import VLLMGenerator


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--lora", type=int, default=0)
    parser.add_argument("--zero", type=int, default=2)
    parser.add_argument("--sft", default=None)
    args = parser.parse_args()
    launch = init_distributed()
    base = "embedded:tiny-qwen2"
    model_cfg = ModelConfig(pretrain=base, lora_rank=args.lora, lora_alpha=16, target_modules=("all-linear",))
    tokenizer = load_tokenizer(model_cfg)
    train_cfg = TrainConfig(zero_stage=args.zero, micro_train_batch_size=1, train_batch_size=launch.world_size)
    actor = TrainEngine(load_causal_lm(model_cfg), train_cfg, bf16=False, total_steps=1, dp_size=launch.world_size)
    rollout = RolloutConfig(generate_max_len=6, micro_rollout_batch_size=64, vllm_tensor_parallel_size=args.tp, vllm_kv_cache_mb=32)
    tp_groups = [dist.new_group(list(range(g, g + args.tp))) for g in range(0, launch.world_size, args.tp)] if args.tp > 1 else []
    vllm = VLLMGenerator(
        resolve_model_path(base),
        tokenizer,
        rollout,
        max_model_len=64,
        dtype=torch.float32,
        seed=0,
        tp_group=tp_groups[launch.rank // args.tp] if tp_groups else None,
    )
    hf = HFGenerator(actor.module, tokenizer, rollout, actor.unpartitioned)
    prompts = [p.ids for p in load_prompts("embedded:arith/prompts_eval.jsonl", None, tokenizer, PromptDataConfig(), 0)[:24]]
    mine = prompts[launch.rank :: launch.world_size][: 8 + 2 * launch.rank]  # unequal counts per rank on purpose

    vllm.refresh(actor)
    before_hf, before_vllm = hf.generate(mine, greedy=True), vllm.generate(mine, greedy=True)
    params = [p for p in actor.module.parameters()]
    writable = deepspeed.zero.GatheredParameters(params, modifier_rank=0) if args.zero == 3 else contextlib.nullcontext()
    with writable, torch.no_grad():  # under ZeRO-3: full tensors, rank 0's edit is what gets partitioned back
        if args.lora:
            g = torch.Generator().manual_seed(1)
            for name, p in actor.module.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        else:
            sft = load_causal_lm(ModelConfig(pretrain=args.sft)).state_dict()
            for name, p in actor.module.named_parameters():
                p.copy_(sft[name])
    after_hf, stale_vllm = hf.generate(mine, greedy=True), vllm.generate(mine, greedy=True)
    vllm.refresh(actor)
    after_vllm = vllm.generate(mine, greedy=True)

    checks = {
        "before: vllm == hf": before_vllm.responses == before_hf.responses and before_vllm.finished == before_hf.finished,
        "the weights change the output": after_hf.responses != before_hf.responses,
        "without a sync vllm is stale": stale_vllm.responses == before_vllm.responses,
        "after the sync: vllm == hf": after_vllm.responses == after_hf.responses and after_vllm.finished == after_hf.finished,
        "one log-prob per token": [len(x) for x in after_vllm.logprobs] == [len(r) for r in after_vllm.responses],
    }
    line = f"rank {launch.rank}: {len(mine)} prompts, synced {vllm.last_bytes} bytes, " + ", ".join(f"{k}: {v}" for k, v in checks.items())
    sys.stdout.write(line + "\n")  # one write: the two ranks share the pipe
    sys.stdout.flush()
    dist.barrier()
    sys.stdout.flush()
    from rlhf.errors import _run_exit_hooks

    _run_exit_hooks()
    os._exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
