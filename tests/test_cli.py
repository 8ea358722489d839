"""The command line, the quickstart, the schema file and the public API."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
from helpers import eventually, run_engine_dev

import engine

ROOT = Path(__file__).parent.parent


def test_quickstart_runs_under_engine_dev(tmp_path: Path) -> None:
    """The README's first command: an embedded PostgreSQL, the demo event, the run's result."""
    result = run_engine_dev("quickstart.py", tmp_path)
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
            assert await conn.fetchval("SELECT engine.schema_version()") == 9
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
        "Concurrency",
        "ConfigurationError",
        "Context",
        "Debounce",
        "DeterminismError",
        "Engine",
        "EngineError",
        "Event",
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
        "StepError",
        "StepInfo",
        "StepLimitError",
        "Throttle",
        "Timeouts",
        "TriggerCron",
        "TriggerEvent",
        "Worker",
    ]
