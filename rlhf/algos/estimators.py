"""The advantage estimators by name, with the traits the rest of the program decides by.

One table answers every question that depends on the estimator: which names exist (the
``--advantage_estimator`` values), which compare the samples of a prompt (they need
``--n_samples_per_prompt >= 2`` and undiscounted returns), which read critic values (PPO then
builds a critic role) and which take ``--gamma != 1``. The maths lives in ``rlhf.algos.ppo``,
which registers one function under each name here and refuses any other.

No torch import on purpose: the config's validation (and so ``--help``) reads this table before
torch is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.errors import UserError


@dataclass(frozen=True)
class EstimatorTraits:
    grouped: bool = False  # compares the n samples of a prompt (a group baseline)
    needs_critic: bool = False  # reads critic values: the job trains a critic
    discounted: bool = False  # takes gamma != 1 (the group estimators use undiscounted returns)


ESTIMATORS: dict[str, EstimatorTraits] = {
    "gae": EstimatorTraits(needs_critic=True, discounted=True),
    "reinforce": EstimatorTraits(discounted=True),
    "rloo": EstimatorTraits(grouped=True),
    "reinforce_baseline": EstimatorTraits(grouped=True),
    "group_norm": EstimatorTraits(grouped=True),
    "dr_grpo": EstimatorTraits(grouped=True),
}


def estimator_traits(name: str) -> EstimatorTraits:
    """The traits of estimator ``name``; an unknown name is a ``UserError`` listing the known ones."""
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise UserError(f"unknown advantage estimator {name!r}; choose one of {', '.join(ESTIMATORS)}") from None


def discounted_estimators() -> list[str]:
    """The names that take gamma != 1, for messages."""
    return [name for name, traits in ESTIMATORS.items() if traits.discounted]
