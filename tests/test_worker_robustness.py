"""A worker never fights itself over a run, a blocked event loop or a hung step is bounded, and
shutdown always ends (#11)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from uuid import UUID

import asyncpg
from helpers import (
    APPS,
    eventually,
    log_events,
    move_clock,
    only_run_id,
    start_worker_process,
)

from engine import Context, Event, RunStatus, Timeouts, TriggerEvent


async def _lease_renewed(sql: Any, run_id: str) -> bool:
    """True once the run's lease runs past the durable clock again (renewed or re-claimed)."""
    return bool(
        await sql.fetchval(
            "SELECT lease_expires_at > engine.now() FROM engine.runs WHERE id = $1::uuid", run_id
        )
    )


async def test_a_worker_never_takes_over_its_own_executing_run(make_engine: Any, sql: Any) -> None:
    """The durable clock jumps past the lease of a run whose step is executing (a missed
    heartbeat looks the same): the worker's own claim must not take the run over from itself,
    and its heartbeat renews it; the step runs once and the run completes."""
    app = make_engine()
    gate = asyncio.Event()
    passes: Counter[str] = Counter()

    async def held() -> int:
        passes["held"] += 1
        await gate.wait()
        return 1

    @app.create_function("own", trigger=TriggerEvent("o/go"))
    async def own(ctx: Context) -> Any:
        await ctx.step.run("held", held)
        return await ctx.step.run("after", lambda: 2)

    async with app.worker(lease="900ms", poll_interval="20ms"):
        [event_id] = await app.send(Event(name="o/go"))
        run_id = await only_run_id(app, event_id)

        async def started() -> bool:
            return passes["held"] == 1

        await eventually(started)
        token = await sql.fetchval("SELECT lease_token FROM engine.runs WHERE id = $1", run_id)
        await move_clock(sql, timedelta(minutes=5))  # every lease has expired now
        await eventually(lambda: _lease_renewed(sql, run_id))
        gate.set()
        run = await app.wait_for_run(run_id)
    assert run.status is RunStatus.COMPLETED
    assert passes == {"held": 1}
    assert await sql.fetchval("SELECT lease_token FROM engine.runs WHERE id = $1", run_id) == token


