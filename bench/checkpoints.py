"""What buffered checkpoints save: time per step with buffered_steps 1, 10 and 100, and with 1
and ``synchronous_commit=False``, against the commit floor measured in the same run.

    python bench/checkpoints.py [--steps 1000] [--repeat 5] [--sync] [--no-step-input]

One embedded PostgreSQL with durable settings (fsync and synchronous_commit on), one fresh
database. Each repeat measures, in an order rotated from one repeat to the next (interleaved,
so that a slow minute of this shared machine hits every figure alike):

- floor: a one-client commit of a step-shaped transaction (an INSERT of a JSON row), the cost
  each step pays when it is committed on its own;
- for each buffer size: one run of N trivial sequential steps of a function declared with
  ``Checkpointing(buffered_steps=B, max_interval="1h")``, time per step (from the run's start to
  its end, on the database's clock) and as a fraction of the floor of the same repeat, and
  this process's CPU time per step (the engine's own Python, the server's work excluded);
- ``1-async``: ``Checkpointing(buffered_steps=1, synchronous_commit=False)``, one commit per
  step that does not wait for its WAL flush.

Step callables are async (``--sync``: plain functions, which run in the worker's thread pool):
the figure is the engine's own cost per step. Each step is given one argument, recorded as its
input (``--no-step-input``: ``Engine(record_step_input=False)``, to see what recording costs).
Prints medians with min and max and writes them
as JSON to bench/results/checkpoints.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).parent))
from core import environment, fresh_database, scratch_server

from engine import Checkpointing, Context, Engine, Event, TriggerEvent
from engine.db import Database
from engine.logs import configure_logging

# The variants measured, by name: each a function declared with this Checkpointing.
VARIANTS = {
    "1": Checkpointing(buffered_steps=1, max_interval="1h"),
    "10": Checkpointing(buffered_steps=10, max_interval="1h"),
    "100": Checkpointing(buffered_steps=100, max_interval="1h"),
    "1-async": Checkpointing(buffered_steps=1, max_interval="1h", synchronous_commit=False),
}


async def floor(url: str, commits: int) -> float:
    """Milliseconds per one-client commit of an INSERT of a small JSON row."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS floor_t (id bigserial PRIMARY KEY, v jsonb)")
        began = time.perf_counter()
        for i in range(commits):
            async with conn.transaction():
                await conn.execute("INSERT INTO floor_t (v) VALUES ($1::jsonb)", f'{{"i": {i}}}')
        return (time.perf_counter() - began) / commits * 1000
    finally:
        await conn.close()


async def _nothing(i: int) -> int:
    return i


def _nothing_sync(i: int) -> int:
    return i


def declare(app: Engine, steps: int, sync: bool) -> None:
    """One function per variant, each a loop of ``steps`` trivial steps."""
    body = _nothing_sync if sync else _nothing
    for name, checkpointing in VARIANTS.items():

        @app.create_function(
            f"steps-{name}",
            trigger=TriggerEvent(f"bench/steps-{name}"),
            checkpointing=checkpointing,
        )
        async def many(ctx: Context) -> int:
            for i in range(steps):
                await ctx.step.run(f"s{i}", body, i)
            return steps


async def per_step(app: Engine, variant: str, steps: int) -> tuple[float, float]:
    """Milliseconds per step of one run (its start to its end, on the database's clock), and
    this process's CPU time per step meanwhile (the engine's Python; the server's excluded)."""
    [event_id] = await app.send(Event(name=f"bench/steps-{variant}"))
    cpu = time.process_time()
    [run] = await app.runs_for_event(event_id, at_least=1)
    db = await app.database()
    while await db.fetchval("run_status", run.run_id) not in ("COMPLETED", "FAILED"):  # noqa: ASYNC110 - polls the database
        await asyncio.sleep(0.05)
    cpu = time.process_time() - cpu  # before get_run decodes the run's N steps
    done = await app.get_run(run.run_id)
    assert done.status.value == "COMPLETED", done.error
    assert done.started_at is not None and done.ended_at is not None
    wall = (done.ended_at - done.started_at).total_seconds()
    return wall / steps * 1000, cpu / steps * 1000


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--sync", action="store_true", help="sync step callables (a thread each)")
    parser.add_argument("--no-step-input", action="store_true", help="record no step input")
    args = parser.parse_args()
    configure_logging("warning")
    with scratch_server("engine-bench-") as server_url:  # stopped and removed at the end
        url = await fresh_database(server_url, "bench_checkpoints")
        await Database(url).apply_schema()
        app = Engine(
            "bench-checkpoints",
            url,
            max_steps=args.steps + 1,
            record_step_input=not args.no_step_input,
        )
        declare(app, args.steps, args.sync)
        samples: dict[str, list[float]] = {"floor_ms": []}
        for b in VARIANTS:
            samples[f"step_ms_{b}"] = []
            samples[f"step_cpu_ms_{b}"] = []
            samples[f"per_floor_{b}"] = []
        figures = ["floor", *VARIANTS]
        async with app.worker(concurrency=10):
            for n in range(args.repeat):
                order = figures[n % len(figures) :] + figures[: n % len(figures)]
                taken: dict[str, float] = {}
                cpu: dict[str, float] = {}
                for figure in order:
                    if figure == "floor":
                        taken[figure] = await floor(url, args.steps)
                    else:
                        taken[figure], cpu[figure] = await per_step(app, figure, args.steps)
                samples["floor_ms"].append(taken["floor"])
                for b in VARIANTS:
                    samples[f"step_ms_{b}"].append(taken[b])
                    samples[f"step_cpu_ms_{b}"].append(cpu[b])
                    samples[f"per_floor_{b}"].append(taken[b] / taken["floor"])
                print(f"repeat {n + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in taken.items()))
        await app.close()
        result = {
            **await environment(url),
            "args": vars(args),
            "figures": {key: summary(values) for key, values in samples.items()},
        }
        for key, value in result["figures"].items():
            print(f"{key}: {value['median']:.3f} ({value['min']:.3f}-{value['max']:.3f})")
        out = Path(__file__).parent / "results"
        out.mkdir(exist_ok=True)
        name = "checkpoints-no-input.json" if args.no_step_input else "checkpoints.json"
        (out / name).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
