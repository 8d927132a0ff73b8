"""No import cycles among Attune's modules: the graph counts every import a module's source names (top level, inside
functions, and under TYPE_CHECKING), so a cycle hidden from the interpreter still fails here. Run as a script to
print the cycles: `python tests/test_import_cycles.py`.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("serving", "alignment", "adapters", "evals", "attune")
KNOWN = {("adapters", "attune.compat"):
         "the AdapterHub guard: attune.compat imports `adapters` to check it, and adapters.ensure_attune_adapters "
         "imports attune.compat's check (both inside functions); to be removed by the adapters/ owner"}
"""Cycles that exist and are owned elsewhere, each with why; any other cycle fails, and so does a listed one that is
gone (remove it from here then)."""


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(packages=PACKAGES) -> dict[str, Path]:
    return {module_name(p): p for pkg in packages for p in sorted((ROOT / pkg).rglob("*.py"))}


def imported(node: ast.AST, here: str, is_package: bool, known: dict[str, Path]) -> set[str]:
    """The known modules one import statement names (`from pkg import mod` names pkg.mod when that is a module)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            anchor = here.split(".") if is_package else here.split(".")[:-1]
            anchor = anchor[:len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, *([base] if base else [])])
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    else:
        return set()
    found = set()
    for name in names:
        while name and name not in known:  # `import serving.chat.x` or an attribute: the nearest known module
            name = name.rpartition(".")[0]
        if name:
            found.add(name)
    return found


def import_graph(packages=PACKAGES) -> dict[str, set[str]]:
    known = modules(packages)
    graph = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges = set()
        for node in ast.walk(tree):
            edges |= imported(node, name, path.name == "__init__.py", known)
        graph[name] = edges - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_the_graph_sees_imports_under_type_checking_and_in_functions():
    graph = import_graph(("serving",))
    assert "serving.protocol" in graph["serving.api_router"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    src = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from serving import chat\n" \
          "def f():\n    from .db import Repository\n"
    known = {"serving.chat": ROOT, "serving.db": ROOT, "serving.x": ROOT}
    found = set().union(*(imported(n, "serving.x", False, known) for n in ast.walk(ast.parse(src))))
    assert found == {"serving.chat", "serving.db"}


def test_no_import_cycles():
    found = [tuple(c) for c in cycles(import_graph())]
    new = [c for c in found if c not in KNOWN]
    assert not new, "import cycles (each line: modules that import each other, directly or not):\n" + \
        "\n".join(" <-> ".join(c) for c in new)
    assert set(KNOWN) <= set(found), f"no longer a cycle, take it out of KNOWN: {sorted(set(KNOWN) - set(found))}"


def test_the_chat_path_has_no_cycle():
    """serving/ alone: chat, sessions and streaming once imported each other (partly under TYPE_CHECKING)."""
    assert cycles(import_graph(("serving",))) == []


if __name__ == "__main__":
    for c in cycles(import_graph()):
        print(" <-> ".join(c))
