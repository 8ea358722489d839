"""Keyset cursors: where a page of a listing ended, as an opaque string to pass back.

A listing newest first continues strictly before the last row it returned, compared on the
listing's sort key (a run's ``(created_at, id)``, an event's ``seq``): unlike an offset, a page
stays right while new rows arrive, and reading it costs the same however deep it is. The string
is URL-safe base64 of ``kind|part|...``, so that a cursor of runs is refused for events.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from uuid import UUID


def encode(kind: str, *parts: str) -> str:
    """The cursor of a page of ``kind`` that ended at ``parts``."""
    text = "|".join((kind, *parts))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode(kind: str, cursor: str, count: int) -> list[str]:
    """The ``count`` parts of a cursor of ``kind``.

    Raises:
        ValueError: the string is no cursor of ``kind``.
    """
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        text = base64.urlsafe_b64decode(padded.encode("ascii")).decode()
    except (binascii.Error, UnicodeError, ValueError):
        text = ""
    found, *parts = text.split("|")
    if found != kind or len(parts) != count:
        raise ValueError(f"{cursor!r} is not a cursor of a listing of {kind}")
    return parts


def run_cursor(created_at: datetime, run_id: str) -> str:
    """The cursor after a run of a listing of runs."""
    return encode("runs", created_at.isoformat(), run_id)


def parse_run_cursor(cursor: str) -> tuple[datetime, UUID]:
    """``(created_at, id)`` of the last run of the previous page.

    Raises:
        ValueError: not a cursor of runs.
    """
    created, run_id = decode("runs", cursor, 2)
    try:
        return datetime.fromisoformat(created), UUID(run_id)
    except ValueError:
        raise ValueError(f"{cursor!r} is not a cursor of a listing of runs") from None


def event_cursor(seq: int) -> str:
    """The cursor after an event of a listing of events."""
    return encode("events", str(seq))


def parse_event_cursor(cursor: str) -> int:
    """The ``seq`` of the last event of the previous page.

    Raises:
        ValueError: not a cursor of events.
    """
    [seq] = decode("events", cursor, 1)
    if not seq.isdigit():
        raise ValueError(f"{cursor!r} is not a cursor of a listing of events")
    return int(seq)
