"""DBOS Transact on the same server: start-to-first-step latency (direct and through a queue),
three-step workflows/s through a queue, and per-step overhead.

    python bench/peers/dbos_bench.py URL [--events 200] [--workflows 1000] [--steps 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from dbos import DBOS


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


started: dict[str, float] = {}
finished: set[str] = set()


@DBOS.step()
async def mark(key: str) -> None:
    started.setdefault(key, time.perf_counter())


@DBOS.step()
async def nothing() -> None:
    return None


@DBOS.workflow()
async def first_step(key: str) -> None:
    await mark(key)


@DBOS.workflow()
async def three_steps(key: str) -> None:
    await nothing()
    await nothing()
    await nothing()
    finished.add(key)


@DBOS.workflow()
async def many_steps(count: int) -> None:
    for _ in range(count):
        await nothing()


async def wait_for(condition: Any) -> None:
    while not condition():  # noqa: ASYNC110 - the workflows run in this process
        await asyncio.sleep(0.001)


async def run(url: str, events: int, workflows: int, steps: int) -> dict[str, Any]:
    queue = await DBOS.retrieve_queue_async("bench")
    direct, queued = [], []
    for i in range(events):
        key = f"d{i}"
        sent = time.perf_counter()
        await DBOS.start_workflow_async(first_step, key)
        await wait_for(lambda key=key: key in started)
        direct.append((started[key] - sent) * 1000)
    for i in range(events // 4):
        key = f"q{i}"
        sent = time.perf_counter()
        await queue.enqueue_async(first_step, key)
        await wait_for(lambda key=key: key in started)
        queued.append((started[key] - sent) * 1000)
    begin = time.perf_counter()
    for i in range(workflows):
        await queue.enqueue_async(three_steps, f"t{i}")
    await wait_for(lambda: len(finished) >= workflows)
    throughput = workflows / (time.perf_counter() - begin)
    begin = time.perf_counter()
    handle = await DBOS.start_workflow_async(many_steps, steps)
    await handle.get_result()
    per_step = (time.perf_counter() - begin) * 1000 / steps
    return {
        "direct_latency_p50_ms": percentile(direct, 0.5),
        "direct_latency_p99_ms": percentile(direct, 0.99),
        "queued_latency_p50_ms": percentile(queued, 0.5),
        "three_step_workflows_per_s": throughput,
        "ms_per_step": per_step,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--workflows", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    DBOS(config={"name": "bench", "system_database_url": args.url, "log_level": "WARNING"})
    DBOS.launch()
    DBOS.register_queue("bench", worker_concurrency=50, polling_interval_sec=0.1)
    try:
        result = asyncio.run(run(args.url, args.events, args.workflows, args.steps))
    finally:
        DBOS.destroy()
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
