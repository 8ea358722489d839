"""Group commit: concurrent writes of many runs share round trips, each gets its own result."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from helpers import eventually, only_run_id, record_queries

from engine import Context, Event, RunStatus, TriggerEvent
from engine.db import Database, is_connection_error
from engine.group_commit import GroupCommitter
from engine.records import StepKind, StepRecord, StepStatus


def checkpoint_item(run: str) -> str:
    return json.dumps({"run": run, "owner": str(uuid.uuid4()), "token": 1, "steps": []})


async def test_concurrent_calls_share_round_trips_and_a_bad_item_fails_alone(
    make_engine: Any,
) -> None:
    app = make_engine()
    db = await app.database()
    sent: list[int] = []
    runs_sent: list[list[str]] = []
    send = GroupCommitter._send

    async def counting(self: GroupCommitter, items: list[str]) -> list[str]:
        sent.append(len(items))
        runs_sent.append([json.loads(item)["run"] for item in items])
        return await send(self, items)

    committer = GroupCommitter(db, "checkpoint_many")
    committer._send = counting.__get__(committer)  # type: ignore[method-assign]
    runs = [str(uuid.uuid4()) for _ in range(30)]
    runs[17] = "not-a-uuid"
    items = [checkpoint_item(run) for run in runs]
    results = await asyncio.gather(
        *(committer.call(item, run) for item, run in zip(items, runs, strict=True)),
        return_exceptions=True,
    )
    assert [r for i, r in enumerate(results) if i != 17] == ["lost"] * 29  # runs nobody leases
    assert isinstance(results[17], asyncpg.DataError)
    assert sent[0] == 1  # the first call went out at once, alone
    assert sum(1 for size in sent if size > 1) >= 1  # the rest were grouped while it flew
    assert len(sent) < 30 + 29  # a failed batch is retried item by item, and only that one
    assert all(batch == sorted(batch) for batch in runs_sent)  # in run id order: no deadlocks


async def test_a_lone_call_is_sent_at_once(make_engine: Any) -> None:
    app = make_engine()
    db = await app.database()
    committer = GroupCommitter(db, "checkpoint_many")
    run = str(uuid.uuid4())
    assert await committer.call(checkpoint_item(run), run) == "lost"
    with pytest.raises(asyncpg.DataError):
        await committer.call(checkpoint_item("nope"), "nope")
    assert await committer.call(checkpoint_item(run), run) == "lost"  # still usable


def in_use(app: Any) -> int:
    """Connections of the app's pool checked out right now."""
    pool = app.open_database.pool
    return int(pool.get_size() - pool.get_idle_size())


async def test_a_held_connection_stays_out_between_round_trips_until_idle(
    make_engine: Any,
) -> None:
    """Back-to-back round trips (a run's step checkpoints) keep one connection instead of taking
    it from the pool and giving it back each time; unused for `idle`, it goes back."""
    app = make_engine()
    db = await app.database()
    kept = db.held(idle=60)
    await kept.fetch("now")
    await kept.fetch("now")
    assert in_use(app) == 1  # kept between the two round trips, and after them
    await kept.close()
    assert in_use(app) == 0

    brief = db.held(idle=0.05)
    await brief.fetch("now")

    async def given_back() -> bool:
        return in_use(app) == 0

    await eventually(given_back)  # no close: the idle timer gave it back
    await brief.fetch("now")  # and takes one again when needed
    await brief.close()
    assert in_use(app) == 0


async def test_a_held_connection_that_fails_is_given_back_and_replaced(
    make_engine: Any, sql: asyncpg.Connection
) -> None:
    """A held connection the server dropped (a restart, a failover) fails that round trip
    only: it goes back to the pool (which drops it), and the next round trip gets a live one."""
    app = make_engine()
    db = await app.database()
    held = db.held(idle=60)
    await held.fetch("now")
    await sql.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    try:
        await held.fetch("now")  # unless the pool saw it closed before: then it replaced it
    except Exception as exc:
        assert is_connection_error(exc), exc
    assert in_use(app) == 0
    assert await held.fetch("now") is not None
    await held.close()


