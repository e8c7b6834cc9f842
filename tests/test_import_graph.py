"""The import graph of pipeline/: no stage imports another stage, no cycle among pipeline modules.

Imports are read with `ast` (module level and inside functions alike); `from . import x` counts as an
import of the module x when x is one.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "pipeline"


def modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def imports(name: str, f: Path, known) -> set[str]:
    pkg = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                if f"{mod}.{a.name}" in known:
                    out.add(f"{mod}.{a.name}")
                elif mod in known:
                    out.add(mod)
    out.discard(name)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {n: imports(n, f, mods) for n, f in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
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
                found.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    return found


def test_no_stage_imports_another_stage():
    g = graph()
    stage = lambda m: m.startswith("pipeline.stages.")  # noqa: E731
    bad = {m: sorted(filter(stage, ups)) for m, ups in g.items() if stage(m) and any(map(stage, ups))}
    assert not bad, f"stages import other stages (move the shared code to pipeline/artifacts or pipeline/methods): {bad}"


def test_libraries_import_no_stage():
    g = graph()
    bad = {m: sorted(u for u in ups if u.startswith("pipeline.stages"))
           for m, ups in g.items() if m.startswith(("pipeline.artifacts", "pipeline.methods", "pipeline.workspace",
                                                    "pipeline.engine", "pipeline.quant"))}
    assert not {m: v for m, v in bad.items() if v}


def test_no_import_cycle_in_pipeline():
    assert cycles(graph()) == []


def test_the_checker_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
