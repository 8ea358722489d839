"""Where an engine figure's time goes on the server: CPU of the PostgreSQL processes, and the time
spent in each of the engine's SQL functions (issue #17: show what bounds a figure, with evidence).

Used by ``bench/ratios.py --breakdown``: around one engine scenario on its own fresh database,

- the CPU time of every process of the embedded server (the postmaster's children, live and
  reaped), read from /proc, against this process's own CPU time (``time.process_time``);
- ``pg_stat_user_functions`` with ``track_functions = 'all'`` (set on that database only):
  the time spent in each engine function, its own (``self``) and with what it calls;
- the share of the machine's cores in use (``/proc/stat``), and what the database's backends
  were doing, sampled from ``pg_stat_activity`` (on CPU, waiting on the WAL, waiting for their
  client): whether a figure is bounded by the CPU or by its round trips waiting on each other.

Both are divided by the scenario's units (steps, events, runs), so that a figure reads "per
step" next to the floor's.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

TICKS = os.sysconf("SC_CLK_TCK")


def server_pid(pgdata: Path) -> int:
    """The postmaster's pid of the server of ``pgdata``: the first line of its postmaster.pid."""
    return int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])


def _cpu_ticks(pid: int, *, reaped: bool) -> int:
    """utime + stime of ``pid`` (and of its reaped children when ``reaped``), in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    used = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    if reaped:
        used += int(fields[13]) + int(fields[14])  # cutime, cstime: children it waited for
    return used


def server_cpu_seconds(postmaster: int) -> float:
    """CPU time of the whole server so far: the postmaster, its live children, and the children
    it reaped (backends of closed connections)."""
    total = _cpu_ticks(postmaster, reaped=True)
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        if f"\nPPid:\t{postmaster}\n" in text:
            try:
                total += _cpu_ticks(int(status.parent.name), reaped=False)
            except (OSError, IndexError):
                continue  # ended meanwhile: counted in the postmaster's cutime
    return total / TICKS


def machine_ticks() -> tuple[int, int]:
    """(busy, all) clock ticks of every core of the machine so far, from /proc/stat (idle and
    iowait are not busy; steal is: a core the hypervisor took was not ours to use)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


@dataclass
class Probe:
    """CPU of the server and of this process, and the machine's cores in use, from
    :meth:`start` to :meth:`stop`."""

    postmaster: int
    server_began: float = 0.0
    mine_began: float = 0.0
    machine_began: tuple[int, int] = (0, 0)
    busy_share: float = 0.0  # of all the machine's cores, over the window (set by stop)

    def start(self) -> None:
        self.server_began = server_cpu_seconds(self.postmaster)
        self.mine_began = time.process_time()
        self.machine_began = machine_ticks()

    def stop(self) -> tuple[float, float]:
        """(server CPU seconds, this process's CPU seconds) since :meth:`start`."""
        busy, every = machine_ticks()
        self.busy_share = (busy - self.machine_began[0]) / max(every - self.machine_began[1], 1)
        return (
            server_cpu_seconds(self.postmaster) - self.server_began,
            time.process_time() - self.mine_began,
        )


# What a backend of the scenario's database is doing, by pg_stat_activity's wait event: the WAL
# waits are a commit's flush and write (and the lock that orders them).
WAL_WAITS = ("WalSync", "WalWrite", "WALWrite", "WalInitSync", "WalInitWrite")
STATES_SQL = """
SELECT count(*) FILTER (WHERE state = 'active' AND wait_event IS NULL) AS on_cpu,
       count(*) FILTER (WHERE state = 'active' AND wait_event = ANY ($1::text[])) AS on_wal,
       count(*) FILTER (WHERE state = 'active' AND wait_event IS NOT NULL
                          AND NOT wait_event = ANY ($1::text[])) AS waiting_other,
       count(*) FILTER (WHERE state <> 'active') AS waiting_for_client
FROM pg_stat_activity
WHERE datname = current_database() AND backend_type = 'client backend'
  AND pid <> pg_backend_pid()
"""


class BackendStates:
    """Samples what the backends of one database do, every ``interval`` seconds, on a
    connection of its own, while a scenario runs: the mean number of them on CPU, waiting on
    the WAL, waiting on something else (a lock), and waiting for their client (idle). Its
    own backend is left out of the counts, not out of the server's CPU: some 200 small
    queries a second, a few percent of the server's CPU in the throughput scenario, which
    makes that figure a little worse, never better."""

    def __init__(self, url: str, interval: float = 0.005) -> None:
        self._url = url
        self._interval = interval
        self._totals = {"on_cpu": 0, "on_wal": 0, "waiting_other": 0, "waiting_for_client": 0}
        self._samples = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        conn = await asyncpg.connect(self._url)
        self._task = asyncio.create_task(self._sample(conn))

    async def _sample(self, conn: asyncpg.Connection) -> None:
        try:
            while True:
                row = await conn.fetchrow(STATES_SQL, list(WAL_WAITS))
                for key in self._totals:
                    self._totals[key] += row[key]
                self._samples += 1
                await asyncio.sleep(self._interval)
        finally:
            await conn.close()

    async def stop(self) -> dict[str, float]:
        """The mean number of backends in each state over the samples taken."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        return {key: total / max(self._samples, 1) for key, total in self._totals.items()}


async def track_functions(admin_url: str, database: str) -> None:
    """Makes the connections to ``database`` opened from now on time every function call."""
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f"ALTER DATABASE {database} SET track_functions = 'all'")
    finally:
        await conn.close()


async def function_times(url: str, units: int, top: int = 8) -> list[dict[str, Any]]:
    """The engine functions that took the most server time, per unit (milliseconds): read after
    the scenario closed its connections (a backend reports its counts when it ends)."""
    await asyncio.sleep(0.5)
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            """
            SELECT funcname, calls, self_time, total_time FROM pg_stat_user_functions
            WHERE schemaname = 'engine' ORDER BY self_time DESC LIMIT $1
            """,
            top,
        )
    finally:
        await conn.close()
    return [
        {
            "function": row["funcname"],
            "calls_per_unit": row["calls"] / units,
            "self_ms_per_unit": row["self_time"] / units,
            "total_ms_per_unit": row["total_time"] / units,
        }
        for row in rows
    ]