async def test_a_held_connection_lost_between_round_trips_is_replaced(
    make_engine: Any, sql: asyncpg.Connection
) -> None:
    """A held connection whose server session ended while it waited for its next round trip
    (a restart, a failover between two steps): asyncpg releases it to the pool by itself, and
    the held connection takes another. At most the next round trip fails (the pool's other
    connections died too), as a connection error; never every round trip after it."""
    app = make_engine()
    db = await app.database()
    held = db.held(idle=60)
    await held.fetch("now")
    assert in_use(app) == 1
    await sql.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )

    async def released() -> bool:  # asyncpg saw the session end and gave its connection back
        return in_use(app) == 0

    await eventually(released)
    try:
        await held.fetch("now")
    except Exception as exc:
        assert is_connection_error(exc), exc
    assert await held.fetch("now") is not None
    await held.close()


async def test_a_stopped_worker_holds_no_connection(make_engine: Any) -> None:
    """A worker's group committers hold their connections while steps follow each other; when
    the worker stops, every connection is back in the pool (closing it does not wait)."""
    app = make_engine()

    @app.create_function("steps", trigger=TriggerEvent("t/steps"))
    async def steps(ctx: Context) -> int:
        for i in range(5):
            await ctx.step.run(f"s{i}", lambda: None)
        return 5

    async with app.worker():
        [event_id] = await app.send(Event(name="t/steps"))
        run = await app.wait_for_run(await only_run_id(app, event_id))
        assert run.status is RunStatus.COMPLETED
    assert in_use(app) == 0


async def test_held_connections_never_starve_the_pool(make_engine: Any) -> None:
    """With every connection of a small pool taken, a held connection goes back after its
    round trip: other callers (a heartbeat, a claim) never wait behind a stream of steps."""
    app = make_engine(pool_size=2)
    db = await app.database()
    first, second = db.held(idle=60), db.held(idle=60)
    await first.fetch("now")
    await second.fetch("now")  # the pool's last connection: given back at once
    assert await asyncio.wait_for(db.fetchval("now"), 10) is not None
    await first.close()
    await second.close()


async def test_a_stream_of_held_round_trips_lets_a_waiter_in(make_engine: Any) -> None:
    """The pool is looked at every few round trips of a stream, not after each one: a caller
    that waits for the pool's last connection still gets it while the stream goes on."""
    app = make_engine(pool_size=2)
    db = await app.database()
    first, second = db.held(idle=60), db.held(idle=60)
    await first.fetch("now")
    streamed, waited = 0, asyncio.Event()

    async def stream() -> None:
        nonlocal streamed
        while not waited.is_set() and streamed < 2_000:
            await second.fetch("now")
            streamed += 1

    async def waiter() -> None:
        await asyncio.sleep(0.05)  # the stream has taken the pool's last connection
        await db.fetchval("now")
        waited.set()

    await asyncio.wait_for(asyncio.gather(stream(), waiter()), 60)
    assert waited.is_set() and streamed < 2_000  # the waiter got in while the stream went on
    await first.close()
    await second.close()


async def lease_a_run(app: Any, owner: uuid.UUID) -> tuple[uuid.UUID, int]:
    """Routes the one event sent to ``app`` into a run leased to ``owner``: (run id, token)."""
    [run] = await lease_runs(app, owner)
    return run


async def lease_runs(app: Any, owner: uuid.UUID) -> list[tuple[uuid.UUID, int]]:
    """Routes the events sent to ``app`` (at most 50) into runs of its function "held" leased
    to ``owner``, in the events' order: [(run id, token)]."""
    db: Database = app.open_database
    async with db.transaction() as conn:
        events = await db.fetch("claim_events", 50, conn=conn)
        seqs = sorted(event["seq"] for event in events)
        plan = json.dumps(
            [{"app_id": "test", "function_id": "held", "event_seq": seq, "claim": True}
             for seq in seqs]
        )  # fmt: skip
        rows = await db.fetch("create_runs", seqs, plan, owner, timedelta(minutes=5), conn=conn)
    by_seq = {row["event_seq"]: (row["id"], row["lease_token"]) for row in rows}
    return [by_seq[seq] for seq in seqs]


def completed(key: str) -> StepRecord:
    began = datetime(2026, 12, 3, 12, 0, 0, 123456, tzinfo=UTC)
    return StepRecord(
        key,
        3,
        StepKind.RUN,
        StepStatus.COMPLETED,
        attempts=2,
        step_id="charge",
        follows=">2",
        started_at=began,
        ended_at=began + timedelta(milliseconds=5),
        input_json='{"args": [1, "two"], "kwargs": {"three": 3}}',
    )


