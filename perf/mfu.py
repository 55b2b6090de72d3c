"""MFU: achieved training FLOP/s of our engine over this machine's measured matmul peak.

    python perf/mfu.py                              # sizes 25M/57M/101M x seq 128/512/1024, fp32; bf16 at 57M
    python perf/mfu.py --sizes 512x8 --seq_lens 256 --steps 3

Peak: the best of repeated square matmuls (``--peak_n``) per dtype, 2 n^3 FLOPs each. Training:
``TrainEngine`` (DeepSpeed ZeRO-2, AdamW, one process) on a random-init Qwen2 and random tokens,
``--tokens_per_step`` tokens per optimizer step split into sequences of each length; the median
time of the steps after the first. On a machine with CUDA the same runs on the GPU. FLOPs per trained token follow the PaLM accounting:
``6 N + 12 L s h`` (N = parameters that do matmuls, i.e. all but the input embedding; L layers,
s sequence length, h hidden; the attention term counts QK^T and AV forward and backward without
discounting the causal mask). MFU = that times tokens/s over the peak of the same dtype.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import qwen2_config, write_report  # noqa: E402


def sync() -> None:
    """Wait for queued GPU work, so wall time measures it (a no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype, n: int, seconds: float = 3.0) -> float:
    """Best FLOP/s of an n x n @ n x n matmul in ``dtype`` over ~``seconds`` of repeats."""
    from rlhf.distributed.env import device

    a, b = torch.randn(n, n, dtype=dtype, device=device()), torch.randn(n, n, dtype=dtype, device=device())
    a @ b  # warm-up: thread pool, kernel choice
    sync()
    best, spent = 0.0, 0.0
    while spent < seconds:
        started = time.perf_counter()
        a @ b
        sync()
        took = time.perf_counter() - started
        spent += took
        best = max(best, 2 * n**3 / took)
    return best


def train_flops_per_token(config, seq_len: int) -> tuple[float, int]:
    """(training FLOPs per token, matmul parameters N) for a decoder config (PaLM accounting)."""
    h, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    head_dim = h // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * config.intermediate_size  # q, k+v, o, gate+up+down
    n = layers * per_layer + h * vocab  # + the LM head; the input embedding is a lookup
    return 6 * n + 12 * layers * seq_len * h, n


def measure_training(hidden: int, layers: int, seq_len: int, tokens_per_step: int, steps: int, bf16: bool) -> dict:
    from transformers import AutoModelForCausalLM

    from rlhf.config import TrainConfig
    from rlhf.distributed.env import device
    from rlhf.engines.train_engine import TrainEngine

    config = qwen2_config(hidden, layers, vocab_size=128)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    batch = max(tokens_per_step // seq_len, 1)
    cfg = TrainConfig(micro_train_batch_size=batch, train_batch_size=batch, zero_stage=2, learning_rate=1e-5, lr_warmup_ratio=0.0)
    engine = TrainEngine(model, cfg, bf16=bf16, total_steps=steps, dp_size=1)
    engine.train()
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), device=device())
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        sync()
        times.append(time.perf_counter() - started)
    seconds = statistics.median(times[1:])
    flops_per_token, n = train_flops_per_token(config, seq_len)
    tokens = batch * seq_len
    del engine, model
    return {"params": n, "tokens_per_s": tokens / seconds, "flops": flops_per_token * tokens / seconds, "step_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        nargs="+",
        default=["512x8", "768x8", "1024x8"],
        help="models as HIDDENxLAYERS (default 512x8 768x8 1024x8: 25M, 57M, 101M)",
    )
    parser.add_argument("--seq_lens", nargs="+", type=int, default=[128, 512, 1024], help="sequence lengths (default 128 512 1024)")
    parser.add_argument("--tokens_per_step", type=int, default=2048, help="tokens per optimizer step (default 2048)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per cell; the first is not timed (default 4)")
    parser.add_argument("--bf16_size", default="768x8", help="model also trained in bf16, at --bf16_seq_len (default 768x8; 'none' skips)")
    parser.add_argument("--bf16_seq_len", type=int, default=512, help="sequence length of the bf16 cell (default 512)")
    parser.add_argument("--peak_n", type=int, default=2048, help="matmul size for the peak (default 2048)")
    args = parser.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29541")
    from rlhf.distributed.env import init_distributed

    init_distributed()
    peak = {"fp32": matmul_peak(torch.float32, args.peak_n), "bf16": matmul_peak(torch.bfloat16, args.peak_n)}
    print(f"matmul peak: fp32 {peak['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s", flush=True)

    cells = [(size, seq, "fp32") for size in args.sizes for seq in args.seq_lens]
    if args.bf16_size != "none":
        cells.append((args.bf16_size, args.bf16_seq_len, "bf16"))
    rows, labels, values = [], [], []
    for size, seq, dtype in cells:
        hidden, layers = (int(x) for x in size.split("x"))
        result = measure_training(hidden, layers, seq, args.tokens_per_step, args.steps, bf16=dtype == "bf16")
        mfu = result["flops"] / peak[dtype]
        print(
            f"  {size} ({result['params'] / 1e6:.0f}M) seq {seq} {dtype}: {result['tokens_per_s']:.0f} tokens/s, "
            f"{result['flops'] / 1e9:.1f} GFLOP/s, MFU {mfu:.1%}",
            flush=True,
        )
        rows.append(
            [
                f"{result['params'] / 1e6:.0f}M ({size})",
                seq,
                dtype,
                f"{result['tokens_per_s']:.0f}",
                f"{result['flops'] / 1e9:.1f}",
                f"{mfu:.1%}",
            ]
        )
        if dtype == "fp32":
            labels.append(f"{result['params'] / 1e6:.0f}M/{seq}")
            values.append(100 * mfu)
    notes = [
        f"Measured matmul peak ({args.peak_n}x{args.peak_n}): fp32 {peak['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.1f} "
        "GFLOP/s.",
        f"{args.tokens_per_step} tokens per optimizer step, DeepSpeed ZeRO-2 + AdamW, one process, sdpa attention; FLOPs = 6N + 12 L s h "
        "per token (PaLM).",
        "Parameters counted are the matmul ones (the input embedding is a lookup); vocabulary 128.",
    ]
    command = "python perf/mfu.py " + " ".join(sys.argv[1:])
    write_report(
        "mfu",
        "MFU of rlhf training on this machine",
        command,
        ["model", "seq len", "dtype", "tokens/s", "GFLOP/s", "MFU"],
        rows,
        notes,
        {"labels": labels, "values": values, "ylabel": "MFU fp32 (%)"},
    )


if __name__ == "__main__":
    main()
