"""Retention: the engine's throughput while a worker prunes a backlog of finished runs.

    python bench/prune.py [--finished 100000] [--baseline 20] [--batch 1000] [--pause 0.05]

Fills a database with `--finished` completed runs 40 days old (each with its event, its
engine/function.finished event, three steps and its execution; plus a tenth as many events
that started nothing), then runs a steady workload (one worker,
concurrency 50, a 3-step function, the backlog of queued events kept topped up) and measures
its steps/s: for `--baseline` seconds with pruning off, then while that worker, its retention
30 days, prunes the whole backlog in one pass (batches of `--batch` rows, a pause of at least
`--pause` s, else as long as the batch took, after each), then again without pruning. Prints
the figures and the ratio of the one while pruning to the mean of the two others,
how long the pass took and what it deleted, and writes them to bench/results/prune.json.
`--finished 1000000` is the README's figure (its fill takes a few minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).parent))

import core

from engine import Context, Engine, Event, TriggerEvent, Worker
from engine.db import Database
from engine.embedded import start
from engine.logs import configure_logging

FILL = """
INSERT INTO engine.events (id, name, data, ts, received_at)
SELECT 'old-' || g, 'old/event', jsonb_build_object('i', g), now() - interval '40 days',
       now() - interval '40 days'
FROM generate_series(1, $1) g;
INSERT INTO engine.runs (app_id, function_id, status, event_seq, dedupe_key, due_at, output,
                         created_at, started_at, ended_at, updated_at)
SELECT 'old-app', 'old-fn', 'COMPLETED', e.seq, 'event:' || e.seq, e.ts, '"done"', e.ts, e.ts,
       e.ts, e.ts
FROM engine.events e WHERE e.name = 'old/event';
INSERT INTO engine.events (id, name, data, ts, received_at)
SELECT r.id::text, 'engine/function.finished', jsonb_build_object('run_id', r.id), r.ended_at,
       r.ended_at
FROM engine.runs r WHERE r.app_id = 'old-app';
INSERT INTO engine.steps (run_id, step_key, position, kind, status, output, created_at, ended_at,
                          started_at, worker)
SELECT r.id, s.key, s.position, 'run', 'COMPLETED', '{"ok": true}', r.created_at, r.created_at,
       r.created_at, '00000000-0000-0000-0000-000000000001'
