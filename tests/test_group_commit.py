"""Group commit: concurrent writes of many runs share round trips, each gets its own result."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import asyncpg
import pytest
from helpers import eventually, only_run_id

from engine import Context, Event, RunStatus, TriggerEvent
from engine.db import is_connection_error
from engine.group_commit import GroupCommitter


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
