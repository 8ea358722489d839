"""ops/roles.sql: what a sender, a worker and a reader may do, checked by connecting as each."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from helpers import eventually, only_run_id

from engine import Context, Engine, Event, TriggerEvent
from engine.db import schema_sql

ROLES_SQL = Path(__file__).parent.parent / "ops" / "roles.sql"


def as_user(url: str, user: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc}"))


@pytest.fixture
async def logins(database_url: str, sql: Any) -> AsyncIterator[dict[str, str]]:
    """Login roles granted engine_sender, engine_worker and engine_reader, after roles.sql."""
    await sql.execute(ROLES_SQL.read_text())
    suffix = f"{os.getpid()}_{abs(hash(database_url)) % 10_000}"
    users = {kind: f"{kind}_{suffix}" for kind in ("sender", "worker", "reader")}
    for kind, user in users.items():
        await sql.execute(f"DROP ROLE IF EXISTS {user}")
        await sql.execute(f"CREATE ROLE {user} LOGIN IN ROLE engine_{kind}")
    yield {kind: as_user(database_url, user) for kind, user in users.items()}
    for user in users.values():
        await sql.execute(f"REVOKE ALL ON ALL TABLES IN SCHEMA engine FROM {user}")
        await sql.execute(f"DROP OWNED BY {user}")
        await sql.execute(f"DROP ROLE IF EXISTS {user}")


async def refused(conn: asyncpg.Connection, statement: str, *args: Any) -> bool:
    try:
        await conn.execute(statement, *args)
    except asyncpg.InsufficientPrivilegeError:
        return True
    return False


async def test_a_sender_may_only_send_events(logins: dict[str, str], sql: Any) -> None:
    conn = await asyncpg.connect(logins["sender"])
    try:
        event_id = await conn.fetchval("SELECT engine.send_event('shop/order', '{\"n\": 1}')")
        assert event_id
        assert await refused(conn, "SELECT * FROM engine.events")
        assert await refused(conn, "SELECT * FROM engine.runs")
        assert await refused(
            conn,
            "INSERT INTO engine.events (id, name, data, ts, received_at)"
            " VALUES ('x', 'x', '{}', now(), now())",
        )
        # The system path of send_events is not reachable: only send_event is granted.
        assert await refused(
            conn, 'SELECT engine.send_events(\'[{"name": "engine/function.failed"}]\', NULL, true)'
        )
        assert await refused(conn, "SELECT engine.cancel_run(gen_random_uuid())")
        assert await refused(conn, "UPDATE engine.clock SET offset_by = '1 day'")
        with pytest.raises(asyncpg.PostgresError, match="reserved prefix"):
            await conn.fetchval("SELECT engine.send_event('engine/function.failed', '{}')")
    finally:
        await conn.close()
    stored = await sql.fetchval("SELECT count(*) FROM engine.events WHERE id = $1", event_id)
    assert stored == 1


async def test_a_reader_reads_and_changes_nothing(logins: dict[str, str], sql: Any) -> None:
    await sql.execute("SELECT engine.send_event('shop/order', '{}')")
    conn = await asyncpg.connect(logins["reader"])
    try:
        assert await conn.fetchval("SELECT count(*) FROM engine.events") == 1
        assert await conn.fetchval("SELECT count(*) FROM engine.run_details") == 0
        assert await refused(conn, "SELECT engine.send_event('shop/order', '{}')")
        assert await refused(conn, "DELETE FROM engine.events")
        assert await refused(conn, "SELECT engine.prune('0')")
        assert await refused(conn, "CREATE TABLE engine.intruder (x int)")
    finally:
        await conn.close()


async def test_a_worker_role_runs_functions_end_to_end(logins: dict[str, str]) -> None:
    """`engine worker` connected as engine_worker: registers, routes, claims, checkpoints."""
    app = Engine("secure", logins["worker"])

    @app.create_function("greet", trigger=TriggerEvent("secure/hello"))
    async def greet(ctx: Context) -> Any:
        await ctx.step.sleep("pause", "10ms")
        return await ctx.step.run("say", lambda: f"hello {ctx.event.data['who']}")

    try:
        async with app.worker():
            [event_id] = await app.send(Event(name="secure/hello", data={"who": "ada"}))
            run = await app.wait_for_run(await only_run_id(app, event_id))
        assert run.output == "hello ada"
        conn = await asyncpg.connect(logins["worker"])
        try:
            assert await refused(conn, "DROP TABLE engine.runs")
            assert await refused(conn, "CREATE TABLE engine.intruder (x int)")
        finally:
            await conn.close()
    finally:
        await app.close()


async def test_locks_a_sender_can_take_do_not_stall_routing(logins: dict[str, str]) -> None:
    """A sender holding the advisory locks the engine once used (their keys computable from
    schema.sql) for the names an app uses, and the schema's: routing, a wait and the run's end
    go on (the engine locks rows no role but the worker may touch)."""
    app = Engine("locked", logins["worker"])

    @app.create_function("pay", trigger=TriggerEvent("locked/order"))
    async def pay(ctx: Context) -> Any:
        paid = await ctx.step.wait_for_event("paid", event="locked/paid", timeout="1m")
        return paid is not None

    names = ["locked/order", "locked/paid", "engine/function.finished", "engine/function.failed"]
    sender = await asyncpg.connect(logins["sender"])
    try:
        for name in names:
            key = "SELECT hashtextextended('engine.event:' || $1, 0)"
            await sender.execute(
                "SELECT pg_advisory_lock(($1)::bigint)", await sender.fetchval(key, name)
            )
        await sender.execute("SELECT pg_advisory_lock(hashtext('engine.schema'))")
        async with app.worker():
            [event_id] = await app.send(Event(name="locked/order"))
            run_id = await only_run_id(app, event_id)

            async def waiting() -> bool:
                return (await app.get_run(run_id)).status.value == "WAITING"

            await eventually(waiting)
            await sender.fetchval("SELECT engine.send_event('locked/paid', '{}')")
            run = await app.wait_for_run(run_id, timeout=20)
        assert run.output is True
    finally:
        await sender.close()
        await app.close()


async def test_a_notify_flood_keeps_an_idle_workers_ticks_bounded(logins: dict[str, str]) -> None:
    """Any role may NOTIFY engine_wakeup: notifications flooding an idle worker cause a bounded
    number of ticks per second (notification-driven ticks that find nothing are spaced out), and
    an event sent afterwards still starts its run."""
    app = Engine("flooded", logins["worker"])

    @app.create_function("f", trigger=TriggerEvent("flooded/e"))
    async def f(ctx: Context) -> str:
        return "ok"

    sender = await asyncpg.connect(logins["sender"])
    try:
        async with app.worker(poll_interval="10s") as worker:
            [event_id] = await app.send(Event(name="flooded/e"))
            await app.wait_for_run(await only_run_id(app, event_id))
            before, started = worker.ticks, time.monotonic()
            for _ in range(2000):
                await sender.execute("NOTIFY engine_wakeup, 'flood'")
            ticks, elapsed = worker.ticks - before, time.monotonic() - started
            [event_id] = await app.send(Event(name="flooded/e"))
            assert (await app.wait_for_run(await only_run_id(app, event_id))).output == "ok"
        # At most about ten notification-driven ticks a second, plus the ramp (1, 2, 4... ms):
        # a bound on work per second, whatever the machine's speed (without pacing, one tick
        # per notification or two: hundreds a second).
        assert ticks <= 10 * elapsed + 20, (ticks, elapsed)
    finally:
        await sender.close()
        await app.close()


async def test_a_migration_grants_the_roles_what_it_adds(logins: dict[str, str], sql: Any) -> None:
    """Roles set up once stay right across upgrades: applying the schema again (what an upgrade
    does) grants the worker and the reader their rights on the tables and functions it finds
    without them, and leaves no function to PUBLIC, whom the sender is."""
    # As an upgrade would leave them: a table and a function the roles have no rights on.
    await sql.execute("CREATE TABLE engine.added_by_upgrade (id int)")
    await sql.execute(
        "CREATE FUNCTION engine.added_by_upgrade() RETURNS int LANGUAGE sql AS 'SELECT 1'"
    )
    await sql.execute("REVOKE ALL ON engine.steps FROM engine_worker, engine_reader")
    privileges = """
        SELECT has_table_privilege('engine_worker', 'engine.added_by_upgrade', 'INSERT'),
               has_table_privilege('engine_worker', 'engine.steps', 'UPDATE'),
               has_table_privilege('engine_reader', 'engine.steps', 'SELECT'),
               has_function_privilege('engine_worker', 'engine.added_by_upgrade()', 'EXECUTE'),
               has_function_privilege('engine_sender', 'engine.added_by_upgrade()', 'EXECUTE'),
               has_table_privilege('engine_reader', 'engine.added_by_upgrade', 'INSERT'),
               has_function_privilege('engine_worker', 'engine.grant_roles()', 'EXECUTE')
    """
    assert tuple(await sql.fetchrow(privileges)) == (False, False, False, True, True, False, False)

    await sql.execute(schema_sql())

    assert tuple(await sql.fetchrow(privileges)) == (True, True, True, True, False, False, False)
    worker = await asyncpg.connect(logins["worker"])
    try:
        await worker.execute("INSERT INTO engine.added_by_upgrade VALUES (1)")
    finally:
        await worker.close()


async def test_a_migration_leaves_a_database_without_roles_as_it_was(sql: Any) -> None:
    """Without ops/roles.sql, applying the schema again grants and revokes nothing: PUBLIC keeps
    PostgreSQL's defaults (a database that never opted into roles keeps working as before)."""
    await sql.execute("SELECT engine.now()")
    public_may = (
        "SELECT bool_and(has_function_privilege('public', p.oid, 'EXECUTE'))"
        " FROM pg_proc p WHERE p.pronamespace = 'engine'::regnamespace"
    )
    assert await sql.fetchval(public_may)
    await sql.execute(schema_sql())
    assert await sql.fetchval(public_may)
    assert not await sql.fetchval("SELECT count(*) FROM engine.meta WHERE key = 'roles'")
