"""Buffered checkpoints: completed steps are committed together, on count, on time, and before
anything that leaves the process or waits; a crash runs again only the steps not committed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections import Counter
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from helpers import FAST, eventually, move_clock, only_run_id, start_worker_process

from engine import (
    Checkpointing,
    ConfigurationError,
    Context,
    Event,
    RunStatus,
    StepError,
    TriggerEvent,
)
from engine.db import queries

MANY = Checkpointing(buffered_steps=100, max_interval="1h")  # only a boundary commits


async def recorded(dsn: str, run_id: str) -> list[str]:
    """The keys of the run's steps committed so far, in order (read from another connection)."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT step_key FROM engine.steps WHERE run_id = $1 ORDER BY position", run_id
        )
    finally:
        await conn.close()
    return [row["step_key"] for row in rows]


async def run_once(app: Any, name: str, data: dict[str, Any] | None = None) -> Any:
    async with app.worker(poll_interval="50ms"):
        [event_id] = await app.send(Event(name=name, data=data or {}))
        return await app.wait_for_run(await only_run_id(app, event_id), timeout=30)


def test_options_are_checked() -> None:
    """Checkpointing refuses a buffer or an interval out of range, naming the option."""
    for bad in (0, 1001, 2.5, True):
        with pytest.raises(ConfigurationError, match="buffered_steps"):
            Checkpointing(buffered_steps=bad)  # type: ignore[arg-type]
    for interval in ("0s", "2h", "soon", -1):
        with pytest.raises(ConfigurationError, match="max_interval"):
            Checkpointing(max_interval=interval)
    assert Checkpointing(buffered_steps=5, max_interval="250ms").to_json() == {
        "buffered_steps": 5,
        "max_interval": 0.25,
    }
    for flag in ("off", 0, None):
        with pytest.raises(ConfigurationError, match="synchronous_commit"):
            Checkpointing(synchronous_commit=flag)  # type: ignore[arg-type]
    assert Checkpointing(buffered_steps=1, synchronous_commit=False).to_json() == {
        "buffered_steps": 1,
        "max_interval": 1.0,
        "synchronous_commit": False,
    }


# Records, at each commit, the synchronous_commit of the transaction that wrote a step or changed
# a run's status (a deferred constraint trigger runs at the commit: what the commit obeys).
COMMIT_PROBE = """
CREATE TABLE commit_probe (tbl text, run_id uuid, status text, setting text);
CREATE FUNCTION probe_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO commit_probe VALUES (TG_TABLE_NAME,
        coalesce(to_jsonb(NEW) ->> 'run_id', to_jsonb(NEW) ->> 'id')::uuid, NEW.status,
        current_setting('synchronous_commit'));
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER probe_steps AFTER INSERT OR UPDATE ON engine.steps
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION probe_commit();
CREATE CONSTRAINT TRIGGER probe_runs AFTER UPDATE OF status ON engine.runs
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION probe_commit();
"""


