"""Direct preference optimisation: DPO, cDPO (--label_smoothing) and IPO (--loss_type ipo).

    torchrun --nproc_per_node 2 -m rlhf.dpo --config configs/dpo_tiny.yaml
    torchrun --nproc_per_node 8 -m rlhf.dpo --pretrain OpenRLHF/Llama-3-8b-sft-mixture \\
        --dataset OpenRLHF/preference_dataset_mixture2_and_safe_pku --apply_chat_template \\
        --chosen_key chosen --rejected_key rejected --prompt_key None --beta 0.1 --bf16 --zero_stage 3

The reference policy is one of:

* ``--ref_mode engine`` (default): a frozen copy of ``--ref_pretrain`` (default ``--pretrain``) on
  the same ranks (``FrozenEngine``: ZeRO-3 when the policy is ZeRO-3, else ZeRO-0), run on each
  micro-batch before the policy;
* ``--ref_mode precompute``: the same model scores every train and eval pair once before
  training (each rank its shard, then shared with every rank), and is freed;
* with LoRA (``--lora_rank > 0``) and no ``--ref_pretrain``: the policy itself with its adapter
  switched off, which is exactly the frozen base; no second model is loaded.

Chosen and rejected responses go through ONE concatenated forward (padded, or one packed row
with ``--packing_samples``); log-probs are summed over response tokens (OpenRLHF's convention,
also for IPO, see ``rlhf.algos.preference.dpo_loss``).

Loss of a step = mean over its pairs of [dpo_loss_i + nll_loss_coef * nll_i], where nll_i is the
chosen response's NLL divided by its own token count (a per-token mean per pair, then averaged
over pairs, like OpenRLHF). Counting the NLL per pair keeps both terms on one normaliser (pairs
of the global step), so the loss does not depend on sharding and a long answer does not weigh
more than a short one.

Steps: 1 launch, 2 data, 3 policy and reference, 4 train, 5 export.
"""

from __future__ import annotations

import gc
from typing import Optional, Sequence

from rlhf.config import DPOConfig, answer_help_early, parse_config

if __name__ == "__main__":
    answer_help_early(DPOConfig, "python -m rlhf.dpo")  # before torch and DeepSpeed are imported

import torch

from rlhf.data.preference import load_pairs
from rlhf.distributed.env import init_distributed
from rlhf.distributed.topology import Topology
from rlhf.dpo_objective import dpo_objective, evaluate_dpo_pairs
from rlhf.engines.reference import load_reference, pair_logprobs, precompute_reference
from rlhf.engines.train_engine import TrainEngine
from rlhf.errors import exit_on_user_error, run_program
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.trainer import Loop, finish, plan_total_steps, run


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg = parse_config(DPOConfig, argv, prog="python -m rlhf.dpo")

    # 1. Launch: policy and reference share every rank.
    launch = init_distributed()
    topology = Topology.colocated(launch.world_size, ("actor", "reference"))
    dp, rank = topology.dp_size("actor"), launch.rank
    torch.manual_seed(cfg.train.seed)

    # 2. Data: pairs; the loop's items are pair indices so a precomputed reference table can be
    # looked up; the plan counts both sides' tokens.
    tokenizer = load_tokenizer(cfg.model)
    train_pairs, eval_pairs = load_pairs(cfg.data, tokenizer, cfg.train.seed)
    lengths = [len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in train_pairs]
    per_epoch, total_steps = plan_total_steps(cfg, lengths, dp, len(train_pairs))
    pad_id, packed = tokenizer.pad_token_id, cfg.data.packing_samples

    # 3. Policy and reference.
    engine = TrainEngine(load_causal_lm(cfg.model), cfg.train, bf16=cfg.model.bf16, total_steps=total_steps, dp_size=dp)
    ref_forward, ref_engine, ref_params = load_reference(cfg, engine, dp)
    if launch.is_rank0:
        what = (
            "the policy with its LoRA adapter disabled"
            if ref_engine is None
            else f"{cfg.ref_pretrain or cfg.model.pretrain} (ZeRO-{ref_engine.ds_config['zero_optimization']['stage']})"
        )
        print(f"dpo: reference = {what}, mode {cfg.ref_mode}; separate reference parameters: {ref_params}", flush=True)
    if cfg.ref_mode == "precompute":
        micro = cfg.train.micro_eval_batch_size or cfg.train.micro_train_batch_size
        tables = {
            split: precompute_reference(ref_forward, pairs, micro, pad_id, packed, rank, dp)
            for split, pairs in (("train", train_pairs), ("eval", eval_pairs))
            if pairs
        }
        if ref_engine is not None:
            ref_engine.release()  # the table is all training needs from the reference
        ref_forward = ref_engine = None
        gc.collect()

        def reference(split: str, indices: list, pairs: list) -> torch.Tensor:
            rows = tables[split][indices]  # [B, 2]
            return torch.cat([rows[:, 0], rows[:, 1]])  # [2B]
    else:

        def reference(split: str, indices: list, pairs: list) -> torch.Tensor:
            with torch.no_grad():
                return pair_logprobs(ref_forward, pairs, pad_id, packed)

    # 4. Train: the loss of a step is the mean over all its pairs (see the module docstring).
    def micro_step(indices: list[int], step_pairs: float) -> dict[str, float]:
        pairs = [train_pairs[i] for i in indices]
        ref_logp = reference("train", indices, pairs)  # [2B], constants
        policy_logp = pair_logprobs(engine, pairs, pad_id, packed)  # [2B]
        loss_sum, metrics = dpo_objective(cfg, policy_logp, ref_logp, pairs)
        engine.backward(loss_sum / step_pairs * engine.grad_scale)  # DeepSpeed divides by dp x accumulation
        engine.step()
        return metrics

    evaluate_now = (lambda: evaluate_dpo_pairs(engine, eval_pairs, reference, cfg, pad_id, rank, dp)) if eval_pairs else None
    loop = Loop(
        name="dpo",
        cfg=cfg,
        launch=launch,
        dp_size=dp,
        items=list(range(len(train_pairs))),
        lengths=lengths,
        micro_step=micro_step,
        step_normaliser=len,
        evaluate=evaluate_now,
    )
    run(loop, engine, total_steps, per_epoch)

    # 5. Export the policy (or its LoRA adapter) as a Hugging Face folder.
    finish(engine, tokenizer, cfg, launch)


if __name__ == "__main__":
    run_program(main)
