"""Flow control across worker processes: limits checked from the database, nothing lost."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from helpers import eventually, max_overlap, start_worker_process

from engine import (
    Batch,
    Concurrency,
    ConfigurationError,
    Context,
    Debounce,
    Event,
    Priority,
    Singleton,
    TriggerEvent,
)


@pytest.fixture
async def flow_workers(database_url: str, sql: Any) -> AsyncIterator[None]:
    """Three `engine worker flow_app:app` processes on the test's database, and the table in
    which flow_app's steps record when they run."""
    await sql.execute(
        "CREATE TABLE flow_log (id bigserial PRIMARY KEY, run_id text, key text,"
        " started_at timestamptz, ended_at timestamptz)"
    )
    workers = [start_worker_process("flow_app:app", database_url) for _ in range(3)]
    try:
        yield
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(timeout=30)


async def test_concurrency_limits_hold_across_three_worker_processes(
    make_engine: Any, flow_workers: None, sql: Any
) -> None:
    sender = make_engine("flow-app")
    count = 24
    await sender.send([Event(name="flow/go", data={"user": n % 4}) for n in range(count)])
    await eventually(lambda: _completed(sql, count), timeout=60)
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


async def test_rate_limit_holds_with_three_routing_processes(
    make_engine: Any, flow_workers: None, sql: Any
) -> None:
    """Three worker processes route 40 events of two users at once: 5 runs per user per hour
    start, the rest are SKIPPED with the reason; after the window, the key admits again."""
    sender = make_engine("flow-app")
    for n in range(40):  # one at a time: every worker's router gets some
        await sender.send(Event(name="flow/rate", data={"user": n % 2, "n": n}))
    await eventually(lambda: _settled(sql, "rate-limited", 40), timeout=60)
    counts = await _statuses(sql, "rate-limited")
    assert counts == {
        ("0", "COMPLETED"): 5,
        ("1", "COMPLETED"): 5,
        ("0", "SKIPPED"): 15,
        ("1", "SKIPPED"): 15,
    }
    reason = await sql.fetchval(
        "SELECT waiting_reason FROM engine.runs WHERE status = 'SKIPPED' LIMIT 1"
    )
    assert reason.startswith("rate limit: 5 runs already started")
    await sql.execute("UPDATE engine.clock SET offset_by = offset_by + interval '61 minutes'")
    await sender.send(Event(name="flow/rate", data={"user": 0, "n": 99}))
    await eventually(lambda: _settled(sql, "rate-limited", 41), timeout=30)
    assert (await _statuses(sql, "rate-limited"))[("0", "COMPLETED")] == 6


async def _settled(sql: Any, fn_id: str, count: int) -> bool:
    done = await sql.fetchval(
        "SELECT count(*) FROM engine.runs WHERE function_id = $1"
        " AND status IN ('COMPLETED', 'SKIPPED')",
        fn_id,
    )
    return bool(done == count)


async def _statuses(sql: Any, fn_id: str) -> dict[tuple[str, str], int]:
    rows = await sql.fetch(
        "SELECT e.data->>'user' AS user, r.status, count(*) AS n FROM engine.runs r"
        " JOIN engine.events e ON e.seq = r.event_seq WHERE r.function_id = $1"
        " GROUP BY 1, 2",
        fn_id,
    )
    return {(row["user"], row["status"]): row["n"] for row in rows}


async def test_idempotency_skips_repeats_for_24_hours(make_engine: Any, sql: Any) -> None:
    app = make_engine()

    @app.create_function(
        "charge", trigger=TriggerEvent("cart/paid"), idempotency="event.data.cart_id"
    )
    async def charge(ctx: Context) -> Any:
        return ctx.event.data["cart_id"]

    async with app.worker():
        ids = await app.send([Event(name="cart/paid", data={"cart_id": c}) for c in "aab"])
        runs = [(await app.runs_for_event(i, at_least=1))[0] for i in ids]
        statuses = [(await app.wait_for_run(r.run_id)).status.value for r in runs]
        assert statuses == ["COMPLETED", "SKIPPED", "COMPLETED"]
        skipped = await app.get_run(runs[1].run_id)
        assert 'idempotency: key "a"' in (skipped.waiting_reason or "")
        await sql.execute("UPDATE engine.clock SET offset_by = offset_by + interval '25 hours'")
        [again] = await app.send(Event(name="cart/paid", data={"cart_id": "a"}))
        run = (await app.runs_for_event(again, at_least=1))[0]
        assert (await app.wait_for_run(run.run_id)).status.value == "COMPLETED"