async def test_a_completed_step_alone_is_recorded_as_the_batched_form_records_it(
    make_engine: Any, sql: asyncpg.Connection
) -> None:
    """engine.checkpoint_completed, the typed form of a checkpoint that carries one completed
    step, writes the row engine.checkpoint_many writes for the same record, and answers as it
    does: 'duplicate' for a step already final, 'lost' without the lease, 'cancel' once a
    cancel is requested (the step is still recorded)."""
    app = make_engine()

    @app.create_function("held", trigger=TriggerEvent("t/held"))
    async def held(ctx: Context) -> None:
        return None

    db = await app.database()
    await app.send(Event(name="t/held"))
    owner = uuid.uuid4()
    run, token = await lease_a_run(app, owner)
    output = '{"charged": 12.5, "ids": ["a", "b"]}'

    def alone(key: str, holder: uuid.UUID = owner) -> tuple[Any, ...]:
        step = completed(key).completed_args(output)
        assert step is not None
        return (run, holder, token, *step)

    assert await db.fetchval("checkpoint_completed", *alone("typed")) == "ok"
    item = {"run": str(run), "owner": str(owner), "token": token}
    steps = f"[{completed('json').to_json(output)}]"
    batch = f'[{json.dumps(item)[:-1]}, "steps": {steps}}}]'
    assert [r["result"] for r in await db.fetch("checkpoint_many", batch)] == ["ok"]
    rows = {
        r["step_key"]: dict(r)
        for r in await sql.fetch("SELECT * FROM engine.steps WHERE run_id = $1", run)
    }
    for row in rows.values():
        del row["step_key"], row["created_at"]
    assert rows["typed"] == rows["json"]
    assert rows["typed"]["input"] == '{"args": [1, "two"], "kwargs": {"three": 3}}'
    assert rows["typed"]["worker"] == owner and rows["typed"]["bytes"] > 0

    assert await db.fetchval("checkpoint_completed", *alone("typed")) == "duplicate"
    assert [r["result"] for r in await db.fetch("checkpoint_many", batch)] == ["duplicate"]
    assert await db.fetchval("checkpoint_completed", *alone("stale", uuid.uuid4())) == "lost"
    await sql.execute("UPDATE engine.runs SET cancel_requested = true WHERE id = $1", run)
    assert await db.fetchval("checkpoint_completed", *alone("late")) == "cancel"
    keys = await sql.fetch("SELECT step_key FROM engine.steps WHERE run_id = $1", run)
    assert sorted(r["step_key"] for r in keys) == ["json", "late", "typed"]


async def twin_runs(
    make_engine: Any, count: int
) -> tuple[Database, uuid.UUID, tuple[list[tuple[uuid.UUID, int]], list[tuple[uuid.UUID, int]]]]:
    """Two lists of ``count`` runs leased to one owner, for one batch written both ways: the
    app's database, the owner, and the lists of (run id, token)."""
    app = make_engine()

    @app.create_function("held", trigger=TriggerEvent("t/held"))
    async def held(ctx: Context) -> None:
        return None

    db = await app.database()
    owner = uuid.uuid4()
    await app.send([Event(name="t/held")] * (2 * count))
    runs = await lease_runs(app, owner)
    return db, owner, (runs[:count], runs[count:])


async def counting_calls(
    sql: asyncpg.Connection, batch: str, write: str = "checkpoint"
) -> tuple[list[asyncpg.Record], dict[str, int]]:
    """engine.checkpoint_many's (``write``: "finish": engine.finish_many's) rows for ``batch``,
    and how many times it called each form: the set, or a function per item."""
    forms = {
        "checkpoint": ["checkpoint_set", "checkpoint_steps"],
        "finish": ["finish_set", "finish_run"],
    }

    async def calls() -> dict[str, int]:
        rows = await sql.fetch(
            "SELECT funcname, calls FROM pg_stat_xact_user_functions WHERE funcname = ANY($1)",
            forms[write],
        )  # the session's counts not flushed yet: a difference, taken in one transaction
        return {row["funcname"]: row["calls"] for row in rows}

    async with sql.transaction():
        await sql.execute("SET LOCAL track_functions = 'all'")
        before = await calls()
        rows = await sql.fetch(f"SELECT result FROM engine.{write}_many($1::jsonb)", batch)
        after = await calls()
    return rows, {
        name: n - before.get(name, 0) for name, n in after.items() if n != before.get(name)
    }


