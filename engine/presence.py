"""A worker's presence in the function registry, and the sweep every worker runs.

The registry (``engine.functions``) lists what every app registered; routing starts runs only
of *active* functions, those a live worker serves. Each worker keeps a row in ``engine.workers``
alive with a heartbeat every third of ``inactive_after`` (never per step), removes it when it
stops, and at each beat runs ``engine.sweep``: expired workers are forgotten, functions that no
live worker serves go inactive (their waiting runs say so), and runs past a timeout are
cancelled even when no worker of their function exists. Functions of this app that nobody
serves while runs of them wait are logged as a warning at each beat.

With an ``alive_file``, each heartbeat that reached the database also rewrites that file (the
worker's owner id): its age is the age of the worker's row in ``engine.workers``, which a
command-based liveness probe (ops/k8s) can check without a query of its own.
"""

from __future__ import annotations

import asyncio
import os
from datetime import timedelta
from pathlib import Path
from uuid import UUID

from .db import Database
from .logs import engine_logger

log = engine_logger()

SWEEP_BATCH = 500  # runs a sweep cancels at most (the next beat takes the rest)


class Presence:
    """Heartbeats of one worker in ``engine.workers``, with the periodic sweep."""

    def __init__(
        self,
        app_id: str,
        owner: UUID,
        functions: list[str],
        ttl: timedelta,
        alive_file: Path | None = None,
    ) -> None:
        if ttl < timedelta(milliseconds=300):
            raise ValueError("inactive_after must be at least 300ms")
        self.app_id = app_id
        self.owner = owner
        self.functions = functions
        self.ttl = ttl
        self.alive_file = alive_file

    async def beat(self, db: Database) -> None:
        """Says this worker is alive (and its functions served) for ``ttl`` from now."""
        await db.fetchval("worker_beat", self.owner, self.app_id, self.functions, self.ttl)
        if self.alive_file is not None:
            _write_atomically(self.alive_file, f"{self.owner}\n")

    async def run(self, db: Database) -> None:
        """Beats and sweeps until cancelled; failures are logged and retried at the next beat."""
        interval = self.ttl.total_seconds() / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await self.beat(db)
                await self.sweep(db)
            except Exception as exc:
                log.warning("worker.presence_failed", error=str(exc) or repr(exc))

    async def sweep(self, db: Database) -> None:
        """Runs ``engine.sweep`` and warns about this app's runs that no worker serves."""
        cancelled = await db.fetchval("sweep", SWEEP_BATCH)
        if cancelled:
            log.info("runs.timed_out", runs=cancelled)
        for row in await db.fetch("unserved_runs", self.app_id):
            log.warning(
                "function.unserved",
                app_id=self.app_id,
                function_id=row["function_id"],
                runs=row["runs"],
                reason="no live worker serves this function: its runs wait (deploy it again, "
                "or cancel them)",
            )

    async def leave(self, db: Database) -> None:
        """Removes this worker: its functions that no other worker serves go inactive now."""
        try:
            await db.fetchval("worker_gone", self.owner)
        except Exception as exc:  # it expires after ttl instead
            log.warning("worker.leave_failed", error=str(exc) or repr(exc))


def _write_atomically(path: Path, text: str) -> None:
    """Writes ``path`` so that a reader never sees it half written (a probe reads it). A few
    bytes once per heartbeat: not worth a thread."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)
