"""What `engine runs list` and `engine events list` cost, with a million runs in the tables.

    python bench/listing.py [--runs 1000000] [--repeat 20]

Fills a database with `--runs` finished runs (20 functions, 5 event names, one in 50 failed) and
their events, then times pages of 20 through the public API (`Engine.list_run_summaries`,
`Engine.list_events`): the first page, the page after 100,000 runs reached by its keyset cursor,
filtered pages, and, for comparison, the same deep page by OFFSET. Prints medians and plans.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).parent))

import core

from engine import Engine
from engine.cursors import event_cursor, run_cursor
from engine.db import Database

FILL = """
INSERT INTO engine.events (id, name, data, ts, received_at)
SELECT 'ev-' || g, 'order/' || (g % 5), {data}, t, t
FROM generate_series(1, $1) g, LATERAL (SELECT now() - (($1 - g) * interval '10 ms') AS t) x;
INSERT INTO engine.runs (app_id, function_id, status, event_seq, dedupe_key, due_at, output,
                         error, created_at, started_at, ended_at, updated_at)
SELECT 'shop', 'fn-' || (e.seq % 20), CASE WHEN e.seq % 50 = 0 THEN 'FAILED' ELSE 'COMPLETED' END,
       e.seq, 'event:' || e.seq, e.ts, '"done"', NULL, e.ts, e.ts, e.ts + interval '5 ms', e.ts
FROM engine.events e;
ANALYZE;
"""
DEEP = 100_000


async def fill(conn: asyncpg.Connection, runs: int, data: str = "'{}'") -> None:
    """``runs`` finished runs of 20 functions (one in 50 FAILED), created 10 ms apart until
    now, each with its event (5 names; ``data``: an SQL expression of ``g``, the event's
    number, for its data), then ANALYZE."""
    await conn.execute(FILL.replace("$1", str(int(runs))).replace("{data}", data))


async def measure(url: str, runs: int, repeat: int) -> None:
    target = await core.fresh_database(url, "bench_listing")
    await Database(target).apply_schema()
    conn = await asyncpg.connect(target)
    app = Engine("bench", target)
    try:
        begin = time.perf_counter()
        await fill(conn, runs)
        print(f"filled {runs:,} runs and events in {time.perf_counter() - begin:.1f} s")
        deep = await conn.fetchrow(
            "SELECT created_at, id FROM engine.runs ORDER BY created_at DESC, id DESC"
            f" OFFSET {DEEP - 1} LIMIT 1"
        )
        cursor = run_cursor(deep["created_at"], str(deep["id"]))
        seq = await conn.fetchval(f"SELECT seq FROM engine.events ORDER BY seq DESC OFFSET {DEEP}")
        cases: dict[str, Callable[[], Awaitable[Any]]] = {
            "runs: first page": lambda: app.list_run_summaries(all_apps=True, limit=20),
            f"runs: page after {DEEP:,} (cursor)": lambda: app.list_run_summaries(
                all_apps=True, limit=20, cursor=cursor
            ),
            "runs: one function": lambda: app.list_run_summaries("fn-7", all_apps=True, limit=20),
            "runs: FAILED": lambda: app.list_run_summaries(
                status="FAILED", all_apps=True, limit=20
            ),
            "runs: one event name": lambda: app.list_run_summaries(
                event_name="order/3", all_apps=True, limit=20
            ),
            "events: first page": lambda: app.list_events(limit=20),
            f"events: page after {DEEP:,} (cursor)": lambda: app.list_events(
                limit=20, cursor=event_cursor(seq)
            ),
            f"runs: page after {DEEP:,} (OFFSET, for comparison)": lambda: conn.fetch(
                "SELECT r.id FROM engine.runs r JOIN engine.events e ON e.seq = r.event_seq"
                f" ORDER BY r.created_at DESC, r.id DESC OFFSET {DEEP} LIMIT 20"
            ),
        }
        await app.list_run_summaries(limit=1)  # connect and register outside the timings
        for name, case in cases.items():
            times = [await _timed(case) for _ in range(repeat)]
            print(f"{name:<45} {statistics.median(times) * 1000:8.2f} ms median")
        plan = await conn.fetch(
            "EXPLAIN " + _listing_query(), None, None, None, None, None, None, None, None, 21
        )
        print("plan of runs list:\n  " + "\n  ".join(r[0] for r in plan))
    finally:
        await app.close()
        await conn.close()


def _listing_query() -> str:
    from engine.db import queries

    return queries()["run_summaries"]


async def _timed(action: Callable[[], Awaitable[Any]]) -> float:
    begin = time.perf_counter()
    await action()
    return time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    with core.scratch_server("engine-bench-listing-") as url:
        asyncio.run(measure(url, args.runs, args.repeat))


if __name__ == "__main__":
    main()
