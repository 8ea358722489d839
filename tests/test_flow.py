"""Flow control across worker processes: limits checked from the database, nothing lost."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from helpers import eventually, start_worker_process

from engine import Concurrency, ConfigurationError, Context, Event, TriggerEvent


def max_overlap(intervals: list[tuple[Any, Any]]) -> int:
    """The most intervals open at the same instant (an end at t closes before a start at t)."""
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    open_now = peak = 0
    for _, delta in points:
        open_now += delta
        peak = max(peak, open_now)
    return peak


async def test_concurrency_limits_hold_across_three_worker_processes(
    make_engine: Any, database_url: str, sql: Any
) -> None:
    await sql.execute(
        "CREATE TABLE flow_log (id bigserial PRIMARY KEY, run_id text, key text,"
        " started_at timestamptz, ended_at timestamptz)"
    )
    workers = [start_worker_process("flow_app:app", database_url) for _ in range(3)]
    try:
        sender = make_engine("flow-app")
        count = 24
        await sender.send([Event(name="flow/go", data={"user": n % 4}) for n in range(count)])
        await eventually(lambda: _completed(sql, count), timeout=60)
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(timeout=30)
    rows = await sql.fetch("SELECT run_id, key, started_at, ended_at FROM flow_log")
    assert len(rows) == 2 * count  # every run did both steps, once each
    assert max_overlap([(r["started_at"], r["ended_at"]) for r in rows]) <= 3
    assert len({r["run_id"] for r in rows}) == count
    for user in ("0", "1", "2", "3"):
        mine = [(r["started_at"], r["ended_at"]) for r in rows if r["key"] == user]
        assert max_overlap(mine) == 1, user
    assert await sql.fetchval("SELECT sum(in_use) FROM engine.concurrency_slots") == 0
    assert (
        max_overlap([(r["started_at"], r["ended_at"]) for r in rows]) >= 2
    )  # it did run in parallel


async def _completed(sql: Any, count: int) -> bool:
    done = await sql.fetchval(
        "SELECT count(*) FROM engine.runs WHERE function_id = 'limited' AND status = 'COMPLETED'"
    )
    return bool(done == count)


async def test_parked_runs_are_visible_and_start_when_a_slot_frees(make_engine: Any) -> None:
    """A run over the limit waits durably (no worker holds it) and says why."""
    app = make_engine()
    gate = asyncio.Event()

    async def hold() -> str:
        await gate.wait()
        return "done"

    @app.create_function("solo", concurrency=Concurrency(limit=1), trigger=TriggerEvent("s/go"))
    async def solo(ctx: Context) -> Any:
        return await ctx.step.run("hold", hold)

    async with app.worker(poll_interval="50ms"):
        first, second = await app.send([Event(name="s/go"), Event(name="s/go")])
        runs = [(await app.runs_for_event(e, at_least=1))[0].run_id for e in (first, second)]
        await eventually(lambda: _reason(app, runs, "concurrency limit reached"))
        gate.set()
        finished = [await app.wait_for_run(r) for r in runs]
    assert [r.status.value for r in finished] == ["COMPLETED", "COMPLETED"]


async def _reason(app: Any, runs: list[str], text: str) -> bool:
    for run_id in runs:
        run = await app.get_run(run_id)
        if run.status.value == "QUEUED" and text in (run.waiting_reason or ""):
            return True
    return False


def test_concurrency_options_are_checked_at_declaration(make_engine: Any) -> None:
    app = make_engine()
    with pytest.raises(ConfigurationError, match="limit must be"):
        Concurrency(limit=0)
    with pytest.raises(ConfigurationError, match="needs a key"):
        Concurrency(limit=1, scope="app")
    with pytest.raises(ConfigurationError, match=r"event\.data\.\("):
        Concurrency(limit=1, key="event.data.(")
    with pytest.raises(ConfigurationError, match="limit is 2"):
        app.create_function("f", concurrency=[Concurrency(limit=1)] * 3)(_noop)


async def _noop(ctx: Context) -> None:
    return None
