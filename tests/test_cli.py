"""The command line, the quickstart, the schema file and the public API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import psutil
from helpers import (
    APPS,
    engine_command,
    eventually,
    run_engine_dev,
    run_in_worker_process,
    start_engine_dev,
    wait_until,
)

import engine
from engine import Event, RunStatus

ROOT = Path(__file__).parent.parent


def test_quickstart_runs_under_engine_dev(dev_dir: Path) -> None:
    """The README's first command: an embedded PostgreSQL, the demo event, the run's result."""
    result = run_engine_dev("quickstart.py", dev_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "COMPLETED" in result.stdout
    assert "step fetch-user" in result.stdout and "step send-welcome" in result.stdout
    assert '"receipt": "welcome mail sent to ada@example.com"' in result.stdout


async def test_migrate_is_idempotent_and_schema_file_is_the_packaged_one(server_url: str) -> None:
    from conftest import with_database

    admin = await asyncpg.connect(server_url)
    await admin.execute("DROP DATABASE IF EXISTS engine_migrate_test WITH (FORCE)")
    await admin.execute("CREATE DATABASE engine_migrate_test")
    try:
        url = with_database(server_url, "engine_migrate_test")
        for _ in range(2):
            subprocess.run(
                [sys.executable, "-m", "engine", "migrate", "--database-url", url],
                check=True,
                capture_output=True,
                timeout=60,
            )
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT engine.schema_version()") == 11
        finally:
            await conn.close()
    finally:
        await admin.execute("DROP DATABASE IF EXISTS engine_migrate_test WITH (FORCE)")
        await admin.close()
    assert (ROOT / "schema.sql").read_text() == (ROOT / "engine" / "schema.sql").read_text()


async def test_engine_send_command(database_url: str, sql: Any) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine",
            "send",
            "cli/hello",
            "--data",
            '{"n": 1}',
            "--database-url",
            database_url,
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    event_id = out.stdout.strip()

    async def stored() -> Any:
        return await sql.fetchval("SELECT data->>'n' FROM engine.events WHERE id = $1", event_id)

    assert await eventually(stored) == "1"


async def test_missing_schema_is_a_clear_error(server_url: str) -> None:
    from conftest import with_database

    app = engine.Engine("x", with_database(server_url, "postgres"))
    try:
        try:
            await app.send(engine.Event(name="a"))
        except engine.SchemaMissingError as error:
            assert "engine migrate" in str(error)
        else:
            raise AssertionError("expected SchemaMissingError")
    finally:
        await app.close()


def test_public_api_is_pinned() -> None:
    assert sorted(engine.__all__) == [
        "Backoff",
        "Batch",
        "Cancel",
        "Checkpointing",
        "Concurrency",
        "ConfigurationError",
        "Context",
        "Debounce",
        "DeterminismError",
        "Engine",
        "EngineError",
        "Event",
        "EventSchemaError",
        "ExpressionError",
        "Function",
        "InvalidEventError",
        "NestedStepError",
        "NonRetriableError",
        "OutputLimitError",
        "Priority",
        "RateLimit",
        "RetryAfterError",
        "RunFailure",
        "RunInfo",
        "RunNotFoundError",
        "RunStatus",
        "SchemaMissingError",
        "SerializationError",
        "Singleton",
        "StateLimitError",
        "StepError",
        "StepInfo",
        "StepLimitError",
        "Throttle",
        "Timeouts",
        "TriggerCron",
        "TriggerEvent",
        "Worker",
    ]


DEV_APP = APPS / "dev_app.py"
BAD_EXPRESSION = """\
from engine import Engine, TriggerEvent
app = Engine("bad")
@app.create_function("f", trigger=TriggerEvent("a/b", if_exp="event.data.total >"))
async def f(ctx): ...
"""


def test_bad_input_is_one_clear_line_and_exit_status_2(tmp_path: Path) -> None:
    """No traceback for bad input: one message, exit 2; --debug shows the traceback. A missing
    file is said before engine dev creates anything."""
    (tmp_path / "bad.py").write_text(BAD_EXPRESSION)
    cases = [
        (("dev", "nosuch.py"), "nosuch.py: no such file"),
        (("worker", "nosuch_module"), "no module named 'nosuch_module'"),
        (("worker", "bad.py"), "trigger 'a/b' if_exp: invalid expression 'event.data.total >'"),
        (("--log-level", "verbose", "send", "a"), "invalid choice: 'verbose'"),
        (("send", "a", "--data", "[1]"), "--data must be a JSON object, got list"),
        (("send", "a", "--data", "{"), "--data is not JSON"),
        (("send", "a", "--ts", "2030-01-01T00:00:00"), "has no time zone"),
        (("send", "a"), "no database: pass --database-url"),
        (("worker", "bad.py", "--lease", "3q"), "'3q' is not a duration"),
    ]
    for args, message in cases:
        result = engine_command(*args, cwd=tmp_path)
        assert (result.returncode, result.stdout) == (2, ""), (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr and "lark" not in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.py"]  # no .engine, no .runtime
    debug = engine_command("--debug", "worker", "bad.py", cwd=tmp_path)
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_unreachable_database_is_one_line_and_exit_status_1(tmp_path: Path) -> None:
    url = f"postgresql://postgres@/postgres?host={tmp_path / 'nothing-here'}"
    result = engine_command("send", "a/b", "--database-url", url, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(f"engine send: error: cannot reach the database at {url}")
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr


def test_send_finds_engine_dev_and_says_what_it_started(dev_dir: Path) -> None:
    """`engine send` without a URL uses the engine dev running in the folder, and says what the
    event did; Ctrl-C ends engine dev (130), which then forgets its URL."""
    dev = start_engine_dev(DEV_APP, dev_dir)
    try:
        url_file = dev_dir / ".engine" / "url"
        wait_until(url_file.exists, 60, "engine dev wrote its URL")
        sent = engine_command("send", "dev/hello", "--id", "once", cwd=dev_dir)
        assert sent.returncode == 0, sent.stderr
        assert sent.stdout == "once\n"
        assert "engine send: started 1 run(s): dev-hello " in sent.stderr
        again = engine_command("send", "dev/hello", "--id", "once", cwd=dev_dir)
        assert "deduplicated: an event with id 'once'" in again.stderr
        nothing = engine_command("send", "dev/nobody", cwd=dev_dir)
        assert "it started no run" in nothing.stderr
        later = engine_command("send", "dev/hello", "--ts", "2099-01-01T00:00Z", cwd=dev_dir)
        assert "its runs start at 2099-01-01T00:00:00+00:00" in later.stderr
        dev.send_signal(signal.SIGINT)
        _, stderr = dev.communicate(timeout=15)
        assert dev.returncode == 130, stderr
        assert not url_file.exists()
    finally:
        _kill(dev)
    stopped = engine_command("send", "dev/hello", cwd=dev_dir)
    assert stopped.returncode == 2 and "no database" in stopped.stderr


def test_ctrl_c_ends_a_demo_at_once(dev_dir: Path) -> None:
    """A demo waiting on something is cancelled by Ctrl-C: exit 130, not a 30 s timeout."""
    dev = start_engine_dev(DEV_APP, dev_dir, env={"DEV_DEMO": "forever"})
    try:
        assert dev.stdout is not None
        assert dev.stdout.readline() == "demo waiting\n"
        dev.send_signal(signal.SIGINT)
        _, stderr = dev.communicate(timeout=15)
        assert dev.returncode == 130, stderr
        assert "Traceback" not in stderr, stderr
    finally:
        _kill(dev)


def test_ctrl_c_while_postgres_starts(dev_dir: Path) -> None:
    """The first Ctrl-C counts even while the embedded server is being created: engine dev
    stops the server, removes the half-made data folder, and exits 130; the next engine dev
    in the folder works."""
    dev = start_engine_dev(DEV_APP, dev_dir)
    pgdata = dev_dir / ".engine" / "pg"
    try:
        wait_until(pgdata.exists, 60, "engine dev began creating its server")
        dev.send_signal(signal.SIGINT)
        _, stderr = dev.communicate(timeout=30)
        assert dev.returncode == 130, stderr
        assert "Traceback" not in stderr, stderr
    finally:
        _kill(dev)
    assert not [p.pid for p in psutil.process_iter(["cmdline"]) if str(pgdata) in str(p.cmdline)]
    again = engine_command("dev", str(DEV_APP), cwd=dev_dir, env={"DEV_DEMO": "clock"})
    assert again.returncode == 0, again.stderr


def test_a_demo_leaves_durable_time_as_it_found_it(dev_dir: Path) -> None:
    """A demo that moves durable time six days forward leaves the database's clock where it
    was: the next demo on the same folder starts at today."""
    for _ in range(2):
        result = engine_command(
            "dev", str(DEV_APP), "--poll-interval", "200ms", cwd=dev_dir, env={"DEV_DEMO": "clock"}
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == "offset 0h\n", result.stdout


def _kill(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
        process.communicate(timeout=30)


async def test_functions_list_shows_the_registry(database_url: str, make_engine: Any) -> None:
    """`engine functions list`: each function with its triggers, flow control, whether it is
    active, its live workers and its runs by status; --json gives the same for scripts."""
    app = make_engine("shop")

    @app.create_function(
        "notify",
        trigger=engine.TriggerEvent("order/placed"),
        concurrency=engine.Concurrency(limit=5, key="event.data.user"),
    )
    async def notify(ctx: engine.Context) -> None:
        return None

    def listing(*options: str) -> str:
        command = [sys.executable, "-m", "engine", "functions", "list", *options]
        return subprocess.run(
            [*command, "--database-url", database_url],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "100"},
        ).stdout

    async with app.worker() as worker:
        [event_id] = await app.send(engine.Event(name="order/placed"))
        run = (await app.runs_for_event(event_id, at_least=1))[0]
        await app.wait_for_run(run.run_id)
        line = next(x for x in listing().splitlines() if x.startswith("shop/notify"))
        assert line.split() == [
            "shop/notify", "active", "1", "order/placed", "concurrency", "5", "per",
            "event.data.user", "COMPLETED=1",
        ]  # fmt: skip
        [listed] = json.loads(listing("--json", "--app", "shop"))
        assert listed["runs"] == {"COMPLETED": 1} and listed["workers"] == 1
        assert listed["config"]["concurrency"][0]["key"] == "event.data.user"
        assert worker.owner
    line = next(x for x in listing().splitlines() if x.startswith("shop/notify"))
    assert line.split()[:3] == ["shop/notify", "inactive", "0"]
    assert json.loads(listing("--json", "--app", "nobody")) == []


async def test_the_worker_command_runs_on_uvloop_or_on_asyncio_when_asked(
    database_url: str, make_engine: Any, tmp_path: Path
) -> None:
    """`engine worker` runs on uvloop where it is installed (the `fast` extra; the dev extra
    has it), on asyncio's loop with ENGINE_EVENT_LOOP=asyncio; a run completes on either, and
    the worker's first line names its loop. An unknown loop is refused before anything starts."""
    for loop, env in (("uvloop", {}), ("asyncio", {"ENGINE_EVENT_LOOP": "asyncio"})):
        log = tmp_path / f"{loop}.log"
        run, code = await run_in_worker_process(
            "graceful:app",
            database_url,
            make_engine,
            Event(name="graceful/go"),
            env={"STEP_SECONDS": "0", **env},
            log=log,
        )
        assert run.status is RunStatus.COMPLETED and code == 0, (loop, run.error, code)
        lines = [json.loads(line) for line in log.read_text().splitlines()]
        [started] = [line for line in lines if line["event"] == "worker.started"]
        assert started["event_loop"] == loop
    refused = engine_command("send", "a/b", cwd=tmp_path, env={"ENGINE_EVENT_LOOP": "trio"})
    assert refused.returncode == 2 and "ENGINE_EVENT_LOOP='trio'" in refused.stderr, refused


async def test_the_worker_command_keeps_its_loaded_code_out_of_the_collectors_reach(
    database_url: str, make_engine: Any
) -> None:
    """`engine worker` freezes what it loaded before it starts (gc.freeze): full collections,
    each a pause of the event loop, then walk only what the runs allocate."""
    run, _code = await run_in_worker_process(
        "heap_app:app", database_url, make_engine, Event(name="heap/frozen")
    )
    frozen = run.output
    assert frozen > 10_000, frozen  # the engine, the app and their imports
