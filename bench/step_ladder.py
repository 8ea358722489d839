"""What a step costs, rung by rung, from PostgreSQL's commit to the engine's step, in one run
(issue #17: what bounds the step goal, measured rather than estimated).

    python bench/step_ladder.py [--repeat 5] [--steps 3000]

Every rung is one client committing N transactions back to back on one connection, against a
run that a worker of this process holds leased (its first step waits until the end):

1. floor: an INSERT of a small JSON row (bench/ratios.py's commit floor);
2. step row: the same step as an ``engine.steps`` row, ``INSERT ... ON CONFLICT`` (its primary
   key, its foreign key to the run), plain SQL with typed parameters;
3. lease-guarded: the same INSERT and the lease check that guards every write of a worker (the
   run's row locked ``FOR KEY SHARE``), one statement: what the durability rules ask of a step;
4. ``engine.checkpoint_completed``: what a worker sends for a step that goes alone (typed);
5. ``engine.checkpoint_many``: the JSON form, sent when other runs' writes go with it;
6. the engine's step: one run of N trivial sequential steps (bench/ratios.py's step), whose
   extra over rung 4 is the worker's Python (its CPU per step is printed too).

For rungs 1-5, the server backend's CPU per transaction is read from /proc (the server must run
on this machine: the embedded one by default). Each repeat measures every rung on a fresh
database; the table gives medians with min and max, and each ratio to the floor is taken within
its repeat. The figures go to bench/results/step_ladder.json too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).parent))
from core import environment, fresh_database
from ratios import STEP_ROW, _step_table, engine_steps

from engine import Context, Engine, Event, TriggerEvent
from engine.db import Database
from engine.embedded import _stop_postmaster, data_directory, start
from engine.records import StepKind, StepRecord, StepStatus

TICKS = os.sysconf("SC_CLK_TCK")
OUTPUT = '{"ok": true}'

STEP_ROW_SQL = """
INSERT INTO engine.steps AS s (run_id, step_key, position, kind, status, attempts, output,
                               created_at, ended_at, step_id, follows, bytes, started_at, worker)
VALUES ($1, $2, 0, 'run', 'COMPLETED', 1, $3::jsonb, now(), now(), $2, '>0', 12, now(), $4)
ON CONFLICT (run_id, step_key) DO UPDATE SET status = excluded.status
    WHERE s.status NOT IN ('COMPLETED', 'FAILED')
"""

LEASE_GUARDED_SQL = """
WITH lease AS (
    SELECT 1 FROM engine.runs r
    WHERE r.id = $1 AND r.lease_owner = $4 AND r.lease_token = $5 AND r.status = 'RUNNING'
    FOR KEY SHARE
)
INSERT INTO engine.steps AS s (run_id, step_key, position, kind, status, attempts, output,
                               created_at, ended_at, step_id, follows, bytes, started_at, worker)
SELECT $1, $2, 0, 'run', 'COMPLETED', 1, $3::jsonb, now(), now(), $2, '>0', 12, now(), $4
FROM lease
ON CONFLICT (run_id, step_key) DO UPDATE SET status = excluded.status
    WHERE s.status NOT IN ('COMPLETED', 'FAILED')
"""


def backend_cpu(pid: int) -> float:
    """CPU seconds (user + system) of one server backend so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def record(key: str) -> StepRecord:
    """A completed step's record, as a worker makes it."""
    now = datetime.now(UTC)
    return StepRecord(
        key, 0, StepKind.RUN, StepStatus.COMPLETED, step_id=key, follows=">0",
        started_at=now, ended_at=now,
    )  # fmt: skip


class Rungs:
    """The SQL rungs, on one connection, against one leased run."""

    def __init__(self, conn: asyncpg.Connection, run: uuid.UUID, owner: uuid.UUID, token: int):
        self.conn, self.run, self.owner, self.token = conn, run, owner, token
        self.count = 0

    def key(self) -> str:
        self.count += 1
        return f"s{self.count}"

    async def floor(self) -> None:
        await self.conn.execute("INSERT INTO floor_steps (v) VALUES ($1::jsonb)", STEP_ROW)

    async def step_row(self) -> None:
        await self.conn.execute(STEP_ROW_SQL, self.run, self.key(), OUTPUT, self.owner)

    async def lease_guarded(self) -> None:
        args = (self.run, self.key(), OUTPUT, self.owner, self.token)
        await self.conn.execute(LEASE_GUARDED_SQL, *args)

    async def checkpoint_completed(self) -> None:
        step = record(self.key()).completed_args(OUTPUT)
        assert step is not None
        result = await self.conn.fetchval(
            "SELECT engine.checkpoint_completed($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9, $10,"
            " $11, $12, $13::jsonb)",
            self.run, self.owner, self.token, *step,
        )  # fmt: skip
        assert result == "ok", result

    async def checkpoint_many(self) -> None:
        steps = record(self.key()).to_json(OUTPUT)
        lease = f'"run":"{self.run}","owner":"{self.owner}","token":{self.token}'
        item = f'[{{{lease},"steps":[{steps}]}}]'
        [row] = await self.conn.fetch("SELECT result FROM engine.checkpoint_many($1::jsonb)", item)
        assert row["result"] == "ok", row["result"]


