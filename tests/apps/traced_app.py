"""A one-step function for the OTLP export test."""

from __future__ import annotations

import os
from typing import Any

from engine import Context, Engine, TriggerEvent

app = Engine("traced-app", os.environ.get("DATABASE_URL"))


@app.create_function("traced", trigger=TriggerEvent("traced/go"))
async def traced(ctx: Context) -> Any:
    return await ctx.step.run("only", lambda: "done")
