"""Sync steps that never return (for the thread pool, finish timeout and shutdown tests)."""

from __future__ import annotations

import os
import threading
from typing import Any

from engine import Context, Engine, TriggerEvent

app = Engine("hung", os.environ.get("DATABASE_URL"))
NEVER = threading.Event()


def hang() -> str:
    NEVER.wait()  # a call to a service that never answers, with no timeout
    return "too late"


@app.create_function("hung", trigger=TriggerEvent("hung/go"))
async def hung(ctx: Context) -> Any:
    return await ctx.step.run("hang", hang)