async def test_a_batch_of_checkpoints_is_written_as_a_set_as_item_by_item(
    make_engine: Any, sql: asyncpg.Connection
) -> None:
    """engine.checkpoint_many writes a batch whose steps are distinct in one statement
    (engine.checkpoint_set), and leaves what one engine.checkpoint_steps call per item leaves:
    the same answers ('ok', 'lost', 'duplicate', 'cancel'), step rows and failed attempts. A
    batch that names a step twice goes an item at a time."""
    db, owner, (batched, alone) = await twin_runs(make_engine, 4)
    failed = completed("retried")
    failed.status, failed.error = StepStatus.RETRYING, {"type": "ValueError", "message": "no"}
    failed.traceback, failed.retry_at = "Traceback ...", datetime(2026, 12, 4, tzinfo=UTC)

    def items(world: list[tuple[uuid.UUID, int]]) -> list[dict[str, Any]]:
        (first, token), (second, _), (stale, _), (cancelled, _) = world
        output = '{"n": 1}'
        return [
            {"run": first, "token": token, "steps": [completed("a"), completed("b")]},
            {"run": second, "token": world[1][1], "steps": [failed]},
            {"run": stale, "token": world[2][1] + 1, "steps": [completed("c")]},  # not its lease
            {"run": first, "token": token, "steps": [completed("d")]},
            {"run": second, "token": world[1][1], "steps": [completed("done"), completed("e")]},
            {"run": cancelled, "token": world[3][1], "steps": [completed("f")], "output": output},
        ]

    def steps_json(item: dict[str, Any]) -> str:
        return "[" + ",".join(step.to_json(item.get("output")) for step in item["steps"]) + "]"

    def as_json(item: dict[str, Any]) -> str:
        head = {"run": str(item["run"]), "owner": str(owner), "token": item["token"]}
        return f'{json.dumps(head)[:-1]}, "steps": {steps_json(item)}}}'

    for world in (batched, alone):  # a step final already, and a cancel pending
        done = {**items(world)[4], "steps": [completed("done")]}
        assert [r["result"] for r in await db.fetch("checkpoint_many", f"[{as_json(done)}]")] == [
            "ok"
        ]
        await sql.execute(
            "UPDATE engine.runs SET cancel_requested = true WHERE id = $1", world[3][0]
        )

    rows, calls = await counting_calls(
        sql, "[" + ",".join(as_json(item) for item in items(batched)) + "]"
    )
    as_set = [row["result"] for row in rows]
    assert calls == {"checkpoint_set": 1}
    item_by_item = [
        await sql.fetchval(
            "SELECT engine.checkpoint_steps($1, $2, $3, $4::jsonb)",
            item["run"],
            owner,
            item["token"],
            steps_json(item),
        )
        for item in items(alone)
    ]
    assert as_set == item_by_item == ["ok", "ok", "lost", "ok", "duplicate", "cancel"]

    async def written(world: list[tuple[uuid.UUID, int]], table: str) -> list[dict[str, Any]]:
        index = {run: i for i, (run, _) in enumerate(world)}
        found = await sql.fetch(
            f"SELECT * FROM engine.{table} WHERE run_id = ANY($1)", [run for run, _ in world]
        )
        rows = [{**dict(r), "run_id": index[r["run_id"]]} for r in found]
        for row in rows:
            row.pop("created_at", None)
        return sorted(rows, key=lambda r: (r["run_id"], r["step_key"]))

    steps = await written(batched, "steps")
    assert [(r["run_id"], r["step_key"]) for r in steps] == [
        (0, "a"), (0, "b"), (0, "d"), (1, "done"), (1, "e"), (1, "retried"), (3, "f"),
    ]  # fmt: skip
    assert steps == await written(alone, "steps")
    attempts = await written(batched, "step_attempts")
    assert [(r["step_key"], json.loads(r["error"])["traceback"]) for r in attempts] == [
        ("retried", "Traceback ...")
    ]
    assert attempts == await written(alone, "step_attempts")

    twice = "[" + ",".join(as_json(item) for item in items(batched)[:1] * 2) + "]"
    again, calls = await counting_calls(sql, twice)
    assert [r["result"] for r in again] == ["duplicate", "duplicate"]
    assert calls == {"checkpoint_steps": 2}


