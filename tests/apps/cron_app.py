"""A nightly job in Paris time, for the cron tests (run by several worker processes)."""

from __future__ import annotations

from typing import Any

from engine import Context, Engine, TriggerCron

app = Engine("cron-app")


@app.create_function("nightly", trigger=TriggerCron("TZ=Europe/Paris 0 3 * * *"))
async def nightly(ctx: Context) -> Any:
    return await ctx.step.run("report", lambda: ctx.event.data["scheduled_at"])
