"""What keeping the run history costs: the engine before and after it, back to back, in one run.

    python bench/history_cost.py [--before 22d4d2f] [--after HEAD] [--repeat 3]
                                 [--steps 300] [--runs 600]

Checks out both versions in temporary git worktrees, starts one embedded PostgreSQL (durable
settings), and runs the same measurement against each version's own code and schema, in a fresh
database each time, interleaved (before, after, before, after...):

- floor: a one-client commit of a step-shaped transaction (an INSERT of a JSON row);
- step: one run of N trivial sequential steps, time per step (and as a multiple of the floor),
  and this process's CPU per step (the worker's Python; the server is another process);
- start: ``app.send()`` called -> the first step's code runs, p50 of 100 events sent one at a
  time (the worker in this process);
- retried step: one run of N steps that each fail once (a retry writes an attempt's history);
- throughput: N events each starting a 3-step function, runs/s (one worker, concurrency 50),
  this process's CPU per run, and the worker's ticks (routing and claiming rounds) per run.

Prints the medians with min and max, and after/before (x) for each figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parent.parent

# Runs inside the version under test (PYTHONPATH = its worktree): prints one JSON line.
CHILD = r"""
import asyncio, json, sys, time
import asyncpg
import engine
from engine import Backoff, Context, Engine, Event, TriggerEvent

URL, STEPS, RUNS = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])


async def floor() -> float:
    conn = await asyncpg.connect(URL)
    await conn.execute("CREATE TABLE IF NOT EXISTS floor_t (id bigserial PRIMARY KEY, v jsonb)")
    began = time.perf_counter()
    for i in range(STEPS):
        async with conn.transaction():
            await conn.execute("INSERT INTO floor_t (v) VALUES ($1::jsonb)", '{"i": %d}' % i)
    took = (time.perf_counter() - began) / STEPS
    await conn.close()
    return took


async def one_run(app: Engine, name: str) -> tuple[float, float]:
    # Wall and CPU time (this process: the worker) of one run, from its creation.
    [event_id] = await app.send(Event(name=name))
    [run] = await app.runs_for_event(event_id, at_least=1)
    began, cpu = time.perf_counter(), time.process_time()
    done = await app.wait_for_run(run.run_id, timeout=600)
    assert done.status.value == "COMPLETED", done.error
    return time.perf_counter() - began, time.process_time() - cpu


ARRIVED = {}
SIGNAL = asyncio.Event()  # set by the first step's code: the sender waits on it, not in a loop


async def arrive(i: int) -> None:
    ARRIVED.setdefault(i, time.perf_counter())
    SIGNAL.set()


