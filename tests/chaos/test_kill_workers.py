"""Chaos 1: worker processes killed with SIGKILL at random moments, and restarted.

Short by default (CI); `CHAOS_LONG=1 python -m pytest -q -s tests/chaos` soaks longer. Prints the
figures that docs/reliability.md reports.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from pathlib import Path
from typing import Any

from helpers import max_overlap

from chaos.workload import Recovery, Workers, check, prepare, runs_to_send, send_runs, under_way

WORKERS = 3
LIMIT = 4  # the concurrency limit of `limited` in tests/apps/chaos_app.py
OPTIONS = ("--lease", "2s", "--concurrency", "20")


async def test_no_run_is_lost_when_workers_are_killed(
    database_url: str, sql: Any, tmp_path: Path
) -> None:
    runs = runs_to_send(200, 3000)
    await prepare(sql)
    workers = Workers(database_url, tmp_path, WORKERS, *OPTIONS)
    recovery = Recovery(database_url)
    kills, began = 0, time.monotonic()
    try:
        await send_runs(database_url, runs)
        while await under_way(sql, began):
            await asyncio.sleep(random.uniform(0.2, 0.8))
            victim = random.randrange(WORKERS)
            owner = workers.owner(victim)
            workers.processes[victim].send_signal(signal.SIGKILL)
            workers.processes[victim].wait()
            if owner is not None:
                await recovery.fault(sql, owner=owner)
            kills += 1
            workers.restart(victim)
            await workers.running(victim)
        await recovery.wait()
    finally:
        workers.stop()
    label = f"chaos kill: {runs} runs, {kills} SIGKILLs in {time.monotonic() - began:.0f} s"
    await check(sql, runs, f"{label}; {recovery.summary()}")


async def test_concurrency_permits_survive_killed_workers(
    database_url: str, sql: Any, tmp_path: Path
) -> None:
    """Workers killed while their runs hold concurrency permits: a dead worker's permits move
    with its runs when their leases expire, the limit holds throughout (checked on the
    intervals the steps logged), and every permit is back at the end."""
    runs = runs_to_send(100, 1000)
    await prepare(sql)
    workers = Workers(database_url, tmp_path, WORKERS, *OPTIONS)
    kills, began = 0, time.monotonic()
    try:
        await send_runs(database_url, runs, "chaos/limited")
        while await under_way(sql, began):
            await asyncio.sleep(random.uniform(0.2, 0.8))
            victim = random.randrange(WORKERS)
            workers.processes[victim].send_signal(signal.SIGKILL)
            workers.processes[victim].wait()
            kills += 1
            workers.restart(victim)
            await workers.running(victim)
    finally:
        workers.stop()
    statuses = dict(await sql.fetch("SELECT status, count(*) FROM engine.runs GROUP BY 1"))
    spans = await sql.fetch("SELECT run_id, step, started, ended FROM chaos_spans")
    peak = max_overlap([(row["started"], row["ended"]) for row in spans])
    print(
        f"\nchaos kill, limited: {runs} runs, {kills} SIGKILLs in"
        f" {time.monotonic() - began:.0f} s; statuses {statuses}; at most {peak} steps at once"
        f" (limit {LIMIT}); {len(spans)} step executions for {2 * runs} steps"
    )
    assert statuses == {"COMPLETED": runs}
    assert len({(row["run_id"], row["step"]) for row in spans}) == 2 * runs
    assert peak <= LIMIT
    assert await sql.fetchval("SELECT sum(in_use) FROM engine.concurrency_slots") == 0
