"""The package's import graph: no cycles, and nothing below the evaluators imports them or the CLI.

Every import counts, also those inside functions (a lazy import is still a dependency), so this reads
the source with ``ast`` instead of importing it.
"""
from __future__ import annotations

import ast
import os
from typing import Dict, List, Set

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "harness")
#: the layers on top: they may import anything
TOP = ("harness.cli", "harness.demo", "harness.sensitivity", "harness.evaluators")


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def import_graph() -> Dict[str, Set[str]]:
    files = [os.path.join(d, f) for d, _, fs in os.walk(PKG) for f in fs if f.endswith(".py")]
    modules = {_module_name(f): f for f in files}
    graph: Dict[str, Set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.endswith("__init__.py")
        base = name.split(".") if is_pkg else name.split(".")[:-1]
        deps: Set[str] = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = base[: len(base) - (node.level - 1)]
                    mod = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name and t.startswith("harness"):
                    deps.add(t)
        graph[name] = deps
    return graph


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    graph = {k: {d for d in v if d != "harness"} for k, v in import_graph().items()}  # the root only re-exports
    assert _cycles(graph) == []


def test_lower_layers_never_import_the_evaluators_or_the_cli() -> None:
    bad = []
    for mod, deps in import_graph().items():
        if mod.startswith(TOP):
            continue
        bad += [f"{mod} -> {d}" for d in deps if d.startswith(TOP)]
    assert bad == []


def test_the_backbones_never_import_methods_or_anything_above() -> None:
    above = ("harness.methods", "harness.models", "harness.ovss", "harness.probes", "harness.evaluators",
             "harness.cli", "harness.demo", "harness.results")
    bad = [f"{m} -> {d}" for m, deps in import_graph().items() if m.startswith("harness.backbones")
           for d in deps if d.startswith(above)]
    assert bad == []
