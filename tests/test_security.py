"""ops/roles.sql: what a sender, a worker and a reader may do, checked by connecting as each."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from helpers import only_run_id

from engine import Context, Engine, Event, TriggerEvent

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
