"""Chaos 7: workers whose database role allows fewer connections than their pools want.

Three worker processes (pool size 10 each, concurrency 20) log in as a role with CONNECTION
LIMIT 12: connections are refused with SQLSTATE 53300 (too many connections) all along. That
is infrastructure, never the function's failure: every run completes, none FAILED.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from chaos.workload import Workers, check, prepare, runs_to_send, send_runs, under_way

ROLES_SQL = Path(__file__).parent.parent.parent / "ops" / "roles.sql"
OPTIONS = ("--lease", "2s", "--concurrency", "20")


def as_user(url: str, user: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{user}@{parts.netloc.rpartition('@')[2]}"))


async def test_refused_connections_fail_no_run(database_url: str, sql: Any, tmp_path: Path) -> None:
    runs = runs_to_send(200, 2000)
    await prepare(sql)
    await sql.execute(ROLES_SQL.read_text())
    user = f"chaos_limited_{os.getpid()}"
    await sql.execute(f"DROP ROLE IF EXISTS {user}")
    await sql.execute(f"CREATE ROLE {user} LOGIN CONNECTION LIMIT 12 IN ROLE engine_worker")
    env = {"CHAOS_EFFECT_URL": database_url}  # the steps' own side effects are not limited
    began = time.monotonic()
    workers = Workers(as_user(database_url, user), tmp_path, 3, *OPTIONS, env=env)
    try:
        await workers.all_started()
        await send_runs(database_url, runs)
        while await under_way(sql, began):  # noqa: ASYNC110 - polls the database
            await asyncio.sleep(0.3)
    finally:
        workers.stop()
        await sql.execute(f"DROP OWNED BY {user}")
        await sql.execute(f"DROP ROLE IF EXISTS {user}")
    refused = sum(
        "too many connections" in str(entry.get("error", ""))
        for name in ("worker.tick_failed", "run.write_cut_off", "worker.heartbeat_failed")
        for entry in workers.events(name)
    )
    label = (
        f"chaos connection limit: {runs} runs, 3 workers (pool 10 each) under CONNECTION LIMIT"
        f" 12, {refused} refusals logged, in {time.monotonic() - began:.0f} s"
    )
    assert refused > 0  # the limit did bite
    await check(sql, runs, label)
