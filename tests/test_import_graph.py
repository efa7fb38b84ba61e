"""No import cycles between the project's modules, lazy (function-level) imports included.

A lazy import that only exists to break a loop (as the tuning records once tied cpu.py, tune.py
and registry.py together) hides a design knot; this test makes one visible when it is made.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _packages() -> dict[str, str]:
    """Package name -> folder, as pyproject.toml maps them (the repo's folders are not nested by package)."""
    line = re.search(r"^package-dir = \{(.*)\}$", (ROOT / "pyproject.toml").read_text(), re.M)
    assert line, "pyproject.toml has no [tool.setuptools] package-dir line"
    return dict(re.findall(r'"([\w.]+)" = "([\w/]+)"', line.group(1)))


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for pkg, folder in _packages().items():
        for f in (ROOT / folder).rglob("*.py"):
            parts = [p for p in f.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            found[".".join([pkg, *parts])] = f
    return found


def _imported(node: ast.AST, base: str) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            parts = base.split(".")
            mod = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
        else:
            mod = node.module or ""
        return [mod] + [f"{mod}.{a.name}" for a in node.names]
    return []


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        base = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            for target in _imported(node, base):
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    deps.add(target)  # a package's own __init__ is not a cycle of its modules
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, deps = work[-1]
            w = next(deps, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_the_checker_sees_every_module_and_a_planted_cycle() -> None:
    graph = import_graph()
    assert "edgeattn.kernels_tvm.tuning_records" in graph and "edgeattn.runtime.host" in graph
    assert "edgeattn.kernels_tvm.schedule" in graph["edgeattn.kernels_tvm.cpu"]
    planted = {k: set(v) for k, v in graph.items()}
    planted["edgeattn.kernels_tvm.schedule"].add("edgeattn.kernels_tvm.cpu")
    assert any({"edgeattn.kernels_tvm.cpu", "edgeattn.kernels_tvm.schedule"} <= set(c) for c in cycles(planted))


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []
