"""Kahneman-Tversky optimisation (KTO, arXiv 2402.01306) on unpaired, labelled completions.

    torchrun --nproc_per_node 2 -m rlhf.kto --config configs/kto_tiny.yaml
    torchrun --nproc_per_node 8 -m rlhf.kto --pretrain OpenRLHF/Llama-3-8b-sft-mixture \\
        --dataset my_kto.jsonl --input_key prompt --output_key completion --label_key label \\
        --apply_chat_template --beta 0.1 --bf16 --zero_stage 3

Rows are ``{prompt, completion, label: true|false}``. The reference is a frozen copy of
``--ref_pretrain`` (default ``--pretrain``) on the same ranks, or with LoRA and no
``--ref_pretrain`` the policy with its adapter disabled (as in ``rlhf.dpo``).

Per micro-batch, one policy forward and one reference forward score the examples AND their
mismatched pairs (prompt i + completion of another example, ``kto_mismatched_pairs``, fixed once
for the run). KTO's reference point z0 = KL(policy || reference) is the mean policy-minus-
reference log-ratio of the mismatched pairs, averaged over the data-parallel ranks (all-reduce),
clamped at 0 and detached (paper sec. 4.1). The loss of a step is the weighted KTO loss summed
over its examples and divided by the number of examples in the global step.

Metrics (the loop divides every sum by the examples of the step): ``loss``; ``kl`` (z0, weighted
by micro-batch size); ``reward_desirable`` and ``reward_undesirable`` are sums of the implicit
reward beta * (log pi - log ref) over the examples of that label, divided by ALL examples, and
``desirable_frac`` the share of desirable examples, so the mean reward of desirable examples is
``reward_desirable / desirable_frac`` (and of undesirable ones ``reward_undesirable / (1 -
desirable_frac)``). Eval reports those means directly: ``eval_reward_desirable``,
``eval_reward_undesirable`` and their difference ``eval_reward_gap`` (positive once the policy
prefers right completions to wrong ones more than the reference does).

With ``--eval_pairs`` (rows ``{prompt, chosen, rejected}``, read with ``--prompt_key``,
``--chosen_key`` and ``--rejected_key``), eval also scores those preference pairs with the same
implicit reward (``rlhf.dpo_objective.evaluate_dpo_pairs``, rlhf.dpo's eval): ``eval_pair_acc``,
the share of pairs whose chosen response gets the higher reward, and ``eval_pair_margin``, the
mean chosen-minus-rejected reward.

Steps: 1 launch, 2 data, 3 policy and reference, 4 train, 5 export.
"""

from __future__ import annotations

from typing import Optional, Sequence

from rlhf.config import DPOConfig, KTOConfig, answer_help_early, parse_config

if __name__ == "__main__":
    answer_help_early(KTOConfig, "python -m rlhf.kto")  # before torch and DeepSpeed are imported

import torch
import torch.distributed as dist

from rlhf.algos.preference import kto_kl_estimate, kto_loss
from rlhf.data.batching import shard_for_eval
from rlhf.data.preference import (
    PairSample,
    UnpairedSample,
    kto_mismatched_pairs,
    tokenize_pairs,
    tokenize_unpaired,
    warn_if_one_label_class,
)
from rlhf.data.sources import load_mixture, load_train_eval
from rlhf.distributed.collectives import all_reduce_sums
from rlhf.distributed.env import init_distributed
from rlhf.distributed.topology import Topology
from rlhf.dpo_objective import evaluate_dpo_pairs
from rlhf.engines.reference import Forward, load_reference, pair_logprobs, sample_logprobs
from rlhf.engines.train_engine import TrainEngine
from rlhf.errors import exit_on_user_error, run_program
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.trainer import Loop, finish, plan_total_steps, run


def load_examples(cfg: KTOConfig, tokenizer) -> tuple[list[UnpairedSample], list[UnpairedSample]]:
    train, held = load_train_eval(cfg.data, cfg.train.seed, lambda rows: tokenize_unpaired(rows, tokenizer, cfg.data))
    warn_if_one_label_class(train, cfg.data)
    return train, held


def load_eval_pairs(cfg: KTOConfig, tokenizer) -> list[PairSample]:
    """The --eval_pairs preference pairs (none without the option), tokenized as rlhf.dpo does."""
    if not cfg.eval_pairs:
        return []
    rows = load_mixture(cfg.eval_pairs, None, cfg.data.eval_split, cfg.data.max_samples, cfg.train.seed)
    return tokenize_pairs(rows, tokenizer, cfg.data)


