"""An async step that blocks the event loop longer than the worker's lease (a CPU loop or a
time.sleep in async code), for the blocked-loop tests. Each execution of the step appends a
line to $BLOCK_LOG."""

from __future__ import annotations

import os
import time
from typing import Any

from engine import Context, Engine, TriggerEvent

app = Engine("blocking", os.environ.get("DATABASE_URL"))


async def block() -> str:
    with open(os.environ["BLOCK_LOG"], "a") as log:  # noqa: ASYNC230 - blocking on purpose
        log.write(f"{os.getpid()}\n")
    time.sleep(float(os.environ.get("BLOCK_SECONDS", "3")))  # noqa: ASYNC251 - on purpose
    return "unblocked"


@app.create_function("blocking", trigger=TriggerEvent("blocking/go"))
async def blocking(ctx: Context) -> Any:
    return await ctx.step.run("block", block, retries=1)
