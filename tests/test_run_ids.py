"""Run ids: stable for one event and function in one database, unique across databases, and
unambiguous whatever characters app and function ids hold."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from conftest import TEMPLATE, with_database
from helpers import only_run_id

from engine import Context, Engine, Event, RunStatus, TriggerEvent
from engine.db import schema_sql

ROUTE = (
    "SELECT id FROM engine.route_simple(10, $1::jsonb, '{}', (SELECT value::bigint"
    " FROM engine.meta WHERE key = 'registry_version'), 'shop', $2, '1 hour', 10)"
    " WHERE id IS NOT NULL"
)
PLAN = '[{"app_id": "shop", "function_id": "charge", "event": "order/placed"}]'


@asynccontextmanager
async def scratch_database(server_url: str, template: str | None) -> AsyncIterator[str]:
    """A database of its own: a copy of the test template, or (``template=None``) an empty one
    to which the schema is applied, as `engine migrate` does on a new install."""
    name = f"engine_ids_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server_url)
    try:
        clause = f" TEMPLATE {template}" if template else ""
        await admin.execute(f"CREATE DATABASE {name}{clause}")
        url = with_database(server_url, name)
        if template is None:
            conn = await asyncpg.connect(url)
            try:
                await conn.execute(schema_sql())
            finally:
                await conn.close()
        yield url
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


async def routed_run_ids(url: str, events: int) -> list[uuid.UUID]:
    """Sends ``events`` events into the database at ``url`` and routes them, as a worker would."""
    conn = await asyncpg.connect(url)
    try:
        for i in range(events):
            await conn.execute(
                "SELECT engine.send_event('order/placed', jsonb_build_object('i', $1::int))", i
            )
        rows = await conn.fetch(ROUTE, PLAN, uuid.uuid4())
        return [row["id"] for row in rows]
    finally:
        await conn.close()


async def test_two_databases_give_the_same_event_sequence_different_run_ids(
    server_url: str,
) -> None:
    """Event sequence numbers restart at 1 in every database: the run ids they derive must not,
    or an idempotency key `run id:step id` would repeat across a reset, staging and production,
    or two databases in front of one payment provider."""
    async with (
        scratch_database(server_url, None) as fresh_a,
        scratch_database(server_url, None) as fresh_b,
        scratch_database(server_url, TEMPLATE) as copy_a,
        scratch_database(server_url, TEMPLATE) as copy_b,
    ):
        ids = [await routed_run_ids(url, 3) for url in (fresh_a, fresh_b, copy_a, copy_b)]
    assert all(len(found) == 3 for found in ids)
    every = [run_id for found in ids for run_id in found]
    assert len(set(every)) == len(every), ids


async def test_the_install_id_is_created_once_and_survives_reapplying_the_schema(
    sql: asyncpg.Connection,
) -> None:
    """Re-applying schema.sql (every deploy runs `engine migrate`) keeps the install id, so the
    ids of runs already derived stay the ids a redone routing derives; a database upgraded from
    version 8 (no install id yet) gets one."""
    before = await sql.fetchval("SELECT value FROM engine.meta WHERE key = 'install_id'")
    salt = await sql.fetchval("SELECT engine.run_id_salt()")
    await sql.execute(schema_sql())
    assert await sql.fetchval("SELECT value FROM engine.meta WHERE key = 'install_id'") == before
    assert await sql.fetchval("SELECT engine.run_id_salt()") == salt
    await sql.execute(
        "DELETE FROM engine.meta WHERE key = 'install_id';"
        "UPDATE engine.meta SET value = '8' WHERE key = 'schema_version'"
    )
    await sql.execute(schema_sql())
    created = await sql.fetchval("SELECT value FROM engine.meta WHERE key = 'install_id'")
    assert created is not None and created != before
    assert await sql.fetchval("SELECT engine.schema_version()") == 11
    # The salt this session computed (and kept) before follows the new install id.
    renewed = await sql.fetchval("SELECT engine.run_id_salt()")
    assert renewed.startswith(f"{created}/") and renewed.split("/")[1:] == salt.split("/")[1:]
    await sql.execute("RESET ALL")  # what a pooler's reset does: the salt is computed again
    assert await sql.fetchval("SELECT engine.run_id_salt()") == renewed


async def test_names_with_slashes_cannot_collide(make_engine: Callable[..., Engine]) -> None:
    """App `acme/eu` with function `ship` and app `acme` with function `eu/ship` are two
    functions: one event starts two runs, each completes."""
    eu = make_engine("acme/eu")
    acme = make_engine("acme")

    @eu.create_function("ship", trigger=TriggerEvent("order/shipped"))
    async def ship_eu(ctx: Context) -> str:
        return "acme/eu:ship"

    @acme.create_function("eu/ship", trigger=TriggerEvent("order/shipped"))
    async def ship_acme(ctx: Context) -> str:
        return "acme:eu/ship"

    await eu.database()
    await acme.database()
    async with eu.worker(), acme.worker():
        [event_id] = await eu.send(Event(name="order/shipped"))
        runs = await eu.runs_for_event(event_id, at_least=2)
        outputs = set()
        for run in runs:
            engine = eu if run.app_id == "acme/eu" else acme
            done = await engine.wait_for_run(run.run_id)
            assert done.status is RunStatus.COMPLETED
            outputs.add(done.output)
    assert outputs == {"acme/eu:ship", "acme:eu/ship"}


async def test_a_run_id_is_stable_for_its_event_and_function(
    make_engine: Callable[..., Engine], sql: asyncpg.Connection
) -> None:
    """The id is derived, not drawn: the same inputs in the same database give the same id, and
    the function, the app and the event each change it."""
    app = make_engine()

    @app.create_function("same", trigger=TriggerEvent("t/same"))
    async def same(ctx: Context) -> None:
        return None

    async with app.worker():
        run_id = await only_run_id(app, (await app.send(Event(name="t/same")))[0])
    seq = await sql.fetchval("SELECT event_seq FROM engine.runs WHERE id = $1", uuid.UUID(run_id))

    async def derive(app_id: str, fn_id: str, event_seq: Any) -> uuid.UUID:
        return await sql.fetchval(
            "SELECT engine.event_run_id(engine.run_id_salt(), $1, $2, $3)", app_id, fn_id, event_seq
        )

    assert str(await derive("test", "same", seq)) == run_id
    others = {await derive("test", "other", seq), await derive("tes", "tsame", seq)}
    others.add(await derive("test", "same", seq + 1))
    assert uuid.UUID(run_id) not in others and len(others) == 3
    assert await derive("acme/eu", "ship", seq) != await derive("acme", "eu/ship", seq)
