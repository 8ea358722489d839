"""The event loop the ``engine`` command runs on: uvloop's when it is installed (the ``fast``
extra), asyncio's otherwise or when ``ENGINE_EVENT_LOOP=asyncio`` asks for it.

uvloop runs asyncpg's round trips and the loop's own turns in C: a worker spends less CPU per
step and per run (bench/README.md). Nothing depends on it: the engine behaves the same on
either loop, and an application that runs ``app.worker()`` in its own loop chooses that loop
itself.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from .errors import ConfigurationError

T = TypeVar("T")
LOOPS = ("uvloop", "asyncio")
VARIABLE = "ENGINE_EVENT_LOOP"


def loop_factory(choice: str | None = None) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """What makes the loop ``choice`` names (default: ``$ENGINE_EVENT_LOOP``, else uvloop when
    installed); None for asyncio's own.

    Raises:
        ConfigurationError: an unknown choice, or uvloop asked for and not installed.
    """
    explicit = choice or os.environ.get(VARIABLE, "").strip().lower() or None
    if explicit is not None and explicit not in LOOPS:
        raise ConfigurationError(f"{VARIABLE}={explicit!r}: expected one of {', '.join(LOOPS)}")
    if explicit == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if explicit == "uvloop":
            raise ConfigurationError(
                "uvloop is not installed: pip install 'pg-durable-engine[fast]'"
            ) from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T], choice: str | None = None) -> T:
    """``asyncio.run(main)`` on the loop :func:`loop_factory` chooses."""
    try:
        factory = loop_factory(choice)
    except ConfigurationError:
        main.close()  # never started: no "never awaited" warning on top of the error
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def name(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop`` or ``asyncio``: the kind of ``loop``, for the worker's first log line."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
