"""The package's import graph: ``import moevl`` has no side effects, and the layers import downwards only
(``moe`` <- ``stgc`` <- ``hf`` <- ``checkpoint`` <- ``training``; ``data``, ``vlm``, ``cli`` and the rest above;
``data`` imports nothing of ``hf``)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: Top-level modules that import nothing of moevl: any layer may use them.
LEAVES = {"atomic", "checks", "observability", "vision_tokens"}
#: package -> the other moevl packages it may import (anywhere in its files), besides the leaves
ALLOWED = {
    "moe": set(),
    "stgc": {"moe"},
    "hf": {"moe", "stgc"},
    "checkpoint": {"moe", "stgc", "hf"},
    "training": {"moe", "stgc", "hf", "checkpoint"},
    "data": set(),  # records and processors: nothing of the model side (hf), the leaves only
}


def _imported_parts(part: str) -> set[str]:
    """The parts of moevl (packages, top-level modules) that ``moevl.<part>`` (a package or a module) imports."""
    path = SRC / "moevl" / part
    found = set()
    for file in path.rglob("*.py") if path.is_dir() else [path.with_suffix(".py")]:
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "moevl":
                names = [f"moevl.{alias.name}" for alias in node.names]  # from moevl import observability
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "moevl":
                    found.add(parts[1] if len(parts) > 1 else "moevl")
    return found - {part}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_the_layers_below(package):
    assert _imported_parts(package) <= ALLOWED[package] | LEAVES


@pytest.mark.parametrize("leaf", sorted(LEAVES))
def test_leaves_import_nothing_of_moevl(leaf):
    assert _imported_parts(leaf) == set()


def _run(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    ).stdout.strip()


def test_import_moevl_imports_nothing_and_leaves_the_import_system_alone():
    out = _run(
        "import sys; finders = list(sys.meta_path); import moevl; "
        "print(sys.meta_path == finders, sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    assert out == "True []"


def test_import_moevl_hf_imports_neither_checkpoint_nor_training():
    out = _run(
        "import sys; import moevl.hf; "
        "print(sorted(m for m in sys.modules if m.startswith(('moevl.checkpoint', 'moevl.training'))))"
    )
    assert out == "[]"


def test_no_two_parts_of_moevl_import_each_other():
    units = [p.stem for p in (SRC / "moevl").glob("*.py") if p.stem != "__init__"]
    units += [p.name for p in (SRC / "moevl").iterdir() if (p / "__init__.py").is_file()]
    graph = {u: _imported_parts(u) for u in units}

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    assert [u for u in sorted(graph) if u in reachable(u)] == []