@pytest.mark.parametrize("buffered", [1, 10])
async def test_synchronous_commit_off_relaxes_only_that_functions_writes(
    make_engine: Any, sql: Any, buffered: int
) -> None:
    """Checkpointing(synchronous_commit=False): the function's steps, suspensions and run ends
    commit with synchronous_commit off; the claims that start its runs, and every write of a
    function without it, still wait for their flush, even while both run at once (their writes
    never share a transaction)."""
    # The test cluster commits without waiting (engine/testdb.py); this database waits, as a
    # production one does. New connections (the worker's) take it.
    await sql.execute(
        "ALTER DATABASE "
        + await sql.fetchval("SELECT current_database()")
        + " SET synchronous_commit = on"
    )
    await sql.execute(COMMIT_PROBE)
    app = make_engine()

    async def flow(ctx: Context) -> int:
        await ctx.step.run("a", lambda: 1)
        await ctx.step.sleep("nap", "1h")
        return await ctx.step.run("b", lambda: 2)

    relaxed = Checkpointing(buffered_steps=buffered, synchronous_commit=False)
    app.create_function("relaxed", trigger=TriggerEvent("t/go"), checkpointing=relaxed)(flow)
    app.create_function("durable", trigger=TriggerEvent("t/go"))(flow)

    async with app.worker(poll_interval="50ms", concurrency=40):
        await app.send([Event(name="t/go") for _ in range(20)])

        async def all_asleep() -> bool:
            count = await sql.fetchval("SELECT count(*) FROM engine.runs WHERE status = 'SLEEPING'")
            return bool(count == 40)

        await eventually(all_asleep, timeout=30)
        await move_clock(sql, timedelta(hours=1))

        async def all_done() -> bool:
            count = await sql.fetchval(
                "SELECT count(*) FROM engine.runs WHERE status = 'COMPLETED'"
            )
            return bool(count == 40)

        await eventually(all_done, timeout=30)
    rows = await sql.fetch(
        "SELECT r.function_id, p.tbl, p.status, p.setting, count(*) AS n"
        " FROM commit_probe p JOIN engine.runs r ON r.id = p.run_id"
        " GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4"
    )
    seen = {(r["function_id"], r["tbl"], r["status"], r["setting"]): r["n"] for r in rows}
    expected: Counter[tuple[str, str, str, str]] = Counter()
    for fn, own in (("relaxed", "off"), ("durable", "on")):
        expected[fn, "steps", "COMPLETED", own] += 40  # a and b
        expected[fn, "steps", "SLEEPING", own] += 20  # the sleep, with the suspension
        expected[fn, "runs", "SLEEPING", own] += 20  # the suspension
        expected[fn, "runs", "COMPLETED", own] += 20  # the run's end
        # The claims that resume the runs (the first starts were routed RUNNING), and the sleep
        # each records as over: the worker's writes, always durable.
        expected[fn, "runs", "RUNNING", "on"] += 20
        expected[fn, "steps", "COMPLETED", "on"] += 20
    assert seen == dict(expected)
    forms = (
        "checkpoint_many",
        "checkpoint_completed",
        "finish_many",
        "finish_alone",
        "suspend_many",
    )
    for name in forms:
        await sql.prepare(queries()[f"{name}_relaxed"])  # each form, batched or not, is valid


async def test_steps_are_committed_when_the_buffer_is_full(make_engine: Any) -> None:
    """With buffered_steps=3, the steps are committed three at a time, in order, beside the
    steps that follow (never more than 2 x 3 - 1 uncommitted when a step starts), and the
    run's end commits the rest."""
    app = make_engine()
    dsn = app.database_url
    seen: dict[str, list[str]] = {}

    async def look(key: str, run_id: str) -> str:
        seen[key] = await recorded(dsn, run_id)
        return key

    @app.create_function(
        "count",
        trigger=TriggerEvent("t/count"),
        checkpointing=Checkpointing(buffered_steps=3, max_interval="1h"),
    )
    async def count(ctx: Context) -> Any:
        return [await ctx.step.run(f"s{i}", look, f"s{i}", ctx.run_id) for i in range(8)]

    run = await run_once(app, "t/count")
    assert run.status is RunStatus.COMPLETED
    committed = [len(seen[f"s{i}"]) for i in range(8)]
    assert committed == sorted(committed), committed  # commits only add, in order
    for i, count in enumerate(committed):
        assert seen[f"s{i}"] == [f"s{j}" for j in range(count)]  # a prefix, three at a time
        assert count % 3 == 0 and i - 5 <= count <= i - i % 3, committed
    assert [s.step_id for s in run.steps] == [f"s{i}" for i in range(8)]
    assert run.output == [f"s{i}" for i in range(8)]


async def test_a_full_buffer_commits_beside_the_next_steps(make_engine: Any) -> None:
    """The commit of a full buffer does not hold the next step: while it waits (here on a lock
    the test holds on the run's row), the next step runs."""
    app = make_engine()
    dsn = app.database_url
    locker: list[asyncpg.Connection] = []
    next_step_ran = asyncio.Event()

    async def lock_the_run(run_id: str) -> None:  # the commit of s0 and s1 will wait on it
        conn = await asyncpg.connect(dsn)
        locker.append(conn)
        await conn.execute("BEGIN")
        await conn.execute("SELECT 1 FROM engine.runs WHERE id = $1 FOR UPDATE", run_id)

    async def mark() -> None:
        next_step_ran.set()

    @app.create_function(
        "beside",
        trigger=TriggerEvent("t/beside"),
        checkpointing=Checkpointing(buffered_steps=2, max_interval="1h"),
    )
    async def beside(ctx: Context) -> str:
        await ctx.step.run("s0", lambda: 0)
        await ctx.step.run("s1", lock_the_run, ctx.run_id)
        await ctx.step.run("s2", mark)
        return "done"

    async with app.worker(poll_interval="50ms"):
        [event_id] = await app.send(Event(name="t/beside"))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(next_step_ran.wait(), 5)
        ran_while_locked = next_step_ran.is_set()
        await eventually(lambda: asyncio.sleep(0, bool(locker)), timeout=30)
        await locker[0].execute("ROLLBACK")
        await locker[0].close()
        run = await app.wait_for_run(await only_run_id(app, event_id), timeout=30)
    assert ran_while_locked
    assert run.status is RunStatus.COMPLETED
    assert [s.step_id for s in run.steps] == ["s0", "s1", "s2"]


