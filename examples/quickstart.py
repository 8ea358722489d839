"""Quickstart: a function with two steps and a durable sleep.

Run it with nothing installed but Python:

    pip install -e '.[dev]' && engine dev examples/quickstart.py

`engine dev` starts an embedded PostgreSQL (data in ./.engine), applies the schema, runs a
worker, and calls `demo(app)` below, which sends an event and prints the run's result.
"""

from __future__ import annotations

import json
from typing import Any

from engine import Context, Engine, Event, TriggerEvent

app = Engine(app_id="quickstart")


def fetch_user(user_id: str) -> dict[str, Any]:
    # A side effect (an API call, a query) belongs in a step: it runs once per run.
    return {"id": user_id, "name": "Ada", "email": "ada@example.com"}


async def send_welcome(user: dict[str, Any]) -> str:
    return f"welcome mail sent to {user['email']}"


@app.create_function(
    fn_id="welcome-user",
    trigger=TriggerEvent(event="user/signed-up", if_exp="event.data.plan != 'test'"),
    retries=3,
)
async def welcome_user(ctx: Context) -> dict[str, Any]:
    user = await ctx.step.run("fetch-user", fetch_user, ctx.event.data["user_id"])
    await ctx.step.sleep("let-them-look-around", "1s")  # durable: no worker is held meanwhile
    receipt = await ctx.step.run("send-welcome", send_welcome, user)
    ctx.logger.info("user.welcomed", user_id=user["id"])
    return {"user": user["name"], "receipt": receipt}


async def demo(app: Engine) -> None:
    """Called by `engine dev` once the worker runs."""
    [event_id] = await app.send(
        Event(name="user/signed-up", data={"user_id": "u-42", "plan": "pro"})
    )
    runs = await app.runs_for_event(event_id, at_least=1)  # routing takes milliseconds
    mine = next(run for run in runs if run.app_id == app.app_id)  # another app may listen too
    run = await app.wait_for_run(mine.run_id, timeout=30)
    print(f"run {run.run_id} {run.status.value}")
    for step in run.steps:
        print(f"  step {step.step_id:<22} {step.status:<10} {json.dumps(step.output)}")
    print(f"result: {json.dumps(run.output)}")
