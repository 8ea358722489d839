"""House rules of the engine's code that a linter does not check."""

from __future__ import annotations

import ast
from pathlib import Path

import engine

PACKAGE = Path(engine.__file__).parent


def _wait_for_calls(path: Path) -> list[int]:
    """Lines of ``path`` that call ``asyncio.wait_for``."""
    tree = ast.parse(path.read_text(), str(path))
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "wait_for"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "asyncio"
    ]


def test_the_engine_bounds_waits_with_asyncio_timeout_not_wait_for() -> None:
    """On Python 3.11, ``asyncio.wait_for`` loses a cancellation that arrives as the awaited
    call completes: a worker's side task (the pruner, once) then never sees its stop, and the
    worker's stop waits forever. ``asyncio.timeout`` does not; the engine uses it alone."""
    found = {
        str(path.relative_to(PACKAGE)): lines
        for path in sorted(PACKAGE.rglob("*.py"))
        if (lines := _wait_for_calls(path))
    }
    assert found == {}