FROM engine.runs r, (VALUES ('a', 0), ('b', 1), ('c', 2)) AS s(key, position)
WHERE r.app_id = 'old-app';
INSERT INTO engine.run_executions (run_id, lease_token, worker, claimed_at, ended_at, outcome)
SELECT r.id, 1, '00000000-0000-0000-0000-000000000001', r.created_at, r.ended_at, 'COMPLETED'
FROM engine.runs r WHERE r.app_id = 'old-app';
INSERT INTO engine.events (id, name, data, ts, received_at)
SELECT 'unrouted-' || g, 'old/nobody', '{}', now() - interval '40 days', now() - interval '40 days'
FROM generate_series(1, $1 / 10) g;
ANALYZE;
"""
APP = "bench-prune"
BACKLOG = 1000  # queued events the sender keeps ahead of the worker


async def fill(url: str, finished: int) -> float:
    conn = await asyncpg.connect(url)
    begin = time.perf_counter()
    try:
        for statement in FILL.strip().split(";\n"):
            await conn.execute(statement.replace("$1", str(int(finished))))
    finally:
        await conn.close()
    return time.perf_counter() - begin


def workload(url: str, retention: str | None) -> Engine:
    app = Engine(APP, url, pool_size=20, retention=retention)

    @app.create_function("three-steps", trigger=TriggerEvent("bench/prune"))
    async def three_steps(ctx: Context) -> None:
        for name in ("a", "b", "c"):
            await ctx.step.run(name, lambda: None)

    return app


async def keep_fed(app: Engine, url: str) -> None:
    """Keeps about BACKLOG events queued: a steady load whatever the worker's pace (on a
    connection of its own: the measuring one is used meanwhile)."""
    conn = await asyncpg.connect(url)
    try:
        while True:
            queued = await conn.fetchval("SELECT count(*) FROM engine.event_queue")
            if queued < BACKLOG:
                await app.send([Event(name="bench/prune") for _ in range(BACKLOG - queued)])
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


async def stop_feeding(feeder: asyncio.Task[None]) -> None:
    """Stops the feeder; raises what stopped it if it died (the figures would be wrong)."""
    if feeder.done():
        feeder.result()
    feeder.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await feeder


async def completed(conn: asyncpg.Connection) -> int:
    query = "SELECT count(*) FROM engine.runs WHERE app_id = $1 AND status = 'COMPLETED'"
    count: int = await conn.fetchval(query, APP)
    return count


async def baseline(url: str, seconds: float) -> float:
    """Steps/s of the workload with pruning off, over ``seconds`` after a 3 s warm-up."""
    app = workload(url, None)
    conn = await asyncpg.connect(url)
    async with app.worker(concurrency=50):
        feeder = asyncio.create_task(keep_fed(app, url))
        await asyncio.sleep(3)
        before, began = await completed(conn), time.perf_counter()
        await asyncio.sleep(seconds)
        rate = 3 * (await completed(conn) - before) / (time.perf_counter() - began)
        await stop_feeding(feeder)
    await conn.close()
    await app.close()
    return rate


async def while_pruning(url: str, batch: int, pause: float) -> dict[str, Any]:
    """Steps/s of the same workload while its worker prunes the backlog in one pass."""
    app = workload(url, "30d")
    conn = await asyncpg.connect(url)
    worker = Worker(app, concurrency=50, prune_every="1h")
    assert worker.pruner is not None
    worker.pruner.batch, worker.pruner.pause = batch, pause
    task = asyncio.create_task(worker.run())
    await worker.started()
    feeder = asyncio.create_task(keep_fed(app, url))
    # the pass starts 10 s after the worker (warm-up included): measured from its turn
    turn = "SELECT owner FROM engine.pruner"
    while await conn.fetchval(turn) != worker.owner:  # noqa: ASYNC110 - polls the database
        await asyncio.sleep(0.01)
    before, began = await completed(conn), time.perf_counter()
    shown = began
    while worker.pruner.passes == 0 and not task.done():
        await asyncio.sleep(0.05)
        if time.perf_counter() - shown >= 10:
            shown = time.perf_counter()
            done = await completed(conn) - before
            print(f"  {shown - began:5.0f} s: {done:,} workload runs completed", flush=True)
    seconds = time.perf_counter() - began
    rate = 3 * (await completed(conn) - before) / seconds
    await stop_feeding(feeder)
    worker.stop()
    await task
    await conn.close()
    await app.close()
    return {"steps_per_s": rate, "prune_seconds": seconds, "deleted": worker.pruner.deleted}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--finished", type=int, default=100_000)
    parser.add_argument("--baseline", type=float, default=20.0)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--pause", type=float, default=0.05)
    args = parser.parse_args()
    configure_logging("warning")
    server, _server = start(Path(tempfile.mkdtemp(prefix="engine-bench-prune-")) / "pg")
    url = await core.fresh_database(server, "bench_prune")
    await Database(url).apply_schema()
    seconds = await fill(url, args.finished)
    print(f"filled {args.finished:,} finished runs (40 days old) in {seconds:.0f} s", flush=True)
    without = await baseline(url, args.baseline)
    print(f"without pruning: {without:,.0f} steps/s", flush=True)
    during = await while_pruning(url, args.batch, args.pause)
    rows = sum(during["deleted"].values())
    print(
        f"while pruning:   {during['steps_per_s']:,.0f} steps/s; the pass took"
        f" {during['prune_seconds']:.1f} s for {rows:,} rows"
        f" ({rows / during['prune_seconds']:,.0f} rows/s, steps not counted): {during['deleted']}",
        flush=True,
    )
    after = await baseline(url, args.baseline)
    ratio = during["steps_per_s"] / ((without + after) / 2)
    print(f"after pruning:   {after:,.0f} steps/s")
    print(f"ratio: while pruning / without (mean of before and after) = {ratio:.2f}")
    left = await asyncpg.connect(url)
    try:
        old = await left.fetchval("SELECT count(*) FROM engine.runs WHERE app_id = 'old-app'")
    finally:
        await left.close()
    print(f"old runs left: {old}")
    figures = {
        "without_steps_per_s": without,
        "after_steps_per_s": after,
        **during,
        "ratio": ratio,
        "old_runs_left": old,
    }
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    result = {**await core.environment(server), "args": vars(args), "figures": figures}
    (out / "prune.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
