"""No run is lost: sleeps across restarts, dead workers, racing workers, fenced writes, cancels."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from helpers import APPS, eventually, move_clock, only_run_id, start_worker_process, status_is

from engine import Context, Event, RunStatus, TriggerEvent
from engine.worker import Worker


async def test_sleep_spans_a_worker_restart(make_engine: Any, sql: Any) -> None:
    """A sleeping run holds no worker; a new worker wakes it when it is due."""
    app = make_engine()

    @app.create_function("nap", trigger=TriggerEvent("t/nap"))
    async def nap(ctx: Context) -> Any:
        before = await ctx.step.run("before", lambda: "b")
        await ctx.step.sleep("nap", "1h")
        return before

    async with app.worker() as worker:
        [event_id] = await app.send(Event(name="t/nap"))
        run_id = await only_run_id(app, event_id)
        await eventually(lambda: status_is(app, run_id, RunStatus.SLEEPING))
        assert worker.executions == {}
    await move_clock(sql, timedelta(hours=1))
    async with app.worker():
        run = await app.wait_for_run(run_id)
    assert run.status is RunStatus.COMPLETED and run.output == "b"


async def test_sleep_until_and_sub_second_sleeps(make_engine: Any) -> None:
    app = make_engine()
    stamps: list[datetime] = []

    @app.create_function("timed", trigger=TriggerEvent("t/timed"))
    async def timed(ctx: Context) -> Any:
        stamps.append(
            await ctx.step.run("t0", lambda: datetime.now(UTC).isoformat()) and datetime.now(UTC)
        )
        await ctx.step.sleep("short", timedelta(milliseconds=300))
        await ctx.step.sleep_until("past", datetime(2000, 1, 1, tzinfo=UTC))  # resumes at once
        await ctx.step.sleep_until("soon", datetime.now(UTC) + timedelta(milliseconds=200))
        return "done"

    async with app.worker():
        [event_id] = await app.send(Event(name="t/timed"))
        run = await app.wait_for_run(await only_run_id(app, event_id))
    assert run.status is RunStatus.COMPLETED
    assert [s.kind for s in run.steps] == ["run", "sleep", "sleep", "sleep"]
    assert run.ended_at - run.started_at >= timedelta(milliseconds=450)


async def test_future_event_ts_schedules_the_run(make_engine: Any, sql: Any) -> None:
    app = make_engine()

    @app.create_function("later", trigger=TriggerEvent("t/later"))
    async def later(ctx: Context) -> Any:
        return "ran"

    async with app.worker():
        [event_id] = await app.send(Event(name="t/later", ts=datetime.now(UTC) + timedelta(days=2)))
        await asyncio.sleep(0.3)
        assert await app.runs_for_event(event_id) == []
        await move_clock(sql, timedelta(days=2))
        run = await app.wait_for_run(await only_run_id(app, event_id))
    assert run.output == "ran"


async def test_two_workers_racing_execute_each_run_once(make_engine: Any, sql: Any) -> None:
    """Two workers with their own pools claim the same runs: every step executes once."""
    await sql.execute("CREATE TABLE effects (run_id text, step text)")
    apps = [make_engine("race"), make_engine("race")]
    for app in apps:
        dsn = app.database_url

        @app.create_function("work", trigger=TriggerEvent("t/work"))
        async def work(ctx: Context, dsn: str = dsn) -> Any:
            for step in ("one", "two"):
                await ctx.step.run(step, _record_effect, dsn, ctx.run_id, step)
            return "ok"

    async with apps[0].worker(concurrency=8), apps[1].worker(concurrency=8):
        ids = await apps[0].send([Event(name="t/work", data={"i": i}) for i in range(60)])

        async def all_done() -> bool:
            count = await sql.fetchval(
                "SELECT count(*) FROM engine.runs WHERE status = 'COMPLETED'"
            )
            return count == 60

        await eventually(all_done, timeout=30)
    assert len(ids) == 60
    duplicates = await sql.fetchval(
        "SELECT count(*) FROM"
        " (SELECT run_id, step FROM effects GROUP BY 1, 2 HAVING count(*) > 1) d"
    )
    assert duplicates == 0
    assert await sql.fetchval("SELECT count(*) FROM effects") == 120
    assert await sql.fetchval("SELECT count(*) FROM engine.runs") == 60


async def _record_effect(dsn: str, run_id: str, step: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("INSERT INTO effects VALUES ($1, $2)", run_id, step)
    finally:
        await conn.close()


async def test_killed_worker_run_is_finished_by_another(
    database_url: str, make_engine: Any, sql: Any
) -> None:
    """SIGKILL in the middle of a run: the lease expires, another worker finishes the run,
    and every step that had completed ran exactly once."""
    await sql.execute("CREATE TABLE effects (run_id text, step text)")
    worker = start_worker_process("crashy:app", database_url, "--lease", "1s")
    try:
        app = make_engine("crashy")
        [event_id] = await app.send(Event(name="crashy/go"))

        async def in_second_step() -> bool:
            return await sql.fetchval("SELECT count(*) FROM effects WHERE step = 'two'") == 1

        await eventually(in_second_step, timeout=30)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    run_id = await only_run_id(app, event_id)
    assert (await app.get_run(run_id)).status is RunStatus.RUNNING

    sys.path.insert(0, str(APPS))
    try:
        import crashy
    finally:
        sys.path.remove(str(APPS))
    crashy.app.database_url = database_url
    crashy.BLOCK_IN_STEP_TWO = False
    try:
        async with crashy.app.worker(lease="1s", poll_interval="100ms"):
            run = await crashy.app.wait_for_run(run_id, timeout=30)
    finally:
        await crashy.app.close()
    assert run.status is RunStatus.COMPLETED
    counts = dict(await sql.fetch("SELECT step, count(*) FROM effects GROUP BY step"))
    assert counts == {"one": 1, "two": 2, "three": 1}  # `two` was interrupted once, by the kill


async def test_a_dead_workers_runs_are_taken_over_before_the_backlog(sql: Any) -> None:
    """Runs already under way whose worker died come before queued runs: otherwise they wait
    for the whole backlog to drain (minutes), holding their concurrency permits meanwhile."""
    await sql.execute("INSERT INTO engine.functions (app_id, function_id) VALUES ('t', 'f')")

    async def queue_runs(count: int) -> list[Any]:
        ids = []
        for _ in range(count):
            event_id = await sql.fetchval("SELECT engine.send_event('t/go', '{}')")
            ids.append(
                await sql.fetchval(
                    "SELECT (engine.insert_run('t', 'f', e.seq, NULL, NULL, NULL, NULL,"
                    " engine.now())).id FROM engine.events e WHERE e.id = $1",
                    event_id,
                )
            )
        return ids

    def claim(owner: int, limit: int) -> Any:
        return sql.fetch(
            "SELECT id FROM engine.claim_runs('t', '{f}', $1, '1 second', $2)",
            uuid.UUID(int=owner),
            limit,
        )

    [started] = await queue_runs(1)
    assert [row["id"] for row in await claim(1, 1)] == [started]  # then its worker dies
    await queue_runs(5)  # a backlog, due before the lease expires
    await move_clock(sql, timedelta(seconds=2))
    assert [row["id"] for row in await claim(2, 1)] == [started]


async def test_a_worker_that_lost_its_lease_records_nothing(make_engine: Any, sql: Any) -> None:
    """Writes carry the lease: after another claim, the old holder's checkpoint is refused."""
    app = make_engine()

    @app.create_function("fenced", trigger=TriggerEvent("t/fenced"))
    async def fenced(ctx: Context) -> Any:
        return None

    await app.database()
    await app.send(Event(name="t/fenced"))
    db = app.open_database
    first_owner, second_owner = (
        "00000000-0000-0000-0000-000000000001",
        "00000000-0000-0000-0000-000000000002",
    )
    async with db.transaction() as conn:
        events = await db.fetch("claim_events", 10, conn=conn)
        seq = events[0]["seq"]
        plan = f'[{{"app_id": "test", "function_id": "fenced", "event_seq": {seq}, "claim": true}}]'
        [row] = await db.fetch(
            "create_runs",
            [events[0]["seq"]],
            plan,
            first_owner,
            timedelta(milliseconds=1),
            conn=conn,
        )
    await asyncio.sleep(0.01)  # the first lease expires
    [claimed] = await db.fetch(
        "claim_runs", "test", ["fenced"], second_owner, timedelta(seconds=30), 5, 2**25
    )
    step = '{"key": "s", "position": 0, "kind": "run", "status": "COMPLETED", "attempts": 1}'
    assert (
        await db.fetchval("checkpoint_step", row["id"], first_owner, row["lease_token"], step)
        == "lost"
    )
    assert (
        await db.fetchval(
            "finish_run",
            row["id"],
            first_owner,
            row["lease_token"],
            "COMPLETED",
            None,
            None,
            0,
            f"[{step}]",  # a stale holder's deferred step is refused with its finish
        )
        == "lost"
    )
    assert (
        await db.fetchval("checkpoint_step", row["id"], second_owner, claimed["lease_token"], step)
        == "ok"
    )
    assert (
        await db.fetchval("checkpoint_step", row["id"], second_owner, claimed["lease_token"], step)
        == "duplicate"
    )


