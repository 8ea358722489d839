"""Events: sending from Python and SQL, transactions, dedupe, limits, and trigger matching."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from helpers import eventually, move_clock, only_run_id

from engine import (
    ConfigurationError,
    Context,
    Event,
    ExpressionError,
    InvalidEventError,
    RunStatus,
    TriggerEvent,
)


async def test_send_returns_ids_and_each_trigger_starts_its_own_run(make_engine: Any) -> None:
    app = make_engine()

    @app.create_function("multi", trigger=[TriggerEvent("a/one"), TriggerEvent("a/two")])
    async def multi(ctx: Context) -> Any:
        return ctx.event.name

    async with app.worker():
        ids = await app.send([Event(name="a/one"), Event(name="a/two", id="fixed")])
        assert ids[1] == "fixed" and len(set(ids)) == 2
        outputs = [(await app.wait_for_run(await only_run_id(app, i))).output for i in ids]
    assert outputs == ["a/one", "a/two"]


async def test_expression_filters_with_inngest_semantics(make_engine: Any) -> None:
    """An int compares with a double, and a missing field is null, not an error."""
    app = make_engine()

    @app.create_function("big", trigger=TriggerEvent("order/created", "event.data.total > 100"))
    async def big(ctx: Context) -> Any:
        return ctx.event.data["total"]

    @app.create_function(
        "no-coupon", trigger=TriggerEvent("order/created", "event.data.coupon == null")
    )
    async def no_coupon(ctx: Context) -> Any:
        return "no coupon"

    async with app.worker():
        small, large, couponed = await app.send(
            [
                Event(name="order/created", data={"total": 99, "coupon": "X"}),
                Event(name="order/created", data={"total": 120.5}),
                Event(name="order/created", data={"total": 150, "coupon": "Y"}),
            ]
        )
        await eventually(lambda: _count_runs(app, 2))
        await asyncio.sleep(0.2)  # anything else would have been routed by now
    assert await app.runs_for_event(small) == []
    assert sorted(r.function_id for r in await app.runs_for_event(large)) == ["big", "no-coupon"]
    assert [r.function_id for r in await app.runs_for_event(couponed)] == ["big"]


async def _count_runs(app: Any, n: int) -> bool:
    return len(await app.list_runs()) >= n


async def test_same_id_within_24_hours_is_stored_once(make_engine: Any, sql: Any) -> None:
    app = make_engine()

    @app.create_function("once", trigger=TriggerEvent("a/once"))
    async def once(ctx: Context) -> Any:
        return None

    async with app.worker():
        first = await app.send(Event(name="a/once", id="order-1", data={"n": 1}))
        second = await app.send(Event(name="a/once", id="order-1", data={"n": 2}))
        assert first == second == ["order-1"]
        await eventually(lambda: _count_runs(app, 1))
        await move_clock(sql, timedelta(hours=25))
        await app.send(Event(name="a/once", id="order-1", data={"n": 3}))
        await eventually(lambda: _count_runs(app, 2))
    assert await sql.fetchval("SELECT count(*) FROM engine.events WHERE id = 'order-1'") == 2
    data = sorted(r.event.data["n"] for r in await app.runs_for_event("order-1"))
    assert data == [1, 3]


async def test_send_inside_callers_transaction(make_engine: Any, database_url: str) -> None:
    """With connection=, the event exists only if the caller's transaction commits."""
    app = make_engine()
    conn = await asyncpg.connect(database_url)
    try:
        with pytest.raises(RuntimeError):
            async with conn.transaction():
                [rolled_back] = await app.send(Event(name="a/tx"), connection=conn)
                raise RuntimeError("the caller's business logic failed")
        async with conn.transaction():
            [committed] = await app.send(Event(name="a/tx"), connection=conn)
        ids = {r["id"] for r in await conn.fetch("SELECT id FROM engine.events")}
    finally:
        await conn.close()
    assert ids == {committed} and rolled_back != committed


