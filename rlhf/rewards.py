"""Reward sources for RL: Python reward functions and reward models, combined by weighted sum.

A reward function is ``fn(prompts: list[str], responses: list[str], labels: list) -> list[float]``,
named on the command line as ``--reward_func module:function`` (or ``file.py:function``) and
called once per batch. ``exact_match`` below is a ready one for datasets with reference answers.
A reward model is any 1-label sequence classifier (``rlhf.rm`` saves one), run as a frozen
engine; with ``--normalize_reward`` its score is standardised with the mean/std it stores.
A remote reward service (``--remote_rm_url``) receives a JSON POST
``{"prompts": [...], "responses": [...], "labels": [...], "queries": [prompt + response, ...]}``
and answers ``{"rewards": [...]}`` (or a bare list); a call that still fails after the bounded
retries stops the job: a reward is never silently zero. ``--remote_rm_url path/reward.py`` is
OpenRLHF's other form: a file defining ``reward_func(queries, prompts, labels)`` (a query is
prompt + response), called in this process. Rewards must be numbers: strings are refused.
The combined sequence reward is ``sum_k w_k * r_k`` (reward models first, then the remote
service, then the function). ``RewardSources`` holds a job's sources in that order; PPO, batch
inference and rejection sampling all score through it.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch

from rlhf.data.sft import Sample, collate_padded, load_user_function
from rlhf.distributed.env import device
from rlhf.errors import UserError, describe_value


def exact_match(prompts: Sequence[str], responses: Sequence[str], labels: Sequence[Any]) -> list[float]:
    """1.0 when the response, stripped, equals the label, else 0.0 (verifiable tasks)."""
    return [1.0 if r.strip() == str(y).strip() else 0.0 for r, y in zip(responses, labels)]


class RewardFunction:
    """A user's batched reward function, with its output checked on every call.

    ``--reward_func`` names ``fn(prompts, responses, labels)``. A Python file given to
    ``--remote_rm_url`` (OpenRLHF's form, ``queries_first``) defines
    ``reward_func(queries, prompts, labels)``, where a query is the prompt followed by the
    response. Either may return the rewards or OpenRLHF's ``{"rewards": ..., ...}``.
    """

    def __init__(self, spec: str, flag: str = "--reward_func", queries_first: bool = False):
        self.who = f"{flag} {spec}"
        self.queries_first = queries_first
        self.fn: Callable = load_user_function(f"{spec}:reward_func" if queries_first else spec, flag)

    def __call__(self, prompts: list[str], responses: list[str], labels: list[Any]) -> torch.Tensor:
        """-> [B] float32 rewards."""
        args = ([p + r for p, r in zip(prompts, responses)], prompts, labels) if self.queries_first else (prompts, responses, labels)
        try:
            values = self.fn(*args)
        except Exception as err:  # noqa: BLE001 - the user's code: report it as their error, in one line
            raise UserError(f"{self.who} raised {type(err).__name__}: {' '.join(str(err).split())[:300]}") from None
        if isinstance(values, dict):
            if "rewards" not in values:
                raise UserError(f"{self.who} returned a dict without 'rewards' (keys: {', '.join(map(str, values))})")
            values = values["rewards"]
        return _check_rewards(values, len(responses), self.who)


def _check_rewards(values: Any, n: int, who: str) -> torch.Tensor:
    """A reward source's answer as [n] float32, or a UserError naming the source.

    Strings are refused even when they look like numbers: "1" from a reward function is a bug
    (a label or a decoded answer returned by mistake), and float() would hide it.
    """
    try:
        items = list(values) if not isinstance(values, (str, bytes, dict)) else None
    except TypeError:  # not iterable (a number, None, a 0-d tensor)
        items = None
    if items is None:
        raise UserError(f"{who} must return a list of numbers, got {describe_value(values)}")
    values = []
    for i, v in enumerate(items):
        try:
            if isinstance(v, (str, bytes)):
                raise TypeError
            values.append(float(v))
        except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several numbers
            raise UserError(f"{who} must return numbers, got {describe_value(v)} at index {i}") from None
    if len(values) != n:
        raise UserError(f"{who} returned {len(values)} rewards for {n} responses")
    if not all(math.isfinite(v) for v in values):
        raise UserError(f"{who} returned a non-finite reward")
    return torch.tensor(values, dtype=torch.float32)


class RemoteReward:
    """A reward service over HTTP: POST with a timeout, bounded retries with backoff."""

    def __init__(self, url: str, timeout: float, retries: int):
        self.url, self.timeout, self.retries = url, timeout, retries

    def __call__(self, prompts: list[str], responses: list[str], labels: list[Any]) -> torch.Tensor:
        body = json.dumps(
            {"prompts": prompts, "responses": responses, "labels": labels, "queries": [p + r for p, r in zip(prompts, responses)]}
        ).encode()
        last_error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(2.0**attempt * 0.25, 10.0))
            request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"}, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                    payload = json.loads(answer.read())
                break
            except (urllib.error.URLError, OSError, json.JSONDecodeError) as err:
                last_error = " ".join(str(getattr(err, "reason", err)).split())[:200]
        else:
            raise UserError(f"--remote_rm_url {self.url}: no answer after {self.retries + 1} tries (last error: {last_error})")
        values = payload.get("rewards") if isinstance(payload, dict) else payload
        return _check_rewards(values, len(responses), f"--remote_rm_url {self.url}")


def remote_reward(url: str, timeout: float, retries: int):
    """The --remote_rm_url source: an HTTP service, or, as OpenRLHF also accepts there, a Python
    file defining ``reward_func(queries, prompts, labels)``, run in this process."""
    if url.endswith(".py"):
        return RewardFunction(url, "--remote_rm_url", queries_first=True)
    return RemoteReward(url, timeout, retries)


def parse_weights(weights: Optional[str], n_sources: int) -> list[float]:
    """--reward_weights '0.5,1' -> [0.5, 1.0]; default 1 for every source."""
    if weights is None:
        return [1.0] * n_sources
    try:
        values = [float(w) for w in weights.split(",")]
    except ValueError:
        raise UserError(f"--reward_weights must be comma-separated numbers, got {weights!r}") from None
    if len(values) != n_sources:
        raise UserError(
            f"--reward_weights has {len(values)} values for {n_sources} reward sources (reward models, then --remote_rm_url, "
            "then --reward_func)"
        )
    return values


def normalise_score(score: torch.Tensor, config: Any) -> torch.Tensor:
    """(score - mean) / std with the statistics rlhf.rm stores in the model config; [B] -> [B]."""
    mean, std = getattr(config, "reward_mean", None), getattr(config, "reward_std", None)
    if mean is None or std is None:
        raise UserError("--normalize_reward: the reward model stores no reward_mean/reward_std (train it with rlhf.rm, or drop the flag)")
    return (score - mean) / max(std, 1e-6)


def combine(per_source: Sequence[torch.Tensor], weights: Sequence[float], clip: tuple[float, float]) -> torch.Tensor:
    """Weighted sum of the per-source rewards [B] each, clipped -> [B]."""
    total = sum(w * r.float() for w, r in zip(weights, per_source))
    return total.clamp(min=clip[0], max=clip[1])


TextSource = Callable[[list[str], list[str], list[Any]], torch.Tensor]  # (prompts, responses, labels) -> [B]


@dataclass
class RewardSources:
    """A job's reward sources in --reward_weights order: reward models, the remote service, the
    reward function; and how their scores combine.

    ``models`` are the loaded reward models (a FrozenEngine or a plain module; anything whose
    output has ``.logits`` [B, 1]); they may be empty on ranks that do not hold them (PPO's reward
    ranks score, the actor ranks combine), so ``num_models`` counts the --reward_pretrain paths.
    """

    num_models: int
    text: dict[str, TextSource]  # source name -> fn, in weight order
    weights: list[float]
    clip: tuple[float, float] = (-float("inf"), float("inf"))
    normalize: bool = False
    models: list = field(default_factory=list)

    @classmethod
    def from_flags(
        cls,
        *,
        reward_pretrain: Optional[str],
        reward_func: Optional[str],
        weights: Optional[str],
        normalize: bool,
        remote_rm_url: Optional[str] = None,
        remote_timeout: float = 30.0,
        remote_retries: int = 3,
        clip: tuple[float, float] = (-float("inf"), float("inf")),
        load_model: Optional[Callable[[str], Any]] = None,
    ) -> "RewardSources":
        """The sources the flags name; ``load_model(path)`` loads each --reward_pretrain model (pass
        None on ranks that do not hold the reward models)."""
        paths = model_paths(reward_pretrain)
        text: dict[str, TextSource] = {}
        if remote_rm_url:
            text["reward_remote"] = remote_reward(remote_rm_url, remote_timeout, remote_retries)
        if reward_func:
            text["reward_func"] = RewardFunction(reward_func)
        models = [load_model(p) for p in paths] if load_model is not None else []
        return cls(len(paths), text, parse_weights(weights, len(paths) + len(text)), clip, normalize, models)

    @property
    def names(self) -> list[str]:
        """Per-source metric names, in weight order."""
        return [f"reward_model{k}" for k in range(self.num_models)] + list(self.text)

    @property
    def active(self) -> bool:
        return bool(self.num_models or self.text)

    @torch.no_grad()
    def model_scores(self, samples: list[Sample], pad_id: int, micro: Union[int, list[list[int]]]) -> torch.Tensor:
        """Every held reward model's score of each (prompt + response) sample: [B, num_models],
        standardised with the model's stored statistics under --normalize_reward. ``micro``: samples
        per forward, or the forwards' sample indices (token-budget micro-batches; an empty list
        still runs a forward, so that ZeRO-3 ranks pair up, and counts nothing)."""
        groups = micro if isinstance(micro, list) else [list(range(s, min(s + micro, len(samples)))) for s in range(0, len(samples), micro)]
        per_model = []
        for model in self.models:
            score = torch.zeros(len(samples))
            for group in groups:
                batch = {k: v.to(device()) for k, v in collate_padded([samples[i] for i in group or [0]], pad_id).items()}
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1).float().cpu()
                score[group] = out[: len(group)]
            config = model.module.config if hasattr(model, "module") else model.config
            per_model.append(normalise_score(score, config) if self.normalize else score)
        return torch.stack(per_model, dim=1) if per_model else torch.zeros(len(samples), 0)

    def combine(
        self, model_scores: torch.Tensor, prompts: Sequence[Any], responses: list[str]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run the text sources on the decoded ``responses`` to ``prompts`` (each with ``.text`` and
        ``.label``) and add the reward models' ``model_scores`` [B, num_models]: the combined,
        clipped reward [B] and each source's reward [B] by name."""
        per_source = {f"reward_model{k}": model_scores[:, k].float() for k in range(self.num_models)}
        texts, labels = [p.text for p in prompts], [p.label for p in prompts]
        per_source.update({name: fn(texts, responses, labels) for name, fn in self.text.items()})
        return combine(list(per_source.values()), self.weights, self.clip), per_source

    def score(
        self, prompts: Sequence[Any], responses: list[list[int]], tokenizer, micro: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Every source on one rank: prompts (``.ids``, ``.text``, ``.label``) and response ids ->
        (combined reward [B], per-source rewards [B] by name)."""
        samples = [Sample(p.ids + r, [0] * len(p.ids) + [1] * len(r)) for p, r in zip(prompts, responses)]
        texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses] if self.text else []  # only text sources read them
        return self.combine(self.model_scores(samples, tokenizer.pad_token_id, micro), prompts, texts)


def inference_reward_sources(task: Any, model: Any, tokenizer) -> RewardSources:
    """The sources of batch inference and rejection sampling (``task``: their --reward_pretrain,
    --reward_func, --reward_weights, --normalize_reward): plain frozen models on this rank."""
    from rlhf.models.loading import frozen_model_config, load_reward_model

    def load(path: str):
        frozen = frozen_model_config(model, path)
        return load_reward_model(frozen, pad_token_id=tokenizer.pad_token_id, flag="--reward_pretrain").to(device()).eval()

    return RewardSources.from_flags(
        reward_pretrain=task.reward_pretrain,
        reward_func=task.reward_func,
        weights=task.reward_weights,
        normalize=task.normalize_reward,
        load_model=load,
    )


def model_paths(reward_pretrain: Optional[str]) -> list[str]:
    """--reward_pretrain 'a,b' -> ['a', 'b']."""
    return reward_pretrain.split(",") if reward_pretrain else []
