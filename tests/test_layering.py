"""The package's shape, as issue 23 states it: imports go one way (no circle, counting imports inside functions
too), the runtime never imports the lab or the harnesses, no module is loaded by path, no .py file over 600 lines."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "multimoe_rt"
# Everything else in the package is the runtime; these may import it, never the other way round.
OUTSIDE_RUNTIME = ("multimoe_rt.lab", "multimoe_rt.benchmarks", "multimoe_rt.cli")


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its file."""
    files = {_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        here = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(here[:len(here) - node.level + 1] + [node.module or ""]) if node.level else node.module
                base = (base or "").rstrip(".")
                # `from pkg import sub` imports the submodule sub; a compiled extension (_C) is no module here
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names
                           if not list(path.parent.glob(f"{a.name}.*.so"))]
            else:
                continue
            for t in targets:
                while t not in files and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in files and t != mod:
                    deps.add(t)
        graph[mod] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_runtime_never_imports_the_lab_or_the_harnesses():
    bad = [(m, d) for m, deps in import_graph().items() if not m.startswith(OUTSIDE_RUNTIME)
           for d in deps if d.startswith(OUTSIDE_RUNTIME) and m != "multimoe_rt.__main__"]
    assert bad == []


def test_no_module_loaded_by_path():
    needles = ("spec_from_file_location", "run_path(", "SourceFileLoader", "load_source(")
    hits = [f"{p.relative_to(ROOT)}: {n}" for folder in (PKG, ROOT / "bench") for p in folder.rglob("*.py")
            for n in needles if n in p.read_text()]
    assert hits == []


def test_no_python_file_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for folder in (PKG, ROOT / "bench") for p in folder.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}
