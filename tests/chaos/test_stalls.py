"""Chaos 5b: stop-the-world pauses inside a worker, like long garbage collections.

A signal handler in the workload's module blocks the worker's main thread, so its event loop
(steps, heartbeats, writes) stands still. A pause shorter than the lease costs latency and
nothing else: no lease is lost, no write refused. A pause longer than the lease lets the other
worker take the runs over; the stalled worker's late writes are refused when it wakes up.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from chaos.workload import Recovery, Workers, check, prepare, runs_to_send, send_runs, under_way


@pytest.mark.parametrize(
    ("stall", "lease"), [(0.4, "2s"), (2.5, "1s")], ids=["shorter than the lease", "longer"]
)
async def test_stalled_event_loops_lose_nothing(
    database_url: str, sql: Any, tmp_path: Path, stall: float, lease: str
) -> None:
    runs = runs_to_send(200, 2000)
    await prepare(sql)
    env = {"CHAOS_STALL_SECONDS": str(stall)}
    workers = Workers(database_url, tmp_path, 2, "--lease", lease, "--concurrency", "20", env=env)
    recovery = Recovery(database_url)
    stalls, began = 0, time.monotonic()
    try:
        await workers.all_started()  # both are up, with their handlers installed
        await send_runs(database_url, runs)
        while await under_way(sql, began):
            victim = stalls % 2
            await holding_runs(sql, workers.owner(victim))
            workers.processes[victim].send_signal(signal.SIGUSR1)
            await recovery.fault(sql, owner=workers.owner(victim))
            stalls += 1
            await asyncio.sleep(stall + random.uniform(0.1, 0.5))
        await recovery.wait()
    finally:
        workers.stop()
    refused = workers.late_writes_refused()
    label = (
        f"chaos stall: {runs} runs, {stalls} stalls of {stall} s (lease {lease})"
        f" in {time.monotonic() - began:.0f} s, {refused} late writes refused; {recovery.summary()}"
    )
    await check(sql, runs, label)
    if stall < 1:
        assert refused == 0  # a pause shorter than the lease costs no lease
    else:
        assert refused > 0  # the runs were taken over, and the late writes refused


async def holding_runs(sql: Any, owner: str | None, patience: float = 2.0) -> None:
    """Waits (a little) until worker ``owner`` executes some runs, for the stall to hit them."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline and not await sql.fetchval(  # noqa: ASYNC110
        "SELECT count(*) FROM engine.runs WHERE status = 'RUNNING' AND lease_owner = $1", owner
    ):
        await asyncio.sleep(0.02)
