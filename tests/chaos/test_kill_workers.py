"""Chaos 1: worker processes killed with SIGKILL at random moments, and restarted.

Short by default (CI); `CHAOS_LONG=1 python -m pytest -q -s tests/chaos` soaks longer. Prints the
figures that docs/reliability.md reports.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from typing import Any

from helpers import start_worker_process

from chaos.workload import LONG, check, prepare, runs_to_send, stop, unfinished
from engine import Engine, Event

WORKERS = 3
OPTIONS = ("--lease", "2s", "--concurrency", "20")


async def test_no_run_is_lost_when_workers_are_killed(database_url: str, sql: Any) -> None:
    runs = runs_to_send(200, 3000)
    await prepare(sql)
    workers = [
        start_worker_process("chaos_app:app", database_url, *OPTIONS) for _ in range(WORKERS)
    ]
    sender = Engine("chaos", database_url)
    kills, began = 0, time.monotonic()
    try:
        for offset in range(0, runs, 500):
            await sender.send([Event(name="chaos/go") for _ in range(min(500, runs - offset))])
        while await unfinished(sql) and time.monotonic() - began < (900 if LONG else 150):
            await asyncio.sleep(random.uniform(0.2, 0.8))
            victim = random.randrange(WORKERS)
            workers[victim].send_signal(signal.SIGKILL)
            workers[victim].wait()
            kills += 1
            workers[victim] = start_worker_process("chaos_app:app", database_url, *OPTIONS)
    finally:
        stop(workers)
        await sender.close()
    label = f"chaos kill: {runs} runs, {kills} SIGKILLs in {time.monotonic() - began:.0f} s"
    await check(sql, runs, label)