async def test_cancel_takes_effect_between_steps(make_engine: Any) -> None:
    """A step already executing finishes and is recorded; no further step starts."""
    app = make_engine()
    started = asyncio.Event()
    release = asyncio.Event()
    later_calls = []

    @app.create_function("cancellable", trigger=TriggerEvent("t/cancel"))
    async def cancellable(ctx: Context) -> Any:
        async def slow() -> str:
            started.set()
            await release.wait()
            return "finished anyway"

        await ctx.step.run("slow", slow)
        await ctx.step.run("never", lambda: later_calls.append(1))

    async with app.worker():
        [event_id] = await app.send(Event(name="t/cancel"))
        run_id = await only_run_id(app, event_id)
        await asyncio.wait_for(started.wait(), 10)
        assert await app.cancel_run(run_id) is RunStatus.RUNNING
        release.set()
        run = await app.wait_for_run(run_id)
    assert run.status is RunStatus.CANCELLED
    assert [(s.step_id, s.output) for s in run.steps] == [("slow", "finished anyway")]
    assert later_calls == []


async def test_cancelling_a_sleeping_run_is_immediate(make_engine: Any) -> None:
    app = make_engine()

    @app.create_function("sleeper", trigger=TriggerEvent("t/sleeper"))
    async def sleeper(ctx: Context) -> Any:
        await ctx.step.sleep("long", "7d")

    async with app.worker():
        [event_id] = await app.send(Event(name="t/sleeper"))
        run_id = await only_run_id(app, event_id)
        await eventually(lambda: status_is(app, run_id, RunStatus.SLEEPING))
        assert await app.cancel_run(run_id) is RunStatus.CANCELLED
    assert (await app.get_run(run_id)).status is RunStatus.CANCELLED
    assert await app.cancel_run(run_id) is RunStatus.CANCELLED  # terminal: unchanged


