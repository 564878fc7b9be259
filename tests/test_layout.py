"""The package's import graph, read from the source: no cycle, ops imports nothing of the run half, and no
engine or library module imports the command line.

    python tests/test_layout.py      # prints every module's imports of the package and any cycle
"""

from __future__ import annotations

import ast
import os
import sys
from typing import Dict, List, Set

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "endokern")


def module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(PACKAGE))[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def import_graph() -> Dict[str, Set[str]]:
    """Module -> the package modules it imports, at any depth of the file (lazy imports inside functions count)."""
    modules = {}
    for folder, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                modules[module_name(path)] = path
    graph: Dict[str, Set[str]] = {}
    for name, path in modules.items():
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        found: Set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(max(node.level - 1, 0)):
                    base = base.rpartition(".")[0]
                stem = (base + "." + node.module if node.module else base) if node.level else node.module
                # ``from X import y``: the submodule X.y where there is one, else X itself; a private name that is no
                # Python file is the compiled extension (endokern._cpu_kernel), not the package
                targets = [stem + "." + a.name if stem + "." + a.name in modules else stem for a in node.names
                           if not (a.name.startswith("_") and stem + "." + a.name not in modules and stem in modules)]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    found.add(target)
        graph[name] = found
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_graph_sees_a_cycle_when_there_is_one():
    graph = import_graph()
    graph["endokern.io"] = graph["endokern.io"] | {"endokern.runs"}  # io -> runs -> io
    assert any({"endokern.io", "endokern.runs"} <= set(c) for c in cycles(graph))


def test_ops_import_nothing_of_the_run_half_and_nothing_imports_the_cli():
    graph = import_graph()
    for module, imports in graph.items():
        if module.startswith("endokern.ops"):  # (the package root holds the compiled kernel)
            assert all(m.startswith("endokern.ops") or m == "endokern" for m in imports), (module, imports)
        if module != "endokern.__main__":
            assert "endokern.cli" not in imports, module
    ray = graph["endokern.integrations.ray"]
    assert "endokern.runs" not in ray and "endokern.cli" not in ray  # an engine, not a command



def test_settings_and_the_reward_math_are_leaves():
    """The options import nothing of the package (the machine's checks live in endokern.checks), and the reward math
    only the options' checks: reading or validating options never loads the model hub, torch or the file layer."""
    graph = import_graph()
    assert graph["endokern.settings"] == set(), graph["endokern.settings"]
    assert graph["endokern.reward"] <= {"endokern.settings"}, graph["endokern.reward"]



def test_the_integrations_use_only_the_stated_public_surface():
    """What endokern.integrations.* take from the package is in the ``__all__`` of the module they take it from: the
    surface the integrations stand on is stated, and an internal can change without breaking one."""
    import importlib

    folder = os.path.join(PACKAGE, "integrations")
    used = []
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".py") or name == "__init__.py":
            continue
        path = os.path.join(folder, name)
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        aliases = {}  # ``from .. import io as eio``: eio.<name> counts as a use of endokern.io's <name>
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 2:
                for a in node.names:
                    if node.module:
                        used.append((name, "endokern." + node.module, a.name))
                    else:
                        aliases[a.asname or a.name] = "endokern." + a.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                used.append((name, aliases[node.value.id], node.attr))
    assert used
    for where, module, attr in used:
        public = getattr(importlib.import_module(module), "__all__", None)
        assert public is not None, f"{module} (used by integrations/{where}) states no __all__"
        assert attr in public, f"integrations/{where} uses {module}.{attr}, which is not in its __all__"


if __name__ == "__main__":
    g = import_graph()
    for module in sorted(g):
        print(f"{module:32s} -> {', '.join(sorted(g[module])) or '-'}")
    found = cycles(g)
    print("cycles:", found or "none")
    sys.exit(1 if found else 0)
