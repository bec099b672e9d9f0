"""The import graph of ``cakes`` has no cycles, and ``import cakes`` has no side effects.

Every module under ``src/cakes`` is parsed with :mod:`ast`; every import counts, at module level and
inside functions alike (a function-level import only defers a cycle, it does not remove it).
Importing ``cakes.a.b`` also runs ``cakes/__init__.py`` and ``cakes/a/__init__.py``, so a module
depends on the packages above what it imports, except on the packages it lives in (those are
already being imported when it runs).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "cakes"


def module_files() -> dict[str, Path]:
    """``{dotted module name: file}`` for every module of the package (``__init__`` as the package)."""
    modules = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Dotted names every ``import`` / ``from ... import`` in ``tree`` refers to (relative imports
    resolved); for ``from a import b`` both ``a`` and ``a.b`` (``b`` may be a submodule)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``, package ``__init__`` edges included."""
    files = module_files()
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges: set[str] = set()
        for name in imported_names(tree, module, path.name == "__init__.py"):
            parts = name.split(".")
            for end in range(1, len(parts) + 1):
                target = ".".join(parts[:end])
                # the packages a module lives in are already importing when it runs
                if target in files and target != module and not module.startswith(target + "."):
                    edges.add(target)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or ``None`` (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if state.get(root):
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_graph_sees_known_edges() -> None:
    graph = import_graph()
    assert "cakes.ops.arch" in graph["cakes.ops.factory"]  # module level
    assert "cakes.profile" in graph["cakes.modules.base"]  # function level
    assert "cakes.ops" in graph["cakes.arch"]  # the package a submodule import runs
    assert "cakes.ops" not in graph["cakes.ops.factory"]  # ... unless the importer lives in it


def test_find_cycle_reports_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_import_cakes_registers_no_resolver() -> None:
    code = (
        "from omegaconf import OmegaConf\n"
        "import cakes\n"
        "names = [n for n in ('operator_mode', 'arch_data') if OmegaConf.has_resolver(n)]\n"
        "assert not names, names\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
