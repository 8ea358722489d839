"""procrastinate on the same server: defer-to-start latency and no-op jobs/s.

python bench/peers/procrastinate_bench.py URL [--events 300] [--jobs 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from typing import Any

import procrastinate


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(url: str, events: int, jobs: int) -> dict[str, Any]:
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))
    started: dict[str, float] = {}
    done = asyncio.Event()
    target = {"count": 0}

    @app.task(queue="bench", name="bench_job")
    async def job(key: str) -> None:
        started[key] = time.perf_counter()
        if len(started) >= target["count"]:
            done.set()

    async with app.open_async():
        with contextlib.suppress(Exception):  # already applied by an earlier repeat
            await app.schema_manager.apply_schema_async()
        worker = asyncio.create_task(
            app.run_worker_async(
                queues=["bench"],
                concurrency=10,
                install_signal_handlers=False,
                fetch_job_polling_interval=0.1,  # its NOTIFY path, with a short safety poll
            )
        )
        await asyncio.sleep(1.0)
        samples = []
        for i in range(events):
            key = f"l{i}"
            target["count"] = len(started) + 1
            done.clear()
            sent = time.perf_counter()  # from the call, as every latency here
            await job.defer_async(key=key)
            await done.wait()
            samples.append((started[key] - sent) * 1000)
        target["count"] = len(started) + jobs
        done.clear()
        begin = time.perf_counter()
        for offset in range(0, jobs, 500):
            keys = [{"key": f"t{n}"} for n in range(offset, min(jobs, offset + 500))]
            await job.batch_defer_async(*keys)
        await done.wait()
        elapsed = time.perf_counter() - begin
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker
    return {
        "latency_p50_ms": percentile(samples, 0.5),
        "latency_p99_ms": percentile(samples, 0.99),
        "jobs_per_s": jobs / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--jobs", type=int, default=5000)
    args = parser.parse_args()
    json.dump(asyncio.run(run(args.url, args.events, args.jobs)), sys.stdout)
    print()


if __name__ == "__main__":
    main()
