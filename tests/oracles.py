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

import functools
import importlib.util
import sys
import types
from pathlib import Path

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
