"""Helpers shared by the tests."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg

from engine import (
    Backoff,
    Concurrency,
    Context,
    Engine,
    Event,
    NonRetriableError,
    RunInfo,
    RunStatus,
    Throttle,
    TriggerEvent,
)

# Retries a test can wait for: the real default waits seconds to an hour.
FAST = Backoff(initial="20ms", maximum="100ms", jitter=0.0)


async def move_clock(conn: asyncpg.Connection, by: timedelta) -> None:
    """Moves the engine's durable clock forward (sleeps, backoffs and due events see it)."""
    await conn.execute("UPDATE engine.clock SET offset_by = offset_by + $1", by)


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 10.0) -> Any:
    """Polls ``check`` until it returns something truthy; fails the test after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {check}")
        await asyncio.sleep(0.02)


async def status_is(app: Engine, run_id: str, status: RunStatus) -> bool:
    """Whether run ``run_id`` has ``status`` now (for :func:`eventually`)."""
    return (await app.get_run(run_id)).status is status


async def only_run_id(engine: Engine, event_id: str, timeout: float = 10.0) -> str:
    """The id of the single run an event started (waits for routing)."""

    async def runs() -> Any:
        return await engine.runs_for_event(event_id)

    found = await eventually(runs, timeout)
    assert len(found) == 1, found
    return str(found[0].run_id)


_scratch: list[Path] = []


def record_queries(db: Any) -> list[tuple[str, tuple[Any, ...]]]:
    """Records the named queries an engine's Database runs from now on (``db.fetch``, and
    ``db.fetch_on`` for held round trips), with their arguments, in the list returned."""
    calls: list[tuple[str, tuple[Any, ...]]] = []
    fetch, fetch_on = db.fetch, db.fetch_on

    async def recorded(query: str, *args: Any, **kwargs: Any) -> Any:
        calls.append((query, args))
        return await fetch(query, *args, **kwargs)

    async def recorded_on(conn: Any, query: str, args: tuple[Any, ...]) -> Any:
        calls.append((query, args))
        return await fetch_on(conn, query, args)

    db.fetch, db.fetch_on = recorded, recorded_on
    return calls


def scratch_root() -> Path:
    """This test session's folder for data directories (servers, engine dev states): the
    session-finish check in conftest.py fails the run if anything is left in it, or if a
    process still runs from it."""
    if not _scratch:
        _scratch.append(Path(tempfile.mkdtemp(prefix="engine-tests-")))
    return _scratch[0]


def scratch_dir(prefix: str) -> Path:
    """A new folder in :func:`scratch_root`; the test that asks for it removes it."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=scratch_root()))


def remove_folder(path: Path) -> None:
    """Deletes ``path`` and everything in it; what is left, the session's leak check names."""
    shutil.rmtree(path, ignore_errors=True)


APPS = Path(__file__).parent / "apps"
EXAMPLES = Path(__file__).parent.parent / "examples"


def run_engine_dev(example: str, folder: Path) -> subprocess.CompletedProcess[str]:
    """Runs `engine dev examples/EXAMPLE` in ``folder`` as a newcomer would: embedded
    PostgreSQL in ./.engine, no URL."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "engine",
            "--log-level",
            "warning",
            "dev",
            str(EXAMPLES / example),
            "--poll-interval",
            "200ms",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=folder,
        check=False,
        env=dev_environment(),
    )


def start_worker_process(
    target: str,
    database_url: str,
    *options: str,
    env: dict[str, str] | None = None,
    log: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Starts `engine worker TARGET` (an app under tests/apps) as a separate process; its log
    (JSON lines) goes to ``log`` if given."""
    environment = {
        **os.environ,
        "DATABASE_URL": database_url,
        "PYTHONPATH": str(APPS),
        **(env or {}),
    }
    stderr = log.open("ab") if log is not None else None
    try:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "engine",
                "worker",
                target,
                "--poll-interval",
                "100ms",
                *options,
            ],
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=stderr or subprocess.DEVNULL,
        )
    finally:
        if stderr is not None:
            stderr.close()  # the child has its own copy


def log_events(log: Path, event: str) -> list[dict[str, Any]]:
    """The lines of a worker's JSON log whose event is ``event`` (complete lines only: the
    worker may be writing the last one as it is read)."""
    if not log.exists():
        return []
    complete = log.read_text().rpartition("\n")[0].split("\n")
    lines = (line for line in complete if line.startswith("{"))
    return [entry for entry in map(json.loads, lines) if entry.get("event") == event]


