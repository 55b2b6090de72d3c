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

import dataclasses
import gc
from typing import Any, Callable, Optional, Sequence

from rlhf.config import DPOConfig, answer_help_early, parse_config

if __name__ == "__main__":
    answer_help_early(DPOConfig, "python -m rlhf.dpo")  # before torch and DeepSpeed are imported

import torch
import torch.distributed as dist

from rlhf.algos.preference import dpo_loss, packed_sequence_logprobs, sequence_logprobs
from rlhf.data.batching import shard_for_eval
from rlhf.data.preference import PairSample, collate_pairs, collate_pairs_packed
from rlhf.distributed.env import device, init_distributed
from rlhf.distributed.topology import Topology
from rlhf.engines.frozen_engine import FrozenEngine
from rlhf.engines.train_engine import TrainEngine
from rlhf.errors import exit_on_user_error, run_program
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.rm import load_pairs
from rlhf.distributed.collectives import all_reduce_sums
from rlhf.trainer import Loop, finish, plan_total_steps, run

Forward = Callable[..., Any]  # model inputs -> HF output with .logits
# (split "train" | "eval", pair indices, those pairs) -> reference log-probs [2B], constants
Reference = Callable[[str, list, list], torch.Tensor]


def pair_logprobs(forward: Forward, pairs: list[PairSample], pad_id: int, packed: bool) -> torch.Tensor:
    """Summed response log-probs [2B] from one forward: chosen 0..B-1, then rejected B..2B-1."""
    if packed:
        batch = {k: v.to(device()) for k, v in collate_pairs_packed(pairs, pad_id).items()}
        logits = forward(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits  # [1, T, V]
        return packed_sequence_logprobs(logits, batch["input_ids"], batch["loss_mask"], batch["sample_ids"], 2 * len(pairs))
    batch = {k: v.to(device()) for k, v in collate_pairs(pairs, pad_id).items()}
    logits = forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits  # [2B, T, V]
    return sequence_logprobs(logits, batch["input_ids"], batch["loss_mask"])


def dpo_objective(cfg: DPOConfig, policy_logp: torch.Tensor, ref_logp: torch.Tensor, pairs: list[PairSample]) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed loss over the pairs (normaliser 1) and metric sums; log-probs [2B] as above."""
    n = len(pairs)
    loss_sum, chosen_r, rejected_r = dpo_loss(
        policy_logp[:n], policy_logp[n:], ref_logp[:n], ref_logp[n:], cfg.beta, cfg.loss_type, cfg.label_smoothing, normaliser=1.0
    )
    metrics = {
        "acc": (chosen_r > rejected_r).float().sum().item(),
        "margin": (chosen_r - rejected_r).sum().item(),
        "chosen_reward": chosen_r.sum().item(),
        "rejected_reward": rejected_r.sum().item(),
        "chosen_logp": policy_logp[:n].detach().sum().item(),
        "rejected_logp": policy_logp[n:].detach().sum().item(),
    }
    if cfg.nll_loss_coef > 0:
        tokens = torch.tensor([sum(p.chosen.loss_mask) for p in pairs], dtype=torch.float32, device=policy_logp.device)  # [B], >= 1
        nll_sum = (-policy_logp[:n] / tokens).sum()  # per-token NLL of each chosen response, summed over pairs
        loss_sum = loss_sum + cfg.nll_loss_coef * nll_sum
        metrics["nll"] = nll_sum.item()
    metrics["loss"] = loss_sum.item()
    return loss_sum, metrics


def adapter_off(engine: TrainEngine) -> Forward:
    """The LoRA policy with its adapter disabled: the frozen base model, without a copy."""

    def forward(**inputs):
        module = engine.module
        was_training = module.training
        module.eval()  # a reference never drops out
        try:
            with torch.no_grad(), module.disable_adapter():
                return engine(**inputs)
        finally:
            module.train(was_training)

    return forward


def load_reference(cfg: DPOConfig, engine: TrainEngine, dp: int) -> tuple[Forward, Optional[FrozenEngine], int]:
    """(reference forward, its FrozenEngine or None, parameters of a separately loaded reference)."""
    if cfg.model.lora_rank > 0 and cfg.ref_pretrain is None:
        return adapter_off(engine), None, 0
    # The reference is a plain full-precision-layout copy: no adapter, no 4-bit, no checkpointing.
    ref_cfg = dataclasses.replace(
        cfg.model, pretrain=cfg.ref_pretrain or cfg.model.pretrain, lora_rank=0, load_in_4bit=False, gradient_checkpointing=False, aux_loss_coef=0.0
    )
    model = load_causal_lm(ref_cfg, flag="--ref_pretrain" if cfg.ref_pretrain else "--pretrain")
    params = sum(p.numel() for p in model.parameters())
    ref = FrozenEngine(model, cfg.train, bf16=cfg.model.bf16, dp_size=dp, offload=cfg.ref_offload)
    return ref.forward, ref, params


@torch.no_grad()
def precompute_reference(forward: Forward, pairs: list[PairSample], micro: int, pad_id: int, packed: bool, rank: int, dp: int) -> torch.Tensor:
    """Reference log-probs [N, 2] (chosen, rejected) of every pair, identical on every rank.

    Each rank scores its shard in micro-batches (``shard_for_eval``: the same number of forwards
    on every rank, so ZeRO-3 gathers stay in step); one all-reduce SUM of the zero-filled table
    then acts as an all-gather, since each row is written by exactly one rank and adding zeros
    is exact.
    """
    table = torch.zeros(len(pairs), 2, dtype=torch.float64, device=device())
    for indices in shard_for_eval(len(pairs), micro, dp)[rank]:
        logp = pair_logprobs(forward, [pairs[i] for i in indices] or [pairs[0]], pad_id, packed)  # [2B]
        if indices:
            n = len(indices)
            table[indices] = torch.stack([logp[:n], logp[n:]], dim=1).double()
    dist.all_reduce(table)
    return table.float()  # fp32, as the on-the-fly reference returns them


@torch.no_grad()
def evaluate(engine: TrainEngine, pairs: list[PairSample], reference: Reference, cfg: DPOConfig, pad_id: int, rank: int, dp: int) -> dict[str, float]:
    """Held-out DPO loss, implicit-reward accuracy and margin, mean rewards (all ranks take part)."""
    micro = cfg.train.micro_eval_batch_size or cfg.train.micro_train_batch_size
    keys = ("loss", "acc", "margin", "chosen_reward", "rejected_reward")
    sums = dict.fromkeys(keys + ("pairs",), 0.0)
    for indices in shard_for_eval(len(pairs), micro, dp)[rank]:
        scored = indices or [0]  # empty: still run the forwards, keeping ZeRO-3 collectives in step
        batch = [pairs[i] for i in scored]
        ref_logp = reference("eval", scored, batch)
        policy_logp = pair_logprobs(engine, batch, pad_id, cfg.data.packing_samples)
        if not indices:
            continue
        _, metrics = dpo_objective(cfg, policy_logp, ref_logp, batch)
        for key in keys:
            sums[key] += metrics[key]
        sums["pairs"] += len(indices)
    totals = all_reduce_sums(sums)
    return {k: totals[k] / max(totals["pairs"], 1.0) for k in keys}


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
    train_pairs, eval_pairs = load_pairs(cfg, tokenizer)
    lengths = [len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in train_pairs]
    per_epoch, total_steps = plan_total_steps(cfg, lengths, dp, len(train_pairs))
    pad_id, packed = tokenizer.pad_token_id, cfg.data.packing_samples

    # 3. Policy and reference.
    engine = TrainEngine(load_causal_lm(cfg.model), cfg.train, bf16=cfg.model.bf16, total_steps=total_steps, dp_size=dp)
    ref_forward, ref_engine, ref_params = load_reference(cfg, engine, dp)
    if launch.is_rank0:
        what = "the policy with its LoRA adapter disabled" if ref_engine is None else f"{cfg.ref_pretrain or cfg.model.pretrain} (ZeRO-{ref_engine.ds_config['zero_optimization']['stage']})"
        print(f"dpo: reference = {what}, mode {cfg.ref_mode}; separate reference parameters: {ref_params}", flush=True)
    if cfg.ref_mode == "precompute":
        micro = cfg.train.micro_eval_batch_size or cfg.train.micro_train_batch_size
        tables = {split: precompute_reference(ref_forward, pairs, micro, pad_id, packed, rank, dp) for split, pairs in (("train", train_pairs), ("eval", eval_pairs)) if pairs}
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

    evaluate_now = (lambda: evaluate(engine, eval_pairs, reference, cfg, pad_id, rank, dp)) if eval_pairs else None
    loop = Loop(
        name="dpo", cfg=cfg, launch=launch, dp_size=dp, items=list(range(len(train_pairs))), lengths=lengths,
        micro_step=micro_step, step_normaliser=len, evaluate=evaluate_now,
    )
    run(loop, engine, total_steps, per_epoch)

    # 5. Export the policy (or its LoRA adapter) as a Hugging Face folder.
    finish(engine, tokenizer, cfg, launch)


if __name__ == "__main__":
    run_program(main)