async def test_without_the_option_each_step_is_committed_before_the_next(
    make_engine: Any,
) -> None:
    app = make_engine()
    dsn = app.database_url
    seen: list[int] = []

    async def look(run_id: str) -> None:
        seen.append(len(await recorded(dsn, run_id)))

    @app.create_function("plain", trigger=TriggerEvent("t/plain"))
    async def plain(ctx: Context) -> Any:
        for i in range(4):
            await ctx.step.run(f"s{i}", look, ctx.run_id)

    assert (await run_once(app, "t/plain")).status is RunStatus.COMPLETED
    assert seen == [0, 1, 2, 3]


async def test_max_interval_commits_while_a_step_still_executes(make_engine: Any) -> None:
    """A step that runs long does not hold the results before it uncommitted: max_interval
    after the first one completed, they are committed while it executes."""
    app = make_engine()
    dsn = app.database_url

    async def wait_for_first(run_id: str) -> list[str]:
        async def committed() -> list[str]:
            return await recorded(dsn, run_id)

        return await eventually(committed, timeout=20)

    @app.create_function(
        "timed",
        trigger=TriggerEvent("t/timed"),
        checkpointing=Checkpointing(buffered_steps=100, max_interval="100ms"),
    )
    async def timed(ctx: Context) -> Any:
        await ctx.step.run("first", lambda: 1)
        return await ctx.step.run("long", wait_for_first, ctx.run_id)

    run = await run_once(app, "t/timed")
    assert run.status is RunStatus.COMPLETED
    assert run.output == ["first"]


async def test_a_send_event_commits_the_buffer_first(make_engine: Any) -> None:
    app = make_engine()
    dsn = app.database_url

    async def look(run_id: str) -> list[str]:
        return await recorded(dsn, run_id)

    @app.create_function("sender", trigger=TriggerEvent("t/send"), checkpointing=MANY)
    async def sender(ctx: Context) -> Any:
        await ctx.step.run("a", lambda: 1)
        await ctx.step.run("b", lambda: 2)
        await ctx.step.send_event("send", Event(name="t/elsewhere"))
        return await ctx.step.run("look", look, ctx.run_id)

    run = await run_once(app, "t/send")
    assert run.output == ["a", "b", "send"]


async def test_a_wait_commits_the_buffer_first(make_engine: Any) -> None:
    """A wait resolved at once (its event came before it) still commits the steps before it."""
    app = make_engine()
    dsn = app.database_url

    async def look(run_id: str) -> list[str]:
        return await recorded(dsn, run_id)

    async def pay() -> None:
        await app.send(Event(name="t/paid"))

    @app.create_function("waiter", trigger=TriggerEvent("t/wait"), checkpointing=MANY)
    async def waiter(ctx: Context) -> Any:
        await ctx.step.run("a", lambda: 1)
        await ctx.step.run("b", pay)  # the wait finds this event when it registers
        got = await ctx.step.wait_for_event("paid", event="t/paid", timeout="1h")
        assert got is not None
        return await ctx.step.run("look", look, ctx.run_id)

    run = await run_once(app, "t/wait")
    assert run.status is RunStatus.COMPLETED
    assert run.output == ["a", "b", "paid"]


async def test_an_invoke_commits_the_buffer_first(make_engine: Any) -> None:
    """The child run starts only once the parent's steps before the invoke are committed."""
    app = make_engine()
    dsn = app.database_url

    @app.create_function("child")
    async def child(ctx: Context) -> Any:
        return await ctx.step.run("look", recorded, dsn, ctx.event.data["parent"])

    @app.create_function("parent", trigger=TriggerEvent("t/invoke"), checkpointing=MANY)
    async def parent(ctx: Context) -> Any:
        await ctx.step.run("a", lambda: 1)
        await ctx.step.run("b", lambda: 2)
        return await ctx.step.invoke("call", function=child, data={"parent": ctx.run_id})

    run = await run_once(app, "t/invoke")
    assert run.status is RunStatus.COMPLETED
    assert run.output == ["a", "b", "call"]


