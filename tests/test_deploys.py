"""Deploys: versions of an app side by side, apps that come and go, and the function registry."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import asyncpg
from helpers import eventually, move_clock
from structlog.testing import capture_logs

from engine import Context, Engine, Event, RunStatus, Timeouts, TriggerCron, TriggerEvent
from engine.db import Database


def version(make_engine: Any, *fn_ids: str, cron: str | None = None) -> Engine:
    """A version of app `shop` whose functions (each on `order/placed`) return their id."""
    app: Engine = make_engine("shop")
    for fn_id in fn_ids:

        @app.create_function(fn_id, trigger=TriggerEvent("order/placed"))
        async def handler(ctx: Context, fn_id: str = fn_id) -> str:
            return fn_id

    if cron is not None:

        @app.create_function("tick", trigger=TriggerCron(cron))
        async def tick(ctx: Context) -> str:
            return "tick"

    return app


async def test_an_older_version_routes_events_to_a_newer_versions_function(
    make_engine: Any,
) -> None:
    """Events routed by a v1 worker start v2's new function too (QUEUED, for a v2 worker)."""
    v1, v2 = version(make_engine, "a"), version(make_engine, "a", "b")
    await v2.database()  # v2 registered: its deploy is under way
    async with v1.worker():
        ids = await v1.send([Event(name="order/placed") for _ in range(20)])
        for event_id in ids:
            runs = await v1.runs_for_event(event_id, at_least=2, timeout=5)
            assert sorted(r.function_id for r in runs) == ["a", "b"]
    async with v2.worker():
        for event_id in ids:
            for run in await v2.runs_for_event(event_id):
                assert (await v2.wait_for_run(run.run_id)).output == run.function_id


async def test_two_versions_side_by_side_start_every_function(make_engine: Any, sql: Any) -> None:
    """With v1 and v2 workers both routing, every event starts both functions, and each run
    is executed by a worker that has its code."""
    v1, v2 = version(make_engine, "a"), version(make_engine, "a", "b")
    async with v2.worker(), v1.worker():
        await eventually(lambda: workers(sql, 2))
        ids = await v1.send([Event(name="order/placed") for _ in range(50)])
        for event_id in ids:
            runs = await v1.runs_for_event(event_id, at_least=2, timeout=5)
            outputs = [(await v1.wait_for_run(r.run_id)).output for r in runs]
            assert sorted(outputs) == ["a", "b"]


async def test_an_older_worker_starting_keeps_what_a_newer_one_registered(
    make_engine: Any, sql: Any
) -> None:
    """A v1 worker starting after v2 removes neither v2's function nor its cron schedule."""
    v1, v2 = version(make_engine, "a"), version(make_engine, "a", "b", cron="* * * * *")
    async with v2.worker(poll_interval="100ms"), v1.worker():
        await eventually(lambda: workers(sql, 2))
        functions = await sql.fetch(
            "SELECT function_id FROM engine.functions WHERE app_id = 'shop' AND active"
        )
        assert sorted(r["function_id"] for r in functions) == ["a", "b", "tick"]
        assert await sql.fetchval("SELECT count(*) FROM engine.cron_schedules") == 1
        await move_clock(sql, timedelta(minutes=3))

        async def ticked() -> bool:
            return bool(await v2.list_runs("tick", status="COMPLETED"))

        await eventually(ticked)


async def test_a_stopped_apps_functions_no_longer_start_runs(make_engine: Any, sql: Any) -> None:
    """After the only worker of an app stops, events no longer start its functions (the
    examples under `engine dev`, one after the other on one database)."""
    old, new = make_engine("quickstart"), make_engine("drip")
    for app, fn_id in ((old, "welcome-user"), (new, "drip")):

        @app.create_function(fn_id, trigger=TriggerEvent("user/signup"))
        async def handler(ctx: Context) -> None:
            return None

    async with old.worker():
        pass
    async with new.worker():
        [event_id] = await new.send(Event(name="user/signup"))
        [run] = await new.runs_for_event(event_id, at_least=1)
        assert (await new.wait_for_run(run.run_id)).status is RunStatus.COMPLETED
    assert [r.function_id for r in await new.runs_for_event(event_id)] == ["drip"]
    active = await sql.fetchval("SELECT active FROM engine.functions WHERE app_id = 'quickstart'")
    assert active is False