@pytest.mark.parametrize("mode", ["skip", "cancel"])
async def test_singleton(make_engine: Any, mode: str) -> None:
    """One active run per key: a second one is skipped, or replaces the first."""
    app = make_engine()

    @app.create_function(
        "sync",
        trigger=TriggerEvent("crm/sync"),
        singleton=Singleton(key="event.data.user", mode=mode),
    )
    async def sync(ctx: Context) -> Any:
        await ctx.step.sleep("slow", "1h")

    async with app.worker():
        [first] = await app.send(Event(name="crm/sync", data={"user": 1}))
        first_run = (await app.runs_for_event(first, at_least=1))[0].run_id
        await eventually(lambda: _is(app, first_run, "SLEEPING"))
        second, other = await app.send(
            [Event(name="crm/sync", data={"user": 1}), Event(name="crm/sync", data={"user": 2})]
        )
        second_run = (await app.runs_for_event(second, at_least=1))[0].run_id
        other_run = (await app.runs_for_event(other, at_least=1))[0].run_id
        await eventually(lambda: _is(app, other_run, "SLEEPING"))
        if mode == "skip":
            assert await _is(app, second_run, "SKIPPED")
            assert await _is(app, first_run, "SLEEPING")
        else:
            assert await _is(app, first_run, "CANCELLED")
            await eventually(lambda: _is(app, second_run, "SLEEPING"))


async def _is(app: Any, run_id: str, status: str) -> bool:
    return (await app.get_run(run_id)).status.value == status


async def test_priority_orders_queued_runs_and_negative_priority_delays(
    make_engine: Any, sql: Any
) -> None:
    app = make_engine()
    gate = asyncio.Event()
    order: list[str] = []

    async def start(name: str) -> str:
        order.append(name)
        if name == "blocker":
            await gate.wait()
        return name

    @app.create_function(
        "jobs",
        trigger=TriggerEvent("jobs/go"),
        priority=Priority(run="event.data.plan == 'enterprise' ? 120 : event.data.boost"),
    )
    async def jobs(ctx: Context) -> Any:
        return await ctx.step.run("start", start, ctx.event.data["name"])

    def job(name: str, plan: str = "free", boost: int = 0) -> Event:
        return Event(name="jobs/go", data={"name": name, "plan": plan, "boost": boost})

    async with app.worker(concurrency=1, poll_interval="50ms"):
        await app.send(job("blocker"))
        await eventually(lambda: _truthy(order == ["blocker"]))
        ids = await app.send([job("free-1"), job("free-2"), job("later", boost=-600)])
        ids += await app.send(job("vip", plan="enterprise"))
        for event_id in ids:
            await app.runs_for_event(event_id, at_least=1)
        gate.set()
        await eventually(lambda: _truthy(len(order) == 4))
        await asyncio.sleep(0.3)
        assert order == ["blocker", "vip", "free-1", "free-2"]  # "later" waits 10 minutes
        await sql.execute("UPDATE engine.clock SET offset_by = offset_by + interval '11 minutes'")
        await eventually(lambda: _truthy(len(order) == 5))
    assert order[-1] == "later"


async def _truthy(value: Any) -> Any:
    return value


async def test_throttle_spreads_starts_across_three_worker_processes(
    make_engine: Any, flow_workers: None, sql: Any
) -> None:
    """Throttle(limit=2, period=1h, burst=1): two start at once, then one every 30 minutes of
    durable time; the others wait (never dropped) and say why."""
    sender = make_engine("flow-app")
    await sender.send([Event(name="flow/throttle", data={"n": n}) for n in range(6)])
    await eventually(lambda: _count(sql, "throttled", "COMPLETED", 2), timeout=30)
    await asyncio.sleep(0.5)
    assert await _count(sql, "throttled", "COMPLETED", 2)
    reason = await sql.fetchval(
        "SELECT waiting_reason FROM engine.runs WHERE status = 'QUEUED' LIMIT 1"
    )
    assert reason.startswith("throttled until")
    for done in range(3, 7):
        await sql.execute("UPDATE engine.clock SET offset_by = offset_by + interval '30 min'")
        await eventually(lambda done=done: _count(sql, "throttled", "COMPLETED", done), 30)
        await asyncio.sleep(0.3)
        assert await _count(sql, "throttled", "COMPLETED", done)
    starts = sorted(await sql.fetch("SELECT started_at FROM engine.runs"))
    for first in starts:  # any hour holds at most limit + burst starts
        assert sum(first[0] <= s[0] < first[0] + timedelta(hours=1) for s in starts) <= 3


