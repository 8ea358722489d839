"""What a run writes: the WAL records of the throughput scenario, per run, by table or index and
by record type (issue #17: what bounds throughput, shown rather than estimated).

    python bench/wal_census.py [--runs 3000] [--processes 1 2 4]

Each WAL record is work the server does for a run (a heap tuple written, an index entry
inserted, a row lock taken) on top of the floor's one insert and commit. On a fresh embedded
server (fsync and synchronous_commit on):

1. the scenario of ``bench/ratios.py --runs N`` (N three-step runs, one worker in this process,
   concurrency 50), between two WAL positions read with ``pg_current_wal_insert_lsn()``; the
   records in between, counted with ``pg_walinspect`` by type (``pg_get_wal_stats``) and by the
   relation each touched block belongs to (``pg_get_wal_block_info``: a record that touches two
   blocks, an UPDATE that moved its row to another page, counts once for each);
2. the same N runs executed by 1, 2 ... ``engine worker`` processes (``--processes``): WAL
   records and multixacts per run. Row locks taken by overlapping transactions on one row (a
   run's end locks the row of the ``engine/function.finished`` event name in share mode) create
   multixacts, which the server must eventually freeze like transaction ids.

Prints the tables and writes bench/results/wal_census.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).parent))
from core import (
    environment,
    fresh_database,
    scratch_server,
    send_until_completed,
    worker_processes,
)
from ratios import engine_throughput

from engine.db import schema_sql

SHOWN = 40  # rows of the per-relation table


async def _schema_database(server: str, name: str) -> str:
    url = await fresh_database(server, name)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(schema_sql())
    finally:
        await conn.close()
    return url


async def census(server: str, runs: int) -> dict[str, Any]:
    """WAL records per run of the in-process throughput scenario, by type and by relation."""
    url = await _schema_database(server, "wal_census")
    admin = await asyncpg.connect(server)
    try:
        await admin.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        await admin.execute("CHECKPOINT")  # full-page images then come from the scenario only
        start = await admin.fetchval("SELECT pg_current_wal_insert_lsn()")
        figures = await engine_throughput(url, runs)
        end = await admin.fetchval("SELECT pg_current_wal_insert_lsn()")
        by_type = await admin.fetch(
            'SELECT "resource_manager/record_type" AS type, count, record_size, fpi_size'
            " FROM pg_get_wal_stats($1, $2, true) WHERE count > 0 ORDER BY count DESC",
            start,
            end,
        )
        by_block = await admin.fetch(
            "SELECT relfilenode, resource_manager || '/' || record_type AS type, count(*) AS n"
            " FROM pg_get_wal_block_info($1, $2) GROUP BY 1, 2 ORDER BY 3 DESC",
            start,
            end,
        )
    finally:
        await admin.close()
    conn = await asyncpg.connect(url)
    try:
        names = dict(await conn.fetch("SELECT relfilenode::oid, relname FROM pg_class"))
    finally:
        await conn.close()
    return {
        **figures,
        "records_per_run": sum(r["count"] for r in by_type) / runs,
        "bytes_per_run": sum(r["record_size"] + r["fpi_size"] for r in by_type) / runs,
        "by_type": [
            {"type": r["type"], "per_run": r["count"] / runs, "bytes": r["record_size"] / runs}
            for r in by_type
        ],
        "by_relation": [
            {
                "relation": names.get(r["relfilenode"], str(r["relfilenode"])),
                "type": r["type"],
                "per_run": r["n"] / runs,
            }
            for r in by_block
        ],
    }


async def _multixact_and_lsn(admin: asyncpg.Connection) -> tuple[int, int]:
    """The next multixact id (as of a checkpoint taken now) and the WAL insert position."""
    await admin.execute("CHECKPOINT")
    multixact = await admin.fetchval(
        "SELECT next_multixact_id::text::bigint FROM pg_control_checkpoint()"
    )
    return multixact, await admin.fetchval("SELECT pg_current_wal_insert_lsn()")


async def processes(server: str, runs: int, count: int) -> dict[str, float]:
    """Multixacts and WAL records per run with ``count`` worker processes (the records counted
    in the WAL itself: pg_stat_wal lags by the backends' statistics flush)."""
    url = await _schema_database(server, f"wal_processes_{count}")
    admin = await asyncpg.connect(server)
    conn = await asyncpg.connect(url)
    try:
        async with worker_processes(url, count):
            multixact_before, start = await _multixact_and_lsn(admin)
            elapsed = await send_until_completed(url, conn, runs)
            # Counted before the checkpoint that reads the multixacts: a checkpoint may remove
            # the WAL segments the records are in.
            end = await admin.fetchval("SELECT pg_current_wal_insert_lsn()")
            records = await admin.fetchval(
                "SELECT sum(count)::bigint FROM pg_get_wal_stats($1, $2)", start, end
            )
            multixact_after, _ = await _multixact_and_lsn(admin)
    finally:
        await conn.close()
        await admin.close()
    return {
        "processes": count,
        "runs_per_s": runs / elapsed,
        "multixacts_per_run": (multixact_after - multixact_before) / runs,
        "wal_records_per_run": records / runs,
    }


def print_census(result: dict[str, Any]) -> None:
    print(
        f"\n{result['records_per_run']:.1f} WAL records and {result['bytes_per_run']:.0f} bytes"
        f" a run ({result['steps_per_s']:.0f} steps/s while counted)\n"
    )
    print("| record type | per run | bytes per run |\n|---|---|---|")
    for row in result["by_type"]:
        if row["per_run"] >= 0.01:
            print(f"| {row['type']} | {row['per_run']:.2f} | {row['bytes']:.0f} |")
    print("\n| relation | record type | blocks touched per run |\n|---|---|---|")
    for row in result["by_relation"][:SHOWN]:
        print(f"| {row['relation']} | {row['type']} | {row['per_run']:.2f} |")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3000)
    parser.add_argument("--processes", type=int, nargs="*", default=[1, 2, 4])
    args = parser.parse_args()
    with scratch_server("engine-wal-") as server:
        result: dict[str, Any] = {**await environment(server)}
        result["census"] = await census(server, args.runs)
        print_census(result["census"])
        result["processes"] = []
        if args.processes:
            print("\n| worker processes | runs/s | multixacts per run | WAL records per run |")
            print("|---|---|---|---|")
        for count in args.processes:
            row = await processes(server, args.runs, count)
            result["processes"].append(row)
            print(
                f"| {count} | {row['runs_per_s']:.0f} | {row['multixacts_per_run']:.3f}"
                f" | {row['wal_records_per_run']:.1f} |",
                flush=True,
            )
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "wal_census.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