async def test_runs_of_a_removed_function_say_why_and_still_time_out(
    make_engine: Any, sql: Any
) -> None:
    """A function renamed in v2 leaves runs that no worker serves: they say so, v2's workers
    warn about them, and their timeouts.finish still ends them."""
    v1, v2 = make_engine("shop"), make_engine("shop")

    @v1.create_function(
        "remind", trigger=TriggerEvent("order/placed"), timeouts=Timeouts(finish="1h")
    )
    async def remind(ctx: Context) -> None:
        await ctx.step.sleep("nap", "1d")

    @v2.create_function("remind-v2", trigger=TriggerEvent("order/placed"))
    async def remind_v2(ctx: Context) -> None:
        return None

    async with v1.worker():
        [event_id] = await v1.send(Event(name="order/placed"))
        [run] = await v1.runs_for_event(event_id, at_least=1)

        async def sleeping() -> bool:
            return (await v1.get_run(run.run_id)).status is RunStatus.SLEEPING

        await eventually(sleeping)
    with capture_logs() as logs:
        async with v2.worker(inactive_after="1s"):

            async def explained() -> bool:
                info = await v2.get_run(run.run_id)
                return info.waiting_reason == "no live worker serves this function"

            await eventually(explained)

            async def warned() -> bool:
                return any(
                    e["event"] == "function.unserved" and e["function_id"] == "remind" for e in logs
                )

            await eventually(warned)
            await move_clock(sql, timedelta(hours=2))
            ended = await v2.wait_for_run(run.run_id, timeout=10)
    assert ended.status is RunStatus.CANCELLED
    assert ended.error is not None and "timeouts.finish" in ended.error["message"]


async def test_a_crashed_workers_functions_go_inactive_after_its_heartbeats_stop(
    make_engine: Any, sql: Any
) -> None:
    """A worker that vanished without saying so (its row simply expires) stops being routed to
    once its functions' time is up; a worker of the app coming back makes them active again."""
    gone, router = make_engine("gone"), make_engine("router")

    @gone.create_function("f", trigger=TriggerEvent("x/y"))
    async def f(ctx: Context) -> str:
        return "f"

    await gone.database()
    await sql.execute(
        "INSERT INTO engine.workers (owner, app_id, functions, expires_at)"
        " VALUES (gen_random_uuid(), 'gone', '{f}', now() + interval '200ms')"
    )
    await sql.execute("UPDATE engine.functions SET live_until = now() WHERE app_id = 'gone'")
    async with router.worker(inactive_after="600ms"):

        async def retired() -> bool:
            return not await sql.fetchval("SELECT active FROM engine.functions WHERE app_id='gone'")

        await eventually(retired)
        [event_id] = await router.send(Event(name="x/y"))
        await eventually(lambda: _routed(sql))
        assert await router.runs_for_event(event_id) == []
        async with gone.worker():
            await eventually(lambda: workers(sql, 2))
            [event_id] = await router.send(Event(name="x/y"))
            [run] = await router.runs_for_event(event_id, at_least=1)
            assert (await router.wait_for_run(run.run_id)).output == "f"


async def _routed(sql: Any) -> bool:
    return not await sql.fetchval("SELECT count(*) FROM engine.event_queue")


async def workers(sql: Any, count: int) -> bool:
    """Whether `count` workers have started (registered and beating)."""
    return bool(await sql.fetchval("SELECT count(*) FROM engine.workers") == count)


