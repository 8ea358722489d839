"""The events a run's end sends (engine/function.finished, .failed, .cancelled): their exact
names, order, ids and data, that runs of system events send none, and that they are queued for
routing only when something awaits or is triggered by them."""

from __future__ import annotations

import json
from typing import Any

from helpers import eventually, only_run_id, status_is

from engine import Context, Event, NonRetriableError, RunStatus, TriggerEvent

ENDS = ("engine/function.finished", "engine/function.failed", "engine/function.cancelled")


async def _sent_by(sql: Any, run_id: str) -> list[tuple[str, dict[str, Any], str | None]]:
    """The events the end of run ``run_id`` sent, in the order they were stored."""
    rows = await sql.fetch(
        "SELECT name, data, traceparent FROM engine.events WHERE id = $1 ORDER BY seq", run_id
    )
    return [(r["name"], json.loads(r["data"]), r["traceparent"]) for r in rows]


async def _run_facts(sql: Any, run_id: str) -> tuple[dict[str, Any], Any, str | None]:
    """The run's trigger event as the end events carry it, its error and its traceparent."""
    row = await sql.fetchrow(
        "SELECT engine.run_event(event_seq) AS event, error, traceparent FROM engine.runs"
        " WHERE id = $1",
        run_id,
    )
    error = None if row["error"] is None else json.loads(row["error"])
    return json.loads(row["event"]), error, row["traceparent"]


async def _base(sql: Any, run_id: str, function_id: str) -> dict[str, Any]:
    event, _, _ = await _run_facts(sql, run_id)
    return {"app_id": "test", "function_id": function_id, "run_id": run_id, "event": event}


async def test_each_end_sends_its_events_with_their_data(make_engine: Any, sql: Any) -> None:
    app = make_engine()

    @app.create_function("fine", trigger=TriggerEvent("s/fine"))
    async def fine(ctx: Context) -> Any:
        return {"n": ctx.event.data["k"]}

    @app.create_function("broken", trigger=TriggerEvent("s/broken"), retries=0)
    async def broken(ctx: Context) -> Any:
        raise NonRetriableError("it broke")

    @app.create_function("sleepy", trigger=TriggerEvent("s/sleepy"))
    async def sleepy(ctx: Context) -> Any:
        await ctx.step.sleep("nap", "1h")

    async with app.worker():
        [fine_event, broken_event, sleepy_event] = await app.send(
            [
                Event(name="s/fine", data={"k": 7}),
                Event(name="s/broken", data={"k": 8}),
                Event(name="s/sleepy", data={"k": 9}),
            ]
        )
        fine_run = await app.wait_for_run(await only_run_id(app, fine_event))
        broken_run = await app.wait_for_run(await only_run_id(app, broken_event))
        sleepy_id = await only_run_id(app, sleepy_event)
        await eventually(lambda: status_is(app, sleepy_id, RunStatus.SLEEPING))
        await app.cancel_run(sleepy_id)
    assert fine_run.status is RunStatus.COMPLETED and broken_run.status is RunStatus.FAILED

    base = await _base(sql, fine_run.run_id, "fine")
    assert base["event"]["name"] == "s/fine" and base["event"]["data"] == {"k": 7}
    _, _, traceparent = await _run_facts(sql, fine_run.run_id)
    assert await _sent_by(sql, fine_run.run_id) == [
        ("engine/function.finished", {**base, "result": {"n": 7}}, traceparent)
    ]

    base = await _base(sql, broken_run.run_id, "broken")
    _, error, traceparent = await _run_facts(sql, broken_run.run_id)
    assert error["message"] == "it broke"
    assert await _sent_by(sql, broken_run.run_id) == [
        ("engine/function.failed", {**base, "error": error}, traceparent),
        ("engine/function.finished", {**base, "error": error}, traceparent),
    ]

    base = await _base(sql, sleepy_id, "sleepy")
    _, error, traceparent = await _run_facts(sql, sleepy_id)
    assert error["type"] == "FunctionCancelled"
    assert await _sent_by(sql, sleepy_id) == [
        ("engine/function.cancelled", {**base, "reason": error["message"]}, traceparent),
        ("engine/function.finished", {**base, "error": error}, traceparent),
    ]


