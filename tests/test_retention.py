"""Retention: every table's growth is bounded by live work plus the retention window.

Workers prune by themselves (engine/retention.py): history older than the Engine's retention on
the durable clock, in batches, one worker of a database at a time, without ever holding a lock
a claim needs; `engine prune` does it on demand.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit
from uuid import uuid4

import asyncpg
import pytest
from helpers import engine_command, eventually, move_clock
from structlog.testing import capture_logs

from engine import (
    Concurrency,
    ConfigurationError,
    Context,
    Engine,
    Event,
    RateLimit,
    Throttle,
    TriggerEvent,
    Worker,
)
from engine.cli import _parser

BOOKKEEPING = [
    "runs",
    "steps",
    "events",
    "event_ids",
    "idempotency_keys",
    "rate_log",
    "throttles",
    "concurrency_slots",
    "matchers",
    "workers",
    "functions",
    "event_names",
    "flow_locks",
]


async def test_prune_leaves_only_what_live_work_needs(make_engine: Any, sql: Any) -> None:
    """After 40 runs under every kind of flow-control key, an end, time passing and a prune,
    no table keeps a row that no live work needs (they kept 4,000 each after 20,000 runs)."""
    app = make_engine("kept")

    @app.create_function(
        "limited",
        trigger=TriggerEvent("kept/e"),
        idempotency="event.data.k",
        rate_limit=RateLimit(limit=1000, period="1m", key="event.data.k"),
        throttle=Throttle(limit=1000, period="1s", key="event.data.k"),
        concurrency=Concurrency(limit=5, key="event.data.k"),
    )
    async def limited(ctx: Context) -> str:
        await ctx.step.wait_for_event("never", event="kept/never", timeout="1s")
        return "done"

    async with app.worker(concurrency=40):
        ids = await app.send(
            [Event(name="kept/e", id=f"e-{n}", data={"k": f"k-{n}"}) for n in range(40)]
        )
        for event_id in ids:
            [run] = await app.runs_for_event(event_id, at_least=1)
            await move_clock(sql, timedelta(seconds=2))  # the wait times out
            assert (await app.wait_for_run(run.run_id)).output == "done"
    counts = await _counts(sql)
    assert all(counts[t] > 0 for t in BOOKKEEPING if t not in ("matchers", "workers")), counts
    await move_clock(sql, timedelta(days=2))
    await sql.execute("CALL engine.prune_all('0', 7)")  # small batches: the loop is exercised
    # the lock rows of system event names stay (a run's end takes them): a bounded few
    system = await sql.fetchval(
        "SELECT count(*) FROM engine.event_names WHERE name LIKE 'engine/%'"
    )
    assert system <= 5
    assert await _counts(sql) == {**dict.fromkeys(BOOKKEEPING, 0), "event_names": system}


async def test_prune_keeps_what_live_work_needs(make_engine: Any, sql: Any) -> None:
    """A run in flight keeps its event, its function, its matcher and its key rows."""
    app = make_engine("live")

    @app.create_function("waits", trigger=TriggerEvent("live/e"), idempotency="event.data.k")
    async def waits(ctx: Context) -> Any:
        return await ctx.step.wait_for_event("reply", event="live/reply", timeout="30d")

    async with app.worker():
        [event_id] = await app.send(Event(name="live/e", id="only", data={"k": "x"}))
        [run] = await app.runs_for_event(event_id, at_least=1)
        await sql.execute("CALL engine.prune_all('0')")
        counts = await _counts(sql)
        for table in ("runs", "events", "matchers", "functions", "idempotency_keys", "workers"):
            assert counts[table] == 1, (table, counts)
        await app.send(Event(name="live/reply"))
        assert (await app.wait_for_run(run.run_id)).status.value == "COMPLETED"


async def test_prune_deletes_bulk_actions_that_ended_longer_ago(sql: Any) -> None:
    """The dashboard's bulk actions go when they ended longer ago than the retention; one that
    ended since, and one still running however old, stay."""
    insert = (
        "INSERT INTO engine.bulk_actions (id, action, filter, expected, state, created_at,"
        " updated_at, ended_at) VALUES (gen_random_uuid(), 'cancel', '{}', 1, $1,"
        " engine.now(), engine.now(), CASE WHEN $1 <> 'running' THEN engine.now() END)"
    )
    for state in ("done", "stopped", "failed", "running"):
        await sql.execute(insert, state)
    await move_clock(sql, timedelta(days=2))
    await sql.execute(insert, "done")  # ended just now
    await sql.execute("CALL engine.prune_all('1 day')")
    left = await sql.fetch("SELECT state FROM engine.bulk_actions ORDER BY state")
    assert [row["state"] for row in left] == ["done", "running"]


async def _counts(sql: Any) -> dict[str, int]:
    return {t: await sql.fetchval(f"SELECT count(*) FROM engine.{t}") for t in BOOKKEEPING}


# -- the option -----------------------------------------------------------------------------------
def test_retention_is_a_duration_thirty_days_by_default_and_none_turns_it_off() -> None:
    assert Engine("a").retention == timedelta(days=30)
    assert Engine("a", retention="7d").retention == timedelta(days=7)
    assert Engine("a", retention=timedelta(hours=2)).retention == timedelta(hours=2)
    assert Engine("a", retention=90).retention == timedelta(seconds=90)
    assert Engine("a", retention=None).retention is None


@pytest.mark.parametrize("bad", [0, "0s", -5, timedelta(days=-1), "soon", True])
def test_a_retention_of_zero_or_less_or_not_a_duration_is_refused(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="retention"):
        Engine("a", retention=bad)


# -- workers prune --------------------------------------------------------------------------------
def app_with_work(make_engine: Any, **options: Any) -> Engine:
    """App `kept` with `work` (two steps and a sleep) and `waits` (waits 60 days for a reply)."""
    app: Engine = make_engine("kept", **options)

    @app.create_function("work", trigger=TriggerEvent("kept/work"))
    async def work(ctx: Context) -> str:
        await ctx.step.run("one", lambda: 1)
        await ctx.step.sleep("nap", "1ms")
        await ctx.step.run("two", lambda: 2)
        return "done"

    @app.create_function("waits", trigger=TriggerEvent("kept/waits"))
    async def waits(ctx: Context) -> Any:
        return await ctx.step.wait_for_event("reply", event="kept/reply", timeout="60d")

    return app


async def finished_runs(app: Engine, count: int) -> list[str]:
    """Runs `count` events through `work` to COMPLETED (a worker must run); their run ids."""
    ids = await app.send([Event(name="kept/work") for _ in range(count)])
    run_ids = []
    for event_id in ids:
        [run] = await app.runs_for_event(event_id, at_least=1)
        assert (await app.wait_for_run(run.run_id)).output == "done"
        run_ids.append(str(run.run_id))
    return run_ids


@asynccontextmanager
async def pruning_worker(
    app: Engine, *, batch: int = 1000, pause: float = 0.0, every: str = "20ms"
) -> AsyncIterator[Worker]:
    """A worker whose pruner passes every ``every``, with the given batch size and pause."""
    worker = Worker(app, poll_interval="50ms", prune_every=every, grace="1s")
    assert worker.pruner is not None
    worker.pruner.batch, worker.pruner.pause = batch, pause
    task = asyncio.create_task(worker.run())
    await worker.started()
    try:
        yield worker
    finally:
        worker.stop()
        await task


async def run_count(sql: Any, run_ids: list[str]) -> int:
    count: int = await sql.fetchval(
        "SELECT count(*) FROM engine.runs WHERE id = ANY ($1::uuid[])", run_ids
    )
    return count


async def test_a_worker_prunes_what_ended_longer_ago_than_its_retention(
    make_engine: Any, sql: Any
) -> None:
    """Age is measured on the durable clock: runs that ended 31 days ago (the clock moved) go,
    in one pass of several batches; a newer run and a run still waiting stay."""
    app = app_with_work(make_engine, retention=None)
    async with app.worker():
        old = await finished_runs(app, 5)
        [waiting_event] = await app.send(Event(name="kept/waits"))
        [waiting] = await app.runs_for_event(waiting_event, at_least=1)
    app.retention = timedelta(days=30)
    with capture_logs() as logs:
        async with pruning_worker(app, batch=2) as worker:
            assert worker.pruner is not None
            await eventually(lambda: passes(worker, 2))
            assert await run_count(sql, old) == 5  # they ended just now on the durable clock
            await move_clock(sql, timedelta(days=31))
            new = await finished_runs(app, 1)
            await eventually(lambda: asyncio.sleep(0, pruned_runs(logs)))
    assert await run_count(sql, old) == 0
    assert await run_count(sql, new) == 1
    assert await run_count(sql, [str(waiting.run_id)]) == 1
    # one pass took all five, two by two: it went on while a batch was full
    assert pruned_runs(logs) == [5], logs


def pruned_runs(logs: list[dict[str, Any]]) -> list[int]:
    """The runs each logged pass deleted (passes that deleted runs)."""
    return [
        e["deleted"]["runs"]
        for e in logs
        if e["event"] == "worker.pruned" and "runs" in e["deleted"]
    ]


async def passes(worker: Worker, at_least: int) -> bool:
    return worker.pruner is not None and worker.pruner.passes >= at_least


async def gone(sql: Any, run_ids: list[str]) -> bool:
    return await run_count(sql, run_ids) == 0


async def test_no_pruning_with_a_retention_of_none(make_engine: Any, sql: Any) -> None:
    """`retention=None`: the worker has no pruner, and history older than any retention stays."""
    app = app_with_work(make_engine, retention=None)
    async with app.worker(prune_every="10ms", poll_interval="10ms") as worker:
        old = await finished_runs(app, 2)
        await move_clock(sql, timedelta(days=3650))
        assert worker.pruner is None
        ticks = worker.ticks
        await eventually(lambda: asyncio.sleep(0, worker.ticks > ticks + 20))
    assert await run_count(sql, old) == 2


async def test_one_worker_of_a_database_prunes_at_a_time(make_engine: Any, sql: Any) -> None:
    """While another worker holds the pruning turn, a worker skips its passes; it prunes once
    the turn is free. The turn is a lease: renewed by its holder, refused to the others."""
    other, mine = uuid4(), uuid4()
    assert await sql.fetchval("SELECT engine.prune_turn($1, '1 hour')", other)
    assert not await sql.fetchval("SELECT engine.prune_turn($1, '1 hour')", mine)
    assert await sql.fetchval("SELECT engine.prune_turn($1, '1 hour')", other)  # renewed
    app = app_with_work(make_engine, retention=None)
    async with app.worker():
        old = await finished_runs(app, 3)
    await move_clock(sql, timedelta(days=31))
    app.retention = timedelta(days=30)
    async with pruning_worker(app) as worker:
        assert worker.pruner is not None
        await eventually(lambda: asyncio.sleep(0, worker.pruner.skipped >= 3))
        assert worker.pruner.passes == 0
        assert await run_count(sql, old) == 3
        await sql.execute("SELECT engine.prune_rest($1, '0')", other)  # the other pass ends
        await eventually(lambda: gone(sql, old))
    # a pass that ended rests the turn for the interval: nobody else starts one meanwhile
    await sql.execute("UPDATE engine.pruner SET busy_until = now() + interval '1 hour'")
    assert not await sql.fetchval("SELECT engine.prune_turn($1, '1 hour')", other)


async def test_a_prune_batch_held_open_never_blocks_a_claim(
    make_engine: Any, sql: Any, database_url: str
) -> None:
    """A prune batch of history (finished runs and events) left open in a transaction:
    meanwhile a worker routes, claims, checkpoints, suspends, claims again and finishes runs
    of the same function. Every session has a lock_timeout, so a wait for a lock the batch
    holds fails (and is logged) instead of hanging."""
    name = urlsplit(database_url).path.lstrip("/")
    await sql.execute(f"ALTER DATABASE {name} SET lock_timeout = '500ms'")
    app = app_with_work(make_engine, retention=None)
    async with app.worker():
        old = await finished_runs(app, 3)
    await move_clock(sql, timedelta(days=31))
    pruning = await asyncpg.connect(database_url)
    try:
        async with pruning.transaction():
            history = await pruning.fetchval("SELECT engine.prune_history('30 days', 1000)")
            assert '"runs": 3' in history
            with capture_logs() as logs:
                async with app.worker():
                    new = await finished_runs(app, 2)  # a sleep: claimed again after it
            assert not [e for e in logs if e.get("log_level") in ("warning", "error")], logs
            assert await run_count(sql, old) == 3  # not committed yet
    finally:
        await pruning.close()
    assert await run_count(sql, old) == 0
    assert await run_count(sql, new) == 2


async def test_a_failed_pass_is_logged_and_the_next_one_prunes(make_engine: Any, sql: Any) -> None:
    """Pruning that fails (here its function is missing) is logged; the worker goes on running
    runs, and a later pass prunes."""
    app = app_with_work(make_engine, retention=None)
    async with app.worker():
        old = await finished_runs(app, 2)
    await move_clock(sql, timedelta(days=31))
    app.retention = timedelta(days=30)
    rename = "ALTER FUNCTION engine.prune_history(interval, int) RENAME TO {}"
    await sql.execute(rename.format("prune_history_away"))
    with capture_logs() as logs:
        async with pruning_worker(app) as worker:
            await eventually(lambda: asyncio.sleep(0, failures(logs) >= 2))
            assert await run_count(sql, old) == 2
            assert len(await finished_runs(app, 1)) == 1  # the worker still works
            await sql.execute(
                rename.replace("prune_history(", "prune_history_away(").format("prune_history")
            )
            await eventually(lambda: passes(worker, 1))
    assert await run_count(sql, old) == 0


def failures(logs: list[dict[str, Any]]) -> int:
    return sum(e["event"] == "worker.prune_failed" for e in logs)


async def test_stopping_a_worker_ends_its_pass_and_hands_the_turn_back(
    make_engine: Any, sql: Any
) -> None:
    """A worker stopped in the middle of a pass (here in the pause after its first batch, an
    hour long) stops at once: the rest of the pass is left for the next one, and the turn is
    free for another worker."""
    app = app_with_work(make_engine, retention=None)
    async with app.worker():
        old = await finished_runs(app, 3)
    await move_clock(sql, timedelta(days=31))
    app.retention = timedelta(days=30)
    async with pruning_worker(app, batch=1, pause=3600) as worker:
        await eventually(lambda: left(sql, old, 2))
        assert await sql.fetchval("SELECT owner FROM engine.pruner") == worker.owner
        # The turn, handed back, rests for `every` (20 ms so far): long enough to check it
        # rests, however slow the machine.
        worker.pruner.every = timedelta(hours=1)
    # (the block ended: the stop did not wait out the pause)
    assert await run_count(sql, old) == 2
    assert await sql.fetchval("SELECT owner FROM engine.pruner") is None
    assert await sql.fetchval("SELECT engine.prune_turn($1, '1 minute')", uuid4()) is False
    await sql.execute("UPDATE engine.pruner SET busy_until = now()")  # its rest is over
    assert await sql.fetchval("SELECT engine.prune_turn($1, '1 minute')", uuid4()) is True


async def left(sql: Any, run_ids: list[str], count: int) -> bool:
    return await run_count(sql, run_ids) == count


async def test_a_pruned_run_leaves_no_row_in_any_table_keyed_by_its_run_id(
    make_engine: Any, sql: Any
) -> None:
    """Every table with a run_id column (found in the catalog, so tables added later are
    covered) has no row left of a pruned run."""
    app = app_with_work(make_engine, retention=None)
    async with app.worker():
        old = await finished_runs(app, 3)
        [event_id] = await app.send(Event(name="kept/waits"))
        [waiting] = await app.runs_for_event(event_id, at_least=1)
        await app.send(Event(name="kept/reply"))
        assert (await app.wait_for_run(waiting.run_id)).status.value == "COMPLETED"
    old.append(str(waiting.run_id))
    tables = [
        row["table"]
        for row in await sql.fetch(
            "SELECT c.table_name AS table FROM information_schema.columns c"
            " JOIN information_schema.tables t USING (table_schema, table_name)"
            " WHERE c.table_schema = 'engine' AND c.column_name = 'run_id'"
            "   AND t.table_type = 'BASE TABLE'"
        )
    ]
    assert "steps" in tables and "matchers" in tables

    async def rows_of_old() -> dict[str, int]:
        return {
            table: await sql.fetchval(
                f"SELECT count(*) FROM engine.{table} WHERE run_id = ANY ($1::uuid[])", old
            )
            for table in tables
        }

    assert (await rows_of_old())["steps"] == 3 * 3 + 1  # the sanity of the check
    await move_clock(sql, timedelta(days=31))
    await sql.execute("CALL engine.prune_all('30 days')")
    assert await run_count(sql, old) == 0
    assert await rows_of_old() == dict.fromkeys(tables, 0)


async def test_a_runs_events_go_with_it_in_the_same_batch(make_engine: Any, sql: Any) -> None:
    """A history batch deletes the events of the runs it deletes (the trigger and the
    engine/function.finished of each), not old events in general: a backlog of old runs never
    makes a batch read past their events."""
    app = app_with_work(make_engine, retention=None)
    async with app.worker():
        old = await finished_runs(app, 3)
        [unrouted] = await app.send(Event(name="kept/nobody"))  # starts nothing
        await eventually(lambda: sql.fetchval("SELECT count(*) = 0 FROM engine.event_queue"))
    await move_clock(sql, timedelta(days=31))
    of_runs = (
        "SELECT count(*) FROM engine.events e WHERE e.id = ANY ($1::text[])"
        " OR e.seq IN (SELECT r.event_seq FROM engine.runs r WHERE r.id = ANY ($1::uuid[]))"
    )
    assert await sql.fetchval(of_runs, old) == 6
    counts = await sql.fetchval("SELECT engine.prune_history('30 days', 3)")
    assert counts == '{"runs": 3, "events": 6}'
    assert await sql.fetchval(of_runs, old) == 0
    alone = "SELECT count(*) FROM engine.events WHERE id = $1"
    assert await sql.fetchval(alone, unrouted) == 1  # a full batch of runs: not yet swept
    assert await sql.fetchval("SELECT engine.prune_history('30 days', 3)") == (
        '{"runs": 0, "events": 1}'
    )
    assert await sql.fetchval(alone, unrouted) == 0


# -- the command line -----------------------------------------------------------------------------
async def test_engine_prune_deletes_now_and_says_what(
    make_engine: Any, sql: Any, database_url: str, tmp_path: Any
) -> None:
    app = app_with_work(make_engine, retention=None)
    async with app.worker():
        old = await finished_runs(app, 3)
        await move_clock(sql, timedelta(days=8))
        new = await finished_runs(app, 1)
    result = await asyncio.to_thread(
        engine_command,
        "prune",
        "--older-than",
        "7d",
        "--batch",
        "2",
        "--database-url",
        database_url,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    counts = dict(line.split() for line in result.stdout.splitlines())
    assert counts["runs"] == "3" and int(counts["events"]) >= 3, result.stdout
    assert result.stderr.startswith("engine prune: deleted "), result.stderr
    assert await run_count(sql, old) == 0
    assert await run_count(sql, new) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("prune", "--older-than", "0s"), "keeps nothing"),
        (("prune", "--older-than", "soon"), "'soon' is not a duration"),
        (("prune", "--batch", "0"), "0 is not positive"),
        (("prune", "--older-than", "off"), "nothing to prune"),
        (("worker", "x.py", "--retention=-1d"), "not a duration"),
    ],
)
def test_engine_prune_and_retention_refuse_bad_input_in_one_line(
    args: tuple[str, ...], message: str, tmp_path: Any
) -> None:
    result = engine_command(*args, "--database-url", "postgresql://nowhere/x", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    error = result.stderr.splitlines()[-1]  # (after argparse's usage lines)
    assert error.startswith(f"engine {args[0]}: error: ") and message in error, result.stderr
    assert "Traceback" not in result.stderr


def test_retention_on_the_command_line_overrides_the_engines() -> None:
    """--retention on worker and dev: a duration, or off; unset, the Engine's stays."""
    parser = _parser()
    assert parser.parse_args(["worker", "m:app", "--retention", "off"]).retention == "off"
    assert parser.parse_args(["dev", "m.py", "--retention", "7d"]).retention == "7d"
    assert parser.parse_args(["worker", "m:app"]).retention is None
