"""wait_for_event and cancel-on-event: matched once, with a look back, racing workers."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import timedelta
from typing import Any
from uuid import UUID

import asyncpg
import pytest
from helpers import eventually, move_clock, only_run_id

from engine import Cancel, ConfigurationError, Context, Event, RunStatus, TriggerEvent


def order_flow(app: Any, gate: asyncio.Event | None = None, **wait: Any) -> Any:
    """A function that (optionally) blocks in a first step, then waits for a payment."""

    async def hold() -> str:
        if gate is not None:
            await gate.wait()
        return "held"

    @app.create_function("order", trigger=TriggerEvent("shop/order"))
    async def order(ctx: Context) -> Any:
        await ctx.step.run("hold", hold)
        options = {"timeout": "1h", "match": "data.order_id", **wait}
        payment = await ctx.step.wait_for_event("payment", event="shop/paid", **options)
        return None if payment is None else payment.data

    return order


async def waiting(app: Any, run_id: str) -> bool:
    return (await app.get_run(run_id)).status is RunStatus.WAITING


async def test_wait_is_resumed_by_a_matching_event(make_engine: Any) -> None:
    """The run waits without a worker slot; the matching event (not the other one) resumes it."""
    app = make_engine()
    order_flow(app)
    async with app.worker():
        [event_id] = await app.send(Event(name="shop/order", data={"order_id": 7}))
        run_id = await only_run_id(app, event_id)
        await eventually(lambda: waiting(app, run_id))
        run = await app.get_run(run_id)
        assert run.steps[1].kind == "wait" and run.steps[1].status == "WAITING"
        assert "shop/paid" in (run.waiting_reason or "")
        await app.send(Event(name="shop/paid", data={"order_id": 8, "amount": 1}))
        await app.send(Event(name="shop/paid", data={"order_id": 7, "amount": 2}))
        run = await app.wait_for_run(run_id)
    assert run.status is RunStatus.COMPLETED
    assert run.output == {"order_id": 7, "amount": 2}


async def test_wait_times_out_with_none(make_engine: Any, sql: Any) -> None:
    """No matching event before the timeout: the step returns None (the clock is moved)."""
    app = make_engine()
    order_flow(app, if_exp="async.data.amount > 100")
    async with app.worker(poll_interval="50ms"):
        [event_id] = await app.send(Event(name="shop/order", data={"order_id": 1}))
        run_id = await only_run_id(app, event_id)
        await eventually(lambda: waiting(app, run_id))
        await app.send(Event(name="shop/paid", data={"order_id": 1, "amount": 5}))  # if_exp fails
        await asyncio.sleep(0.2)
        assert (await app.get_run(run_id)).status is RunStatus.WAITING
        await move_clock(sql, timedelta(hours=2))
        run = await app.wait_for_run(run_id)
    assert run.status is RunStatus.COMPLETED and run.output is None
    assert run.steps[1].status == "COMPLETED" and run.steps[1].output is None


async def test_event_sent_before_the_wait_is_reached_still_matches(make_engine: Any) -> None:
    """Beyond Inngest: a payment sent while the run was busy in an earlier step resumes it."""
    app = make_engine()
    gate = asyncio.Event()
    order_flow(app, gate, if_exp="async.data.order_id == event.data.order_id", match=None)
    async with app.worker():
        [event_id] = await app.send(Event(name="shop/order", data={"order_id": 3}))
        run_id = await only_run_id(app, event_id)
        await app.send(Event(name="shop/paid", data={"order_id": 3, "early": True}))
        await asyncio.sleep(0.1)  # let the router see the event while no wait exists yet
        gate.set()
        run = await app.wait_for_run(run_id)
    assert run.status is RunStatus.COMPLETED
    assert run.output == {"order_id": 3, "early": True}


async def test_an_event_resumes_one_wait_of_a_run(make_engine: Any) -> None:
    """Two waits in a row for the same event name take two distinct events."""
    app = make_engine()

    @app.create_function("twice", trigger=TriggerEvent("t/start"))
    async def twice(ctx: Context) -> Any:
        first = await ctx.step.wait_for_event("a", event="t/ping", timeout="1h")
        second = await ctx.step.wait_for_event("b", event="t/ping", timeout="1h")
        return [first and first.data["n"], second and second.data["n"]]

    async with app.worker():
        [event_id] = await app.send(Event(name="t/start"))
        run_id = await only_run_id(app, event_id)
        await app.send([Event(name="t/ping", data={"n": 1}), Event(name="t/ping", data={"n": 2})])
        run = await app.wait_for_run(run_id)
    assert run.output == [1, 2]


async def test_two_workers_racing_resume_each_wait_once(make_engine: Any) -> None:
    """Payments sent while waits are being registered, with two workers routing: every run is
    resumed exactly once, by its own payment."""
    resumed: Counter[int] = Counter()
    apps = [make_engine(), make_engine()]
    for app in apps:

        @app.create_function("racer", trigger=TriggerEvent("r/start"))
        async def racer(ctx: Context) -> Any:
            paid = await ctx.step.wait_for_event(
                "paid", event="r/paid", timeout="1h", match="data.n"
            )
            assert paid is not None

            def note() -> int:
                resumed[paid.data["n"]] += 1
                return int(paid.data["n"])

            return await ctx.step.run("note", note)

    count = 40
    async with apps[0].worker(), apps[1].worker():
        for n in range(count):
            await apps[n % 2].send(Event(name="r/start", data={"n": n}))
            await apps[(n + 1) % 2].send(Event(name="r/paid", data={"n": n}))
        runs = await eventually(lambda: _all_done(apps[0], count), timeout=30)
    assert sorted(r.output for r in runs) == list(range(count))
    assert resumed == dict.fromkeys(range(count), 1)


async def _all_done(app: Any, count: int) -> Any:
    runs = await app.list_runs("racer", limit=count + 1)
    return runs if len(runs) == count and all(r.status.terminal for r in runs) else None


async def test_invalid_wait_options_fail_the_run(make_engine: Any) -> None:
    app = make_engine()

    @app.create_function("bad", trigger=TriggerEvent("t/bad"), retries=0)
    async def bad(ctx: Context) -> Any:
        await ctx.step.wait_for_event("w", event="x", timeout="1h", if_exp="async.data.(")

    async with app.worker():
        [event_id] = await app.send(Event(name="t/bad"))
        run = await app.wait_for_run(await only_run_id(app, event_id))
    assert run.status is RunStatus.FAILED
    assert run.error is not None and "async.data.(" in run.error["message"]


# -- cancel on event --------------------------------------------------------------------------


def cancellable(
    app: Any,
    effects: list[str],
    gate: asyncio.Event | None = None,
    entered: asyncio.Event | None = None,
) -> None:
    """A function of two steps around a 1-hour sleep, cancelled by `o/cancelled` of the same
    id; its first step waits for ``gate`` (if given), setting ``entered`` when it starts."""

    async def effect(name: str) -> str:
        if name == "first" and entered is not None:
            entered.set()
        if name == "first" and gate is not None:
            await gate.wait()
        effects.append(name)
        return name

    @app.create_function(
        "cancellable",
        trigger=TriggerEvent("o/created"),
        cancel=[Cancel(event="o/cancelled", if_exp="event.data.id == async.data.id")],
    )
    async def run(ctx: Context) -> Any:
        await ctx.step.run("first", effect, "first")
        await ctx.step.sleep("nap", "1h")
        await ctx.step.run("second", effect, "second")


async def test_cancel_event_cancels_a_sleeping_run_at_once(make_engine: Any, sql: Any) -> None:
    app = make_engine()
    effects: list[str] = []
    cancellable(app, effects)
    async with app.worker():
        [event_id] = await app.send(Event(name="o/created", data={"id": 1}))
        run_id = await only_run_id(app, event_id)
        await eventually(lambda: _status(app, run_id, "SLEEPING"))
        await app.send(Event(name="o/cancelled", data={"id": 2}))  # another order's cancel
        await asyncio.sleep(0.2)
        assert await _status(app, run_id, "SLEEPING")
        await app.send(Event(name="o/cancelled", data={"id": 1}))
        await eventually(lambda: _status(app, run_id, "CANCELLED"))
        await move_clock(sql, timedelta(hours=2))
        await asyncio.sleep(0.2)
    assert effects == ["first"]
    cancelled = await sql.fetchval(
        "SELECT count(*) FROM engine.events WHERE name = 'engine/function.cancelled' AND id = $1",
        run_id,
    )
    assert cancelled == 1


async def test_cancel_event_stops_a_running_run_between_steps(make_engine: Any, sql: Any) -> None:
    app = make_engine()
    effects: list[str] = []
    gate, entered = asyncio.Event(), asyncio.Event()
    cancellable(app, effects, gate, entered)
    async with app.worker():
        [event_id] = await app.send(Event(name="o/created", data={"id": 5}))
        run_id = await only_run_id(app, event_id)
        # The step must be executing: a cancel sent before the first step (the run is RUNNING
        # as soon as it is routed) cancels it before anything runs, as documented.
        await asyncio.wait_for(entered.wait(), timeout=10)
        await app.send(Event(name="o/cancelled", data={"id": 5}))

        async def cancel_requested() -> bool:
            query = "SELECT cancel_requested FROM engine.runs WHERE id = $1::uuid"
            return bool(await sql.fetchval(query, run_id))

        # Routed, not merely sent: a slow machine took over 0.2 s to route it, and the run
        # had gone on to its sleep (and was cancelled there, a different case).
        await eventually(cancel_requested)
        gate.set()  # the executing step finishes; nothing after it starts
        run = await app.wait_for_run(run_id)
    assert run.status is RunStatus.CANCELLED
    assert effects == ["first"]
    assert [s.step_id for s in run.steps] == ["first"]
    reason = await sql.fetchval(
        "SELECT data->>'reason' FROM engine.events WHERE name = 'engine/function.cancelled'"
    )
    assert reason.startswith("cancelled by event o/cancelled")


async def test_cancel_sent_before_the_run_starts_counts(make_engine: Any) -> None:
    """The run is created while no worker runs; the cancel arrives before its first start."""
    app = make_engine()
    effects: list[str] = []
    cancellable(app, effects)
    [event_id] = await app.send(Event(name="o/created", data={"id": 9}))
    await app.send(Event(name="o/cancelled", data={"id": 9}))
    async with app.worker():
        run = await app.wait_for_run(await only_run_id(app, event_id))
    assert run.status is RunStatus.CANCELLED
    assert effects == []


def test_bad_cancel_and_match_options_fail_at_declaration(make_engine: Any) -> None:
    app = make_engine()
    with pytest.raises(ConfigurationError, match=r"async\.data\.id =="):
        Cancel(event="x", if_exp="async.data.id ==")
    with pytest.raises(ConfigurationError, match="match="):
        Cancel(event="x", match="order_id")
    with pytest.raises(ConfigurationError, match="limit is 5"):
        app.create_function("f", cancel=[Cancel(event=f"e{i}") for i in range(6)])(_noop)


async def _noop(ctx: Context) -> None:
    return None


async def _status(app: Any, run_id: str, status: str) -> bool:
    return (await app.get_run(run_id)).status.value == status


async def test_cancel_timeout_disarms_the_cancel(make_engine: Any, sql: Any) -> None:
    """Cancel(timeout=1h): a cancel event two hours after the trigger no longer cancels."""
    app = make_engine()

    @app.create_function(
        "window",
        trigger=TriggerEvent("w/start"),
        cancel=Cancel(event="w/stop", match="data.id", timeout="1h"),
    )
    async def window(ctx: Context) -> Any:
        await ctx.step.sleep("nap", "3h")
        return "finished"

    async with app.worker(poll_interval="50ms"):
        [event_id] = await app.send(Event(name="w/start", data={"id": 1}))
        run_id = await only_run_id(app, event_id)
        await eventually(lambda: _status(app, run_id, "SLEEPING"))
        await move_clock(sql, timedelta(hours=2))
        await app.send(Event(name="w/stop", data={"id": 1}))
        await asyncio.sleep(0.3)
        assert await _status(app, run_id, "SLEEPING")
        await move_clock(sql, timedelta(hours=2))
        run = await app.wait_for_run(run_id)
    assert run.status is RunStatus.COMPLETED and run.output == "finished"


async def test_an_event_resolving_a_wait_while_the_run_suspends_wakes_it(
    make_engine: Any, sql: Any, database_url: str
) -> None:
    """A wait resolved by routing at the moment its run suspends: the run resumes at once
    (suspend_run and resolve_match serialize on the run's row), never waits for its timeout."""
    app = make_engine()
    release = asyncio.Event()

    async def hold() -> str:
        await release.wait()  # keeps the run RUNNING, its wait registered, until released
        return "held"

    @app.create_function("racing", trigger=TriggerEvent("t/racing"))
    async def racing(ctx: Context) -> Any:
        event, held = await asyncio.gather(
            ctx.step.wait_for_event("a", event="t/answer", timeout="1h"), ctx.step.run("h", hold)
        )
        return [event is not None, held]

    router = await asyncpg.connect(database_url)  # plays the router resolving the wait
    try:
        async with app.worker():
            [event_id] = await app.send(Event(name="t/racing"))
            run_id = UUID(await only_run_id(app, event_id))

            async def registered() -> Any:
                return await sql.fetchval(
                    "SELECT 1 FROM engine.matchers WHERE run_id = $1 AND key = 'a'", run_id
                )

            await eventually(registered)
            answer = await sql.fetchval("SELECT engine.send_event('t/unrelated', '{}')")
            seq = await sql.fetchval("SELECT seq FROM engine.events WHERE id = $1", answer)
            resolving = router.transaction()
            await resolving.start()
            assert await router.fetchval("SELECT engine.resolve_match($1, 'a', $2)", run_id, seq)
            release.set()  # the run now suspends on its (uncommitted) resolved wait

            async def suspend_blocked_or_done() -> Any:
                return await sql.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND datname = current_database()) OR EXISTS (SELECT 1 FROM engine.runs"
                    " WHERE id = $1 AND status <> 'RUNNING')",
                    run_id,
                )

            await eventually(suspend_blocked_or_done)
            await resolving.commit()
            run = await app.wait_for_run(str(run_id), timeout=10)
    finally:
        await router.close()
    assert run.status is RunStatus.COMPLETED and run.output == [True, "held"]