async def test_stopping_worker_hands_runs_back(make_engine: Any) -> None:
    """On stop, the executing step finishes, and the run is released for another worker."""
    app = make_engine()
    started = asyncio.Event()

    @app.create_function("handover", trigger=TriggerEvent("t/handover"))
    async def handover(ctx: Context) -> Any:
        async def step_one() -> str:
            started.set()
            await asyncio.sleep(0.3)
            return "one"

        one = await ctx.step.run("one", step_one)
        two = await ctx.step.run("two", lambda: "two")
        return [one, two]

    async with app.worker(grace="5s"):
        [event_id] = await app.send(Event(name="t/handover"))
        run_id = await only_run_id(app, event_id)
        await asyncio.wait_for(started.wait(), 10)
    run = await app.get_run(run_id)
    assert run.status is RunStatus.QUEUED
    assert [s.step_id for s in run.steps] == ["one"]
    async with app.worker():
        run = await app.wait_for_run(run_id)
    assert run.output == ["one", "two"]


async def test_sigterm_lets_the_step_finish_and_hands_the_run_back(
    database_url: str, make_engine: Any, sql: Any
) -> None:
    """`engine worker` on SIGTERM: the executing step is recorded, the run is released, the
    process exits cleanly, and another worker completes the run."""
    worker = start_worker_process("graceful:app", database_url, "--grace", "10s")
    app = make_engine("graceful")

    @app.create_function("graceful", trigger=TriggerEvent("graceful/go"))
    async def graceful(ctx: Context) -> Any:
        first = await ctx.step.run("slow", lambda: "unused: recorded by the first worker")
        return [first, await ctx.step.run("after", lambda: "ran on the next worker")]

    try:
        [event_id] = await app.send(Event(name="graceful/go"))
        run_id = await only_run_id(app, event_id, timeout=30)
        await eventually(lambda: status_is(app, run_id, RunStatus.RUNNING), timeout=30)
        worker.send_signal(signal.SIGTERM)
        exit_code = await asyncio.to_thread(worker.wait, 30)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert exit_code == 0
    run = await app.get_run(run_id)
    assert run.status is RunStatus.QUEUED
    assert [(s.step_id, s.output) for s in run.steps] == [
        ("slow", "finished during the grace period")
    ]
    async with app.worker():
        run = await app.wait_for_run(run_id)
    assert run.output == ["finished during the grace period", "ran on the next worker"]


