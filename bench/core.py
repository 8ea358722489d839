"""Core figures on an embedded PostgreSQL with durable settings (fsync and synchronous_commit on).

    python bench/core.py [--events 300] [--steps 1000] [--runs 2000] [--repeat 3]

Prints, for each figure, the median of the repeats with min and max, and writes them as JSON to
bench/results/core.json:

- latency: ``app.send()`` called -> first step of its function starts (events sent one at a
  time, one worker in this process), p50/p90/p99; the peers' latencies are taken the same way,
  from the call that enqueues;
- step overhead: one run of N trivial steps, time per step;
- throughput: N events each triggering a 3-step function, runs/s until all complete (one worker
  process, concurrency 50), with sync step callables (run in a thread) and with async ones;
  then the same with 1 and with 2 separate `engine worker` processes (concurrency 50 each).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import asyncpg

from engine import Checkpointing, Context, Engine, Event, TriggerEvent
from engine.db import Database
from engine.embedded import _stop_postmaster, data_directory, start
from engine.logs import configure_logging

_repeat = itertools.count()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def latency(url: str, events: int) -> dict[str, float]:
    app = Engine("bench-latency", url)
    started: dict[str, float] = {}
    arrived = asyncio.Event()

    @app.create_function("first-step", trigger=TriggerEvent("bench/latency"))
    async def first_step(ctx: Context) -> None:
        started.setdefault(ctx.event.data["i"], time.perf_counter())
        arrived.set()
        await ctx.step.run("one", lambda: None)

    samples = []
    async with app.worker(concurrency=10):
        await asyncio.sleep(0.5)
        for i in range(events):
            arrived.clear()
            # From the call: the send routes its events in its own transaction, so the time
            # from its return would leave out the work of creating the run.
            sent = time.perf_counter()
            await app.send(Event(name="bench/latency", data={"i": str(i)}))
            await arrived.wait()
            samples.append((started[str(i)] - sent) * 1000)
    await app.close()
    return {
        "p50_ms": percentile(samples, 0.5),
        "p90_ms": percentile(samples, 0.9),
        "p99_ms": percentile(samples, 0.99),
    }


async def step_overhead(url: str, steps: int, *, sync_steps: bool = True) -> dict[str, float]:
    """Sync step callables run in a thread (as a blocking call must); async ones in the loop."""
    app = Engine("bench-steps", url)
    step = (lambda: None) if sync_steps else _nothing

    @app.create_function("many-steps", trigger=TriggerEvent("bench/steps"))
    async def many_steps(ctx: Context) -> None:
        for i in range(steps):
            await ctx.step.run(f"s{i}", step)

    app.limits = type(app.limits)(max_steps=steps + 1)
    async with app.worker():
        [event_id] = await app.send(Event(name="bench/steps"))
        runs: list[Any] = []
        while not runs:
            await asyncio.sleep(0.01)
            runs = await app.runs_for_event(event_id)
        run = await app.wait_for_run(runs[0].run_id, timeout=600)
    await app.close()
    elapsed = (run.ended_at - run.started_at).total_seconds()
    return {"ms_per_step": elapsed * 1000 / steps}


async def _nothing() -> None:
    return None


class Countdown:
    """Set when the bodies of ``total`` distinct runs have returned."""

    def __init__(self, total: int) -> None:
        self.runs: set[str] = set()
        self.total = total
        self.done = asyncio.Event()

    def count(self, run_id: str) -> None:
        self.runs.add(run_id)
        if len(self.runs) >= self.total:
            self.done.set()


async def all_completed(
    conn: asyncpg.Connection, returned: Countdown, runs: int, app_id: str
) -> None:
    """Waits until ``runs`` runs of ``app_id`` are COMPLETED in the database. It reads the
    database only once every body has returned (the last ends are then a commit away): a count
    polled all along took the server's CPU from the worker being measured."""
    await returned.done.wait()
    done = "SELECT count(*) FROM engine.runs WHERE app_id = $1 AND status = 'COMPLETED'"
    while await conn.fetchval(done, app_id) < runs:  # noqa: ASYNC110 - polls the database
        await asyncio.sleep(0.005)


async def throughput(
    url: str, runs: int, *, sync_steps: bool = True, checkpointing: Checkpointing | None = None
) -> dict[str, float]:
    """Sync step callables run in a thread (as a blocking call must); async ones in the loop.
    ``checkpointing``: the function's (buffered checkpoints); by default each step is committed
    before the next starts."""
    app_id = f"bench-throughput-{next(_repeat)}"  # each repeat counts only its own runs
    app = Engine(app_id, url, pool_size=20)
    step = (lambda: None) if sync_steps else _nothing

    returned = Countdown(runs)

    @app.create_function(
        "three-steps", trigger=TriggerEvent("bench/throughput"), checkpointing=checkpointing
    )
    async def three_steps(ctx: Context) -> None:
        for name in ("a", "b", "c"):
            await ctx.step.run(name, step)
        returned.count(ctx.run_id)

    conn = await asyncpg.connect(url)
    async with app.worker(concurrency=50):
        start_at = time.perf_counter()
        for offset in range(0, runs, 1000):
            batch = min(1000, runs - offset)
            await app.send([Event(name="bench/throughput") for _ in range(batch)])
        await all_completed(conn, returned, runs, app_id)
        elapsed = time.perf_counter() - start_at
    await conn.close()
    await app.close()
    return {"runs_per_s": runs / elapsed, "steps_per_s": 3 * runs / elapsed}


