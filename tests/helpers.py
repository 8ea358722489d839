"""Helpers shared by the tests."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg

from engine import Backoff, Engine

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


async def only_run_id(engine: Engine, event_id: str, timeout: float = 10.0) -> str:
    """The id of the single run an event started (waits for routing)."""

    async def runs() -> Any:
        return await engine.runs_for_event(event_id)

    found = await eventually(runs, timeout)
    assert len(found) == 1, found
    return str(found[0].run_id)


APPS = Path(__file__).parent / "apps"
EXAMPLES = Path(__file__).parent.parent / "examples"


def run_engine_dev(example: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    """Runs `engine dev examples/EXAMPLE` as a newcomer would: embedded PostgreSQL, no URL."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "engine",
            "--log-level",
            "warning",
            "dev",
            str(EXAMPLES / example),
            "--data-dir",
            str(data_dir / "pg"),
            "--poll-interval",
            "200ms",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=data_dir,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "DATABASE_URL"},
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
    """The lines of a worker's JSON log whose event is ``event``."""
    if not log.exists():
        return []
    lines = (line for line in log.read_text().splitlines() if line.startswith("{"))
    return [entry for entry in map(json.loads, lines) if entry.get("event") == event]


def max_overlap(intervals: list[tuple[Any, Any]]) -> int:
    """The most intervals open at the same instant (an end at t closes before a start at t)."""
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    open_now = peak = 0
    for _, delta in points:
        open_now += delta
        peak = max(peak, open_now)
    return peak