async def test_a_run_cancelled_without_an_error_sends_the_default_reason(sql: Any) -> None:
    """An end written through SQL with no error (the trigger's fallback): the cancel's reason
    is the run's waiting reason, else a default, in both events."""
    seq = await sql.fetchval(
        "INSERT INTO engine.events (id, name, data, ts, received_at)"
        " VALUES ('e-1', 'q/go', '{}', now(), now()) RETURNING seq"
    )
    run_id = str(
        await sql.fetchval(
            "INSERT INTO engine.runs (app_id, function_id, status, event_seq, due_at, created_at,"
            " updated_at) VALUES ('test', 'f', 'QUEUED', $1, now(), now(), now()) RETURNING id",
            seq,
        )
    )
    await sql.execute("UPDATE engine.runs SET status = 'CANCELLED' WHERE id = $1", run_id)
    sent = await _sent_by(sql, run_id)
    assert [(name, data.get("reason"), data.get("error")) for name, data, _ in sent] == [
        ("engine/function.cancelled", "the run was cancelled", None),
        (
            "engine/function.finished",
            None,
            {"type": "FunctionCancelled", "message": "the run was cancelled"},
        ),
    ]


async def test_runs_of_system_events_send_none(make_engine: Any, sql: Any) -> None:
    app = make_engine()
    audited: list[str] = []

    @app.create_function("work", trigger=TriggerEvent("s/work"))
    async def work(ctx: Context) -> Any:
        return "done"

    @app.create_function(
        "audit",
        trigger=TriggerEvent("engine/function.finished", "event.data.function_id == 'work'"),
    )
    async def audit(ctx: Context) -> None:
        audited.append(ctx.run_id)

    async with app.worker():
        await app.send(Event(name="s/work"))
        await eventually(lambda: _truthy(audited))
        [audit_id] = audited
        await eventually(lambda: status_is(app, audit_id, RunStatus.COMPLETED))
    assert await _sent_by(sql, audit_id) == []


async def test_end_events_are_queued_only_when_something_awaits_them(
    make_engine: Any, sql: Any
) -> None:
    """Stored always (a wait may look back for them); queued for routing (and so a NOTIFY)
    only while a function is triggered by their name or a matcher awaits it."""
    app = make_engine()

    @app.create_function("quiet", trigger=TriggerEvent("s/quiet"))
    async def quiet(ctx: Context) -> Any:
        return "done"

    async with app.worker():
        [event_id] = await app.send(Event(name="s/quiet"))
        run = await app.wait_for_run(await only_run_id(app, event_id))
    assert [name for name, _, _ in await _sent_by(sql, run.run_id)] == [ENDS[0]]
    queued = await sql.fetchval(
        "SELECT count(*) FROM engine.event_queue q JOIN engine.events e USING (seq)"
        " WHERE e.name LIKE 'engine/function.%'"
    )
    assert queued == 0

    # A function triggered by one of the two names: that one is queued, the other is not.
    await sql.execute(
        "INSERT INTO engine.functions (app_id, function_id, triggers, config, active)"
        " VALUES ('other', 'on-failure', $1, '{}', true)",
        json.dumps([{"event": "engine/function.failed"}]),
    )
    seq = await sql.fetchval(
        "INSERT INTO engine.events (id, name, data, ts, received_at)"
        " VALUES ('e-2', 'q/go', '{}', now(), now()) RETURNING seq"
    )
    failed_id = str(
        await sql.fetchval(
            "INSERT INTO engine.runs (app_id, function_id, status, event_seq, due_at, created_at,"
            " updated_at) VALUES ('test', 'f', 'RUNNING', $1, now(), now(), now()) RETURNING id",
            seq,
        )
    )
    await sql.execute(
        "UPDATE engine.runs SET status = 'FAILED', error = '{\"message\": \"x\"}' WHERE id = $1",
        failed_id,
    )
    queued_names = await sql.fetch(
        "SELECT e.name FROM engine.event_queue q JOIN engine.events e USING (seq) WHERE e.id = $1",
        failed_id,
    )
    assert [r["name"] for r in queued_names] == ["engine/function.failed"]


async def _truthy(value: Any) -> Any:
    return value
