"""Where a PPO job's roles run, and this rank's engines for them.

``place_roles``: the roles the config asks for (``PPOConfig.roles``), colocated on every rank or
split over rank ranges, their process groups, and the checks that need the world size.
``build_engines``: this rank's engines only (actor and critic train; reference and reward models
are frozen; a generator on the ranks that generate) and how to reach the other roles' ranks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from rlhf.config import PPOConfig
from rlhf.distributed.env import LaunchEnv, device
from rlhf.distributed.exchange import SampleRouter
from rlhf.distributed.topology import RoleGroups, Topology
from rlhf.engines.frozen_engine import FrozenEngine
from rlhf.engines.subgroups import SlotParallel, confine_deepspeed_to
from rlhf.engines.train_engine import TrainEngine
from rlhf.errors import UserError
from rlhf.models.loading import frozen_model_config, load_causal_lm, load_reward_model, resolve_model_path
from rlhf.rewards import RewardSources, model_paths
from rlhf.rollout.hf import HFGenerator
from rlhf.rollout.sync import WeightBroadcast
from rlhf.rollout.vllm_engine import VLLMGenerator, engine_tp_group


@dataclass
class Placement:
    """The job's topology and the groups every rank built for it (collectively)."""

    topology: Topology
    groups: RoleGroups
    rank: int
    mine: tuple[str, ...]  # this rank's roles
    mpu: Optional[SlotParallel]  # split placement: confines DeepSpeed to this rank's role group
    tp_group: Optional[dist.ProcessGroup]  # vLLM: this rank's tensor-parallel engine group
    sync_group: Optional[dist.ProcessGroup]  # actor rank 0 + rollout ranks: the weight broadcast
    sync_members: list[int]