async def test_a_step_is_committed_before_the_next_one_starts(
    make_engine: Any, database_url: str
) -> None:
    """Completed steps are committed lazily, but always before the next step's code runs (and
    the last one with the run's end): what the next step sees in the database is durable."""
    app = make_engine()
    seen: list[str | None] = []

    async def look_back(run_id: str) -> str:
        conn = await asyncpg.connect(database_url)
        try:
            seen.append(
                await conn.fetchval(
                    "SELECT status FROM engine.steps WHERE run_id = $1::uuid AND step_key = 'a'",
                    run_id,
                )
            )
        finally:
            await conn.close()
        return "b"

    @app.create_function("ordered", trigger=TriggerEvent("t/ordered"))
    async def ordered(ctx: Context) -> Any:
        first = await ctx.step.run("a", lambda: "a")
        second = await ctx.step.run("b", look_back, ctx.run_id)
        return [first, second]

    async with app.worker():
        [event_id] = await app.send(Event(name="t/ordered"))
        run = await app.wait_for_run(await only_run_id(app, event_id))
    assert seen == ["COMPLETED"]
    assert run.output == ["a", "b"]
    assert [(s.step_id, s.status) for s in run.steps] == [("a", "COMPLETED"), ("b", "COMPLETED")]


# The backend writing the record of step `key` kills its own connection, once: the worker's
# write fails on the connection (its outcome unknown to the worker), as in a server restart.
KILL_ONCE = """
CREATE SEQUENCE kill_once;
CREATE FUNCTION kill_writer() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.step_key = TG_ARGV[0] AND nextval('kill_once') = 1 THEN
        PERFORM pg_terminate_backend(pg_backend_pid());
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER kill_writer BEFORE INSERT ON engine.steps
    FOR EACH ROW EXECUTE FUNCTION kill_writer('{key}');
"""


@pytest.mark.parametrize(
    "key", ["first", "nap", "third"], ids=["checkpoint", "suspension", "run end"]
)
async def test_a_write_cut_off_by_the_database_neither_fails_nor_stalls_the_run(
    make_engine: Any, sql: Any, key: str
) -> None:
    """A write that dies with its connection is not the function's failure (no retry is used:
    the function has none) and the run does not wait for its lease to expire (durable time
    stands still, so it never does): the worker hands the run back and it goes on."""
    await sql.execute(KILL_ONCE.format(key=key))
    app = make_engine()
    calls: list[str] = []

    @app.create_function("cut", trigger=TriggerEvent("t/cut"), retries=0)
    async def cut(ctx: Context) -> Any:
        for name in ("first", "second"):  # the second one's start commits the first's record
            await ctx.step.run(name, lambda name=name: calls.append(name))
        await ctx.step.sleep("nap", "10ms")
        await ctx.step.run("third", lambda: calls.append("third"))
        return "done"

    async with app.worker(lease="1h"):
        [event_id] = await app.send(Event(name="t/cut"))
        run = await app.wait_for_run(await only_run_id(app, event_id), timeout=30)
    assert await sql.fetchval("SELECT last_value FROM kill_once") == 2  # cut off, then written
    assert run.status is RunStatus.COMPLETED, run.error
    assert [s.step_id for s in run.steps] == ["first", "second", "nap", "third"]
    assert set(calls) == {"first", "second", "third"}  # a step whose record was cut off reruns


