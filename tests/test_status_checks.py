"""The database refuses a run or step status that is not one, in a fresh schema and in one
upgraded from the checks' earlier IN-list form; and a run's end (runs_ended) fires on a move to
a final status only. The checks and the trigger's WHEN call engine.is_run_status and its kin:
an IN list there cost every INSERT and UPDATE statement 6.5 µs (see engine/schema.sql)."""

from __future__ import annotations

import contextlib
from typing import Any

import asyncpg
import pytest
from helpers import eventually, only_run_id, status_is

from engine import Context, Event, RunStatus, TriggerEvent
from engine.db import schema_sql

UNFINISHED = ["QUEUED", "RUNNING", "SLEEPING", "RETRYING", "WAITING"]
RUN_STATUSES = [*UNFINISHED, "COMPLETED", "FAILED", "CANCELLED", "SKIPPED"]
STEP_STATUSES = ["COMPLETED", "FAILED", "SLEEPING", "RETRYING", "WAITING", "CANCELLED"]

OLD_FORM = """
ALTER TABLE engine.runs DROP CONSTRAINT runs_status_check,
    ADD CONSTRAINT runs_status_check CHECK (status IN (
        'QUEUED', 'RUNNING', 'SLEEPING', 'RETRYING', 'WAITING',
        'COMPLETED', 'FAILED', 'CANCELLED', 'SKIPPED'));
ALTER TABLE engine.steps DROP CONSTRAINT steps_status_check,
    ADD CONSTRAINT steps_status_check CHECK (status IN (
        'COMPLETED', 'FAILED', 'SLEEPING', 'RETRYING', 'WAITING', 'CANCELLED'));
"""


async def _a_finished_run(make_engine: Any) -> str:
    app = make_engine()

    @app.create_function("one-step", trigger=TriggerEvent("t/checks"))
    async def one_step(ctx: Context) -> int:
        return await ctx.step.run("a", lambda: 1)

    async with app.worker():
        [event_id] = await app.send(Event(name="t/checks"))
        run_id = await only_run_id(app, event_id)
        await app.wait_for_run(run_id)
    return run_id


async def _refused(sql: asyncpg.Connection, statement: str, *args: Any) -> str:
    with pytest.raises(asyncpg.CheckViolationError) as refused:
        await sql.execute(statement, *args)
    return str(refused.value.constraint_name)


async def _check_forms(sql: asyncpg.Connection) -> dict[str, str]:
    rows = await sql.fetch(
        "SELECT c.conname, pg_get_constraintdef(c.oid) AS form FROM pg_constraint c"
        " WHERE c.conname IN ('runs_status_check', 'steps_status_check')"
        " AND c.connamespace = 'engine'::regnamespace"
    )
    return {row["conname"]: row["form"] for row in rows}


async def _statuses_are_checked(sql: asyncpg.Connection, run_id: str) -> None:
    """Every status passes and anything else is refused, by name, through plain SQL."""
    with contextlib.suppress(_Rollback):
        async with sql.transaction():  # rolled back: the run and its step stay as they were
            for status in RUN_STATUSES:
                await sql.execute(
                    "UPDATE engine.runs SET status = $2 WHERE id = $1", run_id, status
                )
            for status in STEP_STATUSES:
                await sql.execute(
                    "UPDATE engine.steps SET status = $2 WHERE run_id = $1", run_id, status
                )
            raise _Rollback
    for bad in ("BOGUS", "completed", "", "COMPLETED "):
        assert (
            await _refused(sql, "UPDATE engine.runs SET status = $2 WHERE id = $1", run_id, bad)
            == "runs_status_check"
        )
        assert (
            await _refused(
                sql, "UPDATE engine.steps SET status = $2 WHERE run_id = $1", run_id, bad
            )
            == "steps_status_check"
        )
    assert (
        await _refused(
            sql,
            "INSERT INTO engine.steps (run_id, step_key, position, kind, status, created_at)"
            " VALUES ($1, 'x', 9, 'run', 'DONE', now())",
            run_id,
        )
        == "steps_status_check"
    )


class _Rollback(Exception):
    pass


async def test_a_fresh_schema_refuses_what_is_not_a_status(make_engine: Any, sql: Any) -> None:
    run_id = await _a_finished_run(make_engine)
    forms = await _check_forms(sql)
    assert "is_run_status(status)" in forms["runs_status_check"]
    assert "is_step_status(status)" in forms["steps_status_check"]
    await _statuses_are_checked(sql, run_id)


async def test_an_upgraded_schema_takes_the_checks_new_form(make_engine: Any, sql: Any) -> None:
    """A database whose checks have the IN-list form (created before them) gets the functions'
    form when the schema is applied, and the same statuses are refused."""
    run_id = await _a_finished_run(make_engine)
    await sql.execute(OLD_FORM)
    assert "is_run_status" not in (await _check_forms(sql))["runs_status_check"]
    await sql.execute(schema_sql())
    forms = await _check_forms(sql)
    assert "is_run_status(status)" in forms["runs_status_check"]
    assert "is_step_status(status)" in forms["steps_status_check"]
    await _statuses_are_checked(sql, run_id)
    await sql.execute(schema_sql())  # applied again: nothing to convert, nothing changes
    assert await _check_forms(sql) == forms


@pytest.mark.parametrize("final", ["COMPLETED", "FAILED", "CANCELLED"])
async def test_a_run_end_is_announced_only_on_a_move_to_a_final_status(
    make_engine: Any, sql: Any, final: str
) -> None:
    """runs_ended (its WHEN calls engine.is_final_run_status) sends engine/function.finished
    when a run moves to a final status, and never for a move between unfinished ones."""
    app = make_engine()

    @app.create_function("parked", trigger=TriggerEvent("t/parked"))
    async def parked(ctx: Context) -> None:
        await ctx.step.sleep("nap", "1h")

    async with app.worker():
        [event_id] = await app.send(Event(name="t/parked"))
        run_id = await only_run_id(app, event_id)
        await eventually(lambda: status_is(app, run_id, RunStatus.SLEEPING))

    finished = "SELECT count(*) FROM engine.events WHERE name = 'engine/function.finished'"
    for unfinished in ("QUEUED", "RETRYING", "WAITING", "SLEEPING"):
        await sql.execute("UPDATE engine.runs SET status = $2 WHERE id = $1", run_id, unfinished)
    assert await sql.fetchval(finished) == 0
    await sql.execute(
        "UPDATE engine.runs SET status = $2, ended_at = now() WHERE id = $1", run_id, final
    )
    assert await sql.fetchval(finished) == 1
    assert (
        await sql.fetchval(
            "SELECT count(*) FROM engine.steps WHERE run_id = $1 AND status = 'SLEEPING'", run_id
        )
        == 0
    )  # the end closed the open sleep, as runs_ended does
