"""Run-local plumbing the core shares: the step executing in this task, ``ctx.logger``'s class.

A leaf module: it imports nothing from the engine but leaf modules (``logs``, ``replay``), so that
the public :mod:`engine.context` and the core (``execution``, ``steps``) can both import it
without an import cycle.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from .logs import engine_logger
from .replay import current_place

# The step whose callable is executing in this task or thread, with its attempt.
current_step: ContextVar[str | None] = ContextVar("engine_current_step", default=None)
current_attempt: ContextVar[int | None] = ContextVar("engine_current_attempt", default=None)


class RunLogger:
    """``ctx.logger``: a structlog logger that does not repeat lines when a run replays.

    Lines inside a step are emitted by each attempt that runs (a replayed step does not run).
    Lines outside steps are emitted once over the run's executions: a line logged before a step
    that was already recorded when the execution began is a replay and stays quiet (the code
    before that step ran to its end earlier). Lines at a place no recorded step follows yet (after
    the last step of a branch, of any of the run's parallel branches) are counted: the run
    records how many were logged at each such place, and the next execution skips that many
    there. Lines a worker logged before it died without recording its counts are emitted again
    (at least once, never lost).
    """

    def __init__(
        self, bound: Any, already_logged: dict[str, int], replayed: Callable[[str], bool]
    ) -> None:
        self._log = bound
        self._already = dict(already_logged)
        self._replayed = replayed
        self._lines: Counter[str] = Counter()  # lines outside steps not replayed, by place

    def _emit(self, level: str, event: str, **fields: Any) -> None:
        if current_step.get() is None:
            place = current_place()
            if self._replayed(place):
                return
            self._lines[place] += 1
            if self._lines[place] <= self._already.get(place, 0):
                return
        getattr(self._log, level)(event, **fields)

    def logged(self, followed: set[str]) -> dict[str, int]:
        """The counts to record: lines logged at each place that no recorded step follows
        (``followed``: places where code ran to its end, quiet on replay anyway). An execution
        cut short keeps the earlier counts."""
        places = (set(self._lines) | set(self._already)) - followed
        return {p: max(self._lines[p], self._already.get(p, 0)) for p in sorted(places)}

    def debug(self, event: str, **fields: Any) -> None:
        """Logs at debug level."""
        self._emit("debug", event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        """Logs at info level."""
        self._emit("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        """Logs at warning level."""
        self._emit("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        """Logs at error level."""
        self._emit("error", event, **fields)

    def exception(self, event: str, **fields: Any) -> None:
        """Logs at error level with the current exception."""
        self._emit("exception", event, **fields)


def structlog_logger() -> Any:
    """The engine's logger (stable event names; context bound with ``bound_contextvars``)."""
    return engine_logger()
