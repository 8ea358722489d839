"""Buffered checkpoints (``create_function(..., checkpointing=Checkpointing(...))``).

By default a completed step is committed before the function's next step starts: one commit per
step. A function declared with :class:`Checkpointing` keeps completed steps in memory and commits
them together, trading a bounded window of re-execution for fewer commits (see
docs/checkpointing.md). What leaves the process or waits (a sleep, a wait, an invoke, a
``send_event``, a retry, the run's end, a worker handing the run back) always commits the
buffer first; a lost lease loses it (the run's next owner runs those steps again).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from .durations import Duration, parse_duration
from .errors import ConfigurationError

MAX_BUFFERED_STEPS = 1000  # as many as a run may ask for by default (Engine(max_steps=...))
MAX_INTERVAL = timedelta(hours=1)


@dataclass(frozen=True)
class Checkpointing:
    """How a function's completed steps are committed.

    Args:
        buffered_steps: completed steps kept in memory before they are committed together
            (1-1000; 1: each step is committed before the next one starts, as without this
            option).
        max_interval: the longest a completed step stays in memory (``"1s"``, ``"250ms"``,
            ``timedelta``, seconds; more than 0, at most one hour): a step that runs long does
            not hold the results before it uncommitted.
        synchronous_commit: ``False`` commits the function's steps, suspensions and run ends
            without waiting for PostgreSQL to flush them to disk (its ``synchronous_commit =
            off``, for those transactions only). A crash of the database server (not of a
            worker) may then lose the last few hundred milliseconds of them: those steps run
            again, as after a worker's crash. Use it with ``buffered_steps=1`` to keep one
            commit per step, each cheaper.

    A full buffer (of 2 or more) is committed beside the steps that follow, one such commit at
    a time. A crash (a worker killed, its lease lost) loses the steps not yet committed (at
    most ``2 * buffered_steps - 1``): the run's next execution runs them again, with the same
    idempotency keys.
    """

    buffered_steps: int = 10
    max_interval: Duration = "1s"
    synchronous_commit: bool = True
    interval: timedelta = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.synchronous_commit, bool):
            raise ConfigurationError(
                "Checkpointing: synchronous_commit must be True or False, "
                f"got {self.synchronous_commit!r}"
            )
        steps = self.buffered_steps
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise ConfigurationError(
                f"Checkpointing: buffered_steps must be an integer, got {steps!r}"
            )
        if not 1 <= steps <= MAX_BUFFERED_STEPS:
            raise ConfigurationError(
                f"Checkpointing: buffered_steps must be between 1 and {MAX_BUFFERED_STEPS}, "
                f"got {steps}"
            )
        try:
            interval = parse_duration(self.max_interval, what="Checkpointing: max_interval")
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        if not timedelta(0) < interval <= MAX_INTERVAL:
            raise ConfigurationError(
                f"Checkpointing: max_interval must be more than 0 and at most 1h, "
                f"got {self.max_interval!r}"
            )
        object.__setattr__(self, "interval", interval)

    def to_json(self) -> dict[str, Any]:
        """The registry form (shown to operators)."""
        form: dict[str, Any] = {
            "buffered_steps": self.buffered_steps,
            "max_interval": self.interval.total_seconds(),
        }
        if not self.synchronous_commit:
            form["synchronous_commit"] = False
        return form


def commits_synchronously(value: Checkpointing | None) -> bool:
    """Whether a function's writes wait for their WAL flush (the default)."""
    return value is None or value.synchronous_commit


def check_checkpointing(value: Checkpointing | None, fn_id: str) -> Checkpointing | None:
    """Validates the ``checkpointing=`` option of ``create_function``."""
    if value is not None and not isinstance(value, Checkpointing):
        raise ConfigurationError(f"function {fn_id!r}: checkpointing= expects Checkpointing(...)")
    return value
