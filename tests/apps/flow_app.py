"""Functions under flow control, run by several worker processes in the flow tests.

Each step records when it starts and ends in `flow_log` (wall clock, from the database), so the
test can check from the database that no limit was ever exceeded.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import asyncpg

from engine import (
    Batch,
    Concurrency,
    Context,
    Debounce,
    Engine,
    Priority,
    RateLimit,
    Singleton,
    Throttle,
    TriggerEvent,
)

app = Engine("flow-app")


async def record(run_id: str, key: str) -> str:
    conn = await asyncpg.connect(os.environ["DATABASE_URL"])
    try:
        row_id = await conn.fetchval(
            "INSERT INTO flow_log (run_id, key, started_at) VALUES ($1, $2, clock_timestamp()) "
            "RETURNING id",
            run_id,
            key,
        )
        await asyncio.sleep(0.03)
        await conn.execute("UPDATE flow_log SET ended_at = clock_timestamp() WHERE id = $1", row_id)
    finally:
        await conn.close()
    return key


@app.create_function(
    "limited",
    trigger=TriggerEvent("flow/go"),
    concurrency=[Concurrency(limit=3), Concurrency(limit=1, key="event.data.user")],
)
async def limited(ctx: Context) -> Any:
    user = str(ctx.event.data["user"])
    await ctx.step.run("first", record, ctx.run_id, user)
    await ctx.step.sleep("rest", "20ms")  # a sleeping run holds no permit
    return await ctx.step.run("second", record, ctx.run_id, user)


@app.create_function(
    "rate-limited",
    trigger=TriggerEvent("flow/rate"),
    rate_limit=RateLimit(limit=5, period="1h", key="event.data.user"),
)
async def rate_limited(ctx: Context) -> Any:
    return ctx.event.data["n"]


@app.create_function(
    "throttled",
    trigger=TriggerEvent("flow/throttle"),
    throttle=Throttle(limit=2, period="1h", burst=1),
)
async def throttled(ctx: Context) -> Any:
    return ctx.event.data["n"]


@app.create_function(
    "debounced",
    trigger=TriggerEvent("flow/debounce"),
    debounce=Debounce(period="1m", key="event.data.user", timeout="5m"),
)
async def debounced(ctx: Context) -> Any:
    return ctx.event.data["n"]


@app.create_function(
    "batched",
    trigger=TriggerEvent("flow/batch"),
    batch_events=Batch(max_size=5, timeout="1m", key="event.data.user"),
)
async def batched(ctx: Context) -> Any:
    assert ctx.event == ctx.events[0]
    return [event.data["n"] for event in ctx.events]


@app.create_function(
    "charge-once", trigger=TriggerEvent("flow/charge"), idempotency="event.data.cart"
)
async def charge_once(ctx: Context) -> Any:
    return ctx.event.data["cart"]


@app.create_function(
    "one-per-user",
    trigger=TriggerEvent("flow/single"),
    singleton=Singleton(key="event.data.user", mode="skip"),
)
async def one_per_user(ctx: Context) -> Any:
    await ctx.step.sleep("hold", "1h")


async def open_gate(name: str) -> str:
    """Waits until the test opens the gate (a row in flow_gate): holds the slot meanwhile."""
    conn = await asyncpg.connect(os.environ["DATABASE_URL"])
    try:
        while not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM flow_gate)"):  # noqa: ASYNC110
            await asyncio.sleep(0.02)  # another process opens it: no in-process event to wait on
    finally:
        await conn.close()
    return name


@app.create_function(
    "prioritized",
    trigger=TriggerEvent("flow/priority"),
    concurrency=Concurrency(limit=1),
    priority=Priority(run="event.data.plan == 'enterprise' ? 120 : 0"),
)
async def prioritized(ctx: Context) -> Any:
    name = str(ctx.event.data["name"])
    if name == "blocker":
        await ctx.step.run("gate", open_gate, name)
    return await ctx.step.run("work", record, ctx.run_id, name)