async def test_a_batch_of_run_ends_is_written_as_a_set_as_item_by_item(
    make_engine: Any, sql: asyncpg.Connection
) -> None:
    """engine.finish_many ends a batch of distinct runs as a set (engine.finish_set: the
    checkpoints' statement for the leases and steps, then one update of the runs) and leaves
    what one engine.finish_run call per item leaves: the same answers, runs, steps, failed
    attempts, executions and end events. A batch that ends a run twice goes an item at a
    time."""
    db, owner, (batched, alone) = await twin_runs(make_engine, 7)
    broke = completed("broke")
    broke.status, broke.error = StepStatus.FAILED, {"type": "ValueError", "message": "no"}
    broke.traceback = "Traceback ..."
    error = {"type": "ValueError", "message": "no"}

    def items(world: list[tuple[uuid.UUID, int]]) -> list[dict[str, Any]]:
        lease = [{"run": str(run), "owner": str(owner), "token": token} for run, token in world]
        return [
            {**lease[0], "status": "COMPLETED", "output": {"n": 1}, "steps": [completed("last")]},
            {**lease[1], "status": "FAILED", "error": error, "traceback": "Traceback ...",
             "steps": [broke]},
            {**lease[2], "token": world[2][1] + 1, "status": "COMPLETED"},  # not its lease
            {**lease[3], "status": "COMPLETED", "output": 3},  # its cancel is pending
            {**lease[4], "status": "CANCELLED"},
            {**lease[5], "status": "COMPLETED", "steps": [completed("done")]},  # final already
            {**lease[6], "status": "COMPLETED", "log_lines": 3, "log_places": {"a": [1]}},
        ]  # fmt: skip

    def as_json(item: dict[str, Any]) -> str:
        steps = ",".join(step.to_json() for step in item.get("steps", []))
        fields = {"output": None, "error": None, "log_lines": 0}
        fields.update((key, value) for key, value in item.items() if key != "steps")
        return f'{json.dumps(fields)[:-1]}, "steps": [{steps}]}}'

    for world in (batched, alone):
        done = {"run": str(world[5][0]), "owner": str(owner), "token": world[5][1]}
        await db.fetch("checkpoint_many", f"[{as_json({**done, 'steps': [completed('done')]})}]")
        await sql.execute(
            "UPDATE engine.runs SET cancel_requested = true WHERE id = $1", world[3][0]
        )

    rows, calls = await counting_calls(
        sql, "[" + ",".join(as_json(item) for item in items(batched)) + "]", "finish"
    )
    assert calls == {"finish_set": 1}
    item_by_item = [
        await sql.fetchval("SELECT result FROM engine.finish_many($1::jsonb)", f"[{as_json(item)}]")
        for item in items(alone)
    ]
    assert [r["result"] for r in rows] == item_by_item
    assert item_by_item == ["ok", "ok", "lost", "cancel", "ok", "lost", "ok"]

    async def left(world: list[tuple[uuid.UUID, int]]) -> dict[str, list[dict[str, Any]]]:
        index = {run: i for i, (run, _) in enumerate(world)}
        ids = [run for run, _ in world]
        found: dict[str, list[dict[str, Any]]] = {}
        for table, query in (
            ("runs", "SELECT id AS run_id, status, output, error, log_lines, log_places,"
                     " waiting_reason, lease_owner, ended_at IS NULL AS open FROM engine.runs"
                     " WHERE id = ANY($1)"),
            ("steps", "SELECT * FROM engine.steps WHERE run_id = ANY($1)"),
            ("attempts", "SELECT * FROM engine.step_attempts WHERE run_id = ANY($1)"),
            ("executions", "SELECT run_id, outcome, body_error, ended_at IS NULL AS open"
                           " FROM engine.run_executions WHERE run_id = ANY($1)"),
            ("events", "SELECT id::uuid AS run_id, name, data - 'run_id' - 'event' AS data"
                       " FROM engine.events WHERE id::uuid = ANY($1) ORDER BY seq"),
        ):  # fmt: skip
            rows = [dict(r) for r in await sql.fetch(query, ids)]
            for row in rows:
                row["run_id"] = index[row["run_id"]]
                row.pop("created_at", None)
            found[table] = sorted(rows, key=lambda r: (r["run_id"], str(r.get("step_key"))))
        return found

    as_set, one_by_one = await left(batched), await left(alone)
    assert as_set == one_by_one
    assert [(r["run_id"], r["status"]) for r in as_set["runs"]] == [
        (0, "COMPLETED"), (1, "FAILED"), (2, "RUNNING"), (3, "CANCELLED"), (4, "CANCELLED"),
        (5, "RUNNING"), (6, "COMPLETED"),
    ]  # fmt: skip
    assert [(r["run_id"], r["name"]) for r in as_set["events"]] == [
        (0, "engine/function.finished"), (1, "engine/function.failed"),
        (1, "engine/function.finished"), (3, "engine/function.cancelled"),
        (3, "engine/function.finished"), (4, "engine/function.cancelled"),
        (4, "engine/function.finished"), (6, "engine/function.finished"),
    ]  # fmt: skip
    assert [r["step_key"] for r in as_set["attempts"]] == ["broke"]
    assert [
        json.loads(r["body_error"])["traceback"] for r in as_set["executions"] if r["outcome"]
    ] == ["Traceback ..."]

    twice = "[" + ",".join(as_json(item) for item in items(alone)[:1] * 2) + "]"
    again, calls = await counting_calls(sql, twice, "finish")
    assert [r["result"] for r in again] == ["lost", "lost"]  # ended already
    assert calls == {"finish_run": 2}


