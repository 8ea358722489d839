"""Scale: the core scenarios with a million finished runs in the tables, against an empty one.

    python bench/scale.py [--finished 1000000] [--runs 4000] [--events 300] [--repeat 3]

Fills one database with `--finished` completed runs (with their events and three steps each),
then measures event -> first step latency and 3-step throughput there and in an empty database
on the same server, alternating, and prints the ratios. Writes bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).parent))

import core

from engine.db import Database
from engine.embedded import start
from engine.logs import configure_logging

FILL = """
INSERT INTO engine.events (id, name, data, ts, received_at)
SELECT 'old-' || g, 'old/event', jsonb_build_object('i', g), now() - interval '1 day',
       now() - interval '1 day'
FROM generate_series(1, $1) g;
INSERT INTO engine.runs (app_id, function_id, status, event_seq, dedupe_key, due_at, output,
                         created_at, started_at, ended_at, updated_at)
SELECT 'old-app', 'old-fn', 'COMPLETED', e.seq, 'event:' || e.seq, e.ts, '"done"', e.ts, e.ts,
       e.ts, e.ts
FROM engine.events e WHERE e.name = 'old/event';
INSERT INTO engine.steps (run_id, step_key, position, kind, status, output, created_at, ended_at)
SELECT r.id, s.key, s.position, 'run', 'COMPLETED', '{"ok": true}', r.created_at, r.created_at
FROM engine.runs r, (VALUES ('a', 0), ('b', 1), ('c', 2)) AS s(key, position)
WHERE r.app_id = 'old-app';
ANALYZE;
"""


async def make_database(url: str, name: str) -> str:
    target = await core.fresh_database(url, name)
    await Database(target).apply_schema()
    return target


async def fill(url: str, finished: int) -> float:
    conn = await asyncpg.connect(url)
    begin = time.perf_counter()
    try:
        for statement in FILL.strip().split(";\n"):
            if "$1" in statement:
                await conn.execute(statement, finished)
            else:
                await conn.execute(statement)
    finally:
        await conn.close()
    return time.perf_counter() - begin


async def measure(url: str, events: int, runs: int) -> dict[str, float]:
    latency = await core.latency(url, events)
    throughput = await core.throughput(url, runs)
    return {
        "latency_p50_ms": latency["p50_ms"],
        "latency_p99_ms": latency["p99_ms"],
        "runs_per_s": throughput["runs_per_s"],
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--finished", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=4000)
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    configure_logging("warning")
    url, _server = start(Path(tempfile.mkdtemp(prefix="engine-scale-")) / "pg")
    empty = await make_database(url, "bench_empty")
    full = await make_database(url, "bench_full")
    seconds = await fill(full, args.finished)
    print(f"filled {args.finished} finished runs (and 3x steps) in {seconds:.0f} s", flush=True)
    samples: dict[str, list[dict[str, float]]] = {"empty": [], "full": []}
    for _ in range(args.repeat):
        for name, target in (("empty", empty), ("full", full)):
            samples[name].append(await measure(target, args.events, args.runs))
            print(name, json.dumps(samples[name][-1]), flush=True)
    figures: dict[str, Any] = {name: core.summarize(s) for name, s in samples.items()}
    for key in ("latency_p50_ms", "latency_p99_ms", "runs_per_s"):
        a, b = figures["full"][key]["median"], figures["empty"][key]["median"]
        label = f"{args.finished:,} finished"
        print(f"{key:<16} empty {b:9.2f}   {label} {a:9.2f}   ratio {a / b:.2f}")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    result = {**await core.environment(url), "args": vars(args), "figures": figures}
    (out / "scale.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
