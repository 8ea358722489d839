"""The engine's headline figures as ratios to what PostgreSQL itself does on the same server,
measured back to back in one run (issue #17).

    python bench/ratios.py [--repeat 5] [--steps 1000] [--events 200] [--runs 3000]
                           [--log-level info 2>/dev/null] [--compare-log-level info]
                           [--loop uvloop]

These shared machines vary three- to fourfold in speed from day to day; a ratio taken in one
run does not. Each repeat measures every floor and then every engine figure, on a fresh
database each, so that a slow spell of the machine hits both sides of a ratio; the table gives
the median of the repeats with min and max, and each ratio is taken within its repeat.

Floors (plain asyncpg, no engine code):
- commit: one client committing a step-shaped transaction (an INSERT of a small JSON row);
- notify: an INSERT and a NOTIFY committed by one connection, until a LISTEN on another
  connection receives it;
- tps: 16 clients committing step-shaped transactions, transactions per second.

Engine (the worker in this process, durable settings: fsync and synchronous_commit on):
- step: one run of N trivial sequential steps, wall time per step, and this process's CPU
  time per step (the Python the engine spends, the server's excluded);
- start: ``app.send()`` called -> the first step's callable runs, events sent one at a time,
  after ten that warm the connections up (the first of them reported apart: a new process's
  first event);
- start from elsewhere: the same, sent through an ``Engine`` that runs no worker (as a web
  process sends): the event waits for the worker's wake-up (its LISTEN) and a routing
  transaction of its own, where a sender with a worker routes its events in its send (the
  issue's goal is for the latter; this one is reported without a goal);
- throughput: N three-step runs, one worker (concurrency 50): steps/s, and CPU time per run.

CPU times are this process's (``time.process_time``: every thread of it, so the worker, its
step threads and the sending of the events; the PostgreSQL server is another process and is
excluded). Per step: from the first step's start to the last step's end of one run. Per run:
from the first send to the last run completed, divided by the runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).parent))
import breakdown
from core import Countdown, all_completed, environment, fresh_database, percentile

from engine import Context, Engine, Event, TriggerEvent
from engine.db import Database
from engine.embedded import _stop_postmaster, data_directory, start
from engine.event_loop import LOOPS, run
from engine.logs import LEVELS, configure_logging

STEP_ROW = '{"output": {"ok": true}, "step": "charge-card", "attempt": 1}'
TPS_CLIENTS = 16


# -- floors ----------------------------------------------------------------------------------------
async def _step_table(conn: asyncpg.Connection) -> None:
    await conn.execute("CREATE TABLE IF NOT EXISTS floor_steps (id bigserial PRIMARY KEY, v jsonb)")


async def floor_commit(url: str, commits: int = 500) -> dict[str, float]:
    conn = await asyncpg.connect(url)
    try:
        await _step_table(conn)
        cpu, began = time.process_time(), time.perf_counter()
        for _ in range(commits):
            await conn.execute("INSERT INTO floor_steps (v) VALUES ($1::jsonb)", STEP_ROW)
        return {
            "commit_ms": (time.perf_counter() - began) * 1000 / commits,
            # This process's CPU for one round trip of plain asyncpg: what the engine's Python
            # per step is compared with.
            "commit_cpu_ms": (time.process_time() - cpu) * 1000 / commits,
        }
    finally:
        await conn.close()


async def floor_notify(url: str, samples: int = 200) -> dict[str, float]:
    listener, sender = await asyncpg.connect(url), await asyncpg.connect(url)
    received: asyncio.Queue[float] = asyncio.Queue()
    try:
        await _step_table(sender)
        await listener.add_listener("floor", lambda *_: received.put_nowait(time.perf_counter()))
        times = []
        for _ in range(samples):
            began = time.perf_counter()
            async with sender.transaction():
                await sender.execute("INSERT INTO floor_steps (v) VALUES ($1::jsonb)", STEP_ROW)
                await sender.execute("NOTIFY floor")
            times.append((await received.get() - began) * 1000)
        return {"notify_ms": statistics.median(times)}
    finally:
        await listener.close()
        await sender.close()


async def floor_tps(url: str, seconds: float = 3.0) -> dict[str, float]:
    setup = await asyncpg.connect(url)
    await _step_table(setup)
    await setup.close()
    deadline = time.perf_counter() + seconds

    async def client() -> int:
        conn = await asyncpg.connect(url)
        done = 0
        try:
            while time.perf_counter() < deadline:
                await conn.execute("INSERT INTO floor_steps (v) VALUES ($1::jsonb)", STEP_ROW)
                done += 1
        finally:
            await conn.close()
        return done

    began = time.perf_counter()
    counts = await asyncio.gather(*(client() for _ in range(TPS_CLIENTS)))
    elapsed = time.perf_counter() - began
    return {"tps": sum(counts) / elapsed, "tps_seconds": elapsed}


# -- the engine ------------------------------------------------------------------------------------
async def engine_steps(url: str, steps: int) -> dict[str, float]:
    app = Engine("ratio-steps", url)
    done = asyncio.Event()
    cpu: list[float] = []

    @app.create_function("sequential", trigger=TriggerEvent("ratio/steps"))
    async def sequential(ctx: Context) -> None:
        began = time.process_time(), time.perf_counter()
        for i in range(steps):
            await ctx.step.run(f"s{i}", _nothing)
        cpu.extend([time.process_time() - began[0], time.perf_counter() - began[1]])
        done.set()

    app.limits = type(app.limits)(max_steps=steps + 1)
    async with app.worker():
        await app.send(Event(name="ratio/steps"))
        await asyncio.wait_for(done.wait(), 600)
    await app.close()
    cpu_s, wall_s = cpu[:2]
    return {"step_ms": wall_s * 1000 / steps, "step_cpu_ms": cpu_s * 1000 / steps}


async def engine_start(url: str, events: int, *, elsewhere: bool = False) -> dict[str, float]:
    app = Engine("ratio-start", url)
    # With ``elsewhere``, the events go through an Engine of the same app that runs no worker.
    sender = Engine("ratio-start", url) if elsewhere else app
    arrived: dict[int, float] = {}
    signal = asyncio.Event()

    @app.create_function("first-step", trigger=TriggerEvent("ratio/start"))
    async def first_step(ctx: Context) -> None:
        # Bound, not passed: a step's arguments are recorded (step input), and the map of
        # every arrival so far would be encoded at each step, more with each event.
        await ctx.step.run("one", partial(_arrive, arrived, ctx.event.data["i"], signal))

    samples = []
    async with app.worker(concurrency=10):
        await asyncio.sleep(0.5)  # the worker has claimed its first (empty) batch: steady state
        for i in range(WARM_UP + events):
            signal.clear()
            began = time.perf_counter()
            await sender.send(Event(name="ratio/start", data={"i": i}))
            await asyncio.wait_for(signal.wait(), 30)
            samples.append((arrived[i] - began) * 1000)
    await app.close()
    await sender.close()
    key = "start_elsewhere" if elsewhere else "start"
    first, steady = samples[0], samples[WARM_UP:]
    return {
        f"{key}_p50_ms": percentile(steady, 0.5),
        f"{key}_p99_ms": percentile(steady, 0.99),
        f"{key}_first_ms": first,
    }


# Events sent before the samples: each of the first sends may take a pooled connection that has
# not yet run the send's statements, and PostgreSQL compiles a function and plans its
# statements once per connection (8-15 ms, once). The first one is reported on its own.
WARM_UP = 10


async def _arrive(arrived: dict[int, float], i: int, signal: asyncio.Event) -> None:
    arrived.setdefault(i, time.perf_counter())
    signal.set()


async def _nothing() -> None:
    return None


async def engine_throughput(url: str, runs: int) -> dict[str, float]:
    app = Engine("ratio-throughput", url, pool_size=20)
    returned = Countdown(runs)

    @app.create_function("three-steps", trigger=TriggerEvent("ratio/throughput"))
    async def three_steps(ctx: Context) -> None:
        for name in ("a", "b", "c"):
            await ctx.step.run(name, _nothing)
        returned.count(ctx.run_id)

    conn = await asyncpg.connect(url)
    try:
        async with app.worker(concurrency=50):
            cpu, began = time.process_time(), time.perf_counter()
            for offset in range(0, runs, 1000):
                await app.send([Event(name="ratio/throughput")] * min(1000, runs - offset))
            await all_completed(conn, returned, runs, "ratio-throughput")
            elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu
    finally:
        await conn.close()
        await app.close()
    return {"steps_per_s": 3 * runs / elapsed, "run_cpu_ms": cpu * 1000 / runs}


async def throughput_logging(
    url: str, runs: int, level: str, args: argparse.Namespace
) -> dict[str, float]:
    """The throughput figure again with the engine's logging configured at ``level`` (as
    ``engine worker`` does, its lines written to /dev/null), then back to ``--log-level``."""
    saved = sys.stderr
    with open(os.devnull, "w") as sink:  # noqa: ASYNC230 - /dev/null never blocks
        sys.stderr = sink
        configure_logging(level)
        try:
            figures = await engine_throughput(url, runs)
        finally:
            sys.stderr = saved
            configure_logging(args.log_level)
    return {f"{key}_{level}": value for key, value in figures.items()}


# -- the run ---------------------------------------------------------------------------------------
RATIOS: tuple[tuple[str, str, str, float | None, bool], ...] = (
    # (label, engine figure, floor figure, goal (None: none), True when the engine's must be lower)
    ("time per sequential step / commit", "step_ms", "commit_ms", 1.5, True),
    # What bounds the step: its Python beyond a plain round trip's, and the step without it.
    (
        "the step's Python beyond a plain round trip / commit",
        "step_python_extra_ms",
        "commit_ms",
        None,
        True,
    ),
    ("the step less that Python / commit", "step_less_python_ms", "commit_ms", None, True),
    ("app.send() -> first step, p50 / notify", "start_p50_ms", "notify_ms", 3.0, True),
    (
        "the same, sent by a process without a worker / notify",
        "start_elsewhere_p50_ms",
        "notify_ms",
        None,
        True,
    ),
    ("steps/s, 3-step runs / 16-client tps", "steps_per_s", "tps", 0.5, False),
    # --breakdown only: the steps/s the engine's CPU per step would give with every core busy
    ("the same at full use of the cores / tps", "steps_per_s_cpu_ceiling", "tps", None, False),
)


# What each engine scenario is counted in, for --breakdown: (figure key of the count, unit).
UNITS = {
    "steps": ("steps", "step"),
    "start": ("events", "event"),
    "start_elsewhere": ("events", "event"),
    "throughput": ("runs", "run"),
}


async def one_repeat(server: str, index: int, args: argparse.Namespace) -> dict[str, float]:
    figures: dict[str, float] = {}
    jobs: list[tuple[str, Callable[[str], Awaitable[dict[str, float]]]]] = [
        ("floor_commit", floor_commit),
        ("floor_notify", floor_notify),
        ("floor_tps", floor_tps),
        ("steps", lambda url: engine_steps(url, args.steps)),
        ("start", lambda url: engine_start(url, args.events)),
        ("start_elsewhere", lambda url: engine_start(url, args.events, elsewhere=True)),
        ("throughput", lambda url: engine_throughput(url, args.runs)),
    ]
    if args.compare_log_level:
        level = args.compare_log_level
        jobs.append((f"log_{level}", lambda url: throughput_logging(url, args.runs, level, args)))
    for name, job in jobs:
        database = f"ratio_{name}_{index}"
        url = await fresh_database(server, database)
        await Database(url).apply_schema()
        if args.breakdown is not None and name == "floor_tps":
            figures.update(await _floor_server_cpu(job, url, args.breakdown))
        elif args.breakdown is not None and name in UNITS:
            figures.update(
                await _broken_down(name, job, server=server, database=database, url=url, args=args)
            )
        else:
            figures.update(await job(url))
        await _drop(server, database)
    return {**figures, **_step_bound(figures)}


def _step_bound(figures: dict[str, float]) -> dict[str, float]:
    """The step's Python (this process's CPU per step) beyond what plain asyncpg spends on the
    floor's round trip, and the step's time without it: what is left is the server's work for
    a step beyond the floor's INSERT, and the commit. A sequential step cannot overlap its own
    Python with its round trip, so both add to its time."""
    extra = figures["step_cpu_ms"] - figures["commit_cpu_ms"]
    return {"step_python_extra_ms": extra, "step_less_python_ms": figures["step_ms"] - extra}


async def _floor_server_cpu(
    job: Callable[[str], Awaitable[dict[str, float]]], url: str, postmaster: int
) -> dict[str, float]:
    """The 16-client floor with the server's CPU per transaction: what one step-shaped commit
    costs the server, next to what a step of the engine does (``*_server_cpu_ms``)."""
    probe = breakdown.Probe(postmaster)
    probe.start()
    figures = await job(url)
    server_cpu, _mine = probe.stop()
    transactions = figures["tps"] * figures["tps_seconds"]
    figures["tps_server_cpu_ms"] = server_cpu * 1000 / transactions
    figures["tps_machine_busy"] = probe.busy_share
    print(
        f"  floor_tps: server CPU {figures['tps_server_cpu_ms']:.3f} ms per transaction;"
        f" {probe.busy_share:.0%} of the machine's cores busy"
    )
    return figures


async def _broken_down(
    name: str,
    job: Callable[[str], Awaitable[dict[str, float]]],
    *,
    server: str,
    database: str,
    url: str,
    args: argparse.Namespace,
) -> dict[str, float]:
    """Runs ``job`` with the server's CPU and its time per engine function measured (see
    bench/breakdown.py); adds ``<name>_server_cpu_ms`` per unit to the figures and prints the
    functions that took the most server time."""
    await breakdown.track_functions(server, database)
    probe = breakdown.Probe(args.breakdown)
    states = breakdown.BackendStates(url) if name == "throughput" else None
    if states is not None:
        await states.start()
    probe.start()
    figures = await job(url)
    server_cpu, mine = probe.stop()
    units = {"steps": args.steps, "events": args.events, "runs": args.runs}[UNITS[name][0]]
    unit = UNITS[name][1]
    figures[f"{name}_server_cpu_ms"] = server_cpu * 1000 / units
    if states is not None:
        steps = 3 * units  # three-step runs
        figures.update(_throughput_bound(steps, await states.stop(), probe, server_cpu + mine))
    print(
        f"  {name}: server CPU {server_cpu * 1000 / units:.3f} ms per {unit}; engine functions,"
        f" ms per {unit} (own time / with what they call, calls):"
    )
    for row in await breakdown.function_times(url, units):
        print(
            f"    {row['function']:24} {row['self_ms_per_unit']:8.3f} /"
            f" {row['total_ms_per_unit']:8.3f}  x{row['calls_per_unit']:.2f}"
        )
    return figures


def _throughput_bound(
    steps: int, states: dict[str, float], probe: breakdown.Probe, cpu: float
) -> dict[str, float]:
    """What bounds the throughput: the steps/s the engine's CPU per run (server and this
    process) would give with every core busy, against how busy the cores were, and what the
    backends waited on. A scenario that leaves cores idle is bounded by its round trips
    waiting on each other, not by the CPU."""
    ceiling = (os.cpu_count() or 1) * steps / cpu
    print(
        f"  throughput: {probe.busy_share:.0%} of the machine's cores busy; with all busy,"
        f" this CPU per step would give {ceiling:,.0f} steps/s; the database's backends, on"
        f" average: {states['on_cpu']:.2f} on CPU, {states['on_wal']:.2f} waiting on the WAL,"
        f" {states['waiting_other']:.2f} on a lock, {states['waiting_for_client']:.2f} waiting"
        " for the worker"
    )
    return {
        "throughput_machine_busy": probe.busy_share,
        "steps_per_s_cpu_ceiling": ceiling,
        **{f"throughput_backends_{key}": value for key, value in states.items()},
    }


async def _drop(server: str, name: str) -> None:
    admin = await asyncpg.connect(server)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):,.3g} ({min(values):,.3g} - {max(values):,.3g})"


def report(repeats: list[dict[str, float]], log_level: str | None) -> dict[str, Any]:
    print(f"\n{len(repeats)} repeats; median (min - max)")
    for key in repeats[0]:
        print(f"  {key:16} {spread([r[key] for r in repeats])}")
    print("\n| figure | engine / floor, median (min - max) | goal | met |")
    print("|---|---|---|---|")
    summary: dict[str, Any] = {}
    ratios_here: list[tuple[str, str, str, float | None, bool]] = list(RATIOS)
    if log_level:  # the throughput at that level over the one at --log-level
        label = f"steps/s with logging at {log_level} / without"
        ratios_here.append((label, f"steps_per_s_{log_level}", "steps_per_s", 0.95, False))
    for label, mine, floor, goal, lower in ratios_here:
        if mine not in repeats[0]:
            continue  # a figure of --breakdown, measured without it
        ratios = [r[mine] / r[floor] for r in repeats]
        middle = statistics.median(ratios)
        met = None if goal is None else (middle <= goal if lower else middle >= goal)
        wanted = "-" if goal is None else f"{'≤' if lower else '≥'} {goal}"
        verdict = "-" if met is None else ("yes" if met else "no")
        print(f"| {label} | {spread(ratios)} | {wanted} | {verdict} |")
        summary[label] = {"median": middle, "min": min(ratios), "max": max(ratios), "met": met}
    return summary


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3000)
    parser.add_argument("--database-url", help="a server to use instead of an embedded one")
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=LEVELS,
        help="the engine's log level, configured as `engine worker` does (lines on stderr:"
        " redirect it, e.g. 2>/dev/null; the worker's default is info)",
    )
    parser.add_argument(
        "--compare-log-level",
        choices=LEVELS,
        help="also measure the throughput with logging at this level (to /dev/null), in the"
        " same repeats: the cost of logging (e.g. info, the worker's default)",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also measure the server's CPU per step, event and run, the time spent in each"
        " engine SQL function (track_functions), and for the throughput how busy the cores were,"
        " what the backends waited on and the steps/s its CPU per step allows with every core"
        " busy (embedded server only): bench/breakdown.py",
    )
    parser.add_argument(
        "--loop",
        choices=LOOPS,
        default="asyncio",
        help="the event loop of this process, floors and engine alike (uvloop: what the"
        " `engine` command runs on where it is installed; see engine/event_loop.py)",
    )
    args = parser.parse_args()
    if args.breakdown and args.database_url is not None:
        parser.error("--breakdown reads the embedded server's processes: drop --database-url")
    return args


async def main(args: argparse.Namespace) -> None:
    configure_logging(args.log_level)
    scratch = Path(tempfile.mkdtemp(prefix="engine-ratios-"))
    server = args.database_url or start(scratch / "pg")[0]
    args.breakdown = (
        breakdown.server_pid(data_directory(scratch / "pg")) if args.breakdown else None
    )
    try:
        repeats = []
        for index in range(args.repeat):
            repeats.append(await one_repeat(server, index, args))
            print(f"repeat {index + 1}: {json.dumps(repeats[-1])}", flush=True)
        summary = report(repeats, args.compare_log_level)
        out = Path(__file__).parent / "results"
        out.mkdir(exist_ok=True)
        result = {
            **await environment(server),
            "event_loop": args.loop,
            "repeats": repeats,
            "ratios": summary,
        }
        (out / "ratios.json").write_text(json.dumps(result, indent=2))
    finally:
        if args.database_url is None:  # leaves nothing behind
            _stop_postmaster(data_directory(scratch / "pg"))
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    options = arguments()
    run(main(options), options.loop)