def test_only_a_plain_completed_step_has_a_typed_form() -> None:
    """A record with more than an output and an input (a failed attempt, a sleep, a retry)
    goes as JSON, which carries every field."""
    assert completed("a").completed_args(None) is not None
    for change in (
        {"status": StepStatus.RETRYING},
        {"error": {"type": "ValueError", "message": "no"}},
        {"wake_at": datetime(2026, 12, 3, tzinfo=UTC)},
        {"traceback": "Traceback ..."},
        {"retry_at": datetime(2026, 12, 3, tzinfo=UTC)},
    ):
        record = completed("a")
        for name, value in change.items():
            setattr(record, name, value)
        assert record.completed_args(None) is None, change


async def test_steps_that_follow_each_other_are_checkpointed_in_typed_form(
    make_engine: Any,
) -> None:
    """A step whose checkpoint carries nothing else (the step before the next one starts)
    goes as engine.checkpoint_completed; a write that carries two records (a step and a patch
    marker) goes as JSON. Either way the run's history reads the same."""
    app = make_engine()

    @app.create_function("seq", trigger=TriggerEvent("t/seq"))
    async def seq(ctx: Context) -> int:
        first = await ctx.step.run("first", lambda: 1)
        second = await ctx.step.run("second", lambda n: n + 1, first)
        ctx.patched("p")
        third = await ctx.step.run("third", lambda: 3)
        return first + second + third + await ctx.step.run("last", lambda: 4)

    db = await app.database()
    calls = record_queries(db)
    async with app.worker():
        [event_id] = await app.send(Event(name="t/seq"))
        run = await app.wait_for_run(await only_run_id(app, event_id))
    assert run.status is RunStatus.COMPLETED and run.output == 10
    typed = [args[3] for query, args in calls if query == "checkpoint_completed"]
    batched = [json.loads(args[0]) for query, args in calls if query == "checkpoint_many"]
    assert typed == ["first", "third"]  # "second" went with the patch marker; "last" with the end
    assert [[s["key"] for s in item["steps"]] for [item] in batched] == [["second", "p"]]
    info = await app.get_run(run.run_id)
    assert [(s.step_id, s.status, s.output) for s in info.steps] == [
        ("first", "COMPLETED", 1),
        ("second", "COMPLETED", 2),
        ("p", "COMPLETED", True),
        ("third", "COMPLETED", 3),
        ("last", "COMPLETED", 4),
    ]


