"""The TRL side of perf/learning_side_by_side.py; runs in perf/.venv-trl (see perf/setup.sh).

    perf/.venv-trl/bin/python perf/trl_learning.py grpo --model M --data D.jsonl --out DIR --seed S ...
    perf/.venv-trl/bin/python perf/trl_learning.py dpo  --model M --data D.jsonl --out DIR --seed S ...

Trains with TRL's GRPOTrainer / DPOTrainer on the rows of D.jsonl in file order (the driver writes
them in the order our trainer visits them; TRL's sampling is sequential), saves the model every
``--save_steps`` optimizer steps (DIR/checkpoint-N, model only) for the driver's one shared
evaluation, and writes DIR/result.json: the trainer's logs and what TRL actually fed the model
(GRPO: every generation batch's prompt texts and the first batch's prompt token ids; DPO: the
tokenized rows), which the driver checks against our loader's ids.

Settings not on the command line follow perf/trl_side.py's ``common_args`` (fp32 on CPU, AdamW
betas 0.9/0.95, no weight decay, clipping at 1.0, sequential sampler); the schedule here is
cosine with a floor of 0.1 x the peak after a linear warm-up, as our presets use.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trl_side import common_args  # noqa: E402


def exact_match(prompts, completions, label, **kwargs):
    """TRL reward function: 1.0 when the decoded completion, stripped, equals the row's label."""
    return [1.0 if c.strip() == str(y).strip() else 0.0 for c, y in zip(completions, label)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trainer", choices=["grpo", "dpo"])
    parser.add_argument("--model", required=True, help="start model folder (our SFT export)")
    parser.add_argument("--data", required=True, help="jsonl in TRL's format, rows in the order to train on")
    parser.add_argument("--out", required=True, help="output folder (checkpoints, result.json)")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True, help="optimizer steps")
    parser.add_argument("--batch", type=int, required=True, help="completions (GRPO) or pairs (DPO) per optimizer step")
    parser.add_argument("--micro_batch", type=int, required=True, help="per forward/backward")
    parser.add_argument("--lr", type=float, required=True, help="peak learning rate")
    parser.add_argument("--warmup_steps", type=int, required=True, help="linear warm-up steps (ours: ceil(steps x lr_warmup_ratio))")
    parser.add_argument("--save_steps", type=int, required=True, help="save the model every N steps (and at the end)")
    parser.add_argument("--beta", type=float, required=True, help="DPO beta / GRPO KL coefficient")
    parser.add_argument("--num_generations", type=int, default=8, help="GRPO completions per prompt")
    parser.add_argument("--completion_len", type=int, default=4, help="GRPO max_completion_length")
    parser.add_argument("--temperature", type=float, default=1.0, help="GRPO sampling temperature")
    parser.add_argument("--eps_clip", type=float, default=0.2, help="GRPO clip range (both sides)")
    parser.add_argument("--max_len", type=int, default=None, help="DPO max_length")
    args = parser.parse_args()

    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    data = load_dataset("json", data_files=args.data, split="train")
    base = dict(
        common_args(argparse.Namespace(out=args.out, steps=args.steps, lr=args.lr)),
        output_dir=args.out,
        seed=args.seed,
        data_seed=args.seed,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_only_model=True,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=args.warmup_steps,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.batch // args.micro_batch,
    )
    fed: dict = {}
    if args.trainer == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        config = GRPOConfig(
            **base,
            num_generations=args.num_generations,
            max_completion_length=args.completion_len,
            temperature=args.temperature,
            top_p=1.0,
            top_k=0,
            min_p=None,
            repetition_penalty=1.0,
            beta=args.beta,
            num_iterations=1,
            epsilon=args.eps_clip,
            epsilon_high=args.eps_clip,
            loss_type="dapo",
            scale_rewards="group",
            mask_truncated_completions=False,
            shuffle_dataset=False,
            use_vllm=False,
            log_completions=False,
        )
        trainer = GRPOTrainer(model=model, reward_funcs=exact_match, args=config, train_dataset=data, processing_class=tokenizer)
        fed["prompt_batches"] = []  # texts of each generation call (num_generations copies of each prompt)
        tokenize = trainer._tokenize_prompts

        def recording(prompts):
            out = tokenize(prompts)
            fed["prompt_batches"].append(list(prompts))
            fed.setdefault("first_prompt_ids", [list(map(int, ids)) for ids in out[0]])
            return out

        trainer._tokenize_prompts = recording  # observe what TRL tokenizes and feeds generate()
    else:
        from trl import DPOConfig, DPOTrainer

        config = DPOConfig(**base, max_length=args.max_len, beta=args.beta, loss_type=["sigmoid"], precompute_ref_log_probs=False)
        trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
        rows = trainer.train_dataset
        fed["rows"] = [{k: list(map(int, rows[i][k])) for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for i in range(len(rows))]
    trainer.train()
    final = os.path.join(args.out, f"checkpoint-{trainer.state.global_step}")
    if not os.path.isdir(final):  # the last step falls between saves
        trainer.save_model(final)
    logs = [dict(e) for e in trainer.state.log_history]
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump({"logs": logs, "fed": fed, "global_step": trainer.state.global_step}, f)


if __name__ == "__main__":
    main()
