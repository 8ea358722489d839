"""Chaos 4: a worker paused (SIGSTOP) past its lease, then resumed: another worker takes its
runs over, and the paused one's late writes are refused; every run ends exactly once."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

from chaos.workload import Recovery, Workers, check, prepare, runs_to_send, send_runs, under_way

OPTIONS = ("--lease", "1s", "--concurrency", "20")


async def test_a_paused_worker_cannot_overwrite_the_runs_taken_over(
    database_url: str, sql: Any, tmp_path: Path
) -> None:
    runs = runs_to_send(200, 2000)
    await prepare(sql)
    workers = Workers(database_url, tmp_path, 2, *OPTIONS)
    recovery = Recovery(database_url)
    pauses, began = 0, time.monotonic()
    try:
        await workers.all_started()  # both workers are up before the work arrives
        await send_runs(database_url, runs)
        while await under_way(sql, began):
            await asyncio.sleep(0.3)
            victim = pauses % 2
            workers.processes[victim].send_signal(signal.SIGSTOP)
            await recovery.fault(sql, owner=workers.owner(victim))
            await asyncio.sleep(2.5)  # past the 1 s lease: the other worker takes over
            workers.processes[victim].send_signal(signal.SIGCONT)
            pauses += 1
        await recovery.wait()
    finally:
        for worker in workers.processes:
            worker.send_signal(signal.SIGCONT)
        workers.stop()
    refused = workers.late_writes_refused()
    label = (
        f"chaos pause: {runs} runs, {pauses} SIGSTOPs of 2.5 s in {time.monotonic() - began:.0f} s,"
        f" {refused} late writes refused; {recovery.summary()}"
    )
    await check(sql, runs, label)
