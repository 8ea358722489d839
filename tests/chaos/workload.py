"""The chaos workload's setup and checks, shared by the fault scenarios."""

from __future__ import annotations

import os
import subprocess
from typing import Any

LONG = os.environ.get("CHAOS_LONG") == "1"


def runs_to_send(short: int, long: int) -> int:
    """How many runs a scenario sends: CHAOS_RUNS, else the long or the short default."""
    return int(os.environ.get("CHAOS_RUNS", str(long if LONG else short)))


def stop(workers: list[subprocess.Popen[bytes]]) -> None:
    """Stops worker processes (SIGTERM: they hand their runs back) and waits for them."""
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.wait(timeout=30)


async def prepare(sql: Any) -> None:
    """The tables the workload's steps write their side effects to."""
    await sql.execute("CREATE TABLE chaos_log (run_id text, step text)")
    await sql.execute("CREATE TABLE chaos_once (key text PRIMARY KEY)")


async def unfinished(sql: Any) -> bool:
    """True while some event is unrouted or some run has not ended."""
    return bool(
        await sql.fetchval(
            "SELECT count(*) FROM engine.runs WHERE status NOT IN ('COMPLETED', 'FAILED')"
        )
        or await sql.fetchval("SELECT count(*) FROM engine.event_queue")
        or not await sql.fetchval("SELECT count(*) FROM engine.runs")
    )


async def check(sql: Any, runs: int, label: str) -> None:
    """Every run completed once, each step recorded once, every side effect at least once and
    exactly once where keyed; prints the figures docs/reliability.md reports."""
    statuses = dict(await sql.fetch("SELECT status, count(*) FROM engine.runs GROUP BY 1"))
    effects = await sql.fetchval("SELECT count(*) FROM chaos_log")
    distinct = await sql.fetchval("SELECT count(DISTINCT (run_id, step)) FROM chaos_log")
    once = await sql.fetchval("SELECT count(*) FROM chaos_once")
    steps = await sql.fetch(
        "SELECT r.id, count(s.*) AS n FROM engine.runs r LEFT JOIN engine.steps s"
        " ON s.run_id = r.id AND s.status = 'COMPLETED' GROUP BY r.id"
    )
    print(
        f"\n{label}; statuses {statuses}; side effects {effects} for {distinct} needed"
        f" ({effects - distinct} repeated: at least once), {once} keyed (exactly once)"
    )
    assert statuses == {"COMPLETED": runs}, statuses  # no run lost, none failed
    assert all(row["n"] == 5 for row in steps)  # 3 effects, the wait, the nap: each once
    assert distinct == 3 * runs  # every side effect happened at least once
    assert once == 3 * runs  # and exactly once where the step's idempotency key was used
    wrong = await sql.fetchval("SELECT count(*) FROM engine.runs WHERE output::text <> '\"done\"'")
    assert wrong == 0
