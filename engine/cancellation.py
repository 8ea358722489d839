"""Ending runs early: cancel on an event (``cancel=[Cancel(...)]``) and ``timeouts=``."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from .durations import Duration, parse_duration
from .errors import ConfigurationError
from .flow import one_or_many
from .matching import EventMatcher

MAX_CANCELS = 5


@dataclass(frozen=True)
class Cancel:
    """Cancels a run when a matching event arrives (between steps; at once if it is suspended).

    Args:
        event: the event name, e.g. ``"order/cancelled"``.
        if_exp: CEL in which ``event`` is the run's triggering event and ``async`` the new one,
            e.g. ``"event.data.order_id == async.data.order_id"``.
        match: shorthand for that equality: ``match="data.order_id"``.
        timeout: how long after the triggering event the cancel stays armed (default: forever).
    """

    event: str
    if_exp: str | None = None
    match: str | None = None
    timeout: Duration | None = None
    matcher: EventMatcher = field(init=False, repr=False, compare=False)
    window: timedelta | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        what = f"Cancel(event={self.event!r})"
        object.__setattr__(
            self, "matcher", EventMatcher(self.event, self.match, self.if_exp, what=what)
        )
        window = None if self.timeout is None else _duration(self.timeout, f"{what} timeout")
        object.__setattr__(self, "window", window)

    def to_json(self) -> dict[str, Any]:
        """The registry form (shown to operators)."""
        return {"event": self.event, "if_exp": self.if_exp, "match": self.match}


@dataclass(frozen=True)
class Timeouts:
    """Cancels runs that take too long.

    Args:
        start: the longest a run may wait from its trigger to its first start.
        finish: the longest a run may take from its first start to its end (sleeps and waits
            included).
    """

    start: Duration | None = None
    finish: Duration | None = None

    def to_json(self) -> dict[str, str]:
        """The registry form: PostgreSQL intervals, read by the SQL that creates runs."""
        result = {}
        for name in ("start", "finish"):
            value = getattr(self, name)
            if value is not None:
                delay = _duration(value, f"timeouts.{name}")
                if delay <= timedelta(0):
                    raise ConfigurationError(f"timeouts.{name} must be positive, got {value!r}")
                result[name] = f"{delay.total_seconds()} seconds"
        return result


def _duration(value: Duration, what: str) -> timedelta:
    try:
        return parse_duration(value, what=what)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None


def check_cancels(cancel: Cancel | list[Cancel] | None, fn_id: str) -> tuple[Cancel, ...]:
    """Validates the ``cancel=`` option of ``create_function``."""
    return one_or_many(cancel, Cancel, option="cancel", limit=MAX_CANCELS, fn_id=fn_id)