async def test_sql_send_event_starts_the_function(make_engine: Any, sql: Any) -> None:
    """Any language can send an event with SQL, in its own transaction."""
    app = make_engine()

    @app.create_function("from-sql", trigger=TriggerEvent("billing/paid"))
    async def from_sql(ctx: Context) -> Any:
        return ctx.event.data

    await app.database()  # registers the function
    async with sql.transaction():
        event_id = await sql.fetchval(
            "SELECT engine.send_event('billing/paid', '{\"amount\": 5}'::jsonb)"
        )
    async with app.worker():
        run = await app.wait_for_run(await only_run_id(app, event_id))
    assert run.output == {"amount": 5}


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        ({"name": "engine/fake"}, "reserved"),
        ({"name": ""}, "at least 1"),
        ({"name": "x" * 513}, "at most 512"),
        ({"name": "a", "data": {"big": "x" * (512 * 1024)}}, "limit"),
        ({"name": "a", "data": {"n": float("inf")}}, "JSON"),
        ({"name": "a", "data": {"bad": "nul\x00"}}, "NUL"),
        ({"name": "a", "data": [1, 2]}, "dict"),
    ],
)
async def test_python_send_rejects_bad_events_with_a_reason(
    make_engine: Any, sql: Any, event: dict[str, Any], reason: str
) -> None:
    app = make_engine()
    with pytest.raises(InvalidEventError, match=reason):
        await app.send([Event(name="fine"), event])  # type: ignore[list-item]
    assert await sql.fetchval("SELECT count(*) FROM engine.events") == 0


@pytest.mark.parametrize(
    ("call", "reason"),
    [
        ("SELECT engine.send_event('engine/x', '{}')", "reserved"),
        ("SELECT engine.send_event('a', '[1]')", "must be a JSON object"),
        ("SELECT engine.send_event('', '{}')", "required"),
        ("SELECT engine.send_event(repeat('n', 600), '{}')", "limit is 512"),
    ],
)
async def test_sql_send_rejects_bad_events(sql: Any, call: str, reason: str) -> None:
    with pytest.raises(asyncpg.PostgresError, match=reason) as caught:
        await sql.fetchval(call)
    assert caught.value.sqlstate == "EN001"


async def test_a_send_over_the_batch_limit_is_refused_whole(make_engine: Any, sql: Any) -> None:
    """5,000 events per send, in Python and in SQL (events may arrive by SQL too)."""
    app = make_engine()
    with pytest.raises(InvalidEventError, match="the limit is 5000"):
        await app.send([Event(name="many") for _ in range(5001)])
    batch = json.dumps([{"name": "many"}] * 5001)
    with pytest.raises(asyncpg.PostgresError, match="the limit is 5000") as caught:
        await sql.fetch("SELECT engine.send_events($1::jsonb)", batch)
    assert caught.value.sqlstate == "EN001"
    assert await sql.fetchval("SELECT count(*) FROM engine.events") == 0
    assert len(await app.send([Event(name="many") for _ in range(5000)])) == 5000


async def test_invalid_expression_fails_registration_pointing_at_it(make_engine: Any) -> None:
    app = make_engine()
    with pytest.raises(ExpressionError) as caught:

        @app.create_function("bad", trigger=TriggerEvent("a/b", "event.data.total >"))
        async def bad(ctx: Context) -> None: ...

    message = str(caught.value)
    assert "trigger 'a/b' if_exp" in message and "^" in message
    assert "bad" not in app.functions


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("nope(1)", "unknown function nope()"),
        ("event.name.nope()", "unknown function .nope()"),
        ("size(event.data, 1) > 0", r"size\(\) takes 1 argument\(s\), got 2"),
        ("event.name.startsWith()", r"\.startsWith\(\) takes 1 argument\(s\), got 0"),
    ],
)
async def test_unknown_function_or_wrong_arity_fails_registration(
    make_engine: Any, source: str, message: str
) -> None:
    """A call CEL does not know would compile and then never match: refused up front."""
    app = make_engine()
    with pytest.raises(ExpressionError, match=message):
        app.create_function("bad", trigger=TriggerEvent("a/b", if_exp=source))(_nothing)
    for fine in ("size(event.data) > 0", "event.data.l.map(x, x + 1) == [2]", "dyn(1) == 1"):
        TriggerEvent("a/b", if_exp=fine)


async def _nothing(ctx: Context) -> None: ...


