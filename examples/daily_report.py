"""A report every weekday at 08:00 Paris time, whatever the number of workers.

    engine dev examples/daily_report.py

Each scheduled time starts exactly one run; a time missed while no worker ran starts one run
when a worker comes back. Daylight-saving changes follow Debian cron. The demo fast-forwards
durable time to the next scheduled time.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from engine import Context, Engine, TriggerCron
from engine.cron import CronSchedule
from engine.testing import advance_clock

SCHEDULE = "TZ=Europe/Paris 0 8 * * 1-5"
app = Engine(app_id="reports")


def collect_stats(day: str) -> dict[str, Any]:
    return {"day": day, "orders": 128, "revenue_eur": 5421.5}


def send_report(stats: dict[str, Any]) -> str:
    return f"report for {stats['day']}: {stats['orders']} orders, {stats['revenue_eur']} EUR"


@app.create_function(fn_id="daily-report", trigger=TriggerCron(SCHEDULE))
async def daily_report(ctx: Context) -> str:
    scheduled = datetime.fromisoformat(ctx.event.data["scheduled_at"])
    stats = await ctx.step.run("collect-stats", collect_stats, scheduled.date().isoformat())
    return await ctx.step.run("send-report", send_report, stats)


async def demo(app: Engine) -> None:
    """Called by `engine dev`: jump to the next 08:00 (Paris) weekday and watch the run."""
    db = await app.database()
    now = await db.fetchval("now")
    tick = CronSchedule.parse(SCHEDULE).next_after(now)
    await advance_clock(app, to=tick)
    while not (runs := await app.list_runs("daily-report")):  # noqa: ASYNC110 - a demo polls
        await asyncio.sleep(0.02)
    run = await app.wait_for_run(runs[0].run_id)
    local = tick.astimezone(CronSchedule.parse(SCHEDULE).zone)
    print(f"tick {local.isoformat()} -> run {run.status.value}: {run.output}")
