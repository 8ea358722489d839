"""What the metrics' database gauges cost: one snapshot query, with a million finished runs.

    python bench/gauges.py [--finished 1000000] [--unfinished 10000] [--repeat 20]

Fills a database with `--finished` completed runs and `--unfinished` runs spread over the
unfinished states and flow-control reasons, then times `engine.take_gauges` (the scan one worker
makes per metrics interval for the whole database) and, as the floor, `SELECT 1` on the same
server, and prints medians and the plan.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).parent))

import core

from engine.db import Database
from engine.embedded import start

FILL = """
INSERT INTO engine.events (id, name, data, ts, received_at)
SELECT 'old-' || g, 'old/event', '{}', now() - interval '1 day', now() - interval '1 day'
FROM generate_series(1, $1) g;
INSERT INTO engine.runs (app_id, function_id, status, event_seq, dedupe_key, due_at, output,
                         created_at, started_at, ended_at, updated_at)
SELECT 'old-app', 'fn-' || (e.seq % 20), 'COMPLETED', e.seq, 'event:' || e.seq, e.ts, '"done"',
       e.ts, e.ts, e.ts, e.ts
FROM engine.events e WHERE e.name = 'old/event';
INSERT INTO engine.events (id, name, data, ts, received_at)
SELECT 'live-' || g, 'live/event', '{}', now(), now() FROM generate_series(1, $2) g;
INSERT INTO engine.runs (app_id, function_id, status, event_seq, dedupe_key, due_at, blocked_on,
                         created_at, updated_at)
SELECT 'live-app', 'fn-' || (e.seq % 20),
       (ARRAY['QUEUED', 'SLEEPING', 'RETRYING', 'WAITING', 'RUNNING'])[1 + e.seq % 5],
       e.seq, 'event:' || e.seq, now() - (e.seq % 100) * interval '1 second',
       CASE WHEN e.seq % 7 = 0 THEN 'slot' END, e.ts, e.ts
FROM engine.events e WHERE e.name = 'live/event';
ANALYZE;
"""


async def measure(url: str, finished: int, unfinished: int, repeat: int) -> None:
    target = await core.fresh_database(url, "bench_gauges")
    await Database(target).apply_schema()
    conn = await asyncpg.connect(target)
    try:
        begin = time.perf_counter()
        fill = FILL.replace("$1", str(int(finished))).replace("$2", str(int(unfinished)))
        await conn.execute(fill)
        print(
            f"filled {finished:,} finished and {unfinished:,} unfinished runs in "
            f"{time.perf_counter() - begin:.1f} s"
        )
        gauges, floor = [], []
        for _ in range(repeat):
            gauges.append(await _timed(conn, "SELECT engine.take_gauges(engine.now())"))
            floor.append(await _timed(conn, "SELECT 1"))
        rows = len(json.loads(await conn.fetchval("SELECT engine.take_gauges(engine.now())")))
        plan = await conn.fetch(
            "EXPLAIN SELECT count(*) FROM engine.runs r WHERE r.status IN "
            "('QUEUED', 'SLEEPING', 'RETRYING', 'WAITING') OR r.status = 'RUNNING'"
        )
    finally:
        await conn.close()
    g, f = statistics.median(gauges), statistics.median(floor)
    print(
        f"take_gauges: {g * 1000:.2f} ms median ({rows} gauge rows); "
        f"SELECT 1: {f * 1000:.3f} ms; ratio {g / f:.0f}x"
    )
    print("plan:\n  " + "\n  ".join(r[0] for r in plan))


async def _timed(conn: asyncpg.Connection, query: str) -> float:
    begin = time.perf_counter()
    await conn.fetchval(query)
    return time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--finished", type=int, default=1_000_000)
    parser.add_argument("--unfinished", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    url, _server = start(tempfile.mkdtemp(prefix="engine-bench-gauges-"))
    asyncio.run(measure(url, args.finished, args.unfinished, args.repeat))


if __name__ == "__main__":
    main()