def test_expression_is_a_deprecated_alias_of_if_exp() -> None:
    with pytest.warns(DeprecationWarning, match="use if_exp"):
        trigger = TriggerEvent("a/b", expression="event.data.n > 1")
    assert trigger == TriggerEvent("a/b", if_exp="event.data.n > 1")
    assert trigger.if_exp == trigger.expression == "event.data.n > 1"
    assert trigger.matches({"name": "a/b", "data": {"n": 2}})
    with pytest.raises(ConfigurationError, match="not both"), pytest.warns(DeprecationWarning):
        TriggerEvent("a/b", if_exp="true", expression="false")


async def test_trigger_declarations_are_checked(make_engine: Any) -> None:
    app = make_engine()

    async def handler(ctx: Context) -> None: ...

    with pytest.raises(ConfigurationError, match="limit is 10"):
        app.create_function("many", trigger=[TriggerEvent(f"e/{i}") for i in range(11)])(handler)
    with pytest.raises(ConfigurationError, match="same trigger twice"):
        app.create_function("dup", trigger=[TriggerEvent("e"), TriggerEvent("e")])(handler)
    with pytest.raises(ConfigurationError, match="retries"):
        app.create_function("r", trigger=TriggerEvent("e"), retries=21)(handler)
    with pytest.raises(ConfigurationError, match="async def"):
        app.create_function("sync", trigger=TriggerEvent("e"))(lambda ctx: None)  # type: ignore[arg-type]


async def test_event_for_another_apps_function_is_routed_by_any_worker(make_engine: Any) -> None:
    """Routing uses the registry: a worker of app A creates runs for app B's functions."""
    billing, shipping = make_engine("billing"), make_engine("shipping")

    @shipping.create_function("ship", trigger=TriggerEvent("order/paid"))
    async def ship(ctx: Context) -> Any:
        return "shipped"

    await shipping.database()  # shipping's functions are registered
    async with billing.worker():
        [event_id] = await billing.send(Event(name="order/paid"))
        run_id = await only_run_id(billing, event_id)
    assert (await billing.get_run(run_id)).status is RunStatus.QUEUED
    async with shipping.worker():
        assert (await shipping.wait_for_run(run_id)).output == "shipped"


async def test_a_function_registered_by_another_app_gets_the_next_event(make_engine: Any) -> None:
    """A router that already loaded the registry routes to a function registered since
    (the registry version moved), instead of consuming the event with a stale view."""
    router_app = make_engine("router-app")

    @router_app.create_function("warm", trigger=TriggerEvent("t/warm"))
    async def warm(ctx: Context) -> None:
        return None

    async with router_app.worker():
        [warm_id] = await router_app.send(Event(name="t/warm"))
        await router_app.wait_for_run(await only_run_id(router_app, warm_id))
        late = make_engine("late-app")

        @late.create_function("late", trigger=TriggerEvent("t/late"))
        async def late_fn(ctx: Context) -> None:
            return None

        await late.database()  # registers, without running a worker of its own
        [event_id] = await router_app.send(Event(name="t/late"))
        [run] = await router_app.runs_for_event(event_id, at_least=1, timeout=3)
    assert (run.app_id, run.function_id, run.status) == ("late-app", "late", RunStatus.QUEUED)


async def test_plain_events_are_routed_in_one_statement(make_engine: Any, sql: Any) -> None:
    """engine.route_simple routes events whose functions need no Python and leaves the others
    (a CEL expression, a stale registry) to the full path."""
    app = make_engine()

    @app.create_function("plain", trigger=TriggerEvent("t/plain"))
    async def plain(ctx: Context) -> None:
        return None

    @app.create_function("fancy", trigger=TriggerEvent("t/fancy", "event.data.x > 1"))
    async def fancy(ctx: Context) -> None:
        return None

    db = await app.database()
    await app.send([Event(name="t/plain"), Event(name="t/fancy", data={"x": 2})])
    version = await sql.fetchval(
        "SELECT value::bigint FROM engine.meta WHERE key = 'registry_version'"
    )
    simple = '[{"app_id": "test", "function_id": "plain", "event": "t/plain"}]'
    owner, lease = uuid.uuid4(), timedelta(seconds=30)
    stale = await db.fetch(
        "route_simple", 200, simple, ["t/fancy"], version - 1, "test", owner, lease, 10
    )
    assert [(r["routed"], r["deferred"]) for r in stale] == [(0, True)]
    rows = await db.fetch(
        "route_simple", 200, simple, ["t/fancy"], version, "test", owner, lease, 10
    )
    assert (rows[0]["routed"], rows[0]["deferred"]) == (1, True)  # t/fancy was left
    assert [(r["function_id"], json.loads(r["event"])["name"]) for r in rows[1:]] == [
        ("plain", "t/plain")
    ]
    assert rows[1]["lease_token"] == 1  # created leased to the router: it runs at once
    left = await sql.fetch(
        "SELECT e.name FROM engine.event_queue q JOIN engine.events e ON e.seq = q.seq"
    )
    assert [r["name"] for r in left] == ["t/fancy"]


