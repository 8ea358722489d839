"""Sends routed in their own transaction (``engine.send_and_route``): with a worker of the app
running in the sender's process, ``app.send`` stores the events and creates the runs they start
in one transaction, leased to that worker, which starts them without a NOTIFY, a wake-up and a
routing transaction of its own. What the routers do must not change otherwise: capacity, other
apps, names that need Python, scheduled events, a routing that fails, a stopped worker."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import asyncpg
from helpers import eventually, only_run_id, record_queries

from engine import Context, Engine, Event, RunStatus, Timeouts, TriggerEvent

SLOW_POLL = "60s"  # longer than any test: only a NOTIFY (or the send itself) starts a run


async def _created_with_event(sql: asyncpg.Connection, event_id: str) -> list[Any]:
    """The runs of the event: whether each was created by the statement that stored it, and the
    worker its first execution was leased to at creation (routers lease runs to themselves)."""
    return list(
        await sql.fetch(
            "SELECT r.function_id, r.status, r.created_at = e.received_at AS inline,"
            " (SELECT x.worker FROM engine.run_executions x WHERE x.run_id = r.id"
            "  AND x.claimed_at = r.created_at) AS leased_to"
            " FROM engine.runs r JOIN engine.events e ON e.seq = r.event_seq"
            " WHERE e.id = $1 ORDER BY r.function_id",
            event_id,
        )
    )


async def _completed(app: Engine, event_id: str, *, runs: int) -> bool:
    """Whether the event started ``runs`` runs and all of them completed."""
    found = await app.runs_for_event(event_id)
    return len(found) == runs and all(r.status is RunStatus.COMPLETED for r in found)


def _noop_app(make_engine: Any) -> Engine:
    """An app whose one function, on t/noop, does nothing."""
    app: Engine = make_engine()

    @app.create_function("noop", trigger=TriggerEvent("t/noop"))
    async def noop(ctx: Context) -> None:
        return None

    return app


async def test_a_send_creates_its_run_leased_to_the_worker_in_the_same_statement(
    make_engine: Any, sql: asyncpg.Connection
) -> None:
    app = make_engine()
    started = asyncio.Event()

    @app.create_function("greet", trigger=TriggerEvent("user/signup"))
    async def greet(ctx: Context) -> str:
        started.set()
        return await ctx.step.run("hello", lambda: "hi " + ctx.event.data["name"])

    async with app.worker(poll_interval=SLOW_POLL) as worker:
        [event_id] = await app.send(Event(name="user/signup", data={"name": "ada"}))
        [run] = await _created_with_event(sql, event_id)
        assert run["inline"] and run["leased_to"] == worker.owner, run
        assert await sql.fetchval("SELECT count(*) FROM engine.event_queue") == 0
        await asyncio.wait_for(started.wait(), 10)
        done = await app.wait_for_run(await only_run_id(app, event_id))
    assert done.status is RunStatus.COMPLETED and done.output == "hi ada"


async def test_runs_past_the_free_slots_are_queued_and_claimed(
    make_engine: Any, sql: asyncpg.Connection
) -> None:
    app = make_engine()
    gate = asyncio.Event()

    async def held() -> int:
        await gate.wait()
        return 1

    @app.create_function("one-at-a-time", trigger=TriggerEvent("job/go"))
    async def job(ctx: Context) -> int:
        return await ctx.step.run("held", held)

    async with app.worker(concurrency=2, poll_interval="100ms") as worker:
        ids = await app.send([Event(name="job/go") for _ in range(5)])
        rows = [row for event_id in ids for row in await _created_with_event(sql, event_id)]
        assert all(row["inline"] for row in rows), rows
        leased = [row for row in rows if row["leased_to"] == worker.owner]
        assert len(leased) == 2 and {r["status"] for r in leased} == {"RUNNING"}, rows
        assert [row["status"] for row in rows if row not in leased] == ["QUEUED"] * 3
        gate.set()
        runs = [await app.wait_for_run(await only_run_id(app, i)) for i in ids]
    assert [run.status for run in runs] == [RunStatus.COMPLETED] * 5


async def test_events_left_to_the_routers_wake_them(
    make_engine: Any, sql: asyncpg.Connection
) -> None:
    """A name with a CEL trigger is routed in Python: the send leaves it queued and wakes the
    routers itself (its own NOTIFY is held back for the events it routes)."""
    app = make_engine()

    @app.create_function("big-orders", trigger=TriggerEvent("shop/order", "event.data.total > 100"))
    async def big(ctx: Context) -> str:
        return "big"

    @app.create_function("all-orders", trigger=TriggerEvent("shop/order"))
    async def every(ctx: Context) -> str:
        return "any"

    async with app.worker(poll_interval=SLOW_POLL):
        [event_id] = await app.send(Event(name="shop/order", data={"total": 500}))

        await eventually(lambda: _completed(app, event_id, runs=2))
    assert [r["inline"] for r in await _created_with_event(sql, event_id)] == [False, False]


async def test_another_apps_runs_are_created_queued_for_its_workers(
    make_engine: Any, sql: asyncpg.Connection
) -> None:
    web, billing = make_engine("web"), make_engine("billing")

    @web.create_function("welcome", trigger=TriggerEvent("user/signup"))
    async def welcome(ctx: Context) -> str:
        return "welcome"

    @billing.create_function("open-account", trigger=TriggerEvent("user/signup"))
    async def open_account(ctx: Context) -> str:
        return "account"

    async with billing.worker(poll_interval=SLOW_POLL), web.worker(poll_interval=SLOW_POLL) as w:
        [event_id] = await web.send(Event(name="user/signup"))
        rows = await _created_with_event(sql, event_id)
        assert [(r["function_id"], r["inline"]) for r in rows] == [
            ("open-account", True),
            ("welcome", True),
        ]
        assert rows[0]["leased_to"] is None and rows[1]["leased_to"] == w.owner

        await eventually(lambda: _completed(web, event_id, runs=2))


async def test_a_scheduled_event_waits_for_its_time(
    make_engine: Any, sql: asyncpg.Connection
) -> None:
    app = make_engine()

    @app.create_function("later", trigger=TriggerEvent("remind/me"))
    async def later(ctx: Context) -> str:
        return "now"

    async with app.worker(poll_interval="100ms"):
        when = datetime.now(UTC) + timedelta(hours=1)
        [event_id] = await app.send(Event(name="remind/me", ts=when))
        assert await _created_with_event(sql, event_id) == []
        assert await sql.fetchval("SELECT count(*) FROM engine.event_queue") == 1


async def test_a_routing_that_fails_never_fails_the_send(
    make_engine: Any, sql: asyncpg.Connection
) -> None:
    """The first run insert fails (a trigger raises once): the send still stores its event and
    returns its id; the routers route it afterwards."""
    await sql.execute(
        """
        CREATE SEQUENCE public.fail_once;  -- not transactional: counts the rolled-back try too
        CREATE FUNCTION public.fail_once() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF nextval('public.fail_once') = 1 THEN
                RAISE EXCEPTION 'routing broke' USING ERRCODE = 'XX000';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER fail_once BEFORE INSERT ON engine.runs
            FOR EACH ROW EXECUTE FUNCTION public.fail_once();
        """
    )
    app = make_engine()

    @app.create_function("sturdy", trigger=TriggerEvent("try/it"))
    async def sturdy(ctx: Context) -> str:
        return "ok"

    async with app.worker(poll_interval=SLOW_POLL):
        [event_id] = await app.send(Event(name="try/it"))  # its routing failed, not the send
        run = await app.wait_for_run(await only_run_id(app, event_id))
    assert run.status is RunStatus.COMPLETED
    assert [r["inline"] for r in await _created_with_event(sql, event_id)] == [False]


async def test_sends_after_the_worker_stopped_are_only_stored(
    make_engine: Any, sql: asyncpg.Connection
) -> None:
    app = _noop_app(make_engine)

    async with app.worker():
        pass
    [event_id] = await app.send(Event(name="t/noop"))
    assert await _created_with_event(sql, event_id) == []
    assert await sql.fetchval("SELECT count(*) FROM engine.event_queue") == 1


async def test_a_send_in_the_callers_transaction_is_left_to_the_routers(
    make_engine: Any, sql: asyncpg.Connection, database_url: str
) -> None:
    """With ``connection=``, the runs could not start before the caller commits: nothing is
    routed in that transaction."""
    app = _noop_app(make_engine)

    async with app.worker(poll_interval="100ms"):
        conn = await asyncpg.connect(database_url)
        try:
            async with conn.transaction():
                [event_id] = await app.send(Event(name="t/noop"), connection=conn)
                assert await conn.fetchval("SELECT count(*) FROM engine.runs") == 0
        finally:
            await conn.close()
        run = await app.wait_for_run(await only_run_id(app, event_id))
    assert run.status is RunStatus.COMPLETED
    assert [r["inline"] for r in await _created_with_event(sql, event_id)] == [False]


async def test_runs_routed_as_the_worker_stops_are_left_to_their_lease(
    make_engine: Any, sql: asyncpg.Connection
) -> None:
    """A send whose round trip ends after the worker began stopping does not start the runs
    it leased here (the drain would not wait for them): their lease expires, and a worker
    takes them over."""
    app = make_engine()
    calls: list[str] = []

    @app.create_function("late", trigger=TriggerEvent("t/late"))
    async def late(ctx: Context) -> str:
        calls.append("ran")
        return "done"

    async with app.worker(lease="1s") as worker:
        route = worker._router.send_and_route  # type: ignore[union-attr]

        async def stopping_meanwhile(*args: Any, **kwargs: Any) -> Any:
            answer = await route(*args, **kwargs)
            worker.stop()
            return answer

        worker._router.send_and_route = stopping_meanwhile  # type: ignore[method-assign,union-attr]
        [event_id] = await app.send(Event(name="t/late"))
    [row] = await _created_with_event(sql, event_id)
    assert row["leased_to"] == worker.owner and calls == []
    async with app.worker(lease="1s"):
        run = await app.wait_for_run(await only_run_id(app, event_id))
    assert run.status is RunStatus.COMPLETED and calls == ["ran"]


async def test_a_send_carries_the_triggers_of_its_own_event_names_only(
    make_engine: Any, sql: asyncpg.Connection
) -> None:
    """The routing inside a send needs the triggers of the names it sends, not the whole
    registry (every trigger of every app of the schema, which cost each send its transfer and
    parsing); the runs it starts are the same."""
    web, billing = make_engine("web"), make_engine("billing")

    @web.create_function("welcome", trigger=TriggerEvent("user/signup"))
    async def welcome(ctx: Context) -> str:
        return "welcome"

    @web.create_function("big-orders", trigger=TriggerEvent("shop/order", "event.data.total > 1"))
    async def big(ctx: Context) -> str:
        return "big"

    @billing.create_function("open-account", trigger=TriggerEvent("user/signup"))
    async def open_account(ctx: Context) -> str:
        return "account"

    for n in range(50):  # functions of other names, which no send below names

        @billing.create_function(f"other-{n}", trigger=TriggerEvent(f"other/{n}"))
        async def other(ctx: Context) -> None:
            return None

    async with billing.worker(poll_interval=SLOW_POLL), web.worker(poll_interval=SLOW_POLL):
        calls = record_queries(await web.database())
        [signup] = await web.send(Event(name="user/signup"))
        [order, _] = await web.send(
            [Event(name="shop/order", data={"total": 5}), Event(name="user/signup")]
        )
        await eventually(lambda: _completed(web, signup, runs=2))
        await eventually(lambda: _completed(web, order, runs=1))

    carried = [args for query, args in calls if query == "send_and_route"]
    simple, complex_names = json.loads(carried[0][2]), carried[0][3]
    assert sorted((t["function_id"], t["event"]) for t in simple) == [
        ("open-account", "user/signup"),
        ("welcome", "user/signup"),
    ]
    assert complex_names == []
    simple, complex_names = json.loads(carried[1][2]), carried[1][3]
    assert {t["event"] for t in simple} == {"user/signup"} and complex_names == ["shop/order"]


# The columns of a run that depend on when and by which statement it was created, compared as
# times after its creation (or after its event's arrival, which places it in line).
_AFTER_CREATION = ("lease_expires_at", "start_deadline", "finish_deadline", "started_at",
                   "updated_at")  # fmt: skip
_AFTER_ARRIVAL = ("due_at", "rank_at")


async def _runs_as_created(sql: asyncpg.Connection, event_id: str) -> list[dict[str, Any]]:
    """The runs of an event and their first executions, every column, with what differs from
    one event to another by construction (ids, times, the run's own span id) made relative."""
    rows = await sql.fetch(
        "SELECT r.*, e.received_at AS arrived, e.seq AS seq,"
        " (SELECT to_jsonb(array_agg(x.* ORDER BY x.lease_token)) FROM engine.run_executions x"
        "  WHERE x.run_id = r.id) AS executions"
        " FROM engine.runs r JOIN engine.events e ON e.seq = r.event_seq"
        " WHERE e.id = $1 ORDER BY r.app_id, r.function_id",
        event_id,
    )
    runs = []
    for row in rows:
        run = dict(row)
        assert run.pop("dedupe_key") == f"event:{run['seq']}"
        for column in ("id", "event_seq", "seq"):
            run.pop(column)
        for column in _AFTER_CREATION:
            run[column] = run[column] and run[column] - run["created_at"]
        for column in _AFTER_ARRIVAL:
            run[column] = run[column] - run["arrived"]
        trace, span = run.pop("trace_context").split("-")[1:3]
        run["trace_id_is_the_senders"] = trace == run["traceparent"].split("-")[1]
        assert span != run["traceparent"].split("-")[2]
        run.pop("created_at"), run.pop("arrived")
        executions = json.loads(run.pop("executions") or "[]")
        run["executions"] = [(x["lease_token"], x["worker"]) for x in executions]
        runs.append(run)
    return runs


async def test_plain_triggers_create_the_rows_the_python_router_creates(
    make_engine: Any, sql: asyncpg.Connection
) -> None:
    """A send, and a routing tick, write the runs of plain triggers in one statement of their
    own (engine.create_plain_runs), not through the admission of the Python router
    (engine.create_runs and insert_runs, for CEL triggers and flow control): for the same
    triggers, the runs and first executions of all three are the same rows, column by column,
    whether the caller has room for them (leased to it, RUNNING) or not (QUEUED), for its own
    app and for another one."""
    web, billing = make_engine("web"), make_engine("billing")

    @web.create_function(
        "welcome", trigger=TriggerEvent("user/signup"), timeouts=Timeouts(start="1h", finish="2h")
    )
    async def welcome(ctx: Context) -> None:
        return None

    @billing.create_function("open-account", trigger=TriggerEvent("user/signup"))
    async def open_account(ctx: Context) -> None:
        return None

    async with web.worker(), billing.worker():
        pass  # registered
    version = await sql.fetchval(
        "SELECT value::bigint FROM engine.meta WHERE key = 'registry_version'"
    )
    triggers = [("web", "welcome", True), ("billing", "open-account", False)]
    simple = json.dumps([
        {"app_id": app, "function_id": fn, "event": "user/signup", "local": local}
        for app, fn, local in triggers
    ])  # fmt: skip
    owner, lease, trace = uuid4(), timedelta(seconds=30), f"00-{'a' * 32}-{'b' * 16}-01"
    for capacity in (1, 0):
        events = json.dumps([{"name": "user/signup", "data": {"capacity": capacity}}])
        sent = await sql.fetch(
            "SELECT * FROM engine.send_and_route($1::jsonb, $2, $3::jsonb, '{}', $4, 'web', $5,"
            " $6, $7)",
            events, trace, simple, version, owner, lease, capacity,
        )  # fmt: skip
        by_tick = await sql.fetchval("SELECT engine.send_events($1::jsonb, $2)", events, trace)
        ticked = await sql.fetch(
            "SELECT * FROM engine.route_simple(10, $1::jsonb, '{}', $2, 'web', $3, $4, $5)",
            simple, version, owner, lease, capacity,
        )  # fmt: skip
        by_python = await sql.fetchval("SELECT engine.send_events($1::jsonb, $2)", events, trace)
        async with sql.transaction():  # as the Python router routes: claim, plan, create
            [seq] = [row["seq"] for row in await sql.fetch("SELECT * FROM engine.claim_events(10)")]
            plan = [
                {
                    "app_id": app,
                    "function_id": fn,
                    "event_seq": seq,
                    "claim": local and capacity > 0,
                }
                for app, fn, local in triggers
            ]
            created = await sql.fetch(
                "SELECT * FROM engine.create_runs($1, $2::jsonb, $3, $4)",
                [seq], json.dumps(plan), owner, lease,
            )  # fmt: skip
        [by_send] = sent[0]["ids"]
        assert ticked[0]["routed"] == sent[0]["routed"] == 1
        leased = [row for row in created if row["lease_token"] > 0]
        assert len(ticked) == len(sent) == 1 + len(leased) == 1 + capacity
        for a, b, c in zip(ticked[1:], sent[1:], leased, strict=True):
            assert a["function_id"] == b["function_id"] == c["function_id"]
            assert a["lease_token"] == b["lease_token"] == c["lease_token"]
            assert json.loads(a["event"])["id"] == by_tick
            assert json.loads(b["event"])["id"] == by_send
            assert a["traceparent"] == b["traceparent"] == trace
        runs = await _runs_as_created(sql, by_python)
        assert [r["status"] for r in runs] == ["QUEUED", "RUNNING" if capacity else "QUEUED"]
        assert runs == await _runs_as_created(sql, by_send) == await _runs_as_created(sql, by_tick)
    assert await sql.fetchval("SELECT count(*) FROM engine.event_queue") == 0