async def test_a_sleep_commits_the_buffer_with_the_suspension(make_engine: Any, sql: Any) -> None:
    app = make_engine()

    @app.create_function("sleeper", trigger=TriggerEvent("t/sleep"), checkpointing=MANY)
    async def sleeper(ctx: Context) -> Any:
        await ctx.step.run("a", lambda: 1)
        await ctx.step.run("b", lambda: 2)
        await ctx.step.sleep("nap", "1h")
        return await ctx.step.run("c", lambda: 3)

    async with app.worker(poll_interval="50ms"):
        [event_id] = await app.send(Event(name="t/sleep"))
        run_id = await only_run_id(app, event_id)

        async def sleeping() -> bool:
            return (await app.get_run(run_id)).status is RunStatus.SLEEPING

        await eventually(sleeping)
        assert await recorded(app.database_url, run_id) == ["a", "b", "nap"]
        await move_clock(sql, timedelta(hours=1))
        run = await app.wait_for_run(run_id, timeout=30)
    assert run.output == 3
    assert [(s.step_id, s.status) for s in run.steps] == [
        ("a", "COMPLETED"),
        ("b", "COMPLETED"),
        ("nap", "COMPLETED"),
        ("c", "COMPLETED"),
    ]


async def test_a_failed_attempt_commits_the_buffer_with_it(make_engine: Any) -> None:
    """A step that fails for good is recorded with the steps before it: the code that catches
    its error goes on with all of them committed."""
    app = make_engine()
    dsn = app.database_url

    def fail() -> None:
        raise ValueError("no")

    async def look(run_id: str) -> list[str]:
        return await recorded(dsn, run_id)

    @app.create_function("catcher", trigger=TriggerEvent("t/catch"), checkpointing=MANY)
    async def catcher(ctx: Context) -> Any:
        await ctx.step.run("a", lambda: 1)
        await ctx.step.run("b", lambda: 2)
        with contextlib.suppress(StepError):
            await ctx.step.run("bad", fail, retries=0)
        return await ctx.step.run("look", look, ctx.run_id)

    run = await run_once(app, "t/catch")
    assert run.output == ["a", "b", "bad"]


async def test_retries_keep_the_history(make_engine: Any) -> None:
    """A step retried twice among buffered steps: each body ran as often as it should, and
    the history holds its failed attempts and its completion."""
    app = make_engine(backoff=FAST)
    dsn = app.database_url
    calls: dict[str, int] = {}
    seen: list[list[str]] = []

    def count(key: str) -> str:
        calls[key] = calls.get(key, 0) + 1
        return key

    async def flaky(run_id: str) -> str:
        calls["flaky"] = calls.get("flaky", 0) + 1
        seen.append(await recorded(dsn, run_id))
        if calls["flaky"] < 3:
            raise RuntimeError(f"attempt {calls['flaky']}")
        return "ok"

    @app.create_function("retried", trigger=TriggerEvent("t/retry"), checkpointing=MANY)
    async def retried(ctx: Context) -> Any:
        await ctx.step.run("a", count, "a")
        await ctx.step.run("b", count, "b")
        result = await ctx.step.run("flaky", flaky, ctx.run_id)
        await ctx.step.run("c", count, "c")
        return result

    run = await run_once(app, "t/retry")
    assert run.status is RunStatus.COMPLETED and run.output == "ok"
    assert calls == {"a": 1, "b": 1, "flaky": 3, "c": 1}
    assert seen == [[], ["a", "b", "flaky"], ["a", "b", "flaky"]]
    flaky_step = next(s for s in run.steps if s.step_id == "flaky")
    assert [a.outcome for a in flaky_step.attempts] == ["RETRYING", "RETRYING", "COMPLETED"]
    assert flaky_step.attempt_count == 3
    assert [s.step_id for s in run.steps] == ["a", "b", "flaky", "c"]