async def measure(pid: int, steps: int, rung: Callable[[], Awaitable[None]]) -> tuple[float, float]:
    """(wall ms, server backend CPU ms) per transaction of ``rung``."""
    cpu, began = backend_cpu(pid), time.perf_counter()
    for _ in range(steps):
        await rung()
    wall = (time.perf_counter() - began) * 1000 / steps
    return wall, (backend_cpu(pid) - cpu) * 1000 / steps


async def sql_rungs(url: str, steps: int) -> dict[str, float]:
    """Rungs 1-5, against a run held by a worker of this process."""
    app = Engine("ladder", url)
    leased, release = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        leased.set()
        await release.wait()

    @app.create_function("held", trigger=TriggerEvent("ladder/hold"))
    async def held(ctx: Context) -> None:
        await ctx.step.run("hold", hold)

    figures: dict[str, float] = {}
    async with app.worker():
        await app.send(Event(name="ladder/hold"))
        conn = await asyncpg.connect(url)
        try:
            await _step_table(conn)
            await asyncio.wait_for(leased.wait(), 60)
            lease = await conn.fetchrow(
                "SELECT id, lease_owner, lease_token FROM engine.runs WHERE status = 'RUNNING'"
            )
            assert lease is not None
            rungs = Rungs(conn, lease["id"], lease["lease_owner"], lease["lease_token"])
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            for name in ("floor", "step_row", "lease_guarded", "checkpoint_completed",
                         "checkpoint_many"):  # fmt: skip
                wall, cpu = await measure(pid, steps, getattr(rungs, name))
                figures[f"{name}_ms"], figures[f"{name}_server_cpu_ms"] = wall, cpu
        finally:
            release.set()
            await conn.close()
    await app.close()
    return figures


async def one_repeat(server: str, index: int, steps: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    for name, job in (("sql", sql_rungs), ("step", engine_steps)):
        url = await fresh_database(server, f"ladder_{name}_{index}")
        await Database(url).apply_schema()
        figures.update(await job(url, steps))
    return figures


RUNGS = [
    ("floor", "floor: INSERT of a small JSON row"),
    ("step_row", "the step's row (engine.steps), typed SQL"),
    ("lease_guarded", "lease-guarded: lease check + the step's row"),
    ("checkpoint_completed", "engine.checkpoint_completed (typed, alone)"),
    ("checkpoint_many", "engine.checkpoint_many (JSON, batched form)"),
    ("step", "the engine's step (one run, sequential)"),
]

Column = Callable[[dict[str, float], str], float | None]


def figure(suffix: str, per: str | None = None) -> Column:
    """A column: a rung's figure ``{rung}{suffix}``, as a ratio to the floor's ``per`` if
    given; None where the rung has no such figure."""

    def value(repeat: dict[str, float], name: str) -> float | None:
        found = repeat.get(f"{name}{suffix}")
        return found if found is None or per is None else found / repeat[per]

    return value


def print_ladder(
    repeats: list[dict[str, float]], rungs: list[tuple[str, str]], unit: str,
    columns: dict[str, Column],
) -> None:  # fmt: skip
    """Prints a ladder's table: each rung's time and its ratio to the floor, then ``columns``,
    as medians with min and max over the repeats."""

    def spread(values: list[float]) -> str:
        return f"{statistics.median(values):.3f} ({min(values):.3f} - {max(values):.3f})"

    columns = {f"ms per {unit}": figure("_ms"), "/ floor": figure("_ms", "floor_ms"), **columns}
    print(f"\n{len(repeats)} repeats; median (min - max)\n")
    print("| rung | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, label in rungs:
        cells = []
        for column in columns.values():
            values = [v for repeat in repeats if (v := column(repeat, name)) is not None]
            cells.append(spread(values) if values else "-")
        print(f"| {label} | " + " | ".join(cells) + " |")


def report(repeats: list[dict[str, float]]) -> None:
    columns = {"server CPU ms": figure("_server_cpu_ms"), "client CPU ms": figure("_cpu_ms")}
    print_ladder(repeats, RUNGS, "step", columns)


def ladder_main(
    name: str,
    doc: str | None,
    count: tuple[str, int],
    one: Callable[[str, int, int], Awaitable[dict[str, float]]],
    show: Callable[[list[dict[str, float]]], None],
) -> None:
    """A ladder's command: ``--repeat`` repeats of ``one`` (server URL, index, the count of
    ``--{count[0]}``) on a scratch embedded server; prints each repeat and then ``show``'s
    table, and writes the repeats to bench/results/{name}.json."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(f"--{count[0]}", type=int, default=count[1], dest="count", metavar="N")
    args = parser.parse_args()
    asyncio.run(_run_ladder(name, args.repeat, args.count, one, show))


async def _run_ladder(
    name: str,
    repeat: int,
    count: int,
    one: Callable[[str, int, int], Awaitable[dict[str, float]]],
    show: Callable[[list[dict[str, float]]], None],
) -> None:
    scratch = Path(tempfile.mkdtemp(prefix=f"engine-{name}-"))
    server = start(scratch / "pg")[0]
    try:
        repeats: list[dict[str, float]] = []
        for index in range(repeat):
            repeats.append(await one(server, index, count))
            print(f"repeat {index + 1}: {repeats[-1]}", flush=True)
        show(repeats)
        out = Path(__file__).parent / "results"
        out.mkdir(exist_ok=True)
        result = {**await environment(server), "repeats": repeats}
        (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    finally:
        _stop_postmaster(data_directory(scratch / "pg"))
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    ladder_main("step_ladder", __doc__, ("steps", 3000), one_repeat, report)
