"""``read_database_url``: the methods that only read go to the read URL (a replica), everything
else to the primary.

The "replica" here is a second database of the test server that lags: it holds only what the
test ran there, and its URL logs in as a role granted engine_reader with
``default_transaction_read_only = on`` and ``application_name=engine_replica``. What a method
returns then says which database served it: the replica's run, or the primary's.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from helpers import engine_command, only_run_id
from test_security import ROLES_SQL, as_user

from engine import Context, Engine, Event, RunNotFoundError, RunStatus, TriggerEvent
from engine.testdb import TestDatabases
from engine.web import create_app
from engine.web.live import Live

# A primary nothing listens on: an Engine that only reads must never need it.
NOWHERE = "postgresql://nobody@127.0.0.1:1/nowhere"


def shop(app: Engine) -> None:
    @app.create_function("pack", TriggerEvent("shop/order"))
    async def pack(ctx: Context) -> str:
        return await ctx.step.run("label", lambda: f"label {ctx.event.data['n']}")


async def one_run(url: str, n: int) -> tuple[str, str]:
    """Sends an order on ``url`` and runs it to its end with a worker there: (event, run)."""
    app = Engine("shop", url)
    shop(app)
    try:
        async with app.worker(poll_interval="50ms"):
            [event_id] = await app.send(Event(name="shop/order", data={"n": n}))
            run_id = await only_run_id(app, event_id)
            assert (await app.wait_for_run(run_id)).status is RunStatus.COMPLETED
        return event_id, run_id
    finally:
        await app.close()


@pytest.fixture
async def replica(
    engine_test_databases: TestDatabases, sql: asyncpg.Connection
) -> AsyncIterator[dict[str, Any]]:
    """A lagging "replica" that has run one order (event ``old``, run ``old_run``), and its
    read-only URL (``url``)."""
    admin_url = await engine_test_databases.create()
    user = f"replica_{os.getpid()}"
    try:
        event_id, run_id = await one_run(admin_url, 1)
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(ROLES_SQL.read_text())
            await conn.execute(f"DROP ROLE IF EXISTS {user}")
            await conn.execute(f"CREATE ROLE {user} LOGIN IN ROLE engine_reader")
            await conn.execute(f"ALTER ROLE {user} SET default_transaction_read_only = on")
        finally:
            await conn.close()
        url = as_user(admin_url, user)
        url += ("&" if "?" in url else "?") + "application_name=engine_replica"
        yield {"url": url, "user": user, "old": event_id, "old_run": run_id}
    finally:
        await engine_test_databases.drop(admin_url)
        await sql.execute(f"DROP ROLE IF EXISTS {user}")


async def test_reads_go_to_the_read_url_and_writes_to_the_primary(
    database_url: str, replica: dict[str, Any], sql: asyncpg.Connection
) -> None:
    """Every read-only method answers from the replica (its run, not the primary's); sends and
    wait_for_run use the primary, which the replica's role could not write."""
    new_event, new_run = await one_run(database_url, 2)
    app = Engine("shop", database_url, read_database_url=replica["url"])
    try:
        assert [e.id for e in (await app.list_events("shop/order")).events] == [replica["old"]]
        assert await app.get_event(new_event) is None  # not replicated yet
        assert (await app.get_event(replica["old"])) is not None
        assert [r.run_id for r in await app.list_runs()] == [replica["old_run"]]
        assert [r.run_id for r in (await app.list_run_summaries()).runs] == [replica["old_run"]]
        assert [r.run_id for r in await app.runs_for_event(replica["old"])] == [replica["old_run"]]
        assert (await app.get_run(replica["old_run"])).output == "label 1"
        with pytest.raises(RunNotFoundError):
            await app.get_run(new_run)  # what replica lag looks like
        assert [f.function_id for f in await app.list_functions()] == ["pack"]
        # What must see the primary's latest writes does.
        assert (await app.wait_for_run(new_run)).output == "label 2"
        [sent] = await app.send(Event(name="shop/other"))
        assert await sql.fetchval("SELECT count(*) FROM engine.events WHERE id = $1", sent) == 1
        assert await app.get_event(sent) is None
        # The read pool logs in as the replica's role, in read-only transactions.
        async with (await app.read_database()).pool.acquire() as conn:
            who = await conn.fetchrow(
                "SELECT current_user AS user, current_setting('application_name') AS name,"
                " current_setting('transaction_read_only') AS read_only"
            )
            assert dict(who) == {
                "user": replica["user"],
                "name": "engine_replica",
                "read_only": "on",
            }
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                await conn.execute("CREATE TEMP TABLE t (x int)")
    finally:
        await app.close()


async def test_an_engine_that_only_reads_never_connects_to_the_primary(
    replica: dict[str, Any],
) -> None:
    """With the primary out of reach, every read still answers; the first write fails."""
    app = Engine("shop", NOWHERE, read_database_url=replica["url"])
    try:
        assert len((await app.list_run_summaries(all_apps=True)).runs) == 1
        assert (await app.get_run(replica["old_run"])).status is RunStatus.COMPLETED
        assert (await app.list_events()).events
        with pytest.raises(OSError):
            await app.wait_for_run(replica["old_run"])
    finally:
        await app.close()


def test_the_cli_listings_read_from_read_database_url(
    replica: dict[str, Any], tmp_path: Path
) -> None:
    """`engine runs list/show`, `events list/show` and `functions list` read from
    --read-database-url, with --database-url out of reach."""
    read = ["--database-url", NOWHERE, "--read-database-url", replica["url"], "--json"]
    listed = engine_command("runs", "list", *read, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert [r["run_id"] for r in json.loads(listed.stdout)["runs"]] == [replica["old_run"]]
    for args in (
        ("runs", "show", replica["old_run"]),
        ("events", "list"),
        ("events", "show", replica["old"]),
        ("functions", "list"),
    ):
        shown = engine_command(*args, *read, cwd=tmp_path)
        assert shown.returncode == 0, (args, shown.stderr)
        assert replica["old_run"] in shown.stdout or "pack" in shown.stdout, args
    # Without --database-url nor $DATABASE_URL, the read URL is enough.
    alone = engine_command("events", "list", "--read-database-url", replica["url"], cwd=tmp_path)
    assert alone.returncode == 0 and replica["old"] in alone.stdout, alone.stderr


async def test_the_dashboard_reads_the_replica_and_listens_on_the_primary(
    database_url: str, replica: dict[str, Any], sql: asyncpg.Connection
) -> None:
    """The dashboard's reader Engine (as `engine dashboard --read-database-url` builds it)
    renders the replica's runs, and its live pages wake on the primary's NOTIFY (a standby
    cannot LISTEN)."""
    import httpx

    reader = Engine("engine-cli", replica["url"], listen_database_url=database_url)
    writer = Engine("engine-cli", database_url)
    live = Live(reader, interval=600)
    try:
        web = create_app(writer, reader=reader)
        transport = httpx.ASGITransport(app=web)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            page = await http.get("/runs")
            assert page.status_code == 200 and replica["old_run"] in page.text
        await live.wait(within=30)  # the listener's first connect wakes it
        woken = asyncio.create_task(live.wait(within=600))
        deadline = asyncio.get_running_loop().time() + 30
        while not woken.done():  # a NOTIFY on the primary's database, until one is heard
            assert asyncio.get_running_loop().time() < deadline, "no wake-up from the primary"
            await sql.execute("NOTIFY engine_wakeup")
            await asyncio.wait({woken}, timeout=0.5)
    finally:
        await live.close()
        await reader.close()
        await writer.close()
