"""A worker never fights itself over a run, a blocked event loop or a hung step is bounded, and
shutdown always ends (#11)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections import Counter
from datetime import timedelta
from typing import Any

import asyncpg
from helpers import APPS, eventually, move_clock, only_run_id

from engine import Context, Event, RunStatus, TriggerEvent


async def _lease_renewed(sql: Any, run_id: str) -> bool:
    """True once the run's lease runs past the durable clock again (renewed or re-claimed)."""
    return bool(
        await sql.fetchval(
            "SELECT lease_expires_at > engine.now() FROM engine.runs WHERE id = $1::uuid", run_id
        )
    )


async def test_a_worker_never_takes_over_its_own_executing_run(make_engine: Any, sql: Any) -> None:
    """The durable clock jumps past the lease of a run whose step is executing (a missed
    heartbeat looks the same): the worker's own claim must not take the run over from itself,
    and its heartbeat renews it; the step runs once and the run completes."""
    app = make_engine()
    gate = asyncio.Event()
    passes: Counter[str] = Counter()

    async def held() -> int:
        passes["held"] += 1
        await gate.wait()
        return 1

    @app.create_function("own", trigger=TriggerEvent("o/go"))
    async def own(ctx: Context) -> Any:
        await ctx.step.run("held", held)
        return await ctx.step.run("after", lambda: 2)

    async with app.worker(lease="900ms", poll_interval="20ms"):
        [event_id] = await app.send(Event(name="o/go"))
        run_id = await only_run_id(app, event_id)

        async def started() -> bool:
            return passes["held"] == 1

        await eventually(started)
        token = await sql.fetchval("SELECT lease_token FROM engine.runs WHERE id = $1", run_id)
        await move_clock(sql, timedelta(minutes=5))  # every lease has expired now
        await eventually(lambda: _lease_renewed(sql, run_id))
        gate.set()
        run = await app.wait_for_run(run_id)
    assert run.status is RunStatus.COMPLETED
    assert passes == {"held": 1}
    assert await sql.fetchval("SELECT lease_token FROM engine.runs WHERE id = $1", run_id) == token


def _worker_command(database_url: str) -> subprocess.CompletedProcess[str]:
    """`engine worker` as a supervisor starts it; it must end by itself, and soon."""
    return subprocess.run(
        [sys.executable, "-m", "engine", "worker", "graceful:app"],
        env={**os.environ, "DATABASE_URL": database_url, "PYTHONPATH": str(APPS)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_a_worker_without_the_schema_says_so_at_once(server_url: str) -> None:
    from conftest import with_database

    name = f"engine_no_schema_{os.getpid()}"
    admin = await asyncpg.connect(server_url)
    await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        result = await asyncio.to_thread(_worker_command, with_database(server_url, name))
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()
    assert result.returncode != 0
    assert "engine migrate" in result.stderr


async def test_a_worker_whose_database_refuses_connections_exits_at_once() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = await asyncio.to_thread(_worker_command, f"postgresql://u@127.0.0.1:{port}/db")
    assert result.returncode != 0
    assert "refused" in result.stderr.lower() or "connect" in result.stderr.lower()
