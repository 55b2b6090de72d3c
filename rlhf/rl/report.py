"""What a PPO step reports, and the run's summary: is it learning, at a glance."""

from __future__ import annotations

import os

from rlhf.algos import ppo as ppo_math
from rlhf.config import PPOConfig
from rlhf.distributed.topology import Topology
from rlhf.metrics import metric_series, plot_metrics, read_metrics


def progress_keys(cfg: PPOConfig) -> tuple[str, ...]:
    """The progress bar's figures: rewards, whether groups still carry signal, how far the policy moved."""
    return ("reward", f"pass_at_{cfg.rollout.n_samples_per_prompt}", "eval_reward", "kl", "entropy", "response_length")


def step_record(cfg: PPOConfig, totals: dict[str, float], source_names: list[str], topology: Topology) -> dict[str, float]:
    """The step's metrics from the sums of every rank (``totals``): per-sample means of the
    rollout figures, per-update means of the training figures (updates counted per rank)."""
    actor_dp = topology.dp_size("actor")
    critic_dp = topology.dp_size("critic") if "critic" in topology.roles else 0
    n_samples, n_tokens = totals["samples"], max(totals["response_length"], 1.0)
    record = {
        "reward": totals["reward"] / n_samples,
        "kl": totals["kl"] / n_samples,
        "response_length": n_tokens / n_samples,
        "truncated": totals["truncated"] / n_samples,
    }
    record.update({k: totals[k] / n_samples for k in source_names})
    record.update(ppo_math.diagnostics_record(totals, cfg.rollout.n_samples_per_prompt))
    actor_steps = max(totals["actor_updates"] / actor_dp, 1.0)
    record.update({k: totals[k] / actor_steps for k in ("policy_loss", "clip_fraction", "approx_kl", "entropy")})
    if cfg.data.pretrain_data:
        record["ptx_loss"] = totals["ptx_loss"] / actor_steps
    if critic_dp:
        record["value_loss"] = totals["value_loss"] / max(totals["critic_updates"] / critic_dp, 1.0)
    if cfg.rollout.rollout_backend == "vllm":
        record["rollout_logp_gap"] = totals["rollout_logp_gap"] / n_tokens  # mean |log pi_actor - log pi_vllm| per token
    return record


def summarize_run(cfg: PPOConfig, metrics_path: str, has_eval: bool) -> None:
    """Rank 0, after the loop: the reward curve with the learning diagnostics beside the model,
    and the headline reward by step on stdout."""
    headline = "eval_reward" if has_eval else "reward"
    logged = {k for r in read_metrics(metrics_path) for k in r}
    # What says at a glance whether RL is learning: the rewards, whether groups still carry
    # signal (pass@n, zero-variance groups), and how far and how sharp the policy went.
    diagnostics = [f"pass_at_{cfg.rollout.n_samples_per_prompt}", "group_zero_std", "entropy", "kl"]
    keys = ["reward"] + (["eval_reward"] if has_eval else []) + [k for k in diagnostics if k in logged]
    png = plot_metrics(metrics_path, keys, os.path.join(cfg.ckpt.save_path, "reward_curve.png"))
    steps, values = metric_series(read_metrics(metrics_path), headline)
    print(f"{headline} by step: " + ", ".join(f"{s}: {v:.3f}" for s, v in zip(steps, values)) + f"  (plot: {png})", flush=True)