async def test_a_schema_without_the_typed_form_gets_the_json_form(
    make_engine: Any, sql: asyncpg.Connection
) -> None:
    """A worker newer than its schema (deployed before `engine migrate` ran) records its steps
    and its runs' ends through the JSON form every schema version has: its runs do not fail
    for it."""
    await sql.execute("DROP FUNCTION engine.checkpoint_completed")
    await sql.execute("DROP FUNCTION engine.finish_run")
    app = make_engine()

    @app.create_function("seq", trigger=TriggerEvent("t/seq"))
    async def seq(ctx: Context) -> int:
        return sum([await ctx.step.run(f"s{i}", lambda i=i: i) for i in range(4)])

    calls = record_queries(await app.database())
    async with app.worker():
        [event_id] = await app.send(Event(name="t/seq"))
        run = await app.wait_for_run(await only_run_id(app, event_id))
    assert run.status is RunStatus.COMPLETED, run.error
    assert run.output == 6 and [s.output for s in run.steps] == [0, 1, 2, 3]
    info = await app.get_run(run.run_id)
    assert len(info.executions) == 1, info.executions  # never handed back for it
    assert {"checkpoint_many", "finish_many"} <= {query for query, _ in calls}


async def test_a_run_end_alone_is_written_as_the_batched_form_writes_it(
    make_engine: Any, sql: asyncpg.Connection
) -> None:
    """A run's end that goes alone is written in engine.finish_run's typed arguments, not through
    finish_many's set form (which pays off for a batch, and cost a batch of one 0.61 ms of the
    server's CPU against 0.44): a run that completed with an output and logged lines, and one
    that failed with a traceback, read the same either way."""

    def app_of(form: str) -> Any:
        app = make_engine(f"ends-{form}")

        @app.create_function("completes", trigger=TriggerEvent("t/end"))
        async def completes(ctx: Context) -> dict[str, Any]:
            n = await ctx.step.run("one", lambda: 1)
            ctx.logger.info("after.the.step")  # counted where no step follows: recorded
            return {"n": n, "form": "either"}

        @app.create_function("fails", trigger=TriggerEvent("t/end"), retries=0)
        async def fails(ctx: Context) -> None:
            await ctx.step.run("one", lambda: 1)
            raise ValueError("no")

        return app

    ends: dict[str, list[Any]] = {}
    for form in ("typed", "json"):
        app = app_of(form)
        calls = record_queries(await app.database())
        async with app.worker() as worker:
            if form == "json":  # as a worker whose schema lacks the typed form
                worker._group_commits[True].finish._alone_query = None
            [event_id] = await app.send(Event(name="t/end"))
            await eventually(lambda app=app, event_id=event_id: _ended(app, event_id))
        used = {query for query, _ in calls if query.startswith("finish_")}
        assert used == {"finish_alone" if form == "typed" else "finish_many"}, used
        ends[form] = [
            dict(row)
            for row in await sql.fetch(
                "SELECT r.function_id, r.status, r.output, r.error, r.log_lines, r.log_places,"
                " r.lease_owner, r.lease_expires_at, r.ended_at > r.started_at AS ended,"
                " (SELECT jsonb_agg(jsonb_build_object('outcome', x.outcome,"
                "   'error', x.body_error - 'traceback', 'ended', x.ended_at IS NOT NULL,"
                "   'traceback', x.body_error ->> 'traceback' LIKE '%ValueError: no%'))"
                "  FROM engine.run_executions x WHERE x.run_id = r.id) AS executions,"
                " (SELECT jsonb_agg(jsonb_build_array(s.step_key, s.status, s.output))"
                "  FROM engine.steps s WHERE s.run_id = r.id) AS steps"
                " FROM engine.runs r WHERE r.app_id = $1 ORDER BY r.function_id",
                f"ends-{form}",
            )
        ]
    assert [end["status"] for end in ends["typed"]] == ["COMPLETED", "FAILED"]
    assert json.loads(ends["typed"][0]["log_places"]) and ends["typed"][0]["log_lines"] == 1
    assert "true" in ends["typed"][1]["executions"]  # the failure's traceback, kept
    assert ends["typed"] == ends["json"]


async def _ended(app: Any, event_id: str) -> bool:
    runs = await app.runs_for_event(event_id)
    return len(runs) == 2 and all(run.status.terminal for run in runs)