async def test_parallel_steps_are_buffered_and_replayed(make_engine: Any, sql: Any) -> None:
    """Gathered steps complete into one buffer; across a sleep they replay to the same
    result, each body executed once."""
    app = make_engine()
    calls: dict[str, int] = {}

    def body(key: str) -> str:
        calls[key] = calls.get(key, 0) + 1
        return key.upper()

    @app.create_function(
        "fan",
        trigger=TriggerEvent("t/fan"),
        checkpointing=Checkpointing(buffered_steps=4, max_interval="1h"),
    )
    async def fan(ctx: Context) -> Any:
        first = await asyncio.gather(*(ctx.step.run(f"p{i}", body, f"p{i}") for i in range(6)))
        await ctx.step.sleep("nap", "1h")
        second = await asyncio.gather(*(ctx.step.run("q", body, f"q{i}") for i in range(3)))
        return [*first, *second]

    async with app.worker(poll_interval="50ms"):
        [event_id] = await app.send(Event(name="t/fan"))
        run_id = await only_run_id(app, event_id)

        async def sleeping() -> bool:
            return (await app.get_run(run_id)).status is RunStatus.SLEEPING

        await eventually(sleeping)
        await move_clock(sql, timedelta(hours=1))
        run = await app.wait_for_run(run_id, timeout=30)
    assert run.status is RunStatus.COMPLETED
    assert run.output == ["P0", "P1", "P2", "P3", "P4", "P5", "Q0", "Q1", "Q2"]
    assert all(n == 1 for n in calls.values()) and len(calls) == 9
    assert sorted(s.step_id for s in run.steps) == sorted(
        [f"p{i}" for i in range(6)] + ["nap", "q", "q:1", "q:2"]
    )


async def test_a_stopping_worker_commits_the_buffer(make_engine: Any) -> None:
    """A worker stopped gracefully hands the run back with every completed step committed;
    the next worker goes on after them."""
    app = make_engine()
    gate = asyncio.Event()
    started = asyncio.Event()
    calls: dict[str, int] = {}

    async def body(key: str) -> str:
        calls[key] = calls.get(key, 0) + 1
        if key == "c" and calls[key] == 1:
            started.set()
            await gate.wait()
        return key

    @app.create_function("stopped", trigger=TriggerEvent("t/stop"), checkpointing=MANY)
    async def stopped(ctx: Context) -> Any:
        return [await ctx.step.run(k, body, k) for k in ("a", "b", "c", "d")]

    async with app.worker(poll_interval="50ms") as worker:
        [event_id] = await app.send(Event(name="t/stop"))
        run_id = await only_run_id(app, event_id)
        await asyncio.wait_for(started.wait(), 30)
        worker.stop()

        async def stopping() -> bool:
            return all(ex.stopping for ex in worker.executions.values())

        await eventually(stopping)
        gate.set()
    assert await recorded(app.database_url, run_id) == ["a", "b", "c"]
    assert (await app.get_run(run_id)).status is RunStatus.QUEUED
    async with app.worker(poll_interval="50ms"):
        run = await app.wait_for_run(run_id, timeout=30)
    assert run.output == ["a", "b", "c", "d"]
    assert calls == {"a": 1, "b": 1, "c": 1, "d": 1}


async def test_a_crash_runs_again_only_the_steps_not_committed(
    database_url: str, make_engine: Any, sql: Any
) -> None:
    """SIGKILL while the fifth of seven steps executes (buffer of three): the first three were
    committed, the fourth was in memory. The next worker runs the fourth and fifth again, with
    the same idempotency keys, and nothing else twice."""
    await sql.execute("CREATE TABLE effects (run_id text, step text)")
    worker = start_worker_process(
        "buffered:app", database_url, "--lease", "1s", env={"BUFFERED_BLOCK": "1"}
    )
    try:
        app = make_engine("buffered")
        [event_id] = await app.send(Event(name="buffered/go"))

        async def in_fifth_step() -> bool:
            return await sql.fetchval("SELECT count(*) FROM effects WHERE step = 'five'") == 1

        await eventually(in_fifth_step, timeout=30)
        run_id = await only_run_id(app, event_id)

        async def first_three_committed() -> bool:  # a full buffer commits beside the steps
            return await recorded(database_url, run_id) == ["one", "two", "three"]

        await eventually(first_three_committed, timeout=30)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    assert await recorded(database_url, run_id) == ["one", "two", "three"]
    worker = start_worker_process("buffered:app", database_url, "--lease", "1s")
    try:
        run = await app.wait_for_run(run_id, timeout=30)
    finally:
        worker.terminate()
        worker.wait()
    assert run.status is RunStatus.COMPLETED
    counts = dict(await sql.fetch("SELECT step, count(*) FROM effects GROUP BY step"))
    assert counts == {"one": 1, "two": 1, "three": 1, "four": 2, "five": 2, "six": 1, "seven": 1}
    assert await sql.fetchval("SELECT count(DISTINCT run_id) FROM effects") == 1