def _worker_command(database_url: str) -> subprocess.CompletedProcess[str]:
    """`engine worker` as a supervisor starts it; it must end by itself, and soon."""
    return subprocess.run(
        [sys.executable, "-m", "engine", "worker", "graceful:app"],
        env={**os.environ, "DATABASE_URL": database_url, "PYTHONPATH": str(APPS)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_a_worker_without_the_schema_says_so_at_once(server_url: str) -> None:
    from conftest import with_database

    name = f"engine_no_schema_{os.getpid()}"
    admin = await asyncpg.connect(server_url)
    await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        result = await asyncio.to_thread(_worker_command, with_database(server_url, name))
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()
    assert result.returncode != 0
    assert "engine migrate" in result.stderr


async def test_a_worker_whose_database_refuses_connections_exits_at_once() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = await asyncio.to_thread(_worker_command, f"postgresql://u@127.0.0.1:{port}/db")
    assert result.returncode != 0
    assert "refused" in result.stderr.lower() or "connect" in result.stderr.lower()


async def test_hung_sync_steps_neither_freeze_others_nor_outlive_the_finish_timeout(
    make_engine: Any, sql: Any
) -> None:
    """Six sync steps that never return: the worker's other sync steps go on (its own pool,
    sized by concurrency); the finish timeout ends the hung runs CANCELLED while their step is
    still executing; what the abandoned threads return later is never recorded."""
    app = make_engine()
    release = threading.Event()

    def hang() -> str:
        release.wait()
        return "too late"

    @app.create_function("hung", trigger=TriggerEvent("h/hung"), timeouts=Timeouts(finish="1h"))
    async def hung(ctx: Context) -> Any:
        return await ctx.step.run("hang", hang)

    @app.create_function("quick", trigger=TriggerEvent("h/quick"))
    async def quick(ctx: Context) -> Any:
        return await ctx.step.run("sync", lambda: "done")

    try:
        async with app.worker(concurrency=8, lease="900ms", grace="300ms", poll_interval="50ms"):
            await app.send([Event(name="h/hung") for _ in range(6)])

            async def all_hanging() -> bool:
                return bool(
                    await sql.fetchval(
                        "SELECT count(*) = 6 FROM engine.runs WHERE function_id = 'hung'"
                        " AND status = 'RUNNING'"
                        " AND jsonb_array_length(engine.executing_steps(executing)) > 0"
                    )
                )

            await eventually(all_hanging)
            quick_ids = await app.send([Event(name="h/quick") for _ in range(5)])
            for event_id in quick_ids:
                [run] = await eventually(lambda e=event_id: app.runs_for_event(e))
                assert (await app.wait_for_run(run.run_id)).status is RunStatus.COMPLETED
            await move_clock(sql, timedelta(hours=2))  # past the hung runs' finish timeout
            hung_runs = await app.list_runs("hung")
            for run in hung_runs:
                ended = await app.wait_for_run(run.run_id)
                assert ended.status is RunStatus.CANCELLED
                assert ended.error is not None and "timeouts.finish" in ended.error["message"]
            release.set()  # the abandoned threads return now: nothing of theirs is recorded
            await eventually(lambda: _threads_idle(app))
    finally:
        release.set()
    assert not await sql.fetchval("SELECT count(*) FROM engine.steps WHERE step_key = 'hang'")


async def _threads_idle(app: Any) -> bool:
    return not any(t.name.startswith("engine-step") and _busy(t) for t in threading.enumerate())


def _busy(thread: threading.Thread) -> bool:
    frame = sys._current_frames().get(thread.ident or 0)
    return frame is not None and "hang" in {f.name for f in traceback.extract_stack(frame)}


async def test_a_stopping_worker_exits_within_grace_with_hung_sync_steps(
    make_engine: Any, sql: Any, database_url: str
) -> None:
    """SIGTERM with a 1 s grace while six sync steps never return: the process exits by
    itself, soon after the grace period (it used to wait forever for their threads), and hands
    the runs back."""
    worker = start_worker_process("hung:app", database_url, "--grace", "1s")
    try:
        sender = make_engine("hung")
        await sender.send([Event(name="hung/go") for _ in range(6)])

        async def hanging() -> bool:
            query = "SELECT count(*) = 6 FROM engine.runs WHERE status = 'RUNNING'"
            return bool(await sql.fetchval(query))

        await eventually(hanging, timeout=30)
        stopping = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(worker.wait, 1 + 10) == 0
        took = time.monotonic() - stopping
        print(f"\nSIGTERM with grace 1 s, 6 hung sync steps: exited after {took:.1f} s")
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    statuses = dict(await sql.fetch("SELECT status, count(*) FROM engine.runs GROUP BY 1"))
    assert statuses == {"QUEUED": 6}, statuses


async def test_a_step_blocking_the_loop_past_the_lease_is_retried_within_bounds(
    make_engine: Any, sql: Any, database_url: str, tmp_path: Path
) -> None:
    """An async step blocks its worker's event loop three times the lease, on two workers: each
    takeover counts as a failed attempt of the step (it used to re-execute without bound), so
    its `retries=1` ends the run FAILED with an error that says what happened; each worker
    logs `worker.loop_blocked` naming the step."""
    block_log = tmp_path / "executions"
    env = {"BLOCK_LOG": str(block_log), "BLOCK_SECONDS": "3"}
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    workers = [
        start_worker_process("blocking:app", database_url, "--lease", "1s", env=env, log=log)
        for log in logs
    ]
    try:
        sender = make_engine("blocking")
        [event_id] = await sender.send(Event(name="blocking/go"))
        run_id = await only_run_id(sender, event_id, timeout=30)
        run = await sender.wait_for_run(run_id, timeout=90)
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(timeout=30)
    assert run.status is RunStatus.FAILED
    assert run.error is not None
    assert "lost the run's lease while step 'block' was executing" in run.error["message"]
    # At most one takeover before the step was known to be executing, then one per attempt.
    history = [
        (
            x.number,
            x.worker[:4],
            x.taken_over,
            x.outcome,
            x.claimed_at.time(),
            x.ended_at and x.ended_at.time(),
        )
        for x in run.executions
    ]
    attempts = [
        (
            a.attempt,
            a.outcome,
            a.worker and a.worker[:4],
            a.started_at and a.started_at.time(),
            a.ended_at.time(),
        )
        for s in run.steps
        for a in s.attempts
    ]
    assert len(block_log.read_text().splitlines()) <= 1 + 2, (
        history,
        attempts,
        block_log.read_text(),
    )
    blocked = [entry for log in logs for entry in log_events(log, "worker.loop_blocked")]
    assert blocked and all(e["late_by"] > 1 for e in blocked)
    assert any(s["step_id"] == "block" for e in blocked for s in e["steps"])


def _story(run: Any) -> list[str]:
    """A run's executions and step attempts, in words, for an assertion's message."""
    story = [
        f"execution {x.number} on {x.worker[:8]} (taken over: {x.taken_over}) "
        f"{x.claimed_at:%H:%M:%S.%f} -> {x.outcome} {x.ended_at and f'{x.ended_at:%H:%M:%S.%f}'}"
        for x in run.executions
    ]
    story += [
        f"step {s.step_id} attempt {a.attempt} on {(a.worker or '?')[:8]} -> {a.outcome}"
        for s in run.steps
        for a in s.attempts
    ]
    return story


async def test_a_stale_heartbeat_never_hides_a_step_noted_since(make_engine: Any, sql: Any) -> None:
    """A heartbeat's report of the executing steps is taken before its round trip: one that
    arrives after a newer report (a step noted meanwhile) must not replace it, or a takeover
    would not count that step's attempt and would run it beyond its retries (CI saw a step
    blocking the loop run four times with retries=1)."""
    app = make_engine()
    entered, release = asyncio.Event(), asyncio.Event()

    async def held() -> str:
        entered.set()
        await release.wait()
        return "done"

    @app.create_function("held", trigger=TriggerEvent("t/held"))
    async def run_held(ctx: Context) -> Any:
        return await ctx.step.run("held", held)

    async with app.worker(lease="600ms") as worker:
        [event_id] = await app.send(Event(name="t/held"))
        run_id = await only_run_id(app, event_id)
        await asyncio.wait_for(entered.wait(), 10)
        noted = "SELECT engine.executing_steps(executing) FROM engine.runs WHERE id = $1::uuid"

        async def reported() -> bool:
            return '"held"' in (await sql.fetchval(noted, run_id) or "")

        await eventually(reported)
        token = await sql.fetchval(
            "SELECT lease_token FROM engine.runs WHERE id = $1::uuid", run_id
        )
        stale = f'{{"{run_id}": {{"token": {token}, "v": 0, "steps": []}}}}'
        renewed = await sql.fetch(
            "SELECT * FROM engine.heartbeat($1::uuid, '1 minute', ARRAY[$2::uuid], $3::jsonb)",
            worker.owner,
            run_id,
            stale,
        )
        assert len(renewed) == 1  # the lease was renewed...
        assert '"held"' in await sql.fetchval(noted, run_id)  # ...and the step is still noted
        # nor does a report of an earlier execution of the run (its blocked loop let the lease
        # expire, and the worker took the run back since), however many changes it counted
        older = f'{{"{run_id}": {{"token": {token - 1}, "v": 99, "steps": []}}}}'
        await sql.fetch(
            "SELECT * FROM engine.heartbeat($1::uuid, '1 minute', ARRAY[$2::uuid], $3::jsonb)",
            worker.owner,
            run_id,
            older,
        )
        assert '"held"' in await sql.fetchval(noted, run_id)
        release.set()
        assert (await app.wait_for_run(run_id)).status is RunStatus.COMPLETED


async def test_a_heartbeat_never_calls_lost_a_run_claimed_again_during_its_round_trip(
    make_engine: Any, sql: Any, database_url: str
) -> None:
    """A heartbeat is about the executions it saw when it left. If one of them ended while the
    beat was in flight and the run was claimed again (a short sleep, a wait that timed out),
    the database may have seen the run between the two claims, unleased: the beat must not
    mark the *new* execution lost (CI saw a late write refused with no lease lost)."""
    app = make_engine()
    entered, release = asyncio.Event(), asyncio.Event()

    async def held() -> str:
        entered.set()
        await release.wait()
        return "done"

    @app.create_function("held", trigger=TriggerEvent("t/held"))
    async def run_held(ctx: Context) -> Any:
        return await ctx.step.run("held", held)

    # A lease of a minute: no heartbeat of the worker's own runs during the test.
    async with app.worker(lease="1m") as worker:
        [event_id] = await app.send(Event(name="t/held"))
        run_id = await only_run_id(app, event_id)
        await asyncio.wait_for(entered.wait(), 10)
        key = UUID(run_id)
        executing = worker.executions[key]
        locker = await asyncpg.connect(database_url)
        try:
            async with locker.transaction():
                await locker.execute("SELECT 1 FROM engine.runs WHERE id = $1 FOR UPDATE", key)
                beat = asyncio.create_task(worker._renew_leases())

                async def beat_waits() -> bool:
                    return bool(
                        await sql.fetchval(
                            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                            " AND query LIKE '%heartbeat%'"
                        )
                    )

                await eventually(beat_waits)
                # The execution the beat saw ends, and the run is between two claims when the
                # beat reaches it; a new execution of the run has started in the worker.
                newer = SimpleNamespace(lost=False)
                worker.executions[key] = newer  # type: ignore[assignment]
                await locker.execute("UPDATE engine.runs SET lease_owner = NULL WHERE id = $1", key)
            await beat
            assert newer.lost is False
        finally:
            await locker.execute(
                "UPDATE engine.runs SET lease_owner = $2 WHERE id = $1", key, worker.owner
            )
            await locker.close()
            worker.executions[key] = executing
        release.set()
        assert (await app.wait_for_run(run_id)).status is RunStatus.COMPLETED
