"""The chaos workloads: steps with side effects, a wait, a sleep and random failures (retried);
and steps under a concurrency limit, each logging the interval it ran in.

Each step writes its side effect twice: to `chaos_log` (plainly: at least once) and to
`chaos_once` keyed by run and step, the step's idempotency key (exactly once).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from typing import Any

import asyncpg

from engine import Backoff, Concurrency, Context, Engine, TriggerEvent


def _stall(_signum: int, _frame: Any) -> None:
    """A stop-the-world pause, like a long garbage collection: the handler runs on the main
    thread, so the event loop (steps, heartbeats, writes) stands still while it sleeps."""
    time.sleep(float(os.environ.get("CHAOS_STALL_SECONDS", "0.5")))


signal.signal(signal.SIGUSR1, _stall)

app = Engine("chaos", backoff=Backoff(initial="20ms", maximum="200ms", jitter=0.0))


async def effect(run_id: str, step: str) -> str:
    # The worker's own URL, unless the scenario limits the worker's role (test_connection_limit).
    conn = await asyncpg.connect(os.environ.get("CHAOS_EFFECT_URL") or os.environ["DATABASE_URL"])
    try:
        await conn.execute("INSERT INTO chaos_log (run_id, step) VALUES ($1, $2)", run_id, step)
        await conn.execute(
            "INSERT INTO chaos_once (key) VALUES ($1) ON CONFLICT DO NOTHING", f"{run_id}:{step}"
        )
    finally:
        await conn.close()
    # Widen the window between the side effect and its checkpoint, where a kill hurts most.
    await asyncio.sleep(random.uniform(0, 0.02))
    if random.random() < 0.1:
        raise RuntimeError("a transient failure")
    return step


@app.create_function("chaos", trigger=TriggerEvent("chaos/go"), retries=20)
async def chaos(ctx: Context) -> Any:
    for index in range(3):
        await ctx.step.run(f"effect-{index}", effect, ctx.run_id, f"effect-{index}")
        if index == 0:  # a wait that times out (nobody sends the event): None
            assert (
                await ctx.step.wait_for_event("signal", event="chaos/never", timeout="50ms") is None
            )
        if index == 1:
            await ctx.step.sleep("nap", "100ms")
    return "done"


LIMIT = 4  # runs of `limited` executing at once, across every worker


async def work(run_id: str, step: str) -> str:
    """A step that logs when it ran (wall clock: every worker runs on this machine)."""
    started = time.time()
    await asyncio.sleep(random.uniform(0.005, 0.03))
    # The worker's own URL, unless the scenario limits the worker's role (test_connection_limit).
    conn = await asyncpg.connect(os.environ.get("CHAOS_EFFECT_URL") or os.environ["DATABASE_URL"])
    try:
        await conn.execute(
            "INSERT INTO chaos_spans (run_id, step, started, ended) VALUES ($1, $2, $3, $4)",
            run_id,
            step,
            started,
            time.time(),
        )
    finally:
        await conn.close()
    return step


@app.create_function(
    "limited",
    trigger=TriggerEvent("chaos/limited"),
    retries=20,
    concurrency=Concurrency(limit=LIMIT),
)
async def limited(ctx: Context) -> Any:
    for index in range(2):
        await ctx.step.run(f"work-{index}", work, ctx.run_id, f"work-{index}")
    return "done"