async def _count(sql: Any, fn_id: str, status: str, count: int) -> bool:
    found = await sql.fetchval(
        "SELECT count(*) FROM engine.runs WHERE function_id = $1 AND status = $2", fn_id, status
    )
    return bool(found == count)


async def test_debounce_starts_one_run_with_the_last_event(
    make_engine: Any, flow_workers: None, sql: Any
) -> None:
    """Debounce(period=1m, key=user, timeout=5m) with 3 worker processes routing: a burst gives
    one run, with its last event, a quiet minute after it; a never-quiet key starts at 5 min."""
    sender = make_engine("flow-app")

    async def send(user: str, n: int) -> None:
        [event_id] = await sender.send(Event(name="flow/debounce", data={"user": user, "n": n}))
        await eventually(lambda: _routed(sql, event_id), timeout=30)

    async def advance(seconds: int) -> None:
        await sql.execute(
            "UPDATE engine.clock SET offset_by = offset_by + make_interval(secs => $1)", seconds
        )
        await asyncio.sleep(0.4)  # the workers' polls see the new time

    for n in (1, 2, 3):
        await send("a", n)
    await advance(30)
    await send("a", 4)  # restarts the quiet period
    await advance(45)  # 75 s after the first event, 45 s after the last: still waiting
    assert await _outputs(sql, "a") == [("QUEUED", None)]
    await advance(20)
    await eventually(lambda: _outputs_are(sql, "a", [("COMPLETED", 4)]), timeout=30)

    await send("b", 1)
    for n in range(2, 7):  # an event every 50 s: never a quiet minute
        await advance(50)
        await send("b", n)
    assert await _outputs(sql, "b") == [("QUEUED", None)]
    await advance(50)  # 300 s after the first event: the timeout starts it
    await eventually(lambda: _outputs_are(sql, "b", [("COMPLETED", 6)]), timeout=30)


async def _routed(sql: Any, event_id: str) -> bool:
    return bool(
        await sql.fetchval(
            "SELECT NOT EXISTS (SELECT 1 FROM engine.event_queue q JOIN engine.events e"
            " ON e.seq = q.seq WHERE e.id = $1)",
            event_id,
        )
    )


async def _outputs(sql: Any, user: str) -> list[tuple[str, Any]]:
    rows = await sql.fetch(
        "SELECT r.status, r.output::text AS output FROM engine.runs r"
        " JOIN engine.events e ON e.seq = r.event_seq"
        " WHERE r.function_id = 'debounced' AND e.data->>'user' = $1",
        user,
    )
    return [(r["status"], None if r["output"] is None else int(r["output"])) for r in rows]


async def _outputs_are(sql: Any, user: str, expected: list[tuple[str, Any]]) -> bool:
    return await _outputs(sql, user) == expected


async def test_batches_fill_up_or_time_out(make_engine: Any, flow_workers: None, sql: Any) -> None:
    """Batch(max_size=5, timeout=1m): 12 events give runs of 5, 5 and, a minute later, 2;
    each event in exactly one run, in order."""
    sender = make_engine("flow-app")
    await sender.send([Event(name="flow/batch", data={"user": "a", "n": n}) for n in range(7)])
    for n in range(7, 12):
        [event_id] = await sender.send(Event(name="flow/batch", data={"user": "a", "n": n}))
        await eventually(lambda event_id=event_id: _routed(sql, event_id), timeout=30)
    await eventually(lambda: _count(sql, "batched", "COMPLETED", 2), timeout=30)
    assert await _count(sql, "batched", "QUEUED", 1)
    await sql.execute("UPDATE engine.clock SET offset_by = offset_by + interval '61 seconds'")
    await eventually(lambda: _count(sql, "batched", "COMPLETED", 3), timeout=30)
    rows = await sql.fetch(
        "SELECT output::text FROM engine.runs WHERE function_id = 'batched' ORDER BY created_at"
    )
    assert [r["output"] for r in rows] == ["[0, 1, 2, 3, 4]", "[5, 6, 7, 8, 9]", "[10, 11]"]


def test_batching_refuses_the_combinations_the_reference_forbids(make_engine: Any) -> None:
    app = make_engine()
    batch = Batch(max_size=10, timeout="5s")
    with pytest.raises(ConfigurationError, match="cannot be combined with debounce, singleton"):
        app.create_function(
            "f",
            batch_events=batch,
            debounce=Debounce(period="1s"),
            singleton=Singleton(),
        )(_noop)
    with pytest.raises(ConfigurationError, match="max_size"):
        Batch(max_size=0, timeout="1s")