def place_roles(cfg: PPOConfig, launch: LaunchEnv) -> Placement:
    """Collective. Place the config's roles over the world and build their process groups."""
    rollout, placement = cfg.rollout, cfg.placement
    in_use = cfg.roles()
    if placement.is_split:
        topology = Topology.split(launch.world_size, placement.role_sizes(in_use), placement.shared_roles(in_use))
    else:
        topology = Topology.colocated(launch.world_size, in_use)
    samples_per_step = rollout.rollout_batch_size * rollout.n_samples_per_prompt
    for role in ("actor", "rollout"):
        if role in topology.roles:
            topology.check_divides(role, rollout.rollout_batch_size, "--rollout_batch_size")
    for role in topology.roles:
        topology.check_divides(role, samples_per_step, "--rollout_batch_size x --n_samples_per_prompt")
        if role in ("actor", "critic"):
            topology.check_divides(role, cfg.train.train_batch_size, "--train_batch_size")
    vllm, tp = rollout.rollout_backend == "vllm", rollout.vllm_tensor_parallel_size
    if vllm and (launch.world_size % tp or (rollout.vllm_num_engines not in (None, launch.world_size // tp))):
        raise UserError(
            f"--vllm_num_engines {rollout.vllm_num_engines} x --vllm_tensor_parallel_size {tp} must equal the "
            f"{launch.world_size} ranks (one engine per group of {tp} consecutive ranks)"
        )
    groups = topology.build_groups()
    tp_group = engine_tp_group(launch.world_size, launch.rank, tp) if vllm else None
    sync_members = [topology.ranks("actor")[0], *topology.ranks("rollout")] if "rollout" in topology.roles else []
    sync_group = dist.new_group(sync_members) if sync_members else None  # collective: every rank builds it
    mine = topology.roles_of(launch.rank)
    mpu = None
    if not topology.is_colocated:
        confine_deepspeed_to(groups.group(mine[0]))
        mpu = SlotParallel(groups.group(mine[0]), groups.self_group)
    return Placement(topology, groups, launch.rank, mine, mpu, tp_group, sync_group, sync_members)


@dataclass
class RoleEngines:
    """This rank's engines (None / empty for roles held by other ranks) and how to reach the rest."""

    actor: Optional[TrainEngine]
    critic: Optional[TrainEngine]
    reference: Optional[FrozenEngine]  # None on reference ranks only with LoRA (the actor's base is the reference)
    reward_sources: RewardSources  # the reward models are loaded on the reward ranks only
    router: SampleRouter
    groups: RoleGroups
    generator: Optional[HFGenerator]  # on the ranks that generate: the rollout role's if placed, else the actor's
    weight_sync: Optional[WeightBroadcast]  # actor -> rollout ranks, when generation has ranks of its own

    def group(self, role: str):
        return self.groups.group(role)

    @property
    def generating_role(self) -> str:
        return "rollout" if "rollout" in self.groups.topology.roles else "actor"


def build_engines(cfg: PPOConfig, place: Placement, tokenizer, updates: int) -> RoleEngines:
    """This rank's engines; ``updates``: the optimizer steps of the run (the LR schedule's length).

    The engines are built in a fixed order (actor, reference, reward models, critic): loading
    draws random numbers (fresh value heads), and the same order keeps a run reproducible.
    """
    algo, rollout, topology, mine, mpu = cfg.algo, cfg.rollout, place.topology, place.mine, place.mpu
    frozen = dict(bf16=cfg.model.bf16, mpu=mpu, offload=cfg.placement.ref_reward_offload)
    actor = critic = reference = None
    if "actor" in mine:
        actor_train = dataclasses.replace(cfg.train, learning_rate=algo.actor_learning_rate or cfg.train.learning_rate)
        actor = TrainEngine(
            load_causal_lm(cfg.model), actor_train, bf16=cfg.model.bf16, total_steps=updates, dp_size=topology.dp_size("actor"), mpu=mpu
        )
    if "reference" in mine:
        reference = FrozenEngine(load_causal_lm(frozen_model_config(cfg.model)), cfg.train, dp_size=topology.dp_size("reference"), **frozen)

    def load_reward(path: str) -> FrozenEngine:
        model = load_reward_model(frozen_model_config(cfg.model, path), pad_token_id=tokenizer.pad_token_id, flag="--reward_pretrain")
        return FrozenEngine(model, cfg.train, dp_size=topology.dp_size("reward"), **frozen)

    sources = RewardSources.from_flags(
        reward_pretrain=algo.reward_pretrain,
        reward_func=algo.reward_func,
        weights=algo.reward_weights,
        normalize=algo.normalize_reward,
        remote_rm_url=algo.remote_rm_url,
        remote_timeout=algo.remote_rm_timeout,
        remote_retries=algo.remote_rm_retries,
        clip=algo.reward_clip_range,
        load_model=load_reward if "reward" in mine else None,
    )
    if "critic" in mine:
        reward_paths = model_paths(algo.reward_pretrain)
        critic_cfg = dataclasses.replace(
            cfg.model, pretrain=algo.critic_pretrain or (reward_paths[0] if reward_paths else cfg.model.pretrain)
        )
        critic_flag = "--critic_pretrain" if algo.critic_pretrain else "--reward_pretrain" if reward_paths else "--pretrain"
        critic_train = dataclasses.replace(cfg.train, learning_rate=algo.critic_learning_rate or cfg.train.learning_rate)
        critic = TrainEngine(
            load_reward_model(critic_cfg, pad_token_id=tokenizer.pad_token_id, flag=critic_flag),
            critic_train,
            bf16=cfg.model.bf16,
            total_steps=updates,
            dp_size=topology.dp_size("critic"),
            mpu=mpu,
        )

    generator = weight_sync = None
    if "rollout" in mine:  # a plain copy of the policy, refreshed from the actor before each generation
        policy = load_causal_lm(frozen_model_config(cfg.model)).to(device()).requires_grad_(False).eval()
        generator = HFGenerator(policy, tokenizer, rollout)
        weight_sync = WeightBroadcast(place.sync_group, place.sync_members, policy, rollout.weight_sync_bucket_mb)
    elif actor is not None and rollout.rollout_backend == "vllm":
        generator = VLLMGenerator(
            resolve_model_path(cfg.model.pretrain),
            tokenizer,
            rollout,
            max_model_len=cfg.data.prompt_max_len + rollout.generate_max_len,
            dtype=torch.bfloat16 if cfg.model.bf16 else torch.float32,
            seed=cfg.train.seed,
            tp_group=place.tp_group,
        )
    elif actor is not None:
        generator = HFGenerator(actor.module, tokenizer, rollout, actor.unpartitioned) if "rollout" not in topology.roles else None
        weight_sync = (
            WeightBroadcast(place.sync_group, place.sync_members, actor.module, rollout.weight_sync_bucket_mb)
            if place.sync_members
            else None
        )
    return RoleEngines(actor, critic, reference, sources, SampleRouter(topology, place.rank), place.groups, generator, weight_sync)