async def starts(app: Engine, events: int) -> float:
    # app.send() called -> the first step's code runs, p50 (ms), events one at a time.
    samples = []
    for i in range(events):
        SIGNAL.clear()
        began = time.perf_counter()
        await app.send(Event(name="b/first", data={"i": i}))
        await asyncio.wait_for(SIGNAL.wait(), 30)
        samples.append((ARRIVED[i] - began) * 1000)
    return sorted(samples)[len(samples) // 2]


async def main() -> None:
    app = Engine("bench", URL, backoff=Backoff(initial="1ms", jitter=0))

    @app.create_function("steps", trigger=TriggerEvent("b/steps"))
    async def steps(ctx: Context) -> int:
        for i in range(STEPS):
            await ctx.step.run(f"s{i}", lambda: i)
        return STEPS

    @app.create_function("retried", trigger=TriggerEvent("b/retried"), retries=1)
    async def retried(ctx: Context) -> int:
        for i in range(STEPS // 10):
            def once() -> int:
                if ctx.attempt == 0:
                    raise RuntimeError("once")
                return i
            await ctx.step.run(f"r{i}", once)
        return STEPS // 10

    @app.create_function("first", trigger=TriggerEvent("b/first"))
    async def first(ctx: Context) -> None:
        await ctx.step.run("arrive", arrive, ctx.event.data["i"])

    returned, all_returned = set(), asyncio.Event()

    @app.create_function("three", trigger=TriggerEvent("b/three"))
    async def three(ctx: Context) -> int:
        for i in range(3):
            await ctx.step.run(f"t{i}", lambda: i)
        returned.add(ctx.run_id)
        if len(returned) == RUNS:
            all_returned.set()
        return 3

    result = {"engine": engine.__file__, "floor_ms": await floor() * 1000}
    async with app.worker(concurrency=50) as worker:
        wall, cpu = await one_run(app, "b/steps")
        result["step_ms"], result["step_cpu_ms"] = wall / STEPS * 1000, cpu / STEPS * 1000
        wall, _ = await one_run(app, "b/retried")
        result["retried_step_ms"] = wall / (STEPS // 10) * 1000
        await asyncio.sleep(0.5)
        result["start_p50_ms"] = await starts(app, 100)
        began, cpu, ticks = time.perf_counter(), time.process_time(), worker.ticks
        await app.send([Event(name="b/three") for _ in range(RUNS)])
        # The database is read once every body has returned (the last ends are a commit away),
        # not all along: reading it would take the server's CPU from the worker measured.
        await asyncio.wait_for(all_returned.wait(), 600)
        count = (
            "SELECT count(*) FROM engine.runs WHERE function_id = 'three' AND status = 'COMPLETED'"
        )
        conn = await asyncpg.connect(URL)
        while await conn.fetchval(count) < RUNS:
            await asyncio.sleep(0.005)
        await conn.close()
        result["runs_per_s"] = RUNS / (time.perf_counter() - began)
        result["run_cpu_ms"] = (time.process_time() - cpu) / RUNS * 1000
        result["ticks_per_run"] = (worker.ticks - ticks) / RUNS
    await app.close()
    print(json.dumps(result))


asyncio.run(main())
"""


def worktree(ref: str, scratch: Path) -> Path:
    """A checkout of ``ref`` (a commit, a branch, HEAD) in a temporary worktree."""
    path = scratch / ref.replace("/", "_")
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), ref],
        check=True,
        capture_output=True,
    )
    return path


async def _create_database(server: str, name: str, async_commit: bool) -> None:
    admin = await asyncpg.connect(server)
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
    await admin.execute(f'CREATE DATABASE "{name}"')
    if async_commit:  # no WAL flush per commit: what is left is CPU and WAL volume
        await admin.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
    await admin.close()


def fresh_database(server: str, name: str, code: Path, async_commit: bool) -> str:
    """A new database with the schema of the version in ``code``."""
    asyncio.run(_create_database(server, name, async_commit))
    url = server.replace("/postgres?", f"/{name}?")
    env = {**os.environ, "PYTHONPATH": str(code)}
    migrate = [sys.executable, "-m", "engine", "migrate", "--database-url", url]
    subprocess.run(migrate, check=True, env=env, capture_output=True, cwd=code)
    return url


def measure(code: Path, url: str, steps: int, runs: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(code)}
    child = [sys.executable, "-c", CHILD, url, str(steps), str(runs)]
    out = subprocess.run(child, check=False, env=env, capture_output=True, text=True, cwd=code)
    if out.returncode != 0:
        raise SystemExit(f"the measurement of {code} failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["engine"].startswith(str(code)), result["engine"]  # measured the right code
    return result


def summary(samples: list[float]) -> str:
    return f"{statistics.median(samples):8.3f} ({min(samples):.3f} - {max(samples):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--before", default="22d4d2f")
    parser.add_argument("--after", default="HEAD")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--runs", type=int, default=600)
    parser.add_argument(
        "--async-commit",
        action="store_true",
        help="synchronous_commit off: leaves out the disk's flush time, which varies most on"
        " a shared machine, so that the CPU and WAL the history adds stand out",
    )
    args = parser.parse_args()

    from engine.embedded import _stop_postmaster, data_directory, start

    scratch = Path(tempfile.mkdtemp(prefix="history-cost-"))
    os.chmod(scratch, 0o755)  # the embedded server may run as another user
    versions = {"before": worktree(args.before, scratch), "after": worktree(args.after, scratch)}
    server, _ = start(scratch / "pg")
    results: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    try:
        for repeat in range(args.repeat):
            for label, code in versions.items():
                url = fresh_database(server, f"bench_{label}_{repeat}", code, args.async_commit)
                results[label].append(measure(code, url, args.steps, args.runs))
                print(f"{label} #{repeat + 1}: {results[label][-1]}", flush=True)
    finally:
        for code in versions.values():
            remove = ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(code)]
            subprocess.run(remove, check=False)
        _stop_postmaster(data_directory(scratch / "pg"))
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\nbefore = {args.before}, after = {args.after}; median (min - max) of {args.repeat}")
    for figure in (
        "floor_ms",
        "step_ms",
        "step_cpu_ms",
        "retried_step_ms",
        "start_p50_ms",
        "runs_per_s",
        "run_cpu_ms",
        "ticks_per_run",
    ):
        before = [r[figure] for r in results["before"]]
        after = [r[figure] for r in results["after"]]
        ratio = statistics.median(after) / statistics.median(before)
        print(f"{figure:16} before {summary(before)}  after {summary(after)}  x{ratio:.2f}")
    for label in ("before", "after"):
        per_floor = [r["step_ms"] / r["floor_ms"] for r in results[label]]
        print(f"step / floor, {label}: {summary(per_floor)}")


if __name__ == "__main__":
    main()
