"""Durations as users write them: ``"30s"``, ``"1h30m"``, ``"500ms"``, ``timedelta``, seconds."""

from __future__ import annotations

import math
import re
from datetime import timedelta

Duration = str | timedelta | int | float

_UNITS = {
    "ms": timedelta(milliseconds=1),
    "s": timedelta(seconds=1),
    "m": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "d": timedelta(days=1),
    "w": timedelta(weeks=1),
}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")


def parse_duration(value: Duration, *, what: str = "duration") -> timedelta:
    """Turns a duration into a ``timedelta``.

    Args:
        value: ``"30s"``, ``"1h30m"``, ``"2d"``, ``"250ms"`` (units ms, s, m, h, d, w), a
            ``timedelta``, or a number of seconds.
        what: names the option in error messages.

    Raises:
        ValueError: the value is not a duration or is negative.
    """
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected a duration, got {value!r}")
    try:
        result = _to_timedelta(value, what)
    except OverflowError:
        raise ValueError(f"{what}: {value!r} is too long (the limit is 999,999,999 days)") from None
    if result < timedelta(0):
        raise ValueError(f"{what}: {value!r} is negative")
    return result


def _to_timedelta(value: Duration, what: str) -> timedelta:
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"{what}: {value!r} is not a number of seconds")
        return timedelta(seconds=value)
    if isinstance(value, str):
        return _parse_text(value.strip().lower(), what)
    raise ValueError(f"{what}: expected a duration, got {type(value).__name__}")


def _parse_text(text: str, what: str) -> timedelta:
    parts = _PART.findall(text)
    if not text or "".join(n + u for n, u in parts) != text:
        raise ValueError(
            f"{what}: {text!r} is not a duration; write it like '30s', '1h30m', '2d' or '250ms'"
        )
    return sum((float(number) * _UNITS[unit] for number, unit in parts), timedelta())