@pytest.mark.parametrize("fifo", [True, False])
async def test_fifo_slot_lets_the_older_woken_run_go_first(sql: Any, fifo: bool) -> None:
    """The race FIFO is for: a freed slot woke the older run B, but a newer run C is due
    earlier (it was queued, never parked). The claim takes C unless the slot is FIFO."""
    slots = json.dumps([{"slot": "fn:app/f", "cap": 1, "fifo": fifo}])
    for name in ("b", "c"):
        await sql.execute("SELECT engine.send_event($1, '{}')", name)
    await sql.execute(
        "INSERT INTO engine.runs (app_id, function_id, status, event_seq, due_at, concurrency,"
        " blocked_on, created_at, updated_at)"
        " SELECT 'app', 'f', 'QUEUED', e.seq,"
        "        CASE e.name WHEN 'b' THEN now() ELSE now() - interval '1 second' END,"
        "        $1::jsonb, CASE e.name WHEN 'b' THEN 'fn:app/f' END,"
        "        now() - CASE e.name WHEN 'b' THEN interval '1 minute' ELSE interval '0' END,"
        "        now()"
        " FROM engine.events e",
        slots,
    )
    claimed = await sql.fetch(
        "SELECT e.name FROM engine.claim_runs('app', '{f}', gen_random_uuid(), '30s', 1) c"
        " JOIN engine.runs r ON r.id = c.id JOIN engine.events e ON e.seq = r.event_seq"
    )
    assert [row["name"] for row in claimed] == (["b"] if fifo else ["c"])
    parked = await sql.fetchval(
        "SELECT e.name FROM engine.runs r JOIN engine.events e ON e.seq = r.event_seq"
        " WHERE r.status = 'QUEUED' AND r.due_at = 'infinity'"
    )
    assert parked == ("c" if fifo else None)


async def test_idempotency_and_singleton_hold_with_three_routing_processes(
    make_engine: Any, flow_workers: None, sql: Any
) -> None:
    sender = make_engine("flow-app")
    for n in range(30):  # one send each: the three routers race for them
        await sender.send(Event(name="flow/charge", data={"cart": n % 5}))
        await sender.send(Event(name="flow/single", data={"user": n % 4}))
    await eventually(lambda: _settled(sql, "charge-once", 30), timeout=60)
    await eventually(lambda: _count(sql, "one-per-user", "SKIPPED", 26), timeout=60)
    assert await _count(sql, "charge-once", "COMPLETED", 5)
    # the four admitted runs may still be on their way to their sleep
    await eventually(lambda: _count(sql, "one-per-user", "SLEEPING", 4), timeout=30)
    distinct = await sql.fetchval(
        "SELECT count(DISTINCT e.data->>'cart') FROM engine.runs r"
        " JOIN engine.events e ON e.seq = r.event_seq"
        " WHERE r.function_id = 'charge-once' AND r.status = 'COMPLETED'"
    )
    assert distinct == 5


async def test_priority_orders_runs_waiting_for_a_slot_across_processes(
    make_engine: Any, flow_workers: None, sql: Any
) -> None:
    """Runs parked on a full concurrency slot start in priority order, not arrival order."""
    await sql.execute("CREATE TABLE flow_gate (opened boolean)")
    sender = make_engine("flow-app")
    await sender.send(Event(name="flow/priority", data={"name": "blocker", "plan": "free"}))
    await eventually(lambda: _count(sql, "prioritized", "RUNNING", 1), timeout=60)
    for name, plan in (("free-1", "free"), ("free-2", "free"), ("vip", "enterprise")):
        await sender.send(Event(name="flow/priority", data={"name": name, "plan": plan}))
    await eventually(lambda: _parked(sql, 3), timeout=60)
    await sql.execute("INSERT INTO flow_gate VALUES (true)")
    await eventually(lambda: _count(sql, "prioritized", "COMPLETED", 4), timeout=60)
    order = [r["key"] for r in await sql.fetch("SELECT key FROM flow_log ORDER BY started_at")]
    assert order == ["blocker", "vip", "free-1", "free-2"]


async def _parked(sql: Any, count: int) -> bool:
    found = await sql.fetchval(
        "SELECT count(*) FROM engine.runs WHERE due_at = 'infinity' AND blocked_on IS NOT NULL"
    )
    return bool(found == count)
