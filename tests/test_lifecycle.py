"""Timeouts, bulk cancel and rerun."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from helpers import eventually, move_clock, only_run_id

from engine import ConfigurationError, Context, Event, RunStatus, Timeouts, TriggerEvent


async def test_finish_timeout_fires_while_the_run_sleeps(make_engine: Any, sql: Any) -> None:
    app = make_engine()

    @app.create_function("bounded", trigger=TriggerEvent("t/go"), timeouts=Timeouts(finish="30m"))
    async def bounded(ctx: Context) -> Any:
        await ctx.step.run("a", lambda: 1)
        await ctx.step.sleep("nap", "2h")
        await ctx.step.run("b", lambda: 2)

    async with app.worker(poll_interval="50ms"):
        [event_id] = await app.send(Event(name="t/go"))
        run_id = await only_run_id(app, event_id)
        await eventually(lambda: _status(app, run_id, "SLEEPING"))
        await move_clock(sql, timedelta(minutes=31))
        run = await app.wait_for_run(run_id)
    assert run.status is RunStatus.CANCELLED
    assert run.error is not None and "timeouts.finish" in run.error["message"]
    assert [s.step_id for s in run.steps] == ["a", "nap"]
    reason = await sql.fetchval(
        "SELECT data->>'reason' FROM engine.events WHERE name = 'engine/function.cancelled'"
    )
    assert "timeouts.finish" in reason


async def test_finish_timeout_stops_a_running_run_between_steps(make_engine: Any, sql: Any) -> None:
    app = make_engine()
    gate, entered = asyncio.Event(), asyncio.Event()

    async def held() -> int:
        entered.set()
        await gate.wait()
        return 1

    @app.create_function("busy", trigger=TriggerEvent("t/busy"), timeouts=Timeouts(finish="1m"))
    async def busy(ctx: Context) -> Any:
        await ctx.step.run("held", held)
        await ctx.step.run("after", lambda: 2)

    async with app.worker(lease="600ms"):
        [event_id] = await app.send(Event(name="t/busy"))
        run_id = await only_run_id(app, event_id)
        await asyncio.wait_for(entered.wait(), timeout=10)  # the step executes (not only RUNNING)
        # The clock jumps past the deadline and the lease: the worker's claim must not take
        # the run over from itself (that cancelled it with its step unrecorded); its heartbeat
        # renews the lease and learns of the deadline while the step still executes.
        await move_clock(sql, timedelta(minutes=2))
        await eventually(lambda: _lease_renewed(sql, run_id))
        gate.set()
        run = await app.wait_for_run(run_id)
    assert run.status is RunStatus.CANCELLED
    assert [s.step_id for s in run.steps] == ["held"]


async def test_start_timeout_cancels_a_run_that_waited_too_long(make_engine: Any, sql: Any) -> None:
    """A backlog: the second run is still queued when its start deadline passes."""
    app = make_engine()
    gate = asyncio.Event()
    ran: list[bool] = []

    async def hold(block: bool) -> bool:
        if block:
            await gate.wait()
        ran.append(block)
        return block

    @app.create_function("eager", trigger=TriggerEvent("t/eager"), timeouts=Timeouts(start="5m"))
    async def eager(ctx: Context) -> Any:
        return await ctx.step.run("hold", hold, ctx.event.data["block"])

    async with app.worker(concurrency=1):
        [busy_id] = await app.send(Event(name="t/eager", data={"block": True}))
        busy = await only_run_id(app, busy_id)
        await eventually(lambda: _status(app, busy, "RUNNING"))
        [late_id] = await app.send(Event(name="t/eager", data={"block": False}))
        late = await only_run_id(app, late_id)
        await move_clock(sql, timedelta(minutes=6))
        gate.set()
        assert (await app.wait_for_run(busy)).status is RunStatus.COMPLETED
        stale = await app.wait_for_run(late)
    assert stale.status is RunStatus.CANCELLED
    assert stale.error is not None and "timeouts.start" in stale.error["message"]
    assert ran == [True]


def test_invalid_timeouts_fail_at_declaration(make_engine: Any) -> None:
    app = make_engine()
    with pytest.raises(ConfigurationError, match=r"timeouts\.finish"):
        app.create_function("f", timeouts=Timeouts(finish="soon"))(_noop)
    with pytest.raises(ConfigurationError, match="positive"):
        app.create_function("g", timeouts=Timeouts(start=0))(_noop)


async def test_cancel_runs_in_bulk(make_engine: Any) -> None:
    app = make_engine()

    @app.create_function("sleeper", trigger=TriggerEvent("s/go"))
    async def sleeper(ctx: Context) -> Any:
        await ctx.step.sleep("nap", "1h")

    async with app.worker():
        before = datetime.now(UTC) - timedelta(seconds=1)
        ids = await app.send([Event(name="s/go", data={"plan": p}) for p in ["free", "pro"] * 3])
        runs = [await only_run_id(app, i) for i in ids]
        for run_id in runs:
            await eventually(lambda run_id=run_id: _status(app, run_id, "SLEEPING"))
        count = await app.cancel_runs(
            "sleeper", started_after=before, if_exp="event.data.plan == 'pro'"
        )
        assert count == 3
        statuses = Counter([(await app.get_run(r)).status.value for r in runs])
        assert statuses == {"CANCELLED": 3, "SLEEPING": 3}
        assert await app.cancel_runs("sleeper", started_before=before) == 0
        assert await app.cancel_runs("sleeper") == 3


async def test_rerun_from_a_step_keeps_earlier_outputs(make_engine: Any) -> None:
    app = make_engine()
    calls: Counter[str] = Counter()

    def effect(name: str) -> str:
        calls[name] += 1
        return f"{name}{calls[name]}"

    @app.create_function("pipeline", trigger=TriggerEvent("p/go"))
    async def pipeline(ctx: Context) -> Any:
        a = await ctx.step.run("extract", effect, "extract")
        b = await ctx.step.run("load", effect, "load")
        return [a, b, ctx.event.data["x"]]

    async with app.worker():
        [event_id] = await app.send(Event(name="p/go", data={"x": 1}))
        first = await app.wait_for_run(await only_run_id(app, event_id))
        again = await app.wait_for_run(await app.rerun(first.run_id))
        resumed = await app.wait_for_run(await app.rerun(first.run_id, from_step="load"))
    assert first.output == ["extract1", "load1", 1]
    assert again.output == ["extract2", "load2", 1]
    assert resumed.output == ["extract1", "load3", 1]  # extract kept from the first run
    assert calls == {"extract": 2, "load": 3}


async def _noop(ctx: Context) -> None:
    return None


async def _lease_renewed(sql: Any, run_id: str) -> bool:
    query = "SELECT lease_expires_at > engine.now() FROM engine.runs WHERE id = $1::uuid"
    return bool(await sql.fetchval(query, run_id))


async def _status(app: Any, run_id: str, status: str) -> bool:
    return (await app.get_run(run_id)).status.value == status


async def test_advance_clock_moves_leases_along(make_engine: Any) -> None:
    """A run executing while durable time jumps a day keeps its worker: no takeover, one pass."""
    from engine.testing import advance_clock

    app = make_engine()
    gate = asyncio.Event()
    passes: Counter[str] = Counter()

    async def held() -> int:
        passes["held"] += 1
        await gate.wait()
        return 1

    @app.create_function("long", trigger=TriggerEvent("l/go"))
    async def long(ctx: Context) -> Any:
        return await ctx.step.run("held", held)

    async with app.worker(lease="1s", poll_interval="50ms"):
        [event_id] = await app.send(Event(name="l/go"))
        run_id = await only_run_id(app, event_id)
        await eventually(lambda: _status(app, run_id, "RUNNING"))
        before = datetime.now(UTC)
        moved_to = await advance_clock(app, "1d")
        assert moved_to - before >= timedelta(days=1)
        await asyncio.sleep(0.3)  # a takeover would happen here if leases had not moved
        gate.set()
        run = await app.wait_for_run(run_id)
    assert run.status is RunStatus.COMPLETED
    assert passes == {"held": 1}
    with pytest.raises(ValueError, match="negative"):
        await advance_clock(app, timedelta(seconds=-1))


async def test_a_routed_run_reaches_its_first_step_before_the_tick_claims_more(
    make_engine: Any,
) -> None:
    """A run the tick created leased to this worker starts its first step before the tick's
    claim round trip: the step's code runs while the claim is in flight, not after its Python.
    (The event comes from another process, here an Engine with no worker: a send beside a
    running worker is routed in its own transaction, tests/test_send_routing.py.)"""
    app, sender = make_engine(), make_engine()
    order: list[str] = []

    @app.create_function("first-step", trigger=TriggerEvent("t/first-step"))
    async def first_step(ctx: Context) -> None:
        async def step() -> None:
            order.append("step")

        await ctx.step.run("one", step)

    async with app.worker() as worker:
        claim, route = worker._claim, worker._router.route  # type: ignore[union-attr]

        async def noting_claim(limit: int) -> Any:
            order.append("claim")
            return await claim(limit)

        async def noting_route(*args: Any) -> Any:
            routed, mine = await route(*args)
            if mine:
                order.append("routed here")
            return routed, mine

        worker._claim = noting_claim  # type: ignore[method-assign]
        worker._router.route = noting_route  # type: ignore[method-assign,union-attr]
        [event_id] = await sender.send(Event(name="t/first-step"))
        run = await app.wait_for_run(await only_run_id(app, event_id))
    assert run.status is RunStatus.COMPLETED
    after = order[order.index("routed here") :]
    assert after[:3] == ["routed here", "step", "claim"], order


async def test_the_claim_tells_when_the_work_it_left_comes_due(
    make_engine: Any, sql: asyncpg.Connection
) -> None:
    """A tick's claim brings, in the same round trip, when the next work is due: computed after
    the claim, so that a run it just took is not that next work (the timer would fire at once)."""
    app = make_engine("naps")

    @app.create_function("nap", trigger=TriggerEvent("t/nap"))
    async def nap(ctx: Context) -> None:
        await ctx.step.sleep("nap", ctx.event.data["for"])

    async with app.worker(poll_interval="50ms"):
        ids = await app.send([Event(name="t/nap", data={"for": d}) for d in ("1h", "3h")])

        async def sleeping() -> bool:
            runs = [r for i in ids for r in await app.runs_for_event(i)]
            return len(runs) == 2 and all(r.status is RunStatus.SLEEPING for r in runs)

        await eventually(sleeping)
    await move_clock(sql, timedelta(hours=2))  # the 1h nap is due, the 3h one in an hour
    rows = await sql.fetch(
        "SELECT id, next_due, now FROM engine.claim_runs_then_next_due("
        "'naps', '{nap}', gen_random_uuid(), '2 hours', 10, 1000000, true)"
    )
    *claimed, due = rows
    assert len(claimed) == 1 and due["id"] is None
    assert timedelta(minutes=59) < due["next_due"] - due["now"] <= timedelta(hours=1)


async def test_a_claim_that_fills_its_slots_does_not_compute_when_work_comes_due(
    make_engine: Any, sql: asyncpg.Connection
) -> None:
    """A claim that took as many runs as it was allowed leaves the worker no free slot: it
    claims again at once, so the claim skips engine.next_due (a scan of the due and leased runs
    at each tick of a busy worker) and says NULL, although work is still due."""
    app = make_engine("naps")

    @app.create_function("nap", trigger=TriggerEvent("t/nap"))
    async def nap(ctx: Context) -> None:
        await ctx.step.sleep("nap", "1h")

    async with app.worker(poll_interval="50ms"):
        ids = await app.send([Event(name="t/nap") for _ in range(3)])

        async def sleeping() -> bool:
            runs = [r for i in ids for r in await app.runs_for_event(i)]
            return len(runs) == 3 and all(r.status is RunStatus.SLEEPING for r in runs)

        await eventually(sleeping)
    await move_clock(sql, timedelta(hours=2))  # all three naps are due
    claim = (
        "SELECT id, next_due, now FROM engine.claim_runs_then_next_due("
        "'naps', '{nap}', gen_random_uuid(), '2 hours', $1, 1000000, true)"
    )
    *claimed, due = await sql.fetch(claim, 2)
    assert len(claimed) == 2 and due["id"] is None and due["next_due"] is None
    assert due["now"] is not None
    *claimed, due = await sql.fetch(claim, 2)  # the last one: a slot is left
    assert len(claimed) == 1 and due["next_due"] is not None


async def test_a_worker_with_every_slot_busy_waits_for_a_run_to_end(make_engine: Any) -> None:
    """Runs due that a busy worker has no slot for do not make it tick until one of its runs
    ends: no timer is armed for them (it would fire at once and again after every tick, two
    round trips each, for as long as the slots stay full). The run's end then starts the next,
    without waiting for the poll."""
    app = make_engine("busy")
    release = asyncio.Event()

    async def held() -> None:
        await release.wait()

    @app.create_function("hold", trigger=TriggerEvent("t/hold"))
    async def hold(ctx: Context) -> str:
        await ctx.step.run("held", held)
        return "done"

    async with app.worker(concurrency=1, poll_interval="30s") as worker:
        first = await app.send(Event(name="t/hold"))
        await eventually(lambda: asyncio.sleep(0, len(worker.executions) == 1))
        others = await app.send([Event(name="t/hold") for _ in range(3)])
        runs = [await only_run_id(app, i) for i in (*first, *others)]
        await asyncio.sleep(0.1)  # the NOTIFY of the queued runs has had its tick
        ticks = worker.ticks
        await asyncio.sleep(0.5)
        idle_ticks = worker.ticks - ticks
        release.set()
        for run_id in runs:  # well before the 30 s poll
            assert (await app.wait_for_run(run_id, timeout=10)).output == "done"
    assert idle_ticks <= 2, idle_ticks  # spinning, it made hundreds
