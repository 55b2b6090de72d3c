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
service, then the function).
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Optional, Sequence

import torch

from rlhf.data.sft import load_user_function
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
        body = json.dumps({"prompts": prompts, "responses": responses, "labels": labels, "queries": [p + r for p, r in zip(prompts, responses)]}).encode()
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
        raise UserError(f"--reward_weights has {len(values)} values for {n_sources} reward sources (reward models, then --remote_rm_url, then --reward_func)")
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
