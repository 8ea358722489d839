"""Scale: the core figures with a loaded database, against an empty one on the same server.

    python bench/scale.py [--finished 1000000] [--parked 10000] [--runs 3000] [--events 200]
                          [--sleepers 200] [--sleep 1.0] [--repeat 2]

One database holds `--finished` completed 3-step runs (their events, finished events, steps and
executions), `--parked` runs asleep for 30 days and as many waiting 30 days for an event that
never comes: copies of runs the engine made (bench/fill.py), all of the app the measurements
run, whose worker serves the sleeping and waiting functions too. The other database is empty.
Both live on one embedded server (fsync and synchronous_commit on); the script measures them
alternately, `--repeat` times each, with one worker (concurrency 100) for a round:

- throughput: `--runs` events each starting a 3-step run, runs/s until all completed;
- latency: events sent one at a time, event committed -> first step starts, p50/p99;
- wake-up lateness: `--sleepers` runs each sleep until `--sleep` seconds after they first
  execute (bench/timers.py's measure), p50/p99, while the parked runs sit there; started
  together (their events sent in lists of 500, as bench/timers.py does) and spread (one at a
  time, 5 ms apart).

Prints the medians and the loaded/empty ratios (the goals of issue #17: throughput >= 0.9,
latency <= 1.2x, lateness p99 < 50 ms), with the load average at each measurement; writes
bench/results/scale.json. Stops its server and removes its data folder when it ends.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).parent))

import core
import fill

from engine import Context, Engine, Event, TriggerEvent
from engine.db import Database
from engine.logs import configure_logging

APP = "scale"


class Probes:
    """What the measuring functions record, as they run."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}  # latency: event i -> first step called
        self.arrived = asyncio.Event()
        self.late_ms: list[float] = []  # lateness of each sleeper's wake-up


def make_app(url: str) -> tuple[Engine, Probes]:
    """The app of both databases: the fill's functions (so its worker serves the parked runs)
    and the two measuring functions."""
    app = Engine(APP, url, pool_size=20, retention=None)
    fill.define(app)
    probes = Probes()

    @app.create_function("first-step", trigger=TriggerEvent("scale/latency"))
    async def first_step(ctx: Context) -> None:
        probes.started.setdefault(ctx.event.data["i"], time.perf_counter())
        probes.arrived.set()
        await ctx.step.run("one", fill.nothing)

    def wake_time(sleep: float) -> str:
        return (datetime.now(UTC) + timedelta(seconds=sleep)).isoformat()

    @app.create_function("nap", trigger=TriggerEvent("scale/nap"))
    async def nap(ctx: Context) -> None:
        # The wake-up time is taken when the run first executes (a step: replays keep it), so
        # time spent queued behind other runs is not counted as timer lateness.
        wake_at = datetime.fromisoformat(
            await ctx.step.run("wake-at", wake_time, ctx.event.data["sleep"])
        )
        await ctx.step.sleep_until("nap", wake_at)
        probes.late_ms.append((datetime.now(UTC) - wake_at).total_seconds() * 1000)

    return app, probes


async def latency(app: Engine, probes: Probes, events: int) -> dict[str, float]:
    """Event committed -> first step called, events sent one at a time."""
    samples = []
    for i in range(events):
        probes.arrived.clear()
        await app.send(Event(name="scale/latency", data={"i": str(i)}))
        sent = time.perf_counter()
        await probes.arrived.wait()
        samples.append((probes.started[str(i)] - sent) * 1000)
    return {"p50_ms": core.percentile(samples, 0.5), "p99_ms": core.percentile(samples, 0.99)}


async def throughput(app: Engine, runs: int) -> dict[str, float]:
    """3-step runs/s until all ``runs`` completed."""
    conn = await asyncpg.connect((await app.database()).url)
    since = await conn.fetchval("SELECT now()")
    done = (
        "SELECT count(*) FROM engine.runs WHERE app_id = $1 AND function_id = $2"
        " AND created_at >= $3 AND status = 'COMPLETED'"
    )
    begin = time.perf_counter()
    for offset in range(0, runs, 1000):
        batch = min(1000, runs - offset)
        await app.send([Event(name="scale/three") for _ in range(batch)])
    while await conn.fetchval(done, APP, fill.THREE_STEPS, since) < runs:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - begin
    await conn.close()
    return {"runs_per_s": runs / elapsed}