def label_metrics(rewards: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Sums over the examples: reward of each label and the desirable count (see module docstring)."""
    desirable = labels.float()  # [B]
    return {
        "reward_desirable": (rewards * desirable).sum().item(),
        "reward_undesirable": (rewards * (1 - desirable)).sum().item(),
        "desirable_frac": desirable.sum().item(),
    }


@torch.no_grad()
def evaluate(
    engine: TrainEngine, examples: list[UnpairedSample], ref_forward: Forward, cfg: KTOConfig, pad_id: int, rank: int, dp: int
) -> dict[str, float]:
    """Mean implicit reward of desirable and of undesirable held-out completions, and the gap."""
    micro = cfg.train.micro_eval_batch_size or cfg.train.micro_train_batch_size
    sums = {"r_des": 0.0, "n_des": 0.0, "r_und": 0.0, "n_und": 0.0}
    packed = cfg.data.packing_samples
    for indices in shard_for_eval(len(examples), micro, dp)[rank]:
        batch = [examples[i] for i in indices or [0]]  # empty: keep ZeRO-3 collectives in step
        samples = [e.sample for e in batch]
        rewards = cfg.beta * (
            sample_logprobs(engine, samples, pad_id, packed) - sample_logprobs(ref_forward, samples, pad_id, packed)
        )  # [B]
        if not indices:
            continue
        labels = torch.tensor([e.desirable for e in batch], device=rewards.device)
        m = label_metrics(rewards, labels)
        sums["r_des"] += m["reward_desirable"]
        sums["r_und"] += m["reward_undesirable"]
        sums["n_des"] += m["desirable_frac"]
        sums["n_und"] += len(indices) - m["desirable_frac"]
    totals = all_reduce_sums(sums)
    des, und = totals["r_des"] / max(totals["n_des"], 1.0), totals["r_und"] / max(totals["n_und"], 1.0)
    return {"reward_desirable": des, "reward_undesirable": und, "reward_gap": des - und}


@torch.no_grad()
def evaluate_pairs(
    engine: TrainEngine, pairs: list[PairSample], ref_forward: Forward, cfg: KTOConfig, pad_id: int, rank: int, dp: int
) -> dict[str, float]:
    """Pair accuracy and mean margin of the implicit reward on preference pairs (rlhf.dpo's eval).

    DPO's implicit reward is KTO's, beta * (log pi - log ref) summed over response tokens; its
    other settings (loss type, NLL term) only shape the DPO loss, which is not reported here.
    """
    dpo_cfg = DPOConfig(model=cfg.model, data=cfg.data, train=cfg.train, beta=cfg.beta)  # sigmoid, no NLL term
    packed = cfg.data.packing_samples

    def reference(split: str, indices: list, batch: list) -> torch.Tensor:
        return pair_logprobs(ref_forward, batch, pad_id, packed)

    metrics = evaluate_dpo_pairs(engine, pairs, reference, dpo_cfg, pad_id, rank, dp)
    return {"pair_acc": metrics["acc"], "pair_margin": metrics["margin"]}


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg = parse_config(KTOConfig, argv, prog="python -m rlhf.kto")

    # 1. Launch: policy and reference share every rank.
    launch = init_distributed()
    topology = Topology.colocated(launch.world_size, ("actor", "reference"))
    dp, rank = topology.dp_size("actor"), launch.rank
    torch.manual_seed(cfg.train.seed)

    # 2. Data: labelled examples and, fixed for the run, each one's mismatched (KL) pair; the
    # loop's items are example indices so both can be looked up.
    tokenizer = load_tokenizer(cfg.model)
    train_examples, eval_examples = load_examples(cfg, tokenizer)
    eval_pairs = load_eval_pairs(cfg, tokenizer)
    mismatched = kto_mismatched_pairs(train_examples, cfg.train.seed, cfg.data.max_len)
    lengths = [len(e.sample.input_ids) + len(m.input_ids) for e, m in zip(train_examples, mismatched)]
    per_epoch, total_steps = plan_total_steps(cfg, lengths, dp, len(train_examples))
    pad_id, packed = tokenizer.pad_token_id, cfg.data.packing_samples

    # 3. Policy and reference.
    engine = TrainEngine(load_causal_lm(cfg.model), cfg.train, bf16=cfg.model.bf16, total_steps=total_steps, dp_size=dp)
    ref_forward, ref_engine, ref_params = load_reference(cfg, engine, dp)
    if launch.is_rank0:
        what = "the policy with its LoRA adapter disabled" if ref_engine is None else cfg.ref_pretrain or cfg.model.pretrain
        print(f"kto: reference = {what}; separate reference parameters: {ref_params}", flush=True)

    # 4. Train: examples and their mismatched pairs in one forward per model.
    def micro_step(indices: list[int], step_examples: float) -> dict[str, float]:
        batch = [train_examples[i] for i in indices]
        samples = [e.sample for e in batch] + [mismatched[i] for i in indices]  # [2B]: examples, then KL pairs
        n = len(batch)
        with torch.no_grad():
            ref_logp = sample_logprobs(ref_forward, samples, pad_id, packed)  # [2B]
        policy_logp = sample_logprobs(engine, samples, pad_id, packed)  # [2B]
        # z0: this rank's estimate, averaged over data-parallel ranks, then clamped and detached.
        z0 = kto_kl_estimate(policy_logp[n:], ref_logp[n:])
        dist.all_reduce(z0)
        z0 = (z0 / dp).clamp(min=0).detach()
        labels = torch.tensor([e.desirable for e in batch], device=policy_logp.device)
        loss_sum, rewards = kto_loss(
            policy_logp[:n], ref_logp[:n], labels, z0, cfg.beta, cfg.desirable_loss_weight, cfg.undesirable_loss_weight, normaliser=1.0
        )
        engine.backward(loss_sum / step_examples * engine.grad_scale)  # DeepSpeed divides by dp x accumulation
        engine.step()
        return {"loss": loss_sum.item(), "kl": z0.item() * n, **label_metrics(rewards, labels)}

    def evaluate_now() -> dict[str, float]:
        metrics = evaluate(engine, eval_examples, ref_forward, cfg, pad_id, rank, dp) if eval_examples else {}
        if eval_pairs:
            metrics.update(evaluate_pairs(engine, eval_pairs, ref_forward, cfg, pad_id, rank, dp))
        return metrics

    loop = Loop(
        name="kto",
        cfg=cfg,
        launch=launch,
        dp_size=dp,
        items=list(range(len(train_examples))),
        lengths=lengths,
        micro_step=micro_step,
        step_normaliser=len,
        evaluate=evaluate_now if eval_examples or eval_pairs else None,
    )
    run(loop, engine, total_steps, per_epoch)

    # 5. Export the policy (or its LoRA adapter) as a Hugging Face folder.
    finish(engine, tokenizer, cfg, launch)


if __name__ == "__main__":
    run_program(main)
