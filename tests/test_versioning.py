"""Safe code changes for runs in flight: ``ctx.patched`` and the replay check (``engine
check-replay``, ``Engine.check_replay``)."""

from __future__ import annotations

import asyncio
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers import APPS, engine_command, eventually, move_clock, only_run_id

from engine import Context, EngineError, Event, RunStatus, TriggerEvent

sys.path.insert(0, str(APPS))
import versioned

sys.path.remove(str(APPS))


async def _status(app: Any, run_id: str) -> RunStatus:
    return (await app.get_run(run_id)).status


async def _sleeping_at(app: Any, run_id: str, step: str) -> bool:
    run = await app.get_run(run_id)
    return run.status is RunStatus.SLEEPING and any(
        s.step_id == step and s.status == "SLEEPING" for s in run.steps
    )


async def runs_in_flight(make_engine: Any, sql: Any) -> dict[str, str]:
    """Under the old code: a run at the first sleep, one at the second (past the change), one
    completed, and a run of another function; their ids by name."""
    app = make_engine("versioned")
    versioned.declare(app, "old")
    async with app.worker(poll_interval="50ms"):
        ids = await app.send(
            [
                Event(name="versioned/go", data={"second": "1d"}),
                Event(name="versioned/go", data={"second": "1ms"}),
                Event(name="versioned/steady"),
            ]
        )
        second, done, steady = [await only_run_id(app, i) for i in ids]
        await eventually(lambda: _sleeping_at(app, second, "first"))
        await eventually(lambda: _sleeping_at(app, steady, "nap"))
        await move_clock(sql, timedelta(hours=1))
        await eventually(lambda: _sleeping_at(app, second, "second"))
        await app.wait_for_run(done, timeout=30)
        [event_id] = await app.send(Event(name="versioned/go"))
        first = await only_run_id(app, event_id)
        await eventually(lambda: _sleeping_at(app, first, "first"))
    return {"first": first, "second": second, "done": done, "steady": steady}


async def test_patched_keeps_runs_in_flight_on_the_old_path(make_engine: Any, sql: Any) -> None:
    """After a deploy of patched code: the run that went past the patch point with the old
    code goes on without the new step; the run that had not reached it, and a new run, take
    the new path; every run completes, and replay after a sleep decides as the first time."""
    runs = await runs_in_flight(make_engine, sql)
    app = make_engine("versioned")
    versioned.declare(app, "patched")
    async with app.worker(poll_interval="50ms"):
        [event_id] = await app.send(Event(name="versioned/go"))
        fresh = await only_run_id(app, event_id)
        await eventually(lambda: _sleeping_at(app, fresh, "first"))
        await move_clock(sql, timedelta(hours=1))
        await eventually(lambda: _sleeping_at(app, fresh, "second"))
        await move_clock(sql, timedelta(days=1))
        finished = {
            name: await app.wait_for_run(run_id, timeout=30)
            for name, run_id in {**runs, "fresh": fresh}.items()
            if name not in ("done", "steady")
        }
    assert {name: run.status for name, run in finished.items()} == dict.fromkeys(
        finished, RunStatus.COMPLETED
    )
    assert finished["second"].output == ["a", "b", "c"]
    assert finished["first"].output == ["a", "b", "x", "c"]
    assert finished["fresh"].output == ["a", "b", "x", "c"]
    kinds = [(s.step_id, s.kind) for s in finished["fresh"].steps]
    assert kinds == [
        ("a", "run"),
        ("first", "sleep"),
        ("b", "run"),
        ("add-x", "patch"),
        ("x", "run"),
        ("second", "sleep"),
        ("c", "run"),
    ]
    assert "add-x" not in [s.step_id for s in finished["second"].steps]


async def test_patched_answers_the_same_at_the_same_point(make_engine: Any, sql: Any) -> None:
    """Asked again at the same point (and from parallel branches started together), a patch
    answers as it did; the marker is recorded once per point."""
    app = make_engine()
    answers: list[list[bool]] = []

    @app.create_function("twice", trigger=TriggerEvent("t/twice"))
    async def twice(ctx: Context) -> Any:
        await ctx.step.run("a", lambda: 1)

        async def branch(i: int) -> bool:
            seen = ctx.patched("p")
            await ctx.step.run("in-branch", lambda: i)
            return seen

        answers.append(
            [ctx.patched("p"), ctx.patched("p"), *await asyncio.gather(branch(0), branch(1))]
        )
        await ctx.step.sleep("nap", "1h")
        return True

    async with app.worker(poll_interval="50ms"):
        [event_id] = await app.send(Event(name="t/twice"))
        run_id = await only_run_id(app, event_id)
        await eventually(lambda: _sleeping_at(app, run_id, "nap"))
        await move_clock(sql, timedelta(hours=1))
        run = await app.wait_for_run(run_id, timeout=30)
    assert run.status is RunStatus.COMPLETED
    assert answers == [[True, True, True, True], [True, True, True, True]]
    assert len([s for s in run.steps if s.kind == "patch"]) == 2  # after a, and in the branches


async def test_patched_inside_a_step_fails_the_run(make_engine: Any) -> None:
    app = make_engine()

    @app.create_function("inside", trigger=TriggerEvent("t/inside"))
    async def inside(ctx: Context) -> Any:
        return await ctx.step.run("s", lambda: ctx.patched("p"))

    async with app.worker(poll_interval="50ms"):
        [event_id] = await app.send(Event(name="t/inside"))
        run = await app.wait_for_run(await only_run_id(app, event_id), timeout=30)
    assert run.status is RunStatus.FAILED
    assert "inside step 's'" in run.error["message"]


