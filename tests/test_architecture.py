"""Layering of the package: entry points import only the library.

An entry point is a module under rlhf/ with a module-level ``if __name__ == "__main__":`` (the
trainers, generate, chat, plan, the asset builders ...). What two entry points share lives in a
library module (``rlhf.engines.reference``, ``rlhf.data.preference``, ``rlhf.io.jsonl`` ...), so
no module under rlhf/ may import an entry point: not ``from rlhf.X import ...``, not ``import
rlhf.X``, not ``from rlhf import X``, not a relative import, and not inside a function either.
Tests may import entry points; this only reads the package. Pure ``ast``: no torch needed.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, Optional

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "rlhf"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def parse_package() -> dict[str, tuple[Path, ast.Module]]:
    """Every module under rlhf/: dotted name -> (path, syntax tree)."""
    return {module_name(p): (p, ast.parse(p.read_text(), filename=str(p))) for p in sorted(PACKAGE.rglob("*.py"))}


def _is_main_guard(test: ast.expr) -> bool:
    """``__name__ == "__main__"`` (either way round)."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    names = [s.id for s in sides if isinstance(s, ast.Name)]
    constants = [s.value for s in sides if isinstance(s, ast.Constant)]
    return names == ["__name__"] and constants == ["__main__"]


def is_entry_point(tree: ast.Module) -> bool:
    return any(isinstance(node, ast.If) and _is_main_guard(node.test) for node in tree.body)


def _resolve_relative(importer: str, is_package: bool, level: int, module: Optional[str]) -> str:
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([module] if module else []))


def imported_modules(name: str, path: Path, tree: ast.Module) -> Iterator[tuple[str, int, str]]:
    """(imported module, line, source text of the import) for every import anywhere in the
    module; ``from P import X`` yields both ``P`` and ``P.X`` (X may be a submodule)."""
    source = path.read_text()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            text = ast.get_source_segment(source, node) or ""
            for alias in node.names:
                yield alias.name, node.lineno, text
        elif isinstance(node, ast.ImportFrom):
            text = ast.get_source_segment(source, node) or ""
            base = node.module or ""
            if node.level:
                base = _resolve_relative(name, path.name == "__init__.py", node.level, node.module)
            yield base, node.lineno, text
            for alias in node.names:
                yield f"{base}.{alias.name}", node.lineno, text
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
            if called in ("import_module", "__import__"):
                yield node.args[0].value, node.lineno, ast.get_source_segment(source, node) or ""


def test_entry_points_are_found():
    """The detection itself: the known entry points are found, the shared loop is not one."""
    entry_points = {name for name, (_, tree) in parse_package().items() if is_entry_point(tree)}
    assert {
        "rlhf.sft",
        "rlhf.rm",
        "rlhf.dpo",
        "rlhf.kto",
        "rlhf.ppo",
        "rlhf.generate",
        "rlhf.rejection_sampling",
        "rlhf.chat",
        "rlhf.plan",
    } <= entry_points
    assert "rlhf.trainer" not in entry_points  # the shared supervised loop is a library module


def test_no_module_imports_an_entry_point():
    modules = parse_package()
    entry_points = {name for name, (_, tree) in modules.items() if is_entry_point(tree)}
    offences = []
    for name, (path, tree) in modules.items():
        seen = set()
        for imported, line, text in imported_modules(name, path, tree):
            if imported in entry_points and imported != name and (imported, line) not in seen:
                seen.add((imported, line))
                offences.append(f"{path.relative_to(REPO)}:{line} ({name}) imports entry point {imported}: {text}")
    assert not offences, (
        'modules under rlhf/ import entry points (modules with `if __name__ == "__main__":`); '
        "move what they share into a library module:\n  " + "\n  ".join(offences)
    )
