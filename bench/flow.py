"""What flow control costs the claim and the routing transaction, measured in SQL.

    python bench/flow.py [--runs 2000] [--batch 50] [--repeat 3]

For each configuration, a fresh database holds `--runs` queued runs of one function; the figure
is the time of one `engine.claim_runs` call taking `--batch` of them (one round trip, so this is
the claim's whole cost), the median over the calls that drain the queue. Admission (rate limit,
idempotency, singleton, debounce) is measured on `engine.create_runs` for batches of 200 events.
Writes bench/results/flow.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).parent))

import core

from engine.db import Database, schema_sql
from engine.embedded import start

# name -> (concurrency slots of each run, throttle of each run); {i} is the run's index
CLAIMS: dict[str, tuple[Any, Any]] = {
    "no limits": (None, None),
    "concurrency, 1 slot (not full)": ([{"slot": "fn:a/f", "cap": 10**6}], None),
    "concurrency, 2 slots keyed (not full)": (
        [{"slot": "app:a|{k}", "cap": 10**6}, {"slot": "fn:a/f", "cap": 10**6}],
        None,
    ),
    "concurrency, fifo keyed (not full)": (
        [{"slot": "fn:a/f|{k}", "cap": 10**6, "fifo": True}],
        None,
    ),
    "throttle (never delaying)": (None, {"key": "a/f", "interval": 0.000001, "burst": 10**6}),
}

# name -> extra fields of every create_runs entry; {k} is a key among 100
ADMISSIONS: dict[str, dict[str, Any]] = {
    "no admission control": {},
    "idempotency": {"idempotency_key": "a/f|{i}"},
    "rate limit (never full)": {"rate_key": "a/f|{k}", "rate_limit": 10**6, "rate_period": 60},
    "singleton (skip)": {"singleton_key": "a/f|{i}", "singleton_mode": "skip"},
    "debounce": {"debounce_key": "a/f|{i}", "debounce_period": 1, "debounce_timeout": None},
}


def fill(value: Any, i: int) -> Any:
    return json.loads(json.dumps(value).replace("{i}", str(i)).replace("{k}", str(i % 100)))


async def fresh(admin: asyncpg.Connection, url: str, name: str) -> asyncpg.Connection:
    await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    await admin.execute(f"CREATE DATABASE {name} TEMPLATE bench_template")
    return await asyncpg.connect(url.replace("/postgres?", f"/{name}?"))


async def claim_cost(conn: asyncpg.Connection, runs: int, batch: int, config: Any) -> float:
    slots, throttle = config
    events = await conn.fetch(
        "SELECT engine.send_events($1::jsonb) AS id", json.dumps([{"name": "b"}] * runs)
    )
    assert len(events) == runs
    await conn.execute("DELETE FROM engine.event_queue")
    await conn.execute(
        "INSERT INTO engine.runs (app_id, function_id, status, event_seq, due_at, concurrency,"
        " throttle, created_at, updated_at)"
        " SELECT 'a', 'f', 'QUEUED', e.seq, now(), ($1::jsonb) -> (e.seq % $3)::int,"
        " $2::jsonb, now(), now() FROM engine.events e",
        None if slots is None else json.dumps([fill(slots, k) for k in range(100)]),
        None if throttle is None else json.dumps(throttle),
        100,
    )
    owner, timings = uuid.uuid4(), []
    while True:
        begin = time.perf_counter()
        got = await conn.fetch(
            "SELECT id FROM engine.claim_runs('a', '{f}', $1, '30s', $2)", owner, batch
        )
        timings.append((time.perf_counter() - begin) * 1000)
        if not got:
            break
    return statistics.median(timings[:-1])


async def admission_cost(conn: asyncpg.Connection, runs: int, extra: dict[str, Any]) -> float:
    timings = []
    for offset in range(0, runs, 200):
        await conn.fetch("SELECT engine.send_events($1::jsonb)", json.dumps([{"name": "b"}] * 200))
        seqs = [r["seq"] for r in await conn.fetch("SELECT seq FROM engine.event_queue")]
        plan = [
            {
                "app_id": "a",
                "function_id": "f",
                "event_seq": s,
                "claim": False,
                **fill(extra, offset + n),
            }
            for n, s in enumerate(seqs)
        ]
        begin = time.perf_counter()
        async with conn.transaction():
            await conn.fetch(
                "SELECT id FROM engine.create_runs($1, $2::jsonb, $3, '30s')",
                seqs,
                json.dumps(plan),
                uuid.uuid4(),
            )
        timings.append((time.perf_counter() - begin) * 1000 / len(seqs))
    return statistics.median(timings)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    url, _server = start(Path(tempfile.mkdtemp(prefix="engine-bench-")) / "pg")
    await Database(url).apply_schema()
    admin = await asyncpg.connect(url)
    await admin.execute("DROP DATABASE IF EXISTS bench_template WITH (FORCE)")
    await admin.execute("CREATE DATABASE bench_template")
    template = await asyncpg.connect(url.replace("/postgres?", "/bench_template?"))
    await template.execute(schema_sql())
    await template.execute("INSERT INTO engine.functions (app_id, function_id) VALUES ('a', 'f')")
    await template.close()
    figures: dict[str, Any] = {"claim_ms_per_batch": {}, "create_ms_per_run": {}}
    for name, config in CLAIMS.items():
        samples = []
        for _ in range(args.repeat):
            conn = await fresh(admin, url, "bench_flow")
            samples.append(await claim_cost(conn, args.runs, args.batch, config))
            await conn.close()
        figures["claim_ms_per_batch"][name] = summary(samples)
        print(f"claim of {args.batch}: {name:<40} {figures['claim_ms_per_batch'][name]}")
    for name, extra in ADMISSIONS.items():
        samples = []
        for _ in range(args.repeat):
            conn = await fresh(admin, url, "bench_flow")
            samples.append(await admission_cost(conn, args.runs, extra))
            await conn.close()
        figures["create_ms_per_run"][name] = summary(samples)
        print(f"create_runs, per run: {name:<32} {figures['create_ms_per_run'][name]}")
    await admin.close()
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    result = {**await core.environment(url), "args": vars(args), "figures": figures}
    (out / "flow.json").write_text(json.dumps(result, indent=2))


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(samples), 3),
        "min": round(min(samples), 3),
        "max": round(max(samples), 3),
    }


if __name__ == "__main__":
    asyncio.run(main())
