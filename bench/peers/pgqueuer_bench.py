"""PgQueuer on the same server: enqueue-to-start latency and no-op jobs/s.

python bench/peers/pgqueuer_bench.py URL [--events 300] [--jobs 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import timedelta
from typing import Any

import asyncpg
from pgqueuer import PgQueuer, Queries


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(url: str, events: int, jobs: int) -> dict[str, Any]:
    setup = await asyncpg.connect(url)
    queries = Queries.from_asyncpg_connection(setup)
    if not await queries.schema_is_installed():
        await queries.install()
    worker_conn = await asyncpg.connect(url)
    pgq = PgQueuer.from_asyncpg_connection(worker_conn)
    started: dict[bytes, float] = {}
    done = asyncio.Event()
    target = {"count": 0}

    @pgq.entrypoint("bench")
    async def job(item: Any) -> None:
        started[item.payload] = time.perf_counter()
        if len(started) >= target["count"]:
            done.set()

    worker = asyncio.create_task(pgq.run(batch_size=10, dequeue_timeout=timedelta(seconds=1)))
    await asyncio.sleep(1.0)
    samples = []
    for i in range(events):
        key = f"l{i}".encode()
        target["count"] = len(started) + 1
        done.clear()
        sent = time.perf_counter()  # from the call, as every latency here
        await queries.enqueue("bench", key)
        await done.wait()
        samples.append((started[key] - sent) * 1000)
    target["count"] = len(started) + jobs
    done.clear()
    begin = time.perf_counter()
    for offset in range(0, jobs, 1000):
        batch = min(1000, jobs - offset)
        payloads: list[bytes | None] = [f"t{offset + n}".encode() for n in range(batch)]
        await queries.enqueue(["bench"] * batch, payloads, [0] * batch)
    await done.wait()
    elapsed = time.perf_counter() - begin
    pgq.shutdown.set()
    await asyncio.wait_for(worker, 30)
    await worker_conn.close()
    await setup.close()
    return {
        "latency_p50_ms": percentile(samples, 0.5),
        "latency_p99_ms": percentile(samples, 0.99),
        "jobs_per_s": jobs / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--jobs", type=int, default=10000)
    args = parser.parse_args()
    json.dump(asyncio.run(run(args.url, args.events, args.jobs)), sys.stdout)
    print()


if __name__ == "__main__":
    main()
