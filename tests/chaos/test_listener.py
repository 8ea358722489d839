"""Chaos 3: the LISTEN connection killed under a running worker.

The worker reconnects by itself and wake-ups resume: with a 5 s poll, an event sent after the
kill starts long before the next poll could have found it (the run would not be lost either
way: the poll is the safety net).
"""

from __future__ import annotations

import time
from typing import Any

from helpers import eventually
from structlog.testing import capture_logs

from engine import Context, Event, TriggerEvent


async def listeners(sql: Any) -> list[int]:
    rows = await sql.fetch(
        "SELECT pid FROM pg_stat_activity"
        " WHERE datname = current_database() AND query LIKE 'LISTEN%'"
    )
    return [row["pid"] for row in rows]


async def test_wake_ups_resume_after_the_listen_connection_is_killed(
    make_engine: Any, sql: Any
) -> None:
    app = make_engine()
    started: dict[int, float] = {}

    @app.create_function("ping", trigger=TriggerEvent("chaos/ping"))
    async def ping(ctx: Context) -> None:
        started.setdefault(ctx.event.data["n"], time.monotonic())

    async def roundtrip(n: int) -> float:
        sent = time.monotonic()
        await app.send(Event(name="chaos/ping", data={"n": n}))
        await eventually(lambda: _started(started, n), timeout=15)
        return started[n] - sent

    reconnects, latencies = [], []
    with capture_logs() as logs:
        await _kill_listener_three_times(app, sql, roundtrip, reconnects, latencies)
    # Each disconnect is a fresh failure: retried at once, not after the previous ones' backoff.
    retries = [line["retry_in"] for line in logs if line["event"] == "listener.disconnected"]
    assert retries == [0.1, 0.1, 0.1], retries
    print(
        f"\nchaos listener: 3 kills; listening again after {_seconds(reconnects)};"
        f" the next event started after {_seconds(latencies)}"
    )


async def _kill_listener_three_times(
    app: Any, sql: Any, roundtrip: Any, reconnects: list[float], latencies: list[float]
) -> None:
    async with app.worker(poll_interval="5s"):
        await eventually(lambda: listeners(sql))
        assert await roundtrip(0) < 2.5  # woken by NOTIFY, not by the 5 s poll
        for n in range(1, 4):
            [old] = await listeners(sql)
            killed = time.monotonic()
            await sql.execute("SELECT pg_terminate_backend($1)", old)
            await eventually(lambda old=old: _replaced(sql, old), timeout=15)
            reconnects.append(time.monotonic() - killed)
            latencies.append(await roundtrip(n))
            assert latencies[-1] < 2.5  # LISTENing again by itself


def _seconds(values: list[float]) -> str:
    return ", ".join(f"{value * 1000:.0f} ms" for value in values)


async def _started(started: dict[int, float], n: int) -> bool:
    return n in started


async def _replaced(sql: Any, old: int) -> bool:
    now = await listeners(sql)
    return bool(now) and old not in now
