"""A function that reports how many objects the garbage collector leaves frozen in its worker."""

from __future__ import annotations

import gc
import os

from engine import Context, Engine, TriggerEvent

app = Engine("heap-app", os.environ.get("DATABASE_URL"))


@app.create_function("frozen", trigger=TriggerEvent("heap/frozen"))
async def frozen(ctx: Context) -> int:
    return gc.get_freeze_count()
