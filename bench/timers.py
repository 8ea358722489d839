"""Timers: how late sleeping runs wake up, and what sleeping runs cost a worker's memory.

    python bench/timers.py [--runs 2000] [--sleep 1.0] [--repeat 3] [--sleepers 10000]

- lateness: `--runs` runs each sleep until `--sleep` seconds after they first execute; the
  figure is (the code after the sleep runs) - (the time asked for), p50/p99, one worker;
- memory: the worker process's resident memory with no run, then with `--sleepers` runs
  sleeping (they hold no worker memory: their state is rows).

Durable settings on the embedded PostgreSQL; writes bench/results/timers.json.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import resource
import statistics
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).parent))

import core

from engine import Context, Engine, Event, TriggerEvent
from engine.db import Database
from engine.embedded import start
from engine.logs import configure_logging

_repeat = itertools.count()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def lateness(url: str, runs: int, sleep: float) -> dict[str, float]:
    tag = next(_repeat)
    app = Engine(f"bench-timers-{tag}", url, pool_size=20)
    late: list[float] = []

    def wake_time() -> str:
        return (datetime.now(UTC) + timedelta(seconds=sleep)).isoformat()

    @app.create_function("sleeper", trigger=TriggerEvent(f"bench/timer-{tag}"))
    async def sleeper(ctx: Context) -> None:
        # The wake-up time is taken when the run first executes (a step: replays keep it), so
        # time spent queued behind other runs is not counted as timer lateness.
        wake_at = datetime.fromisoformat(await ctx.step.run("wake-at", wake_time))
        await ctx.step.sleep_until("nap", wake_at)
        late.append((datetime.now(UTC) - wake_at).total_seconds() * 1000)

    async with app.worker(concurrency=100):
        await asyncio.sleep(0.5)
        for offset in range(0, runs, 500):
            await app.send(
                [Event(name=f"bench/timer-{tag}") for _ in range(min(500, runs - offset))]
            )
        while len(late) < runs:  # noqa: ASYNC110 - the function appends as runs wake
            await asyncio.sleep(0.05)
    await app.close()
    return {"p50_ms": percentile(late, 0.5), "p99_ms": percentile(late, 0.99), "max_ms": max(late)}


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def memory(url: str, sleepers: int) -> dict[str, float]:
    app = Engine("bench-memory", url, pool_size=20)

    @app.create_function("long-sleeper", trigger=TriggerEvent("bench/memory"))
    async def long_sleeper(ctx: Context) -> None:
        await ctx.step.run("before", lambda: None)
        await ctx.step.sleep("nap", "1h")

    conn = await asyncpg.connect(url)
    async with app.worker(concurrency=100):
        await asyncio.sleep(1.0)
        idle = rss_mb()
        for offset in range(0, sleepers, 1000):
            await app.send(
                [Event(name="bench/memory") for _ in range(min(1000, sleepers - offset))]
            )
        query = (
            "SELECT count(*) FROM engine.runs WHERE app_id = 'bench-memory' AND status = 'SLEEPING'"
        )
        while await conn.fetchval(query) < sleepers:  # noqa: ASYNC110 - polls the database
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        sleeping = rss_mb()
    await conn.close()
    await app.close()
    return {"idle_mb": idle, "with_sleepers_mb": sleeping, "sleepers": sleepers}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--sleep", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sleepers", type=int, default=10000)
    args = parser.parse_args()
    configure_logging("warning")
    url, _server = start(Path(tempfile.mkdtemp(prefix="engine-bench-")) / "pg")
    await Database(url).apply_schema()
    samples = [await lateness(url, args.runs, args.sleep) for _ in range(args.repeat)]
    figures: dict[str, Any] = {
        "lateness": {
            key: {
                "median": statistics.median(s[key] for s in samples),
                "min": min(s[key] for s in samples),
                "max": max(s[key] for s in samples),
            }
            for key in samples[0]
        }
    }
    print("lateness", json.dumps(figures["lateness"]))
    figures["memory"] = await memory(url, args.sleepers)
    print("memory", json.dumps(figures["memory"]))
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    result = {**await core.environment(url), "args": vars(args), "figures": figures}
    (out / "timers.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
