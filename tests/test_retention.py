"""Retention: every table's growth is bounded by live work plus the retention window."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from helpers import move_clock

from engine import Concurrency, Context, Event, RateLimit, Throttle, TriggerEvent

BOOKKEEPING = [
    "runs",
    "steps",
    "events",
    "event_ids",
    "idempotency_keys",
    "rate_log",
    "throttles",
    "concurrency_slots",
    "matchers",
    "workers",
    "functions",
    "event_names",
    "flow_locks",
]


async def test_prune_leaves_only_what_live_work_needs(make_engine: Any, sql: Any) -> None:
    """After 40 runs under every kind of flow-control key, an end, time passing and a prune,
    no table keeps a row that no live work needs (they kept 4,000 each after 20,000 runs)."""
    app = make_engine("kept")

    @app.create_function(
        "limited",
        trigger=TriggerEvent("kept/e"),
        idempotency="event.data.k",
        rate_limit=RateLimit(limit=1000, period="1m", key="event.data.k"),
        throttle=Throttle(limit=1000, period="1s", key="event.data.k"),
        concurrency=Concurrency(limit=5, key="event.data.k"),
    )
    async def limited(ctx: Context) -> str:
        await ctx.step.wait_for_event("never", event="kept/never", timeout="1s")
        return "done"

    async with app.worker(concurrency=40):
        ids = await app.send(
            [Event(name="kept/e", id=f"e-{n}", data={"k": f"k-{n}"}) for n in range(40)]
        )
        for event_id in ids:
            [run] = await app.runs_for_event(event_id, at_least=1)
            await move_clock(sql, timedelta(seconds=2))  # the wait times out
            assert (await app.wait_for_run(run.run_id)).output == "done"
    counts = await _counts(sql)
    assert all(counts[t] > 0 for t in BOOKKEEPING if t not in ("matchers", "workers")), counts
    await move_clock(sql, timedelta(days=2))
    await sql.execute("CALL engine.prune_all('0', 7)")  # small batches: the loop is exercised
    assert await _counts(sql) == dict.fromkeys(BOOKKEEPING, 0)


async def test_prune_keeps_what_live_work_needs(make_engine: Any, sql: Any) -> None:
    """A run in flight keeps its event, its function, its matcher and its key rows."""
    app = make_engine("live")

    @app.create_function("waits", trigger=TriggerEvent("live/e"), idempotency="event.data.k")
    async def waits(ctx: Context) -> Any:
        return await ctx.step.wait_for_event("reply", event="live/reply", timeout="30d")

    async with app.worker():
        [event_id] = await app.send(Event(name="live/e", id="only", data={"k": "x"}))
        [run] = await app.runs_for_event(event_id, at_least=1)
        await sql.execute("CALL engine.prune_all('0')")
        counts = await _counts(sql)
        for table in ("runs", "events", "matchers", "functions", "idempotency_keys", "workers"):
            assert counts[table] == 1, (table, counts)
        await app.send(Event(name="live/reply"))
        assert (await app.wait_for_run(run.run_id)).status.value == "COMPLETED"


async def _counts(sql: Any) -> dict[str, int]:
    return {t: await sql.fetchval(f"SELECT count(*) FROM engine.{t}") for t in BOOKKEEPING}
