"""What recording a step's input costs: CPU and time per step with and without it, interleaved.

    python bench/step_input.py [--steps 500] [--repeat 12]

One embedded PostgreSQL, one fresh database, two apps in this process: ``on``
(``Engine(record_step_input=True)``, the default) and ``off`` (``record_step_input=False``), each
with one function of N sequential steps given one integer (``Checkpointing(buffered_steps=100)``,
so the commits weigh little and the engine's own Python shows). Each repeat runs one run of
each, in an order alternated from one repeat to the next, and takes its time per step (the
run's start to its end, on the database's clock) and this process's CPU time per step. Prints
the medians with their ranges.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from core import fresh_database, scratch_server

from engine import Checkpointing, Context, Engine, Event, TriggerEvent
from engine.db import Database
from engine.logs import configure_logging


async def _same(value: int) -> int:
    return value


def declare(app: Engine, steps: int) -> None:
    """One function of ``steps`` trivial steps, each given one integer (its input)."""

    @app.create_function(
        "steps",
        trigger=TriggerEvent(f"bench/{app.app_id}"),
        checkpointing=Checkpointing(buffered_steps=100, max_interval="1h"),
    )
    async def many(ctx: Context) -> int:
        for i in range(steps):
            await ctx.step.run(f"s{i}", _same, i)
        return steps


async def per_step(app: Engine, steps: int) -> tuple[float, float]:
    """Milliseconds per step of one run, and this process's CPU milliseconds per step."""
    [event_id] = await app.send(Event(name=f"bench/{app.app_id}"))
    cpu = time.process_time()
    [run] = await app.runs_for_event(event_id, at_least=1)
    done = await app.wait_for_run(run.run_id, timeout=600)
    cpu = time.process_time() - cpu
    assert done.started_at is not None and done.ended_at is not None
    return (done.ended_at - done.started_at).total_seconds() / steps * 1000, cpu / steps * 1000


async def measure(url: str, steps: int, repeat: int) -> dict[str, list[tuple[float, float]]]:
    """The samples of both apps, interleaved."""
    apps = {
        name: Engine(name, url, max_steps=steps + 1, record_step_input=name == "on")
        for name in ("on", "off")
    }
    for app in apps.values():
        declare(app, steps)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in apps}
    async with apps["on"].worker(concurrency=4), apps["off"].worker(concurrency=4):
        for n in range(repeat):
            for name in list(apps) if n % 2 == 0 else list(apps)[::-1]:
                samples[name].append(await per_step(apps[name], steps))
    for app in apps.values():
        await app.close()
    return samples


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=12)
    args = parser.parse_args()
    configure_logging("warning")
    with scratch_server("engine-bench-input-") as server_url:
        url = await fresh_database(server_url, "bench_step_input")
        await Database(url).apply_schema()
        samples = await measure(url, args.steps, args.repeat)
    for name, values in samples.items():
        walls, cpus = [v[0] for v in values], [v[1] for v in values]
        print(
            f"input {name}: {statistics.median(walls):.3f} ms a step"
            f" ({min(walls):.3f}-{max(walls):.3f}), CPU {statistics.median(cpus):.3f} ms"
            f" ({min(cpus):.3f}-{max(cpus):.3f})"
        )


if __name__ == "__main__":
    asyncio.run(main())