async def test_migrate_on_an_unchanged_schema_never_blocks_sends(
    make_engine: Any, database_url: str
) -> None:
    """`engine migrate` with an application transaction open that sent an event: it completes
    without waiting for it, and a concurrent send is never queued behind it."""
    app = make_engine("web")
    holder = await asyncpg.connect(database_url)
    try:
        async with holder.transaction():
            await app.send(Event(name="order/placed"), connection=holder)
            for _ in range(2):  # the first applies (this database has no hash yet), then a no-op
                migrate = asyncio.create_task(Database(database_url).apply_schema())
                await asyncio.wait_for(app.send(Event(name="unrelated")), 10)
                await asyncio.wait_for(migrate, 10)
            assert await Database(database_url).apply_schema() is False
    finally:
        await holder.close()


async def test_migrate_that_needs_a_lock_retries_instead_of_blocking_sends(
    make_engine: Any, database_url: str, sql: Any
) -> None:
    """A schema change that must lock event_queue (here: its trigger changed) waits for its lock
    a short time at most, backs off and tries again, while sends go on; it completes once the
    application transaction ends."""
    app = make_engine("web")
    await sql.execute("DELETE FROM engine.meta WHERE key = 'trigger:event_queue_notify'")
    holder = await asyncpg.connect(database_url)
    try:
        with capture_logs() as logs:
            async with holder.transaction():
                await app.send(Event(name="order/placed"), connection=holder)
                migrate = asyncio.create_task(Database(database_url).apply_schema())

                async def busy() -> bool:
                    return any(e["event"] == "migrate.lock_busy" for e in logs)

                await eventually(busy)
                await asyncio.wait_for(app.send(Event(name="unrelated")), 10)
            assert await asyncio.wait_for(migrate, 10) is True
    finally:
        await holder.close()
    assert await sql.fetchval("SELECT count(*) FROM engine.meta WHERE key LIKE 'trigger:%'") == 4


async def test_a_worker_from_before_patches_leaves_runs_holding_a_patch_marker(
    make_engine: Any, sql: Any
) -> None:
    """A worker of a version without ctx.patched cannot read a run that recorded a patch
    marker (it would fail it as unreadable). Its claim, as it calls it (claim_runs without
    p_replays_patches), skips such runs and takes the others; a current worker finishes them."""
    app: Engine = make_engine("shop")

    @app.create_function("patched", trigger=TriggerEvent("order/placed"))
    async def patched(ctx: Context) -> str:
        path = "new" if ctx.patched("v2") else "old"
        await ctx.step.sleep("nap", "1h")
        return path

    @app.create_function("plain", trigger=TriggerEvent("order/placed"))
    async def plain(ctx: Context) -> str:
        await ctx.step.sleep("nap", "1h")
        return "plain"

    async with app.worker(poll_interval="50ms"):
        [event_id] = await app.send(Event(name="order/placed"))

        async def both_sleeping() -> bool:
            runs = await app.runs_for_event(event_id)
            return len(runs) == 2 and all(r.status is RunStatus.SLEEPING for r in runs)

        await eventually(both_sleeping)
    runs = {r.function_id: r.run_id for r in await app.runs_for_event(event_id)}
    await move_clock(sql, timedelta(hours=2))
    old_claim = "SELECT function_id FROM engine.claim_runs('shop', $1, $2, '1 minute', 10)"
    claimed = await sql.fetch(old_claim, ["patched", "plain"], uuid.uuid4())
    assert [row["function_id"] for row in claimed] == ["plain"]
    await sql.execute(
        "UPDATE engine.runs SET status = 'QUEUED', lease_owner = NULL WHERE id = $1",
        runs["plain"],
    )
    async with app.worker(poll_interval="50ms"):
        done = {fn: await app.wait_for_run(run_id, timeout=30) for fn, run_id in runs.items()}
    assert {fn: run.output for fn, run in done.items()} == {"patched": "new", "plain": "plain"}
