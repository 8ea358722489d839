"""A function whose first step takes a while, for the SIGTERM test."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from engine import Context, Engine, TriggerEvent

app = Engine("graceful", os.environ.get("DATABASE_URL"))


async def slow_step() -> str:
    await asyncio.sleep(float(os.environ.get("STEP_SECONDS", "1")))
    return "finished during the grace period"


@app.create_function("graceful", trigger=TriggerEvent("graceful/go"))
async def graceful(ctx: Context) -> Any:
    first = await ctx.step.run("slow", slow_step)
    second = await ctx.step.run("after", lambda: "ran on the next worker")
    return [first, second]
