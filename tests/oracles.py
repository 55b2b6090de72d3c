"""Peer implementations used as numerical oracles, loaded file by file.

``bash launch/install.sh --test`` installs the peers' wheels with ``--no-deps`` into
``<repo>/.oracles/<dist>-<version>/`` (outside site-packages, ignored by git). Their package
``__init__`` files import heavy or absent things (Ray, vLLM, flash-attn), so we never import the
packages: ``load_peer_file`` executes single source files under a private module name, after
first loading the sibling files they import relatively (``from .utils import ...``). Parent
packages are empty placeholder modules, so no ``__init__`` ever runs. The peers' code stays in
``.oracles/``; nothing of it is copied into this repository.

A missing oracle is a test FAILURE with the command that installs it, never a skip.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import itertools
import logging
import sys
import types
from pathlib import Path
from typing import List, Tuple

ORACLE_ROOT = Path(__file__).resolve().parent.parent / ".oracles"
INSTALL_HINT = "run `bash launch/install.sh --test` to install the test oracles"


class OracleMissing(RuntimeError):
    """An oracle file is not installed (the message says how to install it)."""


def _module_name(dist: str, relpath: str) -> str:
    """("openrlhf-0.11.2", "openrlhf/models/loss.py") -> "_oracle_openrlhf_0_11_2.openrlhf.models.loss"."""
    root = "_oracle_" + "".join(c if c.isalnum() else "_" for c in dist)
    return ".".join([root, *Path(relpath).with_suffix("").parts])


def _ensure_parents(name: str) -> None:
    """Empty package placeholders for every parent of ``name``, so relative imports resolve."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        parent = ".".join(parts[:i])
        if parent not in sys.modules:
            package = types.ModuleType(parent)
            package.__path__ = []  # a package, but with nothing importable from disk
            sys.modules[parent] = package


@functools.cache
def load_peer_file(dist: str, relpath: str, requires: tuple[str, ...] = ()) -> types.ModuleType:
    """Execute ``.oracles/<dist>/<relpath>`` as a module; ``requires`` (same form) load first.

    dist: install folder name, e.g. "openrlhf-0.11.2"; relpath: file inside it, e.g.
    "openrlhf/models/loss.py"; requires: files it imports relatively, e.g.
    ("openrlhf/models/utils.py",). Cached: each file is executed once per test session.
    """
    for dep in requires:
        load_peer_file(dist, dep)
    path = ORACLE_ROOT / dist / relpath
    if not path.is_file():
        raise OracleMissing(f"test oracle {path} is missing: {INSTALL_HINT}")
    name = _module_name(dist, relpath)
    _ensure_parents(name)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def openrlhf_loss(version: str) -> types.ModuleType:
    """OpenRLHF ``openrlhf/models/loss.py`` of that version (it imports ``.utils``)."""
    return load_peer_file(f"openrlhf-{version}", "openrlhf/models/loss.py", ("openrlhf/models/utils.py",))


def openrlhf_utils(version: str) -> types.ModuleType:
    """OpenRLHF ``openrlhf/models/utils.py`` of that version (imports deepspeed: a few seconds)."""
    return load_peer_file(f"openrlhf-{version}", "openrlhf/models/utils.py")


def openrlhf_kl_controller(version: str) -> types.ModuleType:
    """OpenRLHF ``openrlhf/trainer/ppo_utils/kl_controller.py`` (Adaptive/FixedKLController; numpy only)."""
    return load_peer_file(f"openrlhf-{version}", "openrlhf/trainer/ppo_utils/kl_controller.py")


def torchtune_rewards(version: str) -> types.ModuleType:
    """torchtune ``torchtune/rlhf/rewards.py`` (GAE, PPO rewards, masked mean / whiten; torch only)."""
    return load_peer_file(f"torchtune-{version}", "torchtune/rlhf/rewards.py")


OPENRLHF_ADVANTAGE_METHODS = ("compute_advantages_and_returns", "get_advantages_and_returns", "get_cumulative_returns")


@functools.cache
def openrlhf_advantage_maker(version: str) -> type:
    """OpenRLHF's ``RemoteExperienceMaker`` reduced to its three advantage methods, as a class.

    ``experience_maker.py`` imports Ray and the Ray launcher at the top, so the file is not
    executed: its source is parsed, the class keeps only ``OPENRLHF_ADVANTAGE_METHODS``
    (verbatim), and that is executed in a namespace holding torch, itertools, the real
    ``compute_reward`` / ``masked_mean`` of ``models/utils.py``, a module logger and a no-op
    ``apply_length_penalties`` (length penalties are tested apart). Callers set the attributes
    the methods read: ``advantage_estimator``, ``kl_ctl.value`` and ``strategy.args``.
    """
    path = ORACLE_ROOT / f"openrlhf-{version}" / "openrlhf/trainer/ppo_utils/experience_maker.py"
    if not path.is_file():
        raise OracleMissing(f"test oracle {path} is missing: {INSTALL_HINT}")
    tree = ast.parse(path.read_text(), filename=str(path))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "RemoteExperienceMaker")
    methods = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name in OPENRLHF_ADVANTAGE_METHODS]
    if sorted(m.name for m in methods) != sorted(OPENRLHF_ADVANTAGE_METHODS):
        raise RuntimeError(f"{path}: expected methods {OPENRLHF_ADVANTAGE_METHODS}, found {[m.name for m in methods]}")
    cls.body, cls.bases, cls.keywords, cls.decorator_list = methods, [], [], []
    utils = openrlhf_utils(version)
    namespace = {
        "torch": importlib.import_module("torch"),
        "itertools": itertools,
        "List": List,
        "Tuple": Tuple,
        "Experience": types.SimpleNamespace,
        "compute_reward": utils.compute_reward,
        "masked_mean": utils.masked_mean,
        "apply_length_penalties": lambda experiences, args: None,
        "logger": logging.getLogger(f"oracle.openrlhf-{version}.experience_maker"),
    }
    exec(compile(ast.Module(body=[cls], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["RemoteExperienceMaker"]
