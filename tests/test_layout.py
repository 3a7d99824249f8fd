"""The package's layout: no import circles (lazy imports included), a thin CLI, and no package
folder named like an output folder."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent / "mechinterp"


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module → the mechinterp modules it imports anywhere (top level or inside functions).
    `from pkg import name` counts as importing `pkg.name` when that is a module. A package's
    own `__init__` re-exporting its submodules is not an edge back from them."""
    modules = {_module(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                    + ([base] if base else []))  # fmt: skip
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]  # fmt: skip
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    for name in graph:  # a submodule importing its parent package's __init__ is no circle
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_no_module_imports_itself_in_a_circle():
    graph = import_graph()
    run = graph["mechinterp.experiments.extension.run"]
    assert "mechinterp.experiments.extension.report" in run
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]


def test_the_cli_is_a_thin_table_and_no_package_folder_is_named_like_an_output():
    assert len((ROOT / "cli.py").read_text().splitlines()) < 200
    folders = {p.name for p in ROOT.rglob("*") if p.is_dir() and p.name != "__pycache__"}
    assert not folders & {"runs", "figures", "results", "shards", "checkpoints"}


def test_the_old_import_paths_still_work_with_a_deprecation_warning():
    import importlib
    import sys

    import pytest

    for old, name in (("mechinterp.study", "run_study"), ("mechinterp.runs", "run_eval")):
        sys.modules.pop(old, None)
        with pytest.warns(DeprecationWarning, match="moved to mechinterp.experiments"):
            module = importlib.import_module(old)
        assert callable(getattr(module, name))
    import mechinterp

    for name in mechinterp.__all__:  # the top-level API
        assert callable(getattr(mechinterp, name))
