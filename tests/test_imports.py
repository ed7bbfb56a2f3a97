"""The package's import graph: ``import moevl`` has no side effects, and the layers import downwards only
(``moe`` <- ``stgc`` <- ``hf`` <- ``checkpoint`` <- ``training``; ``vlm``, ``cli`` and the rest above)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: package -> the other moevl packages and modules it may import (anywhere in its files)
ALLOWED = {
    "moe": set(),
    "stgc": {"moe"},
    "hf": {"moe", "stgc"},
    "checkpoint": {"moe", "stgc", "hf", "atomic"},
}


def _imported_packages(package: str) -> set[str]:
    """The moevl packages / top-level modules that the files of ``moevl.<package>`` import."""
    found = set()
    for file in (SRC / "moevl" / package).rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "moevl":
                    found.add(parts[1] if len(parts) > 1 else "moevl")
    return found - {package}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_the_layers_below(package):
    assert _imported_packages(package) <= ALLOWED[package]


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
