"""Chaos 1: worker processes killed with SIGKILL at random moments, and restarted.

Short by default (CI); `CHAOS_LONG=1 python -m pytest -q tests/chaos` soaks longer. Prints the
figures that docs/reliability.md reports.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from typing import Any

from helpers import start_worker_process

from engine import Engine, Event

LONG = os.environ.get("CHAOS_LONG") == "1"
RUNS = int(os.environ.get("CHAOS_RUNS", "3000" if LONG else "200"))
WORKERS = 3


async def test_no_run_is_lost_when_workers_are_killed(database_url: str, sql: Any) -> None:
    await sql.execute("CREATE TABLE chaos_log (run_id text, step text)")
    await sql.execute("CREATE TABLE chaos_once (key text PRIMARY KEY)")
    options = ("--lease", "2s", "--concurrency", "20")
    workers = [
        start_worker_process("chaos_app:app", database_url, *options) for _ in range(WORKERS)
    ]
    sender = Engine("chaos", database_url)
    kills, began = 0, time.monotonic()
    try:
        for offset in range(0, RUNS, 500):
            await sender.send([Event(name="chaos/go") for _ in range(min(500, RUNS - offset))])
        while await _unfinished(sql) and time.monotonic() - began < (900 if LONG else 150):
            await asyncio.sleep(random.uniform(0.2, 0.8))
            victim = random.randrange(WORKERS)
            workers[victim].send_signal(signal.SIGKILL)
            workers[victim].wait()
            kills += 1
            workers[victim] = start_worker_process("chaos_app:app", database_url, *options)
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(timeout=30)
        await sender.close()
    elapsed = time.monotonic() - began
    statuses = dict(await sql.fetch("SELECT status, count(*) FROM engine.runs GROUP BY 1"))
    effects = await sql.fetchval("SELECT count(*) FROM chaos_log")
    distinct = await sql.fetchval("SELECT count(DISTINCT (run_id, step)) FROM chaos_log")
    once = await sql.fetchval("SELECT count(*) FROM chaos_once")
    steps = await sql.fetch(
        "SELECT r.id, count(s.*) AS n FROM engine.runs r LEFT JOIN engine.steps s"
        " ON s.run_id = r.id AND s.status = 'COMPLETED' GROUP BY r.id"
    )
    print(
        f"\nchaos kill: {RUNS} runs, {kills} SIGKILLs in {elapsed:.0f} s; statuses {statuses};"
        f" side effects {effects} for {distinct} step executions needed"
        f" ({effects - distinct} repeated: at least once), {once} keyed (exactly once)"
    )
    assert statuses == {"COMPLETED": RUNS}, statuses  # no run lost, none failed
    assert all(row["n"] == 4 for row in steps)  # 3 effects + the nap, each recorded once
    assert distinct == 3 * RUNS  # every side effect happened at least once
    assert once == 3 * RUNS  # and exactly once where the step's idempotency key was used
    outputs = await sql.fetchval(
        "SELECT count(*) FROM engine.runs WHERE output::text <> '\"done\"'"
    )
    assert outputs == 0


async def _unfinished(sql: Any) -> bool:
    return bool(
        await sql.fetchval(
            "SELECT count(*) FROM engine.runs WHERE status NOT IN ('COMPLETED', 'FAILED')"
        )
        or await sql.fetchval("SELECT count(*) FROM engine.event_queue")
        or not await sql.fetchval("SELECT count(*) FROM engine.runs")
    )
