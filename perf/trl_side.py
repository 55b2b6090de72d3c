"""The TRL side of the side-by-side benchmarks; runs in perf/.venv-trl (see perf/setup.sh).

    perf/.venv-trl/bin/python perf/trl_side.py sft  --model M --data D.jsonl --out R.json ...
    perf/.venv-trl/bin/python perf/trl_side.py dpo  ...
    perf/.venv-trl/bin/python perf/trl_side.py grpo ...

Writes R.json: {"step_seconds": [...], "logs": [trainer log dicts, one per step]}; with
``--memory_json M.json`` also M.json: resident memory of optimizer step 2 (perf/memory.py). The settings
mirror what perf/side_by_side.py gives our trainer: fp32 on CPU, AdamW with betas (0.9, 0.95),
no weight decay, clipping at 1.0, constant learning rate, the dataset in the order our trainer
visits it (sequential sampler), no evaluation, no checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (data, forward, backward, optimizer; for GRPO also generation)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.logs: list[dict] = []
        self._started = 0.0
        self.startup_seconds: float | None = None  # process start -> the first step begins

    def on_step_begin(self, args, state, control, **kwargs):
        if self.startup_seconds is None:
            import psutil

            self.startup_seconds = time.time() - psutil.Process().create_time()
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._started)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "train_runtime" not in logs:
            self.logs.append(dict(logs))


class StepMemory(TrainerCallback):
    """Peak resident memory of optimizer step ``measured`` (after a warm-up step, so Adam's state
    exists): at the end of the step before it, settle the heap, read VmRSS and reset VmHWM to it;
    at the end of the measured step read VmHWM (perf/ppo_step_memory.py's readings)."""

    def __init__(self, path: str, measured: int = 2) -> None:
        self.path, self.measured, self.before_kb = path, measured, 0

    def on_step_end(self, args, state, control, **kwargs):
        from ppo_step_memory import reset_peak, settle, status_kb

        if state.global_step == self.measured - 1:
            settle()
            self.before_kb = status_kb("VmRSS")
            reset_peak()
        elif state.global_step == self.measured:
            peak_kb = status_kb("VmHWM")
            with open(self.path, "w") as f:
                json.dump({"step": self.measured, "before_mb": self.before_kb / 1024, "peak_mb": peak_kb / 1024}, f)


def common_args(args) -> dict:
    return dict(
        output_dir=args.out + ".trainer",
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        seed=42,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trainer", choices=["sft", "dpo", "grpo"], help="which TRL trainer")
    parser.add_argument("--model", required=True, help="model folder (shared with our side)")
    parser.add_argument("--data", required=True, help="jsonl in TRL's format, in the order our trainer visits it")
    parser.add_argument("--out", required=True, help="result JSON path")
    parser.add_argument("--steps", type=int, required=True, help="optimizer steps")
    parser.add_argument("--batch", type=int, required=True, help="sequences (SFT), pairs (DPO) or completions (GRPO) per optimizer step")
    parser.add_argument("--micro_batch", type=int, required=True, help="per forward/backward")
    parser.add_argument("--max_len", type=int, default=None, help="SFT/DPO max_length")
    parser.add_argument("--lr", type=float, default=1e-5, help="learning rate")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO beta / GRPO KL coefficient")
    parser.add_argument("--num_generations", type=int, default=8, help="GRPO completions per prompt")
    parser.add_argument("--completion_len", type=int, default=64, help="GRPO tokens per completion (EOS suppressed)")
    parser.add_argument("--reward", default=None, help="GRPO reward: path/to/file.py:function")
    parser.add_argument("--memory_json", default=None, help="also measure optimizer step 2's peak resident memory into this JSON")
    parser.add_argument(
        "--no_gradient_checkpointing", action="store_true", help="turn off TRL's default gradient checkpointing (TRL 1.16 defaults it on)"
    )
    args = parser.parse_args()

    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(42)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    data = load_dataset("json", data_files=args.data, split="train")
    timer = StepTimer()
    callbacks = [timer]
    if args.memory_json:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        callbacks.append(StepMemory(args.memory_json))
    accumulation = args.batch // args.micro_batch
    base = dict(common_args(args), per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=accumulation)
    if args.no_gradient_checkpointing:
        base["gradient_checkpointing"] = False

    if args.trainer == "sft":
        from trl import SFTConfig, SFTTrainer

        config = SFTConfig(**base, dataset_text_field="text", max_length=args.max_len, packing=False)
        trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer, callbacks=callbacks)
    elif args.trainer == "dpo":
        from trl import DPOConfig, DPOTrainer

        config = DPOConfig(**base, max_length=args.max_len, beta=args.beta, loss_type=["sigmoid"], precompute_ref_log_probs=False)
        trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer, callbacks=callbacks)
    else:
        import importlib.util

        from trl import GRPOConfig, GRPOTrainer

        path, _, name = args.reward.rpartition(":")
        spec = importlib.util.spec_from_file_location("bench_reward", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        reward = getattr(module, name)

        def reward_fn(prompts, completions, **kwargs):  # TRL passes decoded text
            return reward(prompts, completions)

        config = GRPOConfig(
            **base,
            num_generations=args.num_generations,
            max_completion_length=args.completion_len,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            beta=args.beta,
            num_iterations=1,
            shuffle_dataset=False,
            use_vllm=False,
            generation_kwargs={"min_new_tokens": args.completion_len},  # EOS suppressed: every completion has completion_len tokens
        )
        trainer = GRPOTrainer(
            model=model, reward_funcs=reward_fn, args=config, train_dataset=data, processing_class=tokenizer, callbacks=callbacks
        )
    trainer.train()
    with open(args.out, "w") as f:
        json.dump({"step_seconds": timer.seconds, "startup_seconds": timer.startup_seconds, "logs": timer.logs}, f)


if __name__ == "__main__":
    main()