def max_overlap(intervals: list[tuple[Any, Any]]) -> int:
    """The most intervals open at the same instant (an end at t closes before a start at t)."""
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    open_now = peak = 0
    for _, delta in points:
        open_now += delta
        peak = max(peak, open_now)
    return peak


def engine_command(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Runs the real `engine` command (no $DATABASE_URL unless ``env`` gives one)."""
    return subprocess.run(
        [sys.executable, "-m", "engine", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        check=False,
        env={**dev_environment(), **(env or {})},
    )


def start_engine_dev(
    target: Path, cwd: Path, *options: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """Starts `engine dev TARGET` in ``cwd`` as a separate process (stdout, stderr piped)."""
    return subprocess.Popen(
        [sys.executable, "-m", "engine", "dev", str(target), "--poll-interval", "200ms", *options],
        cwd=cwd,
        env={**dev_environment(), "PYTHONUNBUFFERED": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def dev_environment() -> dict[str, str]:
    """The environment of a newcomer's shell: no $DATABASE_URL (nor $ENGINE_SCHEMA)."""
    unset = ("DATABASE_URL", "ENGINE_LOG_LEVEL", "ENGINE_SCHEMA")
    return {k: v for k, v in os.environ.items() if k not in unset}


def wait_until(check: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    """Polls ``check`` (synchronous) until it returns something truthy; fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what or check}")
        time.sleep(0.02)
    return result


async def run_in_worker_process(
    target: str,
    database_url: str,
    make_engine: Any,
    event: Event,
    *,
    env: dict[str, str] | None = None,
    exit_within: float = 30,
    log: Path | None = None,
) -> tuple[RunInfo, int]:
    """Runs `engine worker TARGET` (an app under tests/apps), sends ``event`` from an Engine of
    the same app id, waits for the run it starts to end, stops the worker with SIGTERM and
    returns the run and the worker's exit code (the worker must exit within ``exit_within``
    seconds); the worker's log goes to ``log`` if given."""
    worker = start_worker_process(target, database_url, env=env, log=log)
    try:
        app = make_engine(_app_id(target))
        [event_id] = await app.send(event)

        async def routed() -> Any:
            return await app.runs_for_event(event_id)

        [run] = await eventually(routed, timeout=30)
        run = await app.wait_for_run(run.run_id, timeout=30)
    finally:
        worker.terminate()
        code = worker.wait(timeout=exit_within)
    return run, code


def _app_id(target: str) -> str:
    """The app id of an app under tests/apps: its module's name, with dashes ("traced_app:app"
    -> "traced-app")."""
    return target.partition(":")[0].replace("_", "-")


async def run_traced_worker(
    database_url: str, make_engine: Any, env: dict[str, str], exit_within: float = 30
) -> tuple[str, int]:
    """Runs tests/apps/traced_app.py's function under `engine worker` with ``env`` (see
    run_in_worker_process): the run id and the worker's exit code."""
    run, code = await run_in_worker_process(
        "traced_app:app",
        database_url,
        make_engine,
        Event(name="traced/go"),
        env={"OTEL_BSP_SCHEDULE_DELAY": "50", **env},
        exit_within=exit_within,
    )
    return str(run.run_id), code


def shop(app: Engine) -> None:
    """Two functions: ``pack`` (x/pack) completes; ``bill`` (x/bill) fails when told to."""

    @app.create_function("pack", trigger=TriggerEvent("x/pack"))
    async def pack(ctx: Context) -> str:
        return "packed"

    @app.create_function(
        "bill",
        trigger=TriggerEvent("x/bill"),
        concurrency=Concurrency(limit=3, key="event.data.user"),
        throttle=Throttle(limit=10, period="1m"),
    )
    async def bill(ctx: Context) -> str:
        if ctx.event.data.get("fail"):
            raise NonRetriableError("card declined")
        return "billed"


async def finished(app: Engine, events: list[Event]) -> list[str]:
    """Sends ``events`` and waits for the run of ``app`` each starts to end; their run ids."""
    run_ids = []
    for event_id in await app.send(events):
        runs = await app.runs_for_event(event_id, at_least=1)
        [run] = [run for run in runs if run.app_id == app.app_id]
        await app.wait_for_run(run.run_id)
        run_ids.append(run.run_id)
    return run_ids
