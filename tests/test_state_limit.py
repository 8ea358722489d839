"""A run's total state is bounded, and no run's history can break the claim of the others."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from helpers import eventually, move_clock, only_run_id

from engine import ConfigurationError, Context, Engine, Event, RunStatus, TriggerEvent
from engine.db import schema_sql


async def test_a_run_over_its_state_limit_fails_naming_the_limit(make_engine: Any) -> None:
    """Each output is within max_output_bytes, but together they pass max_state_bytes: the
    run fails with StateLimitError at the step that crosses it, which does not run again."""
    app = make_engine(max_output_bytes=4000, max_state_bytes=10_000)
    calls: list[int] = []

    def chunk(i: int) -> str:
        calls.append(i)
        return "x" * 3000

    @app.create_function("hoard", trigger=TriggerEvent("t/hoard"))
    async def hoard(ctx: Context) -> None:
        for i in range(5):
            await ctx.step.run(f"chunk-{i}", chunk, i)

    async with app.worker():
        run = await app.wait_for_run(
            await only_run_id(app, (await app.send(Event(name="t/hoard")))[0])
        )
    assert run.status is RunStatus.FAILED
    assert run.error is not None and run.error["type"] == "StateLimitError"
    assert "max_state_bytes" in run.error["message"] and "10000" in run.error["message"]
    assert calls == [0, 1, 2, 3]
    assert [s.step_id for s in run.steps] == ["chunk-0", "chunk-1", "chunk-2"]


async def test_the_function_output_counts_toward_the_state(make_engine: Any) -> None:
    app = make_engine(max_output_bytes=8000, max_state_bytes=10_000)

    @app.create_function("tail", trigger=TriggerEvent("t/tail"))
    async def tail(ctx: Context) -> str:
        await ctx.step.run("half", lambda: "y" * 6000)
        return "z" * 6000

    async with app.worker():
        run = await app.wait_for_run(
            await only_run_id(app, (await app.send(Event(name="t/tail")))[0])
        )
    assert run.status is RunStatus.FAILED
    assert run.error is not None and run.error["type"] == "StateLimitError"


def test_the_state_limit_is_checked_at_configuration() -> None:
    with pytest.raises(ConfigurationError, match="max_state_bytes"):
        Engine("x", "postgresql://nowhere/db", max_state_bytes=512 * 1024 * 1024)


async def _status(app: Engine, run_id: str) -> RunStatus:
    return (await app.get_run(run_id)).status


async def test_an_oversized_run_from_before_the_limit_fails_alone(
    make_engine: Any, sql: asyncpg.Connection
) -> None:
    """A run recorded under version 8 (no state limit) holds 66 steps of 4 MiB: building its
    history as one jsonb would pass PostgreSQL's 256 MiB limit and fail the whole claim, for
    every run of the app, at every tick. After the upgrade it fails alone, with a clear error;
    the run that wakes beside it completes; get_run shows it without raising."""
    app = make_engine()

    @app.create_function("napper", trigger=TriggerEvent("t/nap"))
    async def napper(ctx: Context) -> str:
        await ctx.step.sleep("nap", "1h")
        return "awake"

    async with app.worker():
        big = await only_run_id(app, (await app.send(Event(name="t/nap")))[0])
        small = await only_run_id(app, (await app.send(Event(name="t/nap")))[0])
        for run_id in (big, small):
            await eventually(lambda r=run_id: _is_sleeping(app, r))
    # As version 8 recorded them: no size column to read. repeat() compresses in storage, so
    # the table stays small; the claim would expand it to 264 MiB.
    await sql.execute(
        "INSERT INTO engine.steps (run_id, step_key, position, kind, status, output, created_at)"
        " SELECT $1::uuid, 'big:' || i, i, 'run', 'COMPLETED',"
        " to_jsonb(repeat('x', 4 * 1024 * 1024 - 16)), now() FROM generate_series(1, 66) i",
        big,
    )
    await sql.execute(
        "UPDATE engine.steps SET bytes = NULL;"
        "UPDATE engine.meta SET value = '8' WHERE key = 'schema_version'"
    )
    await sql.execute(schema_sql())  # the upgrade measures the runs under way
    await move_clock(sql, timedelta(hours=2))  # both wake now
    async with app.worker():
        done = await app.wait_for_run(small)
        failed = await app.wait_for_run(big)
    assert done.status is RunStatus.COMPLETED and done.output == "awake"
    assert failed.status is RunStatus.FAILED
    assert failed.error is not None and failed.error["type"] == "StateLimitError"
    assert "max_state_bytes" in failed.error["message"]
    assert len(failed.steps) == 67 and all(s.output_omitted for s in failed.steps)


async def _is_sleeping(app: Engine, run_id: str) -> bool:
    return await _status(app, run_id) is RunStatus.SLEEPING
