"""Where an engine figure's time goes on the server: CPU of the PostgreSQL processes, and the time
spent in each of the engine's SQL functions (issue #17: show what bounds a figure, with evidence).

Used by ``bench/ratios.py --breakdown``: around one engine scenario on its own fresh database,

- the CPU time of every process of the embedded server (the postmaster's children, live and
  reaped), read from /proc, against this process's own CPU time (``time.process_time``);
- ``pg_stat_user_functions`` with ``track_functions = 'all'`` (set on that database only):
  the time spent in each engine function, its own (``self``) and with what it calls.

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


@dataclass
class Probe:
    """CPU of the server and of this process, from :meth:`start` to :meth:`stop`."""

    postmaster: int
    server_began: float = 0.0
    mine_began: float = 0.0

    def start(self) -> None:
        self.server_began = server_cpu_seconds(self.postmaster)
        self.mine_began = time.process_time()

    def stop(self) -> tuple[float, float]:
        """(server CPU seconds, this process's CPU seconds) since :meth:`start`."""
        return (
            server_cpu_seconds(self.postmaster) - self.server_began,
            time.process_time() - self.mine_began,
        )


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
