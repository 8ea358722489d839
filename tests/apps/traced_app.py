"""A function with a retried step, a sleep and a wait, for the OTLP export tests."""

from __future__ import annotations

import os
from typing import Any

from engine import Backoff, Context, Engine, TriggerEvent

app = Engine("traced-app", os.environ.get("DATABASE_URL"), backoff=Backoff(initial="100ms"))


@app.create_function("traced", trigger=TriggerEvent("traced/go"))
async def traced(ctx: Context) -> Any:
    def flaky() -> str:
        if ctx.attempt == 0:
            raise RuntimeError("the first try fails")
        return "ok"

    await ctx.step.run("flaky", flaky)
    await ctx.step.sleep("nap", "100ms")
    await ctx.step.wait_for_event("reply", event="traced/reply", timeout="100ms")
    return await ctx.step.run("only", lambda: "done")
