"""Worker processes: how 3-step throughput grows from 1 to 4 `engine worker` processes, and why.

    python bench/processes.py [--max 4] [--runs 4000] [--repeat 2]

For N = 1 .. `--max` (interleaved, `--repeat` rounds), starts N `engine worker` processes of
bench/throughput_app.py (concurrency 50 each) on one embedded server (fsync and
synchronous_commit on), sends `--runs` events (batches of 1,000) and times until every run
completed. Over that window it records where the time went:

- CPU seconds of the worker processes and of the PostgreSQL server (postmaster, backends,
  WAL writer, checkpointer: every process of the server), from /proc through psutil, per run;
  and the machine's CPU busy share (/proc/stat: other users' processes included);
- the server's commits, WAL records and bytes (pg_stat_database, pg_stat_wal) and WAL writes
  and fsyncs (pg_stat_io), per run;
- what the backends of the database were doing, sampled every 20 ms from pg_stat_activity:
  running, or waiting (on the client, a lock, WAL I/O...), as shares of the samples.

Prints a table and writes bench/results/processes.json. Stops its server and its workers and
removes its data folder when it ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import psutil

sys.path.insert(0, str(Path(__file__).parent))

import core

from engine.db import Database
from engine.embedded import data_directory
from engine.logs import configure_logging

APP = core.PROCESSES_APP


def server_processes(url: str) -> list[psutil.Process]:
    """Every process of the embedded server of ``url``: the postmaster and its children."""
    folder = Path(url.split("host=", 1)[1].split("&", 1)[0])
    pid = int((data_directory(folder.parent) / "postmaster.pid").read_text().split("\n", 1)[0])
    postmaster = psutil.Process(pid)
    return [postmaster, *postmaster.children(recursive=True)]


def cpu_seconds(processes: list[psutil.Process]) -> dict[int, float]:
    """User + system CPU seconds of each process still alive, by pid."""
    seconds = {}
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            seconds[process.pid] = times.user + times.system
    return seconds


def used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two readings (a process born since counts from zero)."""
    return sum(value - before.get(pid, 0.0) for pid, value in after.items())


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine so far (/proc/stat)."""
    with open("/proc/stat") as stat:
        fields = [float(x) for x in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


SERVER_COUNTERS = """
SELECT (SELECT xact_commit FROM pg_stat_database
        WHERE datname = current_database())::float8 AS commits,
       (SELECT wal_records FROM pg_stat_wal)::float8 AS wal_records,
       (SELECT wal_bytes FROM pg_stat_wal)::float8 AS wal_bytes,
       (SELECT coalesce(sum(writes), 0)::float8 FROM pg_stat_io WHERE object = 'wal') AS wal_writes,
       (SELECT coalesce(sum(fsyncs), 0)::float8 FROM pg_stat_io WHERE object = 'wal') AS wal_fsyncs
"""

ACTIVITY = """
SELECT coalesce(wait_event_type || ':' || wait_event,
                CASE WHEN state = 'active' THEN 'running' ELSE state END) AS doing
FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'
"""


async def sample_activity(conn: asyncpg.Connection[Any], seen: Counter[str]) -> None:
    """Counts what the database's backends do, every 20 ms, until cancelled."""
    while True:
        for row in await conn.fetch(ACTIVITY):
            seen[row["doing"]] += 1
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def workers(url: str, count: int) -> AsyncIterator[list[psutil.Process]]:
    """``count`` worker processes, started and registered; stopped after the block."""
    async with core.worker_processes(url, count) as started:
        yield [psutil.Process(w.pid) for w in started]


async def one_run(url: str, count: int, runs: int) -> dict[str, float]:
    """The 3-step workload on ``count`` worker processes, and where its time went."""
    conn = await asyncpg.connect(url)
    await conn.execute("DELETE FROM engine.runs WHERE app_id = $1", APP)
    async with workers(url, count) as processes:
        server = server_processes(url)
        cpu = (cpu_seconds(processes), cpu_seconds(server), machine_busy())
        counters = dict(await conn.fetchrow(SERVER_COUNTERS))
        seen: Counter[str] = Counter()
        watcher = await asyncpg.connect(url)
        sampling = asyncio.create_task(sample_activity(watcher, seen))
        elapsed = await core.send_until_completed(url, conn, runs)
        sampling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampling
        after = dict(await conn.fetchrow(SERVER_COUNTERS))
        worker_cpu = used(cpu[0], cpu_seconds(processes))
        server_cpu = used(cpu[1], cpu_seconds(server_processes(url)))
        busy, total = (b - a for a, b in zip(cpu[2], machine_busy(), strict=True))
        await watcher.close()
    await conn.close()
    samples = sum(seen.values()) or 1
    figures = {
        "runs_per_s": runs / elapsed,
        "worker_cpu_ms_per_run": worker_cpu * 1000 / runs,
        "server_cpu_ms_per_run": server_cpu * 1000 / runs,
        "worker_cores": worker_cpu / elapsed,
        "server_cores": server_cpu / elapsed,
        "machine_busy": busy / total,
        **{f"{k}_per_run": (after[k] - counters[k]) / runs for k in counters},
        "load_1min": os.getloadavg()[0],
    }
    figures.update({f"wait {k}": v / samples for k, v in seen.most_common(8)})
    return figures


def show(count: int, figures: dict[str, float]) -> None:
    """One line of the table, as the run ends."""
    main = ("runs_per_s", "worker_cores", "server_cores", "machine_busy", "commits_per_run")
    head = "  ".join(f"{k} {figures[k]:.2f}" for k in main)
    waits = "  ".join(f"{k[5:]} {v:.0%}" for k, v in figures.items() if k.startswith("wait "))
    print(f"{count} processes: {head}  | {waits}", flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max", type=int, default=4)
    parser.add_argument("--runs", type=int, default=4000)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    configure_logging("warning")
    samples: dict[int, list[dict[str, float]]] = {n: [] for n in range(1, args.max + 1)}
    with core.scratch_server("engine-bench-processes-") as url:
        await Database(url).apply_schema()
        for _ in range(args.repeat):
            for count, runs in samples.items():
                runs.append(await one_run(url, count, args.runs))
                show(count, runs[-1])
        environment = await core.environment(url)
    keys = set.intersection(*(set(s) for runs in samples.values() for s in runs))
    figures = {
        n: core.summarize([{k: s[k] for k in keys} for s in runs]) for n, runs in samples.items()
    }
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    result = {**environment, "args": vars(args), "figures": figures, "samples": samples}
    (out / "processes.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
