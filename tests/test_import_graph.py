"""The engine's modules import each other without a cycle at run time (the house rule).

Imports under ``if TYPE_CHECKING:`` are for annotations only and do not count; imports inside
functions do, since they run.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import engine

PACKAGE = Path(engine.__file__).parent


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST, modules: set[str]) -> set[str]:
    """The engine modules a module imports when it runs (relative or ``engine.`` imports)."""
    found: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.ImportFrom):
            found |= _imported(node, modules)
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("engine.")}
        stack.extend(ast.iter_child_nodes(node))
    return found & modules


def _imported(node: ast.ImportFrom, modules: set[str]) -> set[str]:
    if node.level == 1 and node.module:
        return {node.module.split(".")[0]}
    if node.level == 1:  # from . import a, b
        return {alias.name for alias in node.names}
    if node.module and node.module.startswith("engine."):
        return {node.module.split(".")[1]}
    if node.module == "engine":
        return {alias.name for alias in node.names} & modules
    return set()


def import_graph() -> dict[str, set[str]]:
    """Each engine module with the engine modules it imports at run time."""
    files = {path.stem: path for path in PACKAGE.glob("*.py")}
    modules = set(files)
    return {
        name: _runtime_imports(ast.parse(path.read_text()), modules) - {name}
        for name, path in files.items()
    }


def test_the_run_time_import_graph_of_engine_has_no_cycle() -> None:
    graph = import_graph()
    assert "context" in graph["execution"]  # the graph is read (a sanity check of the parser)
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as cycle:
        raise AssertionError(f"import cycle: {' -> '.join(cycle.args[1])}") from None


def test_run_local_plumbing_and_telemetry_are_leaves_of_the_core() -> None:
    graph = import_graph()
    leaves = {"logs", "replay", "errors", "serialization", "_version", "events"}
    assert graph["runlocal"] <= leaves
    assert graph["telemetry"] <= leaves
    assert graph["context"] <= leaves | {"runlocal"}
    # telemetry takes plain values, not an Execution: not even its annotations need the core
    assert "from .execution" not in (PACKAGE / "telemetry.py").read_text()


def test_importing_the_engine_builds_no_cel_parser() -> None:
    """The CEL environment is built by the first expression compiled, not at import: its
    parser took a seventh of a second, paid by every `engine` command that never reads an
    expression. Building it leaves the recursion limit as the process has it (cel-python sets
    its own), which importing raised to what CEL needs."""
    probe = (
        "import sys, engine, engine.expressions as e;"
        " assert e._environment.cache_info().currsize == 0, 'built at import';"
        " assert sys.getrecursionlimit() >= 2500, sys.getrecursionlimit();"
        " sys.setrecursionlimit(4000);"
        " e.Expression('event.data.n > 1');"
        " assert e._environment.cache_info().currsize == 1;"
        " assert sys.getrecursionlimit() == 4000, sys.getrecursionlimit()"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=60)
