"""The package's import graph: ``import moevl`` has no side effects, the layers import downwards only
(``moe`` <- ``stgc`` <- ``hf`` <- ``checkpoint`` <- ``training``; ``data``, ``vlm``, ``cli`` and the rest above;
``data`` imports nothing of ``hf``), and no two modules import each other, inside a package or across."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Mapping, Set
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
#: Import cycles between modules that are known and being removed (each a set of modules: the cycle's members).
KNOWN_CYCLES: set[frozenset[str]] = set()


def module_files(root: Path = SRC, package: str = "moevl") -> dict[str, Path]:
    """The modules of ``package`` under ``root``, by dotted name (a package by its own name: its ``__init__``)."""
    found = {}
    for file in (root / package).rglob("*.py"):
        parts = file.relative_to(root).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return found


def _bound_names(tree: ast.Module) -> set[str]:
    """The names a module binds at its top level (under ``if`` / ``try`` / ``with`` too): what
    ``from <module> import <name>`` can get from it."""
    names, todo = set(), list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            names.update(alias.asname or alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for target in targets for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, ast.If | ast.Try | ast.With | ast.ExceptHandler):
            for block in ("body", "orelse", "finalbody", "handlers"):
                todo.extend(getattr(node, block, []))
    return names


def import_graph(root: Path = SRC, package: str = "moevl") -> dict[str, set[str]]:
    """module -> the modules of ``package`` it imports, from every ``import`` / ``from ... import`` in its file
    (inside functions too; relative imports resolved). ``import a.b`` imports ``a.b`` (a package: its
    ``__init__``), not the packages above it. ``from a import n`` imports the submodule ``a.n`` when there is
    one, and ``a`` itself when ``n`` is not a submodule or when ``a``'s ``__init__`` binds ``n`` (a package
    re-exporting its submodule's function of the same name, ``from moevl.hf import upcycle``)."""
    files = module_files(root, package)
    trees = {module: ast.parse(file.read_text()) for module, file in files.items()}
    bound = {module: _bound_names(trees[module]) for module, file in files.items() if file.stem == "__init__"}
    graph = {}
    for module, tree in trees.items():
        here = module if files[module].stem == "__init__" else module.rpartition(".")[0]
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # from . import x, from ..y import z
                    base = here.split(".")[: len(here.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    if submodule in files:
                        found.add(submodule)
                    if submodule not in files or alias.name in bound.get(source, ()):
                        found.add(source)
        graph[module] = {target for target in found if target in files and target != module}
    return graph


def import_cycles(graph: Mapping[str, Set[str]]) -> list[list[str]]:
    """One cycle path (``[a, b, ..., a]``) for each set of modules that import each other (Tarjan's strongly
    connected components with more than one module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set(stack[stack.index(node) :])
            del stack[stack.index(node) :]
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_path(graph, component) for component in components]


def _cycle_path(graph: Mapping[str, Set[str]], component: set[str]) -> list[str]:
    """A shortest path from the component's first module back to itself, within the component."""
    start = min(component)
    paths, todo = {start: [start]}, [start]
    while todo:
        node = todo.pop(0)
        for nxt in sorted(graph[node] & component):
            if nxt == start:
                return [*paths[node], start]
            if nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                todo.append(nxt)
    raise AssertionError(f"{sorted(component)} is not a cycle")


def _part(module: str) -> str:
    """The part of moevl a module belongs to: its package or top-level module (``moevl`` for the root)."""
    return module.split(".")[1] if "." in module else module


GRAPH = import_graph()


def _imported_parts(part: str) -> set[str]:
    """The parts of moevl (packages, top-level modules) that ``moevl.<part>`` (a package or a module) imports."""
    return {_part(t) for module, targets in GRAPH.items() if _part(module) == part for t in targets} - {part}


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
    graph = {u: _imported_parts(u) for u in {_part(m) for m in GRAPH} - {"moevl"}}

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    assert [u for u in sorted(graph) if u in reachable(u)] == []


def test_no_two_modules_import_each_other():
    cycles = {frozenset(path): path for path in import_cycles(GRAPH)}
    new = [
        " -> ".join(path)
        for members, path in sorted(cycles.items(), key=lambda c: c[1])
        if members not in KNOWN_CYCLES
    ]
    assert not new, f"import cycles between modules: {new}"
    gone = [sorted(members) for members in KNOWN_CYCLES if members not in cycles]
    assert not gone, f"no longer import cycles (take them off KNOWN_CYCLES): {gone}"


def test_the_import_graph_resolves_submodules_re_exports_and_relative_imports(tmp_path):
    files = {
        "pkg/__init__.py": "",
        "pkg/a/__init__.py": "from pkg.a.x import f\nfrom pkg.a.z import h\n",
        "pkg/a/x.py": "def f():\n    from . import y  # a function-level relative import of a submodule\n",
        "pkg/a/y.py": "from ..b import B\n",
        "pkg/a/z.py": "from pkg.a import f  # the package's __init__ (it binds f): a cycle\nh = 1\n",
        "pkg/b.py": "import pkg.a.x  # the module, not pkg.a's __init__\nB = 1\n",
        "pkg/c.py": "from pkg import a\nfrom pkg.a import x, f\nimport json\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path, "pkg")
    assert graph == {
        "pkg": set(),
        "pkg.a": {"pkg.a.x", "pkg.a.z"},
        "pkg.a.x": {"pkg.a.y"},
        "pkg.a.y": {"pkg.b"},
        "pkg.a.z": {"pkg.a"},
        "pkg.b": {"pkg.a.x"},
        "pkg.c": {"pkg.a", "pkg.a.x"},
    }
    assert sorted(import_cycles(graph)) == [
        ["pkg.a", "pkg.a.z", "pkg.a"],
        ["pkg.a.x", "pkg.a.y", "pkg.b", "pkg.a.x"],
    ]
