"""What a send costs the server, rung by rung, from PostgreSQL's INSERT to the engine's start, in
one run (issue #17: what bounds the start goal, measured rather than estimated).

    python bench/send_ladder.py [--repeat 5] [--sends 2000]

Every SQL rung is one client committing N transactions back to back on one connection (each
commit waits for its WAL flush, as a send's does), one event of one small JSON object each:

1. floor: an INSERT of a small JSON row (bench/ratios.py's commit floor);
2. the event's rows: the event in ``engine.events`` and its place on the routing queue
   (``engine.event_queue``), one statement of typed SQL: what storing an event asks of the
   tables;
3. ``engine.send_events``: a send from a process without a worker (the event checked, stored
   and queued, the routers woken);
4. the run's row: a run in ``engine.runs``, leased, one statement of typed SQL: what a run asks
   of the tables when it is created;
5. ``engine.send_and_route``: a send in a worker's process, which stores the event and routes
   it in the same transaction to a run leased to the caller (one plain trigger);
6. the engine's start: ``app.send()`` called until the first step's callable runs
   (bench/ratios.py's start, p50), the worker in the same process.

For rungs 1-5, the server backend's CPU per transaction is read from /proc (the server must run
on this machine: the embedded one by default). Each repeat measures every rung on a fresh
database; the table gives medians with min and max, and each ratio to the floor is taken within
its repeat. The figures go to bench/results/send_ladder.json too.
"""

from __future__ import annotations

import itertools
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).parent))
from core import fresh_database
from ratios import STEP_ROW, _step_table, engine_start
from step_ladder import figure, ladder_main, measure, print_ladder

from engine import Context, Engine, TriggerEvent
from engine.db import Database
from engine.serialization import dumps

APP, FUNCTION, NAME = "ladder", "started", "ladder/start"
LEASE = timedelta(hours=1)  # no worker runs while the rungs do: nothing takes the runs over

EVENT_ROWS_SQL = """
WITH event AS (
    INSERT INTO engine.events (id, name, data, ts, received_at)
    VALUES (gen_random_uuid()::text, $1, $2::jsonb, now(), now())
    RETURNING seq
)
INSERT INTO engine.event_queue (seq, due_at) SELECT seq, now() FROM event
"""

RUN_ROW_SQL = """
INSERT INTO engine.runs (id, app_id, function_id, status, event_seq, dedupe_key, due_at,
                         lease_owner, lease_token, lease_expires_at, created_at, started_at,
                         updated_at, rank_at)
VALUES (gen_random_uuid(), $1, $2, 'RUNNING', $3, $4, now(), $5, 1, now() + $6::interval,
        now(), now(), now(), now())
"""


class Rungs:
    """The SQL rungs, on one connection, with one registered function triggered by NAME."""

    def __init__(self, conn: asyncpg.Connection, version: int, event_seq: int) -> None:
        self.conn, self.version, self.event_seq = conn, version, event_seq
        self.owner = uuid.uuid4()
        self.count = itertools.count()
        self.triggers = dumps([{"app_id": APP, "function_id": FUNCTION, "event": NAME,
                                "local": True}])  # fmt: skip

    def events(self) -> str:
        return dumps([{"name": NAME, "data": {"i": next(self.count)}}])

    async def floor(self) -> None:
        await self.conn.execute("INSERT INTO floor_steps (v) VALUES ($1::jsonb)", STEP_ROW)

    async def event_rows(self) -> None:
        await self.conn.execute(EVENT_ROWS_SQL, NAME, dumps({"i": next(self.count)}))

    async def send_events(self) -> None:
        await self.conn.fetch("SELECT engine.send_events($1::jsonb)", self.events())

    async def run_row(self) -> None:
        dedupe = f"ladder:{next(self.count)}"
        args = (APP, FUNCTION, self.event_seq, dedupe, self.owner, LEASE)
        await self.conn.execute(RUN_ROW_SQL, *args)

    async def send_and_route(self) -> None:
        rows = await self.conn.fetch(
            "SELECT id FROM engine.send_and_route($1::jsonb, NULL, $2::jsonb, '{}'::text[], $3,"
            " $4, $5, $6, 1)",
            self.events(), self.triggers, self.version, APP, self.owner, LEASE,
        )  # fmt: skip
        assert [row["id"] is not None for row in rows] == [False, True], "not routed here"


async def sql_rungs(url: str, sends: int) -> dict[str, float]:
    """Rungs 1-5, with the function registered by a worker that has stopped since."""
    app = Engine(APP, url)

    @app.create_function(FUNCTION, trigger=TriggerEvent(NAME))
    async def started(ctx: Context) -> None:
        return None

    async with app.worker():
        pass  # registers the function and its trigger
    await app.close()
    conn = await asyncpg.connect(url)
    try:
        await _step_table(conn)
        version = int(await conn.fetchval(
            "SELECT value FROM engine.meta WHERE key = 'registry_version'"))  # fmt: skip
        seq = await conn.fetchval(
            "INSERT INTO engine.events (id, name, data, ts, received_at)"
            " VALUES ('ladder-runs', $1, '{}', now(), now()) RETURNING seq",
            NAME,
        )
        rungs = Rungs(conn, version, seq)
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        figures: dict[str, float] = {}
        for name, _ in RUNGS[:-1]:
            wall, cpu = await measure(pid, sends, getattr(rungs, name))
            figures[f"{name}_ms"], figures[f"{name}_server_cpu_ms"] = wall, cpu
        return figures
    finally:
        await conn.close()


async def one_repeat(server: str, index: int, sends: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    url = await fresh_database(server, f"send_ladder_sql_{index}")
    await Database(url).apply_schema()
    figures.update(await sql_rungs(url, sends))
    url = await fresh_database(server, f"send_ladder_start_{index}")
    await Database(url).apply_schema()
    figures["start_ms"] = (await engine_start(url, min(sends, 500)))["start_p50_ms"]
    return figures


RUNGS = [
    ("floor", "floor: INSERT of a small JSON row"),
    ("event_rows", "the event's rows (engine.events, engine.event_queue), typed SQL"),
    ("send_events", "engine.send_events (stored, queued, routers woken)"),
    ("run_row", "the run's row (engine.runs, leased), typed SQL"),
    ("send_and_route", "engine.send_and_route (stored and routed to a run leased here)"),
    ("start", "the engine's start: app.send() -> first step, p50"),
]


def report(repeats: list[dict[str, float]]) -> None:
    columns = {
        "server CPU ms": figure("_server_cpu_ms"),
        "/ floor's server CPU": figure("_server_cpu_ms", "floor_server_cpu_ms"),
    }
    print_ladder(repeats, RUNGS, "send", columns)


if __name__ == "__main__":
    ladder_main("send_ladder", __doc__, ("sends", 2000), one_repeat, report)
