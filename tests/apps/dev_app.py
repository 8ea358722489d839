"""An app for tests of `engine dev`: ``DEV_DEMO`` picks its demo (none by default).

* ``clock``: prints the durable clock's offset, then moves durable time six days forward;
* ``forever``: prints ``demo waiting`` and waits for what never comes (Ctrl-C ends it).
"""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime

from engine import Context, Engine, TriggerEvent
from engine.testing import advance_clock

app = Engine("dev-app")


@app.create_function("dev-hello", trigger=TriggerEvent("dev/hello"))
async def hello(ctx: Context) -> str:
    return "hello"


async def _clock_demo(app: Engine) -> None:
    offset = await advance_clock(app) - datetime.now(UTC)
    print(f"offset {round(offset.total_seconds() / 3600)}h", flush=True)
    await advance_clock(app, "6d")


async def _forever_demo(app: Engine) -> None:
    print("demo waiting", flush=True)
    await asyncio.Event().wait()


DEMOS = {"clock": _clock_demo, "forever": _forever_demo}
if os.environ.get("DEV_DEMO") in DEMOS:
    demo = DEMOS[os.environ["DEV_DEMO"]]
