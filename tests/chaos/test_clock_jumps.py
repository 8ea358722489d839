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
from pathlib import Path
from typing import Any

from chaos.workload import Recovery, Workers, check, prepare, runs_to_send, send_runs, under_way

OPTIONS = ("--lease", "2s", "--concurrency", "20")


async def test_clock_jumps_do_not_break_runs(database_url: str, sql: Any, tmp_path: Path) -> None:
    runs = runs_to_send(200, 2000)
    await prepare(sql)
    workers = Workers(database_url, tmp_path, 3, *OPTIONS)
    recovery = Recovery(database_url)
    jumps, began = 0, time.monotonic()
    try:
        await asyncio.sleep(1.0)
        await send_runs(database_url, runs)
        while await under_way(sql, began):
            await asyncio.sleep(random.uniform(0.2, 0.6))
            step = timedelta(hours=1) if jumps % 3 != 2 else timedelta(seconds=-10)
            await sql.execute("UPDATE engine.clock SET offset_by = offset_by + $1", step)
            await recovery.fault(sql)
            jumps += 1
        await recovery.wait()
    finally:
        workers.stop()
    elapsed = time.monotonic() - began
    refused = workers.late_writes_refused()
    label = f"chaos clock: {runs} runs, {jumps} clock jumps in {elapsed:.0f} s, {refused} refused"
    await check(sql, runs, f"{label}; {recovery.summary()}")
