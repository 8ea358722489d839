"""Chaos 5: the clock jumps while workers run.

Durable time (`engine.now()`) leaps an hour forward, which expires every lease at once (each
worker then looks dead to the others, and runs are taken over while their first holder is still
executing them), and steps back a little, as a corrected system clock does. The fenced writes
keep every run to one outcome and every step to one record.
"""

from __future__ import annotations

import asyncio
import random
import time
from datetime import timedelta
from typing import Any

from helpers import start_worker_process

from chaos.workload import LONG, check, prepare, runs_to_send, stop, unfinished
from engine import Engine, Event

OPTIONS = ("--lease", "2s", "--concurrency", "20")


async def test_clock_jumps_do_not_break_runs(database_url: str, sql: Any) -> None:
    runs = runs_to_send(200, 2000)
    await prepare(sql)
    workers = [start_worker_process("chaos_app:app", database_url, *OPTIONS) for _ in range(3)]
    sender = Engine("chaos", database_url)
    jumps, began = 0, time.monotonic()
    try:
        await asyncio.sleep(1.0)
        await sender.send([Event(name="chaos/go") for _ in range(runs)])
        while await unfinished(sql) and time.monotonic() - began < (600 if LONG else 150):
            await asyncio.sleep(random.uniform(0.2, 0.6))
            step = timedelta(hours=1) if jumps % 3 != 2 else timedelta(seconds=-10)
            await sql.execute("UPDATE engine.clock SET offset_by = offset_by + $1", step)
            jumps += 1
    finally:
        stop(workers)
        await sender.close()
    elapsed = time.monotonic() - began
    await check(sql, runs, f"chaos clock: {runs} runs, {jumps} clock jumps in {elapsed:.0f} s")
