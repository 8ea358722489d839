"""The chaos workload's setup and checks, shared by the fault scenarios."""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import asyncpg
from helpers import eventually, log_events, start_worker_process

from engine import Engine, Event
from engine.events import MAX_EVENTS_PER_SEND

LONG = os.environ.get("CHAOS_LONG") == "1"
PATIENCE = 900 if LONG else 150  # seconds a scenario keeps injecting faults, at most


def runs_to_send(short: int, long: int) -> int:
    """How many runs a scenario sends: CHAOS_RUNS, else the long or the short default."""
    return int(os.environ.get("CHAOS_RUNS", str(long if LONG else short)))


class Workers:
    """Worker processes of the chaos app, each logging to a file of its own, from which the
    test learns its owner id (the `lease_owner` of the runs it holds) and what it reported."""

    def __init__(
        self,
        url: str,
        directory: Path,
        count: int,
        *options: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.url, self.directory, self.options, self.env = url, directory, options, env
        self.started = 0
        self.processes: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        for _ in range(count):
            process, log = self._start()
            self.processes.append(process)
            self.logs.append(log)

    def _start(self) -> tuple[subprocess.Popen[bytes], Path]:
        self.started += 1
        log = self.directory / f"worker-{self.started}.log"
        process = start_worker_process(
            "chaos_app:app", self.url, *self.options, env=self.env, log=log
        )
        return process, log

    def restart(self, index: int) -> None:
        """Starts a new process in place of `index` (after it was killed)."""
        self.processes[index], self.logs[index] = self._start()

    async def running(self, index: int) -> None:
        """Returns once worker `index` runs (has logged its owner id). A scenario that kills
        workers waits for this between kills: on a loaded machine a process can take longer to
        start than the pause between two kills, and a workload whose workers never start
        makes no progress at all."""

        async def has_owner() -> bool:
            return self.owner(index) is not None

        await eventually(has_owner, timeout=120)

    def owner(self, index: int) -> str | None:
        """The owner id of worker `index`, or None if it has not started yet."""
        started = log_events(self.logs[index], "worker.started")
        return started[-1]["owner"] if started else None

    async def all_started(self, patience: float = 60.0) -> None:
        """Waits until every process has started (its log says so): a signal sent before
        then would hit a process that has not installed the workload's handlers yet."""
        deadline = time.monotonic() + patience
        while any(self.owner(i) is None for i in range(len(self.processes))):
            assert time.monotonic() < deadline, "the workers did not start"
            await asyncio.sleep(0.05)

    def events(self, event: str) -> list[dict[str, Any]]:
        """What every process so far logged under ``event``."""
        logs = sorted(self.directory.glob("worker-*.log"))
        return [entry for log in logs for entry in log_events(log, event)]

    def late_writes_refused(self) -> int:
        """How many writes every process so far made without its lease (and had refused)."""
        return len(self.events("run.lease_lost"))

    def stop(self) -> None:
        stop(self.processes)


async def send_runs(url: str, runs: int, name: str = "chaos/go") -> None:
    """Sends the events that start the workload's runs."""
    sender = Engine("chaos", url)
    try:
        for offset in range(0, runs, MAX_EVENTS_PER_SEND):
            count = min(MAX_EVENTS_PER_SEND, runs - offset)
            await sender.send([Event(name=name) for _ in range(count)])
    finally:
        await sender.close()


async def under_way(sql: Any, began: float) -> bool:
    """True while the workload is unfinished, for at most PATIENCE seconds from ``began``."""
    return time.monotonic() - began < PATIENCE and await unfinished(sql)


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
    await sql.execute(
        "CREATE TABLE chaos_spans (run_id text, step text, started float8, ended float8)"
    )


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


class Recovery:
    """Time to recover from each fault: how long until every run that was executing when the
    fault hit (RUNNING) has moved again: recorded another step, or left RUNNING (finished,
    slept, waited, or was handed to a worker that did). A run held by a dead or paused worker
    moves only once another worker takes it over, so this is what a user waits at worst.
    """

    POLL = 0.05  # the resolution of the figures, in seconds

    def __init__(self, url: str) -> None:
        self.url = url
        self.times: list[float] = []
        self.stalled: list[int] = []  # how many runs were in flight at each fault
        self._watches: set[asyncio.Task[None]] = set()

    async def fault(
        self, sql: Any, *, began: float | None = None, owner: str | None = None
    ) -> None:
        """Notes the runs in flight (through `sql`), those of worker ``owner`` if given (the one
        the fault hit), and times their recovery in the background.

        Call it right after injecting the fault, or before with ``began`` when the database
        will be unreachable (a restart): the clock then runs from ``began``.
        """
        began = time.monotonic() if began is None else began
        rows = await sql.fetch(
            "SELECT r.id, count(s.run_id) AS steps FROM engine.runs r"
            " LEFT JOIN engine.steps s ON s.run_id = r.id"
            " WHERE r.status = 'RUNNING' AND ($1::uuid IS NULL OR r.lease_owner = $1)"
            " GROUP BY r.id",
            owner,
        )
        if not rows:
            return
        ids, steps = [row["id"] for row in rows], [row["steps"] for row in rows]
        self.stalled.append(len(rows))
        watch = asyncio.create_task(self._watch(ids, steps, began))
        self._watches.add(watch)
        watch.add_done_callback(self._watches.discard)

    async def _watch(self, ids: list[Any], steps: list[int], began: float) -> None:
        conn = None
        while time.monotonic() - began < 300:
            try:
                conn = conn or await asyncpg.connect(self.url)
                still = await conn.fetchval(
                    "SELECT count(*) FROM unnest($1::uuid[], $2::bigint[]) AS f(id, steps)"
                    " JOIN engine.runs r USING (id) WHERE r.status = 'RUNNING'"
                    " AND (SELECT count(*) FROM engine.steps s WHERE s.run_id = f.id) = f.steps",
                    ids,
                    steps,
                )
                if still == 0:
                    self.times.append(time.monotonic() - began)
                    break
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                conn = None  # the server is restarting: try again
            await asyncio.sleep(self.POLL)
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def wait(self) -> None:
        """Waits for the watches still running (every run ends, so each one finishes)."""
        await asyncio.gather(*self._watches)

    def summary(self) -> str:
        """The figures docs/reliability.md reports."""
        if not self.times:
            return "time to recover: no run was in flight at any fault"
        median = statistics.median
        return (
            f"time to recover, over the {len(self.times)} faults that hit runs in flight (median"
            f" {median(self.stalled):.0f}): median {median(self.times):.2f} s,"
            f" max {max(self.times):.2f} s"
        )