async def test_list_runs_is_per_app_unless_all_apps(make_engine: Any) -> None:
    shop, billing = make_engine("shop"), make_engine("billing")
    for app in (shop, billing):

        @app.create_function("f", trigger=TriggerEvent("both/go"))
        async def f(ctx: Context) -> str:
            return "done"

    async with shop.worker(), billing.worker():
        [event_id] = await shop.send(Event(name="both/go"))
        await shop.runs_for_event(event_id, at_least=2)
    assert {r.app_id for r in await shop.list_runs()} == {"shop"}
    assert {r.app_id for r in await billing.list_runs("f")} == {"billing"}
    assert {r.app_id for r in await shop.list_runs("f", all_apps=True)} == {"shop", "billing"}


_TRACE = f"00-{'c' * 32}-{'d' * 16}-01"


async def _stored(sql: asyncpg.Connection, seqs: list[int]) -> list[dict[str, Any]]:
    """The stored events and their places on the routing queue, in seq order, with what differs
    between two sends by construction (ids, seqs, the time they arrived) left out or made
    relative."""
    rows = await sql.fetch(
        "SELECT e.name, e.data, e.v, e.traceparent, e.ts = e.received_at AS arrived_now,"
        " CASE WHEN e.ts <> e.received_at THEN e.ts END AS ts,"
        " q.due_at - greatest(e.ts, e.received_at) AS queued_for"
        " FROM engine.events e LEFT JOIN engine.event_queue q ON q.seq = e.seq"
        " WHERE e.seq = ANY ($1) ORDER BY e.seq",
        seqs,
    )
    return [dict(row) for row in rows]


async def test_events_sent_together_are_stored_as_one_at_a_time_stores_them(
    sql: asyncpg.Connection,
) -> None:
    """engine.store_events writes the events of a send in one statement when none carries an id
    of its own (each id is kept once in its 24 hours, one event at a time): either way the
    events, their order and their places on the routing queue are the same, and a bad event
    stores none of its send."""
    events = [
        {"name": "t/a", "data": {"n": 1}},
        {"name": "t/b", "data": None, "v": "2"},
        {"name": "t/c", "ts": "2030-01-01T00:00:00+00:00", "traceparent": _TRACE},
        {"name": "t/d", "data": {"nested": [1, {"x": None}]}},
    ]
    together = await sql.fetch(
        "SELECT * FROM engine.store_events($1::jsonb, $2, false)", json.dumps(events), _TRACE
    )
    keyed = [{**event, "id": f"key-{n}"} for n, event in enumerate(events)]
    one_at_a_time = await sql.fetch(
        "SELECT * FROM engine.store_events($1::jsonb, $2, false)", json.dumps(keyed), _TRACE
    )
    assert [row["id"] for row in one_at_a_time] == [event["id"] for event in keyed]
    assert len({row["id"] for row in together}) == len(events)
    for sent in (together, one_at_a_time):
        assert [row["seq"] for row in sent] == sorted(row["seq"] for row in sent)
    stored = await _stored(sql, [row["seq"] for row in together])
    assert stored == await _stored(sql, [row["seq"] for row in one_at_a_time])
    assert [row["name"] for row in stored] == ["t/a", "t/b", "t/c", "t/d"]
    assert [row["traceparent"] for row in stored] == [_TRACE] * 4
    assert all(row["queued_for"] == timedelta(0) for row in stored), stored

    before = await sql.fetchval("SELECT count(*) FROM engine.events")
    bad = [*events[:2], {"name": "engine/reserved"}, *events[2:]]
    with pytest.raises(asyncpg.PostgresError, match="reserved prefix"):
        await sql.fetch("SELECT engine.send_events($1::jsonb)", json.dumps(bad))
    assert await sql.fetchval("SELECT count(*) FROM engine.events") == before
