"""Cancellation always lands, and a cancelled run says why and leaves no step open."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import asyncpg
from helpers import eventually, only_run_id, status_is

from engine import (
    Cancel,
    Context,
    Engine,
    Event,
    NonRetriableError,
    RetryAfterError,
    RunStatus,
    Singleton,
    TriggerEvent,
)


async def _requested(sql: asyncpg.Connection, run_id: str) -> bool:
    return bool(
        await sql.fetchval("SELECT cancel_requested FROM engine.runs WHERE id = $1::uuid", run_id)
    )


def after_the_last_step(app: Engine, outcome: str, **options: Any) -> tuple[asyncio.Event, ...]:
    """A function whose last step completes, then runs code outside any step until ``release``
    is set, then returns (or fails, per ``outcome``). Returns (outside, release)."""
    outside, release = asyncio.Event(), asyncio.Event()

    @app.create_function("tail", trigger=TriggerEvent("t/tail"), **options)
    async def tail(ctx: Context) -> str:
        await ctx.step.run("last", lambda: "recorded")
        outside.set()
        await release.wait()
        if outcome == "fail":
            raise NonRetriableError("failed after the cancel")
        return "returned after the cancel"

    return outside, release


async def test_a_cancel_while_code_outside_steps_runs_ends_the_run_cancelled(
    make_engine: Any, sql: asyncpg.Connection
) -> None:
    """cancel_run lands while the body runs code after its last step: the run ends CANCELLED
    (not COMPLETED), its last step is still recorded, and the return value is discarded."""
    app = make_engine()
    outside, release = after_the_last_step(app, "return")
    async with app.worker():
        run_id = await only_run_id(app, (await app.send(Event(name="t/tail")))[0])
        await asyncio.wait_for(outside.wait(), 10)
        assert await app.cancel_run(run_id) is RunStatus.RUNNING
        release.set()
        run = await app.wait_for_run(run_id)
    assert run.status is RunStatus.CANCELLED
    assert run.output is None
    assert [(s.step_id, s.status, s.output) for s in run.steps] == [
        ("last", "COMPLETED", "recorded")
    ]
    assert run.error == {"type": "FunctionCancelled", "message": "cancelled by cancel_run"}
    reason = await sql.fetchval(
        "SELECT data->>'reason' FROM engine.events WHERE name = 'engine/function.cancelled'"
    )
    assert reason == "cancelled by cancel_run"


async def test_a_cancel_event_during_the_last_step_wins_over_a_failure(
    make_engine: Any, sql: asyncpg.Connection
) -> None:
    """A matching cancel event arrives while the function executes: whatever the function then
    does (here it fails), the run ends CANCELLED, naming the event that cancelled it."""
    app = make_engine()
    outside, release = after_the_last_step(app, "fail", cancel=Cancel(event="t/stop"))
    async with app.worker():
        run_id = await only_run_id(app, (await app.send(Event(name="t/tail")))[0])
        await asyncio.wait_for(outside.wait(), 10)
        [stop_id] = await app.send(Event(name="t/stop"))
        await eventually(lambda: _requested(sql, run_id))
        release.set()
        run = await app.wait_for_run(run_id)
    assert run.status is RunStatus.CANCELLED
    assert run.error is not None and run.error["type"] == "FunctionCancelled"
    assert stop_id in run.error["message"] and "t/stop" in run.error["message"]
    assert [(s.step_id, s.status) for s in run.steps] == [("last", "COMPLETED")]


async def test_finish_run_in_sql_honours_a_cancel_request(
    make_engine: Any, sql: asyncpg.Connection
) -> None:
    """No worker path can skip a cancel: engine.finish_run itself turns COMPLETED into
    CANCELLED when the cancel was requested first, records the steps and drops the output."""
    app = make_engine()

    @app.create_function("plain", trigger=TriggerEvent("t/plain"))
    async def plain(ctx: Context) -> None:
        return None

    await app.database()
    await app.send(Event(name="t/plain"))
    owner = "00000000-0000-0000-0000-000000000001"
    [run] = await sql.fetch(  # routed and leased to `owner`, as a worker's router does
        "SELECT r.id, r.lease_token FROM engine.route_simple(10, $2::jsonb, '{}', "
        "(SELECT value::bigint FROM engine.meta WHERE key = 'registry_version'), 'test', $1,"
        " '1 minute', 10) r WHERE r.id IS NOT NULL",
        owner,
        '[{"app_id": "test", "function_id": "plain", "event": "t/plain"}]',
    )
    assert await sql.fetchval("SELECT engine.cancel_run($1, 'by the test')", run["id"]) == "RUNNING"
    step = '{"key": "s", "position": 0, "kind": "run", "status": "COMPLETED", "attempts": 1,'
    step += ' "output": 7, "error": null, "wake_at": null}'
    result = await sql.fetchval(
        "SELECT engine.finish_run($1, $2, $3, 'COMPLETED', '\"out\"', NULL, 0, $4::jsonb)",
        run["id"],
        owner,
        run["lease_token"],
        f"[{step}]",
    )
    assert result == "cancel"
    row = await sql.fetchrow(
        "SELECT status, output, error FROM engine.runs WHERE id = $1", run["id"]
    )
    assert row["status"] == "CANCELLED" and row["output"] is None
    assert '"by the test"' in row["error"]
    assert await sql.fetchval("SELECT status FROM engine.steps WHERE run_id = $1", run["id"]) == (
        "COMPLETED"
    )


async def test_a_cancelled_run_closes_its_retrying_step_and_says_who_cancelled_it(
    make_engine: Any,
) -> None:
    """A run waiting to retry a step is cancelled: the run's error names cancel_runs, and the
    step is CANCELLED (keeping its last error), not RETRYING inside a finished run."""
    app = make_engine()

    def flaky() -> None:
        raise RetryAfterError("not yet", retry_after=timedelta(hours=1))

    @app.create_function("flaky", trigger=TriggerEvent("t/flaky"))
    async def run_flaky(ctx: Context) -> None:
        await ctx.step.run("try", flaky)

    async with app.worker():
        run_id = await only_run_id(app, (await app.send(Event(name="t/flaky")))[0])
        await eventually(lambda: status_is(app, run_id, RunStatus.RETRYING))
        assert await app.cancel_runs("flaky") == 1
    run = await app.get_run(run_id)
    assert run.status is RunStatus.CANCELLED
    assert run.error == {"type": "FunctionCancelled", "message": "cancelled by cancel_runs"}
    [step] = run.steps
    assert step.status == "CANCELLED"
    assert step.error is not None and "not yet" in step.error["message"]


async def test_a_cancelled_sleeping_run_closes_its_sleep(make_engine: Any) -> None:
    app = make_engine()

    @app.create_function("sleeper", trigger=TriggerEvent("t/sleeper"))
    async def sleeper(ctx: Context) -> None:
        await ctx.step.sleep("nap", "7d")

    async with app.worker():
        run_id = await only_run_id(app, (await app.send(Event(name="t/sleeper")))[0])
        await eventually(lambda: status_is(app, run_id, RunStatus.SLEEPING))
        assert await app.cancel_run(run_id) is RunStatus.CANCELLED
    run = await app.get_run(run_id)
    assert run.error == {"type": "FunctionCancelled", "message": "cancelled by cancel_run"}
    assert [(s.step_id, s.status) for s in run.steps] == [("nap", "CANCELLED")]
    assert run.steps[0].error == {
        "type": "StepCancelled",
        "message": "the run ended CANCELLED before this step finished",
    }


async def test_a_singleton_replacement_says_so(make_engine: Any) -> None:
    app = make_engine()

    @app.create_function(
        "single",
        trigger=TriggerEvent("t/single"),
        singleton=Singleton(key="event.data.user", mode="cancel"),
    )
    async def single(ctx: Context) -> None:
        await ctx.step.sleep("nap", "7d")

    async with app.worker():
        [event_id] = await app.send(Event(name="t/single", data={"user": 1}))
        first = await only_run_id(app, event_id)
        await eventually(lambda: status_is(app, first, RunStatus.SLEEPING))
        await app.send(Event(name="t/single", data={"user": 1}))
        await eventually(lambda: status_is(app, first, RunStatus.CANCELLED))
    run = await app.get_run(first)
    assert run.error == {
        "type": "FunctionCancelled",
        "message": "replaced by a newer run (singleton)",
    }
    assert [s.status for s in run.steps] == ["CANCELLED"]