async def test_several_steps_are_recorded_in_one_statement_as_one_by_one(sql: Any) -> None:
    """engine.checkpoint_steps with several steps records them as record_step does each (a
    failed attempt's history included), and says duplicate when one is final already."""
    await sql.execute("INSERT INTO engine.functions (app_id, function_id) VALUES ('t', 'f')")
    event_id = await sql.fetchval("SELECT engine.send_event('t/go', '{}')")
    await sql.execute(
        "SELECT engine.insert_run('t', 'f', e.seq, NULL, NULL, NULL, NULL, engine.now())"
        " FROM engine.events e WHERE e.id = $1",
        event_id,
    )
    owner = "00000000-0000-0000-0000-000000000001"
    [run] = await sql.fetch(
        "SELECT id, lease_token FROM engine.claim_runs('t', '{f}', $1, '30 seconds', 1)", owner
    )

    def step(key: str, status: str = "COMPLETED", **fields: Any) -> dict[str, Any]:
        return {
            "key": key,
            "position": 0,
            "kind": "run",
            "status": status,
            "attempts": 1,
            "output": {"k": key},
            "id": key,
            "follows": ">",
            **fields,
        }

    async def checkpoint(*steps: dict[str, Any]) -> str:
        return await sql.fetchval(
            "SELECT engine.checkpoint_steps($1, $2, $3, $4::jsonb)",
            run["id"],
            owner,
            run["lease_token"],
            json.dumps(list(steps)),
        )

    failed = step(
        "b",
        "RETRYING",
        attempts=2,
        error={"type": "E", "message": "m"},
        traceback="tb",
        retry_at="2030-01-01T00:00:00+00:00",
    )
    assert await checkpoint(step("a"), failed) == "ok"
    rows = await sql.fetch(
        "SELECT step_key, status, output, attempts, ended_at IS NULL AS open"
        " FROM engine.steps WHERE run_id = $1 ORDER BY step_key",
        run["id"],
    )
    assert [tuple(r) for r in rows] == [
        ("a", "COMPLETED", '{"k": "a"}', 1, False),
        ("b", "RETRYING", '{"k": "b"}', 2, True),
    ]
    attempt = await sql.fetchrow("SELECT * FROM engine.step_attempts WHERE run_id = $1", run["id"])
    assert (attempt["step_key"], attempt["attempt"], attempt["outcome"]) == ("b", 1, "RETRYING")
    assert json.loads(attempt["error"]) == {"type": "E", "message": "m", "traceback": "tb"}
    # a is final: refused (it keeps its output), and the answer says so
    assert await checkpoint(step("c"), {**step("a"), "output": {"k": "again"}}) == "duplicate"
    assert (
        await sql.fetchval(
            "SELECT output FROM engine.steps WHERE run_id = $1 AND step_key = 'a'", run["id"]
        )
        == '{"k": "a"}'
    )


async def test_a_lost_lease_drops_the_buffer_and_starts_nothing_new(make_engine: Any) -> None:
    """Once a worker knows its lease is lost (as its heartbeat learns it), it cannot write: the
    steps it buffered are dropped, no new step starts, and the run's next owner runs them
    again."""
    app = make_engine(backoff=FAST)
    gate = asyncio.Event()
    started = asyncio.Event()
    calls: dict[str, int] = {}

    async def body(key: str) -> str:
        calls[key] = calls.get(key, 0) + 1
        if key == "c" and calls[key] == 1:
            started.set()
            await gate.wait()
        return key

    @app.create_function("lost", trigger=TriggerEvent("t/lost"), checkpointing=MANY)
    async def lost(ctx: Context) -> Any:
        return [await ctx.step.run(k, body, k) for k in ("a", "b", "c", "d")]

    async with app.worker(poll_interval="50ms", lease="1s") as worker:
        [event_id] = await app.send(Event(name="t/lost"))
        run_id = await only_run_id(app, event_id)
        await asyncio.wait_for(started.wait(), 30)
        [execution] = worker.executions.values()
        execution.lost = True  # what a heartbeat that finds the lease gone sets
        gate.set()

        async def ended() -> bool:
            return not worker.executions

        await eventually(ended)
    assert calls == {"a": 1, "b": 1, "c": 1}
    assert await recorded(app.database_url, run_id) == []
    async with app.worker(poll_interval="50ms", lease="1s"):  # another owner, once it expires
        run = await app.wait_for_run(run_id, timeout=30)
    assert run.status is RunStatus.COMPLETED and run.output == ["a", "b", "c", "d"]
    assert calls == {"a": 2, "b": 2, "c": 2, "d": 1}
