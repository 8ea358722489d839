"""A three-step function whose second step blocks, for a worker that the test kills."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import asyncpg

from engine import Context, Engine, TriggerEvent

app = Engine("crashy", os.environ.get("DATABASE_URL"))
BLOCK_IN_STEP_TWO = True


async def effect(step: str, run_id: str) -> str:
    conn = await asyncpg.connect(app.database_url)
    try:
        await conn.execute("INSERT INTO effects VALUES ($1, $2)", run_id, step)
    finally:
        await conn.close()
    if step == "two" and BLOCK_IN_STEP_TWO:
        await asyncio.sleep(3600)  # the worker is killed here
    return step


@app.create_function("crashy", trigger=TriggerEvent("crashy/go"))
async def crashy(ctx: Context) -> Any:
    return [await ctx.step.run(step, effect, step, ctx.run_id) for step in ("one", "two", "three")]
