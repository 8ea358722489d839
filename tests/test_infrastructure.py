"""Infrastructure errors are never a function's failure (#11).

"The database cannot be reached or used right now" (too many connections, a shutdown, a
read-only standby, a serialization failure or a deadlock) hands the run back: it goes on, and no
completed step is lost or run twice because a write did not commit.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from helpers import FAST, eventually

from engine import Context, Engine, Event, RunStatus, TriggerEvent
from engine.db import is_infrastructure_error

ROLES_SQL = Path(__file__).parent.parent / "ops" / "roles.sql"

INFRASTRUCTURE = ["08000", "08006", "53000", "53100", "53200", "53300", "53400"]
INFRASTRUCTURE += ["57P01", "57P02", "57P03", "25006", "40001", "40P01"]
# The statement's or the data's fault, or the engine's own refusals: never infrastructure.
NOT_INFRASTRUCTURE = ["P0001", "23505", "22P02", "42883", "42501", "54000", "40002", "25P02"]


async def _raised(sql: Any, state: str) -> asyncpg.PostgresError:
    """The error asyncpg raises when the server reports ``state``."""
    try:
        await sql.execute(
            f"DO $$ BEGIN RAISE EXCEPTION 'state {state}' USING ERRCODE = '{state}'; END $$"
        )
    except asyncpg.PostgresError as exc:
        assert exc.sqlstate == state
        return exc
    raise AssertionError("no error raised")


@pytest.mark.parametrize("state", INFRASTRUCTURE)
async def test_unavailable_database_states_are_infrastructure(sql: Any, state: str) -> None:
    assert is_infrastructure_error(await _raised(sql, state))


@pytest.mark.parametrize("state", NOT_INFRASTRUCTURE)
async def test_statement_errors_are_not_infrastructure(sql: Any, state: str) -> None:
    assert not is_infrastructure_error(await _raised(sql, state))


def test_connection_failures_are_infrastructure() -> None:
    assert is_infrastructure_error(ConnectionRefusedError(111, "refused"))
    assert is_infrastructure_error(TimeoutError())
    assert is_infrastructure_error(asyncpg.InterfaceError("connection is closed"))
    assert not is_infrastructure_error(asyncpg.DataError("invalid input"))
    assert not is_infrastructure_error(ValueError("boom"))


# A sequence, not a table: the failed statement's transaction rolls back, nextval does not.
FAIL_ONCE = """
CREATE SEQUENCE failed_once;
CREATE FUNCTION fail_once() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.step_key = 'a' AND nextval('failed_once') = 1 THEN
        RAISE EXCEPTION 'the database cannot do it now' USING ERRCODE = '{state}';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER fail_once BEFORE INSERT ON engine.steps FOR EACH ROW EXECUTE FUNCTION fail_once();
"""


@pytest.mark.parametrize("state", ["40001", "53300"])
async def test_a_checkpoint_that_did_not_commit_loses_no_step(
    make_engine: Any, sql: Any, state: str
) -> None:
    """Step `a` completes; its record's write fails once with an infrastructure error. The run
    is not failed (retries=0), and `a` is recorded by the hand-back: it ran once. The function
    even catches what the next step raises, as the docs invite for StepError."""
    await sql.execute(FAIL_ONCE.replace("{state}", state))
    app = make_engine()
    calls: list[str] = []

    def side_effect(name: str) -> str:
        calls.append(name)
        return name

    @app.create_function("once", trigger=TriggerEvent("t/once"), retries=0)
    async def once(ctx: Context) -> Any:
        await ctx.step.run("a", side_effect, "a")
        try:
            await ctx.step.run("b", side_effect, "b")
        except Exception as exc:  # what a careless function does with any error
            return f"caught {exc}"
        return "done"

    async with app.worker(poll_interval="50ms"):
        [event_id] = await app.send(Event(name="t/once"))
        [run] = await eventually(lambda: app.runs_for_event(event_id))
        run = await app.wait_for_run(run.run_id)
    assert run.status is RunStatus.COMPLETED, run.error
    assert run.output == "done"
    assert calls == ["a", "b"]
    assert await sql.fetchval("SELECT last_value FROM failed_once") == 2  # failed, then saved


def _as_user(url: str, user: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc}"))


async def test_a_connection_limit_fails_no_run(
    make_engine: Any, sql: Any, database_url: str
) -> None:
    """A login role limited to 3 connections, a worker whose pool wants 10: connections are
    refused with 53300 (too many connections) all along, and no run fails (retries=0)."""
    await sql.execute(ROLES_SQL.read_text())
    user = f"limited_{os.getpid()}_{abs(hash(database_url)) % 10_000}"
    await sql.execute(f"DROP ROLE IF EXISTS {user}")
    await sql.execute(f"CREATE ROLE {user} LOGIN CONNECTION LIMIT 3 IN ROLE engine_worker")
    runs = 60
    app = Engine("limited", _as_user(database_url, user), backoff=FAST)
    try:
        sender = make_engine("limited")
        ran: list[str] = []

        async def step(name: str) -> str:
            ran.append(name)
            return name

        @app.create_function("limited", trigger=TriggerEvent("t/limited"), retries=0)
        async def limited(ctx: Context) -> Any:
            for index in range(3):
                await ctx.step.run(f"s{index}", step, f"s{index}")
            return "done"

        async with app.worker(concurrency=20, poll_interval="50ms"):
            await sender.send([Event(name="t/limited") for _ in range(runs)])

            async def finished() -> bool:
                count = await sql.fetchval(
                    "SELECT count(*) FROM engine.runs WHERE status IN ('COMPLETED', 'FAILED')"
                )
                return bool(count == runs)

            await eventually(finished, timeout=120)
        statuses = dict(await sql.fetch("SELECT status, count(*) FROM engine.runs GROUP BY 1"))
        assert statuses == {"COMPLETED": runs}, statuses
    finally:
        await app.close()
        await sql.execute(f"DROP OWNED BY {user}")
        await sql.execute(f"DROP ROLE IF EXISTS {user}")
