"""A sign-up drip: messages days apart, each sent once, with durable sleeps in between.

    engine dev examples/signup_drip.py

A sleeping run holds no worker and no connection: a drip of a million users is a million rows.
The demo fast-forwards durable time instead of waiting a week.
"""

from __future__ import annotations

import asyncio

from engine import Context, Engine, Event, RunStatus, TriggerEvent
from engine.testing import advance_clock

app = Engine(app_id="growth")
SENT: list[str] = []  # stands in for an email provider


def send_email(to: str, template: str) -> str:
    SENT.append(f"{template} -> {to}")
    return f"{template} sent"


def is_activated(user_id: str) -> bool:
    return user_id.endswith("7")  # pretend lookup


@app.create_function(fn_id="signup-drip", trigger=TriggerEvent("user/signed-up"))
async def signup_drip(ctx: Context) -> list[str]:
    email = ctx.event.data["email"]
    sent = [await ctx.step.run("welcome", send_email, email, "welcome")]
    await ctx.step.sleep("wait-a-day", "1d")
    sent.append(await ctx.step.run("tips", send_email, email, "getting-started-tips"))
    await ctx.step.sleep("wait-three-days", "3d")
    if not await ctx.step.run("check-activation", is_activated, ctx.event.data["user_id"]):
        sent.append(await ctx.step.run("nudge", send_email, email, "need-a-hand"))
    return sent


async def demo(app: Engine) -> None:
    """Called by `engine dev`: one user's first week, in a few seconds."""
    [event_id] = await app.send(
        Event(name="user/signed-up", data={"user_id": "u-1", "email": "ada@example.com"})
    )
    runs = await app.runs_for_event(event_id, at_least=1)
    run_id = next(run.run_id for run in runs if run.app_id == app.app_id)  # not another app's
    await _settled(app, run_id)
    for day in range(1, 6):
        await advance_clock(app, "1d")
        await _settled(app, run_id)  # the worker resumes what came due
        print(f"day {day}: {len(SENT)} message(s) sent")
    run = await app.wait_for_run(run_id)
    print(f"run {run.status.value}: {run.output}")
    for step in run.steps:
        print(f"  {step.kind:<6} {step.step_id:<16} {step.status}")


async def _settled(app: Engine, run_id: str) -> None:
    """Returns once the run has ended, or sleeps until a time still to come."""
    db = await app.database()
    while True:
        run, now = await app.get_run(run_id), await db.fetchval("now")
        if run.status.terminal:
            return
        if run.status is RunStatus.SLEEPING and any(
            step.wake_at is not None and step.wake_at > now for step in run.steps
        ):
            return
        await asyncio.sleep(0.01)