PROCESSES_APP = "bench-processes"  # the app of bench/throughput_app.py


def start_workers(url: str, processes: int) -> list[subprocess.Popen[bytes]]:
    """`engine worker bench/throughput_app.py` processes, concurrency 50 each."""
    env = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": str(Path(__file__).parent)}
    command = [sys.executable, "-m", "engine", "--log-level", "warning", "worker"]
    return [
        subprocess.Popen([*command, "throughput_app:app", "--concurrency", "50"], env=env)
        for _ in range(processes)
    ]


@contextlib.asynccontextmanager
async def worker_processes(url: str, count: int) -> AsyncIterator[list[subprocess.Popen[bytes]]]:
    """``count`` worker processes (:func:`start_workers`), started and registered; stopped
    after the block."""
    started = start_workers(url, count)
    try:
        await asyncio.sleep(3.0)  # the processes start and register
        yield started
    finally:
        for worker in started:
            worker.terminate()
        for worker in started:
            worker.wait(timeout=30)


async def send_until_completed(url: str, conn: asyncpg.Connection, runs: int) -> float:
    """Sends ``runs`` events of bench/throughput_app.py's function (batches of 1,000) and waits
    until every run of its app completed; the seconds from the first send."""
    sender = Engine(PROCESSES_APP, url)
    done = "SELECT count(*) FROM engine.runs WHERE app_id = $1 AND status = 'COMPLETED'"
    try:
        began = time.perf_counter()
        for offset in range(0, runs, 1000):
            batch = min(1000, runs - offset)
            await sender.send([Event(name="bench/processes") for _ in range(batch)])
        while await conn.fetchval(done, PROCESSES_APP) < runs:  # noqa: ASYNC110 - polls the database
            await asyncio.sleep(0.05)
        return time.perf_counter() - began
    finally:
        await sender.close()


async def throughput_processes(url: str, runs: int, processes: int) -> dict[str, float]:
    """The 3-step workload run by separate `engine worker` processes (sync step callables)."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("DELETE FROM engine.runs WHERE app_id = $1", PROCESSES_APP)
        async with worker_processes(url, processes):
            elapsed = await send_until_completed(url, conn, runs)
    finally:
        await conn.close()
    return {"runs_per_s": runs / elapsed, "steps_per_s": 3 * runs / elapsed}


async def settings(url: str) -> dict[str, str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT name, setting FROM pg_settings WHERE name IN "
            "('fsync', 'synchronous_commit', 'shared_buffers', 'server_version')"
        )
    finally:
        await conn.close()
    return {r["name"]: r["setting"] for r in rows}


async def fresh_database(url: str, name: str) -> str:
    """A new, empty database `name` on the server of `url` (dropped first if it exists)."""
    admin = await asyncpg.connect(url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    return url.replace("/postgres?", f"/{name}?")


async def environment(url: str) -> dict[str, Any]:
    """What every result records: date, Python, PostgreSQL version and settings, packages."""
    packages = {}
    for name in ("asyncpg", "cel-python", "pg-durable-engine", "dbos", "procrastinate", "pgqueuer"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "postgres": await settings(url),
        "packages": packages,
    }


@contextlib.contextmanager
def scratch_server(prefix: str) -> Iterator[str]:
    """An embedded server in a new folder under /tmp, for one benchmark: stopped and its folder
    removed when the block ends (a million runs leave gigabytes behind otherwise)."""
    scratch = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(scratch, 0o755)  # the embedded server may run as another user
    try:
        url, _server = start(scratch / "pg")
        yield url
    finally:
        _stop_postmaster(data_directory(scratch / "pg"))
        shutil.rmtree(scratch, ignore_errors=True)


def summarize(samples: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {
        key: {
            "median": statistics.median(s[key] for s in samples),
            "min": min(s[key] for s in samples),
            "max": max(s[key] for s in samples),
        }
        for key in samples[0]
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    configure_logging("warning")
    url, _server = start(Path(tempfile.mkdtemp(prefix="engine-bench-")) / "pg")
    await Database(url).apply_schema()
    figures: dict[str, Any] = {}
    for name, job in (
        ("latency", lambda: latency(url, args.events)),
        ("step_overhead", lambda: step_overhead(url, args.steps)),
        ("throughput", lambda: throughput(url, args.runs)),
        ("throughput_async_steps", lambda: throughput(url, args.runs, sync_steps=False)),
        ("throughput_1_process", lambda: throughput_processes(url, args.runs, 1)),
        ("throughput_2_processes", lambda: throughput_processes(url, args.runs, 2)),
    ):
        figures[name] = summarize([await job() for _ in range(args.repeat)])
        print(name, json.dumps(figures[name]))
    result = {**await environment(url), "args": vars(args), "figures": figures}
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "core.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result["postgres"]))


if __name__ == "__main__":
    asyncio.run(main())
