"""Time travel for tests and demos: move durable time instead of waiting for it.

Durable time is ``engine.now()``: the database's clock plus an offset kept in ``engine.clock``
(zero in production). Moving it forward makes sleeps, waits, timeouts, retry backoffs and cron
schedules come due at once, in every worker on the database. Never use it in production.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta

from .app import Engine
from .durations import Duration, parse_duration


async def advance_clock(
    app: Engine, by: Duration | None = None, *, to: datetime | None = None
) -> datetime:
    """Moves durable time forward ``by`` a duration, or ``to`` a time (never backwards).

    Returns the new durable time; the workers are woken to look for what came due. Leases
    move along (they measure real time), so runs executing meanwhile keep their worker.
    """
    delta = timedelta(0) if by is None else parse_duration(by, what="advance_clock")
    db = await app.database()
    now: datetime = await db.fetchval("advance_clock", delta, to)
    return now


@asynccontextmanager
async def clock_preserved(app: Engine) -> AsyncIterator[None]:
    """Puts durable time back where it was when the block ends (even if the block moved it
    forward with :func:`advance_clock` or failed): a demo leaves the database's clock as it
    found it. Anything that came due meanwhile stays done."""
    db = await app.database()
    offset: timedelta = await db.fetchval("clock_offset")
    try:
        yield
    finally:
        db = await app.database()
        await db.fetchval("restore_clock_offset", offset)