async def lateness(
    app: Engine, probes: Probes, sleepers: int, sleep: float, batch: int
) -> list[float]:
    """How late (ms) ``sleepers`` runs sleeping ``sleep`` seconds wake up; their events sent
    ``batch`` at a time (one at a time: 5 ms apart)."""
    probes.late_ms = []
    for offset in range(0, sleepers, batch):
        count = min(batch, sleepers - offset)
        await app.send([Event(name="scale/nap", data={"sleep": sleep}) for _ in range(count)])
        if batch == 1:
            await asyncio.sleep(0.005)
    while len(probes.late_ms) < sleepers:  # noqa: ASYNC110 - the function appends
        await asyncio.sleep(0.05)
    return probes.late_ms


async def wakeups(app: Engine, probes: Probes, sleepers: int, sleep: float) -> dict[str, float]:
    """Wake-up lateness two ways: the sleepers started together (events in lists of 500, as
    bench/timers.py sends them: they come due together, a burst the worker works through) and
    spread (events one at a time: each comes due alone, which times the timer itself)."""
    burst = await lateness(app, probes, sleepers, sleep, 500)
    spread = await lateness(app, probes, sleepers, sleep, 1)
    return {
        "late_p50_ms": core.percentile(burst, 0.5),
        "late_p99_ms": core.percentile(burst, 0.99),
        "spread_late_p50_ms": core.percentile(spread, 0.5),
        "spread_late_p99_ms": core.percentile(spread, 0.99),
    }


# A worker that starts as the only one of its app clears the "no live worker serves this
# function" mark from every runnable run of its functions (engine.clear_unserved), and marks
# them again when it stops alone (engine.retire_functions): with 20,000 parked runs, 0.5-0.7 s
# of server work each way, in the loaded database only. One worker serves a whole round, and
# the measuring starts once that start's work is done.
SETTLE = 3.0


async def measure(url: str, args: argparse.Namespace) -> dict[str, float]:
    """One round of the three figures on one database, one worker (concurrency 100) for the
    round, with the load average before it."""
    load = os.getloadavg()[0]
    app, probes = make_app(url)
    async with app.worker(concurrency=100):
        await asyncio.sleep(SETTLE)
        figures = await latency(app, probes, args.events)
        figures.update(await throughput(app, args.runs))
        figures.update(await wakeups(app, probes, args.sleepers, args.sleep))
    await app.close()
    return {**figures, "load_1min": load}


async def prepare(url: str, args: argparse.Namespace) -> tuple[str, str]:
    """The empty and the loaded database, schema applied; the loaded one filled."""
    empty = await core.fresh_database(url, "scale_empty")
    full = await core.fresh_database(url, "scale_full")
    for target in (empty, full):
        await Database(target).apply_schema()
    app, _probes = make_app(full)
    try:
        took = await fill.load(
            app, finished=args.finished, sleeping=args.parked, waiting=args.parked
        )
    finally:
        await app.close()
    print("filled:", json.dumps({k: round(v, 1) for k, v in took.items()}), "seconds", flush=True)
    return empty, full


GOALS = {"runs_per_s": "loaded >= 0.9x", "p50_ms": "<= 1.2x", "p99_ms": "<= 1.2x"}


def report(figures: dict[str, Any], args: argparse.Namespace) -> None:
    """Prints each figure's medians and the loaded / empty ratio."""
    label = f"{args.finished:,} finished + {2 * args.parked:,} parked"
    for key in figures["full"]:
        full, empty = figures["full"][key]["median"], figures["empty"][key]["median"]
        goal = GOALS.get(key, "p99 < 50 ms" if key.endswith("late_p99_ms") else "")
        ratio = full / empty
        print(f"{key:<12} empty {empty:9.2f}   {label} {full:9.2f}   ratio {ratio:5.2f}  {goal}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--finished", type=int, default=1_000_000)
    parser.add_argument("--parked", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3000)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--sleepers", type=int, default=200)
    parser.add_argument("--sleep", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    configure_logging("warning")
    with core.scratch_server("engine-bench-scale-") as url:
        empty, full = await prepare(url, args)
        samples: dict[str, list[dict[str, float]]] = {"empty": [], "full": []}
        for _ in range(args.repeat):
            for name, target in (("empty", empty), ("full", full)):
                samples[name].append(await measure(target, args))
                print(name, json.dumps({k: round(v, 2) for k, v in samples[name][-1].items()}))
        figures: dict[str, Any] = {name: core.summarize(s) for name, s in samples.items()}
        report(figures, args)
        result = {**await core.environment(url), "args": vars(args), "figures": figures}
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "scale.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