async def test_check_replay_reports_exactly_the_runs_that_would_break(
    make_engine: Any, sql: Any
) -> None:
    """The new code adds a step before the second sleep: only the run already past it breaks
    (and, with since, the run that completed). Running the new code confirms it: that run
    fails with the reported DeterminismError, the others complete."""
    runs = await runs_in_flight(make_engine, sql)
    new = make_engine("versioned")
    versioned.declare(new, "new")
    report = await new.check_replay()
    assert report.checked == 3  # first, second and steady: in flight
    assert [(p.run_id, p.recorded_step, p.asked_step) for p in report.problems] == [
        (runs["second"], "second", "x")
    ]
    [problem] = report.problems
    assert problem.function_id == "journey" and problem.status == "SLEEPING"
    assert not report.ok
    since = await new.check_replay(since="7d")
    assert sorted(p.run_id for p in since.problems) == sorted([runs["second"], runs["done"]])
    assert (await new.check_replay(function="steady")).problems == []
    with pytest.raises(EngineError, match="not declared"):
        await new.check_replay(function="nope")

    patched = make_engine("versioned")
    versioned.declare(patched, "patched")
    assert (await patched.check_replay(since="7d")).ok

    assert await sql.fetchval("SELECT count(*) FROM engine.steps WHERE kind = 'patch'") == 0
    async with new.worker(poll_interval="50ms"):
        await move_clock(sql, timedelta(days=1))
        second = await new.wait_for_run(runs["second"], timeout=30)
        await eventually(lambda: _sleeping_at(new, runs["first"], "second"))
    assert second.status is RunStatus.FAILED
    assert second.error["type"] == "DeterminismError"
    assert second.error["message"] == problem.message
    first = await new.get_run(runs["first"])  # went on through the new step
    assert [s.step_id for s in first.steps] == ["a", "first", "b", "x", "second"]


async def test_check_replay_runs_no_step_and_writes_nothing(make_engine: Any, sql: Any) -> None:
    """The check reads: no step body runs (even at a run's frontier), no row changes."""
    app = make_engine()
    calls: list[str] = []

    def body(key: str) -> str:
        calls.append(key)
        return key

    @app.create_function("f", trigger=TriggerEvent("t/f"))
    async def f(ctx: Context) -> Any:
        await ctx.step.run("a", body, "a")
        await ctx.step.sleep("nap", "1h")
        await asyncio.gather(ctx.step.run("b", body, "b"), ctx.step.run("c", body, "c"))
        return "done"

    async with app.worker(poll_interval="50ms"):
        [event_id] = await app.send(Event(name="t/f"))
        run_id = await only_run_id(app, event_id)
        await eventually(lambda: _sleeping_at(app, run_id, "nap"))
    await move_clock(sql, timedelta(hours=1))  # due: the check replays up to b and c
    before = await sql.fetch("SELECT * FROM engine.steps ORDER BY step_key")
    runs_before = await sql.fetch("SELECT id, status, updated_at FROM engine.runs")
    report = await app.check_replay()
    assert report.ok and report.checked == 1
    assert calls == ["a"]
    assert await sql.fetch("SELECT * FROM engine.steps ORDER BY step_key") == before
    assert await sql.fetch("SELECT id, status, updated_at FROM engine.runs") == runs_before


async def test_engine_check_replay_command(
    make_engine: Any, sql: Any, database_url: str, tmp_path: Path
) -> None:
    """`engine check-replay module:app` lists the runs that would break with both step ids
    and exits 1; 0 for the patched code."""
    runs = await runs_in_flight(make_engine, sql)
    env = {"PYTHONPATH": str(APPS), "DATABASE_URL": database_url}
    broken = engine_command(
        "check-replay", "versioned:app", cwd=tmp_path, env={**env, "VERSIONED_CODE": "new"}
    )
    assert broken.returncode == 1, broken.stderr
    [line, message] = broken.stdout.strip().split("\n")
    assert line.split() == [
        runs["second"],
        "journey",
        "SLEEPING",
        "recorded",
        "'second',",
        "the",
        "code",
        "asks",
        "for",
        "'x'",
    ]
    assert "DeterminismError" not in message and "'x'" in message
    assert "3 run(s) replayed; 1 would fail" in broken.stderr
    fine = engine_command(
        "check-replay",
        "versioned:app",
        "--since",
        "7d",
        cwd=tmp_path,
        env={**env, "VERSIONED_CODE": "patched"},
    )
    assert fine.returncode == 0, fine.stderr
    assert fine.stdout == ""
    assert "4 run(s) replayed; no run would fail" in fine.stderr
    as_json = engine_command(
        "check-replay",
        "versioned:app",
        "--json",
        cwd=tmp_path,
        env={**env, "VERSIONED_CODE": "new"},
    )
    assert as_json.returncode == 1
    assert '"recorded_step": "second"' in as_json.stdout
    unknown = engine_command(
        "check-replay", "versioned:app", "--function", "nope", cwd=tmp_path, env=env
    )
    assert unknown.returncode == 2 and "not declared" in unknown.stderr