# The first routing transaction dies with its connection (its backend kills itself).
CUT_ROUTING_ONCE = """
CREATE SEQUENCE cut_once;
CREATE FUNCTION cut_routing() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF nextval('cut_once') = 1 THEN
        PERFORM pg_terminate_backend(pg_backend_pid());
    END IF;
    RETURN OLD;
END $$;
CREATE TRIGGER cut_routing BEFORE DELETE ON engine.event_queue
    FOR EACH ROW EXECUTE FUNCTION cut_routing();
"""


async def test_runs_leased_to_a_worker_that_lost_track_of_them_go_on(
    make_engine: Any, sql: Any
) -> None:
    """A claim (or a routing) can commit while its reply is lost with the connection: its runs
    are then leased to a worker that does not execute them. After a failed tick, the worker
    queues such runs again at once instead of leaving them to their lease (an hour here, and
    durable time stands still, so it never expires)."""
    app = make_engine()

    @app.create_function("lost", trigger=TriggerEvent("t/lost"))
    async def lost(ctx: Context) -> Any:
        return await ctx.step.run("only", lambda: "found")

    await app.database()  # registers the function
    worker = Worker(app, lease="1h")
    event_id = await sql.fetchval("SELECT engine.send_event('t/orphan', '{}')")
    orphan = await sql.fetchval(
        "SELECT (engine.insert_run('test', 'lost', e.seq, NULL, NULL, NULL, NULL,"
        " engine.now())).id FROM engine.events e WHERE e.id = $1",
        event_id,
    )
    claimed = await sql.fetch(  # committed, but the worker never heard of it
        "SELECT id FROM engine.claim_runs('test', '{lost}', $1, '1 hour', 10)", worker.owner
    )
    assert [row["id"] for row in claimed] == [orphan]
    await sql.execute(CUT_ROUTING_ONCE)
    [event_id] = await app.send(Event(name="t/lost"))  # its routing is cut off: a failed tick
    task = asyncio.create_task(worker.run())
    try:
        run = await app.wait_for_run(orphan, timeout=30)
        routed = await app.wait_for_run(await only_run_id(app, event_id), timeout=30)
    finally:
        worker.stop()
        await task
    assert await sql.fetchval("SELECT last_value FROM cut_once") >= 1  # the cut happened
    assert run.status is RunStatus.COMPLETED and run.output == "found"
    assert routed.status is RunStatus.COMPLETED


ROUTE_SIMPLE = (
    "SELECT id FROM engine.route_simple(10, $1::jsonb, '{}', (SELECT value::bigint"
    " FROM engine.meta WHERE key = 'registry_version'), 'test', $2, '1 hour', 10)"
    " WHERE id IS NOT NULL"
)


async def test_a_routing_lost_in_a_crash_recreates_the_same_run(make_engine: Any, sql: Any) -> None:
    """Routing commits without waiting for its WAL flush (the first step starts ~0.4 ms
    sooner); a crash may take it. The event is durable and is routed again, to a run with the
    same id, so a step that had already run keeps its idempotency key (`run id:step id`)."""
    app = make_engine()

    @app.create_function("again", trigger=TriggerEvent("t/again"))
    async def again(ctx: Context) -> None:
        return None

    await app.database()  # registers the function
    plan = json.dumps([{"app_id": "test", "function_id": "again", "event": "t/again"}])
    owner = uuid.uuid4()
    await app.send(Event(name="t/again"))
    await sql.execute("SET synchronous_commit = on")  # as in production (the tests run without)
    transaction = sql.transaction()
    await transaction.start()
    [first] = await sql.fetch(ROUTE_SIMPLE, plan, owner)
    assert await sql.fetchval("SHOW synchronous_commit") == "off"  # for this transaction only
    await transaction.rollback()  # what a crash before the WAL flush would leave
    assert await sql.fetchval("SELECT count(*) FROM engine.runs") == 0
    assert await sql.fetchval("SELECT count(*) FROM engine.event_queue") == 1  # still there
    [again_routed] = await sql.fetch(ROUTE_SIMPLE, plan, owner)
    assert again_routed["id"] == first["id"]
    assert await sql.fetchval("SHOW synchronous_commit") == "on"
