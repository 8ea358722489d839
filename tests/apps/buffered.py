"""Seven steps with buffered checkpoints (three at a time); the fifth blocks while
``BUFFERED_BLOCK=1``, for a worker that the test kills."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import asyncpg

from engine import Checkpointing, Context, Engine, TriggerEvent

app = Engine("buffered", os.environ.get("DATABASE_URL"))
STEPS = ("one", "two", "three", "four", "five", "six", "seven")


async def effect(step: str, run_id: str) -> str:
    conn = await asyncpg.connect(app.database_url)
    try:
        await conn.execute("INSERT INTO effects VALUES ($1, $2)", run_id, step)
    finally:
        await conn.close()
    if step == "five" and os.environ.get("BUFFERED_BLOCK") == "1":
        await asyncio.sleep(3600)  # the worker is killed here
    return step


@app.create_function(
    "buffered",
    trigger=TriggerEvent("buffered/go"),
    checkpointing=Checkpointing(buffered_steps=3, max_interval="1h"),
)
async def buffered(ctx: Context) -> Any:
    return [await ctx.step.run(step, effect, step, ctx.run_id) for step in STEPS]
