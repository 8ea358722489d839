"""A CRM sync, limited per user and throttled globally.

    engine dev examples/rate_limited_sync.py

Every `crm/contact.updated` event asks to push a user's contact to a CRM whose API allows a few
calls per second in all, and whose per-user endpoint should not be hammered:

- `rate_limit`: at most 2 syncs per user per minute; further updates in that minute start no
  run (their run is recorded SKIPPED, with the reason, so nothing is dropped silently);
- `throttle`: at most 4 starts per second across all users, spread evenly; excess runs wait
  their turn in PostgreSQL (delayed, never dropped);
- `concurrency`: one sync per user at a time.

The limits hold whatever the number of worker processes: they are enforced inside the
transactions that create and claim runs.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from engine import Concurrency, Context, Engine, Event, RateLimit, Throttle, TriggerEvent

app = Engine(app_id="crm")


def push_contact(user_id: str, fields: dict[str, Any]) -> str:
    return f"pushed {len(fields)} field(s) for {user_id}"


@app.create_function(
    fn_id="sync-contact",
    trigger=TriggerEvent("crm/contact.updated"),
    rate_limit=RateLimit(limit=2, period="1m", key="event.data.user_id"),
    throttle=Throttle(limit=4, period="1s", burst=1),
    concurrency=Concurrency(limit=1, key="event.data.user_id"),
)
async def sync_contact(ctx: Context) -> str:
    return await ctx.step.run(
        "push", push_contact, ctx.event.data["user_id"], ctx.event.data["fields"]
    )


async def demo(app: Engine) -> None:
    """Called by `engine dev`: a burst of 10 updates from 4 users."""
    users = ["ada", "ada", "ada", "bob", "bob", "cy", "cy", "cy", "cy", "dee"]
    began = time.monotonic()
    ids = await app.send(
        [
            Event(name="crm/contact.updated", data={"user_id": user, "fields": {"n": n}})
            for n, user in enumerate(users)
        ]
    )
    runs = [await _run_of(app, event_id) for event_id in ids]
    finished = [await app.wait_for_run(run_id) for run_id in runs]
    outcome: Counter[tuple[str, str]] = Counter()
    for run in finished:
        outcome[(run.event.data["user_id"], run.status.value)] += 1
    for (user, status), count in sorted(outcome.items()):
        print(f"{user:<4} {status:<9} x{count}")
    skipped = next(run for run in finished if run.status.value == "SKIPPED")
    print(f"why skipped: {skipped.waiting_reason}")
    print(f"all {len(finished)} settled in {time.monotonic() - began:.1f}s (throttled to 4/s)")


async def _run_of(app: Engine, event_id: str) -> str:
    """The run an event started in this app (another app may listen to the same event)."""
    runs = await app.runs_for_event(event_id, at_least=1)  # routing takes milliseconds
    return next(run.run_id for run in runs if run.app_id == app.app_id)
