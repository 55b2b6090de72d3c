"""PPO and its critic-free cousins (GRPO, RLOO, REINFORCE++, Dr. GRPO) as one SPMD program.

    torchrun --nproc_per_node 2 -m rlhf.ppo --config configs/grpo_tiny.yaml
    torchrun --nproc_per_node 8 -m rlhf.ppo --pretrain OpenRLHF/Llama-3-8b-sft-mixture \\
        --reward_pretrain OpenRLHF/Llama-3-8b-rm-mixture --advantage_estimator gae \\
        --prompt_data OpenRLHF/prompt-collection-v0.1 --input_key context_messages --apply_chat_template \\
        --rollout_batch_size 1024 --micro_rollout_batch_size 16 --train_batch_size 128 \\
        --micro_train_batch_size 4 --zero_stage 3 --bf16 --actor_learning_rate 5e-7 --critic_learning_rate 9e-6

Placement (rlhf.rl.roles, rlhf.distributed.topology): colocated, every rank holds a shard of every role (actor,
critic, reference, reward) and the phases of a step time-share the ranks; or split, each role on
its own ranks (--actor_num_gpus_per_node ...), a DeepSpeed engine per role on its own process
group, with rollouts routed between groups (rlhf.distributed.exchange). Generation runs on the actor's
ranks with its live weights, or on rollout ranks of their own that receive the actor's weights
by broadcast before every rollout (rlhf.rollout.sync). Phases: generate, score (reference
log-probs, critic values, rewards), advantages (pure functions chosen by
--advantage_estimator), train (actor and critic).

Steps: 1 launch, 2 data, 3 engines, 4 resume, 5 loop (experience -> advantages -> train ->
eval -> log -> checkpoint), 6 export. The parts live in rlhf.rl: roles (placement, engines),
schedule (prompts per step), experience (generate, score, advantages), update (policy and
value updates), report (metrics, summary).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Optional, Sequence

from rlhf.config import PPOConfig, answer_help_early, parse_config

if __name__ == "__main__":
    answer_help_early(PPOConfig, "python -m rlhf.ppo")  # before torch and DeepSpeed are imported

import torch
import torch.distributed as dist

from rlhf.algos import ppo as ppo_math
from rlhf.distributed.collectives import all_reduce_sums
from rlhf.distributed.env import init_distributed
from rlhf.engines.ema import WeightEMA
from rlhf.errors import exit_on_user_error, run_program
from rlhf.io.checkpoint import export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
from rlhf.io.preemption import PreemptionWatch
from rlhf.metrics import MetricsLogger, seconds_since_process_start
from rlhf.models.loading import load_tokenizer
from rlhf.rl.experience import Scorer, eval_reward, make_experience
from rlhf.rl.report import progress_keys, step_record, summarize_run
from rlhf.rl.roles import build_engines, place_roles
from rlhf.rl.schedule import load_prompt_schedule
from rlhf.rl.update import PretrainMix, train_on_rollout
from rlhf.trainer import finish


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg = parse_config(PPOConfig, argv, prog="python -m rlhf.ppo")
    algo, rollout = cfg.algo, cfg.rollout

    # 1. Launch: place the roles (colocated, or split over rank ranges) and build their groups.
    launch = init_distributed()
    place = place_roles(cfg, launch)
    topology, rank = place.topology, launch.rank
    torch.manual_seed(cfg.train.seed)

    # 2. Data: each step takes --rollout_batch_size prompts; a generating rank gets every dp-th one.
    tokenizer = load_tokenizer(cfg.model)
    schedule, eval_prompts = load_prompt_schedule(cfg, tokenizer)
    samples_per_step = rollout.rollout_batch_size * rollout.n_samples_per_prompt
    updates = schedule.total_steps * algo.ppo_epochs * samples_per_step // cfg.train.train_batch_size

    # 3. Engines, only for this rank's roles: actor (+ critic) train; reference and reward models are frozen.
    roles = build_engines(cfg, place, tokenizer, updates)
    actor, critic = roles.actor, roles.critic
    kl_ctl = ppo_math.kl_controller(algo.init_kl_coef, algo.kl_target, algo.kl_horizon)
    scorer = Scorer(cfg, tokenizer, roles, kl_ctl)
    ema = WeightEMA(actor, algo.ema_beta) if algo.enable_ema and actor is not None else None
    engines = {name: e for name, e in (("actor", actor), ("actor_ema", ema), ("critic", critic)) if e is not None}
    ptx = None  # --pretrain_data: PPO-ptx
    if cfg.data.pretrain_data and actor is not None:
        ptx = PretrainMix.from_config(cfg, tokenizer, *topology.slot_index("actor", rank))

    # 4. Resume: engines, RNG, KL controller, step. (Seeded again here: building engines draws
    # random numbers, and a rank builds only its roles', so sampling would depend on the placement.)
    torch.manual_seed(cfg.train.seed)
    start_step = 0
    if cfg.ckpt.load_checkpoint and (folder := latest_checkpoint(cfg.ckpt.ckpt_path)) is not None:
        state = load_checkpoint(folder, engines)
        start_step = state["step"]
        kl_ctl.load_state_dict(state["kl_ctl"])

    # 5. Loop: experience -> train -> log (+ eval, checkpoint, SLURM preemption).
    total_steps = schedule.total_steps
    metrics_path = cfg.log.metrics_path or os.path.join(cfg.ckpt.save_path, "metrics.jsonl")
    logger = MetricsLogger(
        metrics_path, cfg.log, dataclasses.asdict(cfg), "ppo", total_steps, launch.is_rank0, start_step > 0, progress_keys(cfg)
    )
    if start_step:
        logger.log(start_step, {"resumed_from_step": start_step})
    elif eval_prompts:
        logger.log(0, {"eval_reward": eval_reward(cfg, roles, scorer, eval_prompts, rank)})
    preemption = PreemptionWatch()
    startup_seconds = seconds_since_process_start()  # imports, engines, resume, the first eval: logged with the first step
    for step in range(start_step, total_steps):
        my_prompts = schedule.step_prompts(step, *topology.slot_index(roles.generating_role, rank)) if roles.generator is not None else []
        timings = dict.fromkeys(("generate", "sync", "score", "train"), 0.0)
        actor_batch, critic_batch, exp_stats = make_experience(cfg, roles, scorer, my_prompts, timings)
        started = time.perf_counter()
        lr = actor.lr if actor is not None else 0.0  # the rate this step's updates start at (the scheduler moves on inside them)
        train_sums = train_on_rollout(cfg, roles, actor_batch, critic_batch, step, kl_ctl.value, ptx, ema, tokenizer.pad_token_id)
        for key in ("kl", "rollout_logp_gap"):  # measured in training when the experience phase had no behaviour log-probs
            exp_stats[key] += train_sums.pop(key)
        timings["train"] = time.perf_counter() - started

        totals = all_reduce_sums({**exp_stats, **train_sums})
        record = step_record(cfg, totals, scorer.source_names, topology)
        record.update({f"time_{k}": v for k, v in timings.items()}, kl_coef=kl_ctl.value, lr=lr)
        if step == start_step:
            record["startup_seconds"] = startup_seconds
        if roles.weight_sync is not None or rollout.rollout_backend == "vllm":  # bytes moved into the generator
            record["weight_sync_mb"] = (roles.weight_sync or roles.generator).last_bytes / 2**20
        kl_ctl.update(record["kl"], samples_per_step)

        done = step + 1
        if eval_prompts and (done % algo.eval_every == 0 or done == total_steps):
            record["eval_reward"] = eval_reward(cfg, roles, scorer, eval_prompts, rank)
        logger.log(done, record)
        state = {"episode": schedule.episode(step), "kl_ctl": kl_ctl.state_dict()}
        saved = cfg.ckpt.save_steps > 0 and done % cfg.ckpt.save_steps == 0
        if saved and done < total_steps:
            save_checkpoint(cfg.ckpt.ckpt_path, done, engines, state, cfg.ckpt.max_ckpt_num)
        if done < total_steps and preemption.stop_requested():  # SLURM's warning: save now, requeue
            if not saved:
                save_checkpoint(cfg.ckpt.ckpt_path, done, engines, state, cfg.ckpt.max_ckpt_num)
            logger.close()
            preemption.hand_over()
    logger.close()

    # 6. Export: the critic and the reward curve beside the actor, then the actor (and upload).
    if critic is not None:
        export_hf(critic, tokenizer, os.path.join(cfg.ckpt.save_path, "critic"))
    dist.barrier()  # the critic is written before the actor's export moves it into place
    if launch.is_rank0:
        summarize_run(cfg, metrics_path, bool(eval_prompts))
    with ema.swapped_in() if ema is not None else contextlib.nullcontext():  # --enable_ema exports the average
        finish(actor, tokenizer, cfg, launch)


if __name__ == "__main__":
    run_program(main)
