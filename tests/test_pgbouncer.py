"""The engine through PgBouncer in transaction pooling mode (ops/pgbouncer.md): sends, claims
and steps through the pooler, LISTEN on a direct connection (``listen_database_url``).

Runs where the ``pgbouncer`` binary is installed (Debian: ``apt-get install pgbouncer``), and is
skipped elsewhere, unless ``ENGINE_PGBOUNCER_TESTS=1`` (CI, which installs it) makes a missing
binary a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest
from helpers import eventually, only_run_id, remove_folder, scratch_dir, wait_until

from engine import Context, Engine, Event, RunStatus, TriggerEvent

PGBOUNCER = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/bin")
if PGBOUNCER is None and os.environ.get("ENGINE_PGBOUNCER_TESTS") == "1":
    raise RuntimeError("ENGINE_PGBOUNCER_TESTS=1 but pgbouncer is not installed")
pytestmark = pytest.mark.skipif(
    PGBOUNCER is None,
    reason="pgbouncer is not installed (apt-get install pgbouncer; ENGINE_PGBOUNCER_TESTS=1 "
    "makes this a failure)",
)
APP_NAME = "via_pgbouncer"  # what PgBouncer's server connections call themselves


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _ini(url: str, port: int, folder: Path) -> tuple[Path, str]:
    """A transaction-mode pgbouncer.ini in ``folder`` for the server of ``url``; and the user
    PgBouncer runs as (it refuses root; the embedded server's socket folder is its owner's)."""
    parts = urlsplit(url)
    host = parse_qs(parts.query).get("host", [parts.hostname or "127.0.0.1"])[0]
    user = parts.username or "postgres"
    target = f"host={host} port={parts.port or 5432} user={user} application_name={APP_NAME}"
    if parts.password:
        target += f" password={parts.password}"
    (folder / "users.txt").write_text(f'"{user}" ""\n')
    ini = folder / "pgbouncer.ini"
    ini.write_text(
        f"[databases]\n* = {target}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {folder / 'users.txt'}\n"
        "pool_mode = transaction\ndefault_pool_size = 4\nmax_client_conn = 100\n"
    )
    for path in (folder, ini, folder / "users.txt"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    runs_as = "nobody"
    if host.startswith("/"):
        runs_as = Path(host).owner()
    return ini, runs_as


def _listening(port: int, process: subprocess.Popen[bytes], log: Path) -> bool:
    if process.poll() is not None:
        raise AssertionError(f"pgbouncer exited: {log.read_text()}")
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def pgbouncer(database_url: str) -> Iterator[str]:
    """PgBouncer in transaction mode in front of the test's server: the test database's URL
    through it."""
    assert PGBOUNCER is not None
    folder = scratch_dir("pgbouncer-")
    port = _free_port()
    ini, runs_as = _ini(database_url, port, folder)
    command = [PGBOUNCER, *(["-u", runs_as] if os.geteuid() == 0 else []), str(ini)]
    log = folder / "pgbouncer.log"
    with log.open("w") as output:  # a file, not a pipe: nothing reads it while tests run
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    user = urlsplit(database_url).username or "postgres"
    dbname = urlsplit(database_url).path.lstrip("/")
    try:
        wait_until(lambda: _listening(port, process, log), what="pgbouncer listening")
        yield f"postgresql://{user}@127.0.0.1:{port}/{dbname}"
    finally:
        process.terminate()
        process.wait(timeout=30)
        logged = log.read_text()
        remove_folder(folder)
        assert "FATAL" not in logged, logged


def shop(app: Engine) -> None:
    @app.create_function("deliver", TriggerEvent("shop/order"))
    async def deliver(ctx: Context) -> str:
        label = await ctx.step.run("label", lambda: f"label {ctx.event.data['n']}")
        await ctx.step.sleep("nap", "100ms")
        paid = await ctx.step.wait_for_event(
            "paid", event="shop/paid", timeout="1m", match="data.n"
        )
        return f"{label} paid {paid is not None and paid.data['n']}"


@pytest.fixture
async def through_pgbouncer(pgbouncer: str, database_url: str) -> AsyncIterator[Engine]:
    """An Engine whose pool goes through PgBouncer (no named prepared statements: PgBouncer
    1.18 cannot keep them) and whose LISTEN goes to the server directly."""
    app = Engine("shop", pgbouncer, listen_database_url=database_url, statement_cache_size=0)
    shop(app)
    yield app
    await app.close()


async def test_a_worker_runs_functions_through_pgbouncer_in_transaction_mode(
    through_pgbouncer: Engine, sql: asyncpg.Connection
) -> None:
    """Sends, claims, steps, a sleep and a wait complete through the pooler, with more runs at
    once than it has server connections; the worker polls once a minute, so the runs finishing
    within the wait says wake-ups reached it. Its LISTEN is a direct session of the server."""
    app = through_pgbouncer
    # No health probe on the listening connection: its last statement stays its LISTEN.
    async with app.worker(concurrency=12, poll_interval="60s", listen_check="1h"):
        orders = await app.send([Event(name="shop/order", data={"n": n}) for n in range(12)])
        runs = [await only_run_id(app, event_id, timeout=30) for event_id in orders]

        async def all_waiting() -> bool:
            statuses = [(await app.get_run(run_id)).status for run_id in runs]
            return all(status is RunStatus.WAITING for status in statuses)

        await eventually(all_waiting, timeout=30)
        await app.send([Event(name="shop/paid", data={"n": n}) for n in range(12)])
        for n, run_id in enumerate(runs):
            finished = await app.wait_for_run(run_id, timeout=30)
            assert finished.status is RunStatus.COMPLETED, finished.error
            assert finished.output == f"label {n} paid {n}"
        listening = await sql.fetch(
            "SELECT application_name FROM pg_stat_activity"
            " WHERE datname = current_database() AND query LIKE 'LISTEN%'"
        )
        assert [row["application_name"] for row in listening] == [""]  # not PgBouncer's
    # The pool's sessions were PgBouncer's: its few server connections served every query.
    served = await sql.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", APP_NAME
    )
    assert 1 <= served <= 4
