"""A function whose code changes between deploys (``VERSIONED_CODE``: old, new or patched): the
new code adds step ``x`` between ``b`` and the second sleep; the patched code adds it behind
``ctx.patched("add-x")``."""

from __future__ import annotations

import os
from typing import Any

from engine import Context, Engine, TriggerEvent

app = Engine("versioned", os.environ.get("DATABASE_URL"))


def declare(engine: Engine, version: str) -> None:
    """Declares ``journey`` as the code of ``version`` has it."""

    @engine.create_function("journey", trigger=TriggerEvent("versioned/go"))
    async def journey(ctx: Context) -> Any:
        done = [await ctx.step.run("a", lambda: "a")]
        await ctx.step.sleep("first", "1h")
        done.append(await ctx.step.run("b", lambda: "b"))
        if version == "new" or (version == "patched" and ctx.patched("add-x")):
            done.append(await ctx.step.run("x", lambda: "x"))
        await ctx.step.sleep("second", ctx.event.data.get("second", "1d"))
        done.append(await ctx.step.run("c", lambda: "c"))
        return done

    @engine.create_function("steady", trigger=TriggerEvent("versioned/steady"))
    async def steady(ctx: Context) -> Any:
        await ctx.step.run("one", lambda: 1)
        await ctx.step.sleep("nap", "1d")
        return await ctx.step.run("two", lambda: 2)


declare(app, os.environ.get("VERSIONED_CODE", "old"))
