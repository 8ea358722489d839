"""Bulk actions as durable jobs: "cancel (or rerun) every run matching" goes on by itself.

The Bulk page's action inserts a row of ``engine.bulk_actions`` (the previewed filter, the action,
a cursor) and answers at once; a :class:`BulkRunner`, a task of the dashboard process, carries it
out ``BATCH`` runs at a time. Each batch is one transaction that locks the job's row, acts on the
next matching runs after the cursor (newest first, as :func:`~engine.web.overview.bulk_cancel`
does), and moves the cursor: a batch is done entirely or not at all, so a crash or a restart
resumes after the last committed batch and no run is acted on twice. Two dashboard processes
may run the same job: the row lock (``SKIP LOCKED``) gives each batch to one of them.

The request's idempotency key is the job's id: a form posted twice (a double click, a reload)
starts one job.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

from ..db import is_infrastructure_error
from ..logs import engine_logger
from ..runs import RunStatus
from ..serialization import dumps, loads
from .overview import RunFilter, _Frozen

if TYPE_CHECKING:
    from ..app import Engine
    from ..db import Connection

log = engine_logger()

BATCH = 500  # runs per transaction (cancelling takes ~3 ms a run on a loaded 2-core machine)
ACTIONS = ("cancel", "rerun")
POLL = 2.0  # seconds between looks for jobs another process (or an earlier one) left running
REASON = "cancelled in bulk (dashboard)"


class BulkJob(_Frozen):
    """A bulk action and how far it got (a row of ``engine.bulk_actions``)."""

    id: str
    action: str
    """``cancel`` or ``rerun``."""
    filter: RunFilter
    expected: int
    """The runs its preview counted (at most the preview's cap)."""
    state: str
    """``running``, ``done``, ``stopped`` (by a person) or ``failed`` (``error`` says why)."""
    matched: int
    """Matching runs looked at so far."""
    acted: int
    """Of those, the runs cancelled (or rerun)."""
    error: str | None = None
    created_at: datetime
    updated_at: datetime
    ended_at: datetime | None = None

    @property
    def description(self) -> str:
        """Its filter in words: ``fn-7 · FAILED · event order/1 · until 14:03:22``."""
        chosen = self.filter
        parts = [chosen.function_id or "every function"]
        if chosen.app_id:
            parts[0] = f"{chosen.app_id}/{parts[0]}"
        parts.append(", ".join(s.value for s in chosen.statuses) or "any status")
        if chosen.event_name:
            parts.append(f"event {chosen.event_name}")
        if chosen.since is not None:
            parts.append(f"from {chosen.since:%Y-%m-%d %H:%M:%S}")
        if chosen.until is not None:
            parts.append(f"until {chosen.until:%Y-%m-%d %H:%M:%S}")
        return " · ".join(parts)

    @property
    def percent(self) -> int:
        """How far it got, against the preview's count (100 once done)."""
        if self.state == "done":
            return 100
        return min(99, self.matched * 100 // max(self.expected, 1))


async def start_bulk_action(
    engine: Engine, action: str, run_filter: RunFilter, *, key: UUID, expected: int
) -> tuple[UUID, bool]:
    """Records a bulk action to carry out (``run_filter`` bounded by its preview's time), and
    returns its id and whether it is new (False: ``key`` started one already).

    Raises:
        ValueError: not an action (``cancel`` or ``rerun``), or a filter without its bound.
    """
    if action not in ACTIONS:
        raise ValueError(f"no bulk action {action!r}")
    if run_filter.until is None:
        raise ValueError("a bulk action applies to the runs a preview counted: bound the filter")
    db = await engine.database()
    text = dumps(run_filter.model_dump(mode="json"))
    row = await db.fetchrow("bulk_action_start", key, action, text, expected)
    assert row is not None
    return row["id"], row["created"]


async def bulk_actions(reader: Engine, limit: int = 20) -> list[BulkJob]:
    """The newest bulk actions, with their progress."""
    rows = await (await reader.database()).fetch("bulk_actions_recent", limit)
    return [_job(row) for row in rows]


async def stop_bulk_action(engine: Engine, job_id: UUID) -> bool:
    """Stops a bulk action between two batches; False when it was not running."""
    db = await engine.database()
    return await db.fetchval("bulk_action_end", job_id, "stopped", None) is not None


async def advance(engine: Engine, job_id: UUID, batch: int = BATCH) -> bool:
    """Carries out the next batch of a job in one transaction; True when more is left to do
    (False: it is over, or another process holds it now)."""
    db = await engine.database()
    async with db.transaction() as conn:
        job = await db.fetchrow("bulk_action_take", job_id, conn=conn)
        if job is None:
            return False
        run_filter = RunFilter.model_validate(loads(job["filter"]))
        query = run_filter.through("ended_run_summaries", "bulk_unfinished_runs", "run_summaries")
        after = (job["after_at"], job["after_id"])
        rows = await db.fetch(query, *run_filter.arguments(), *after, batch, conn=conn)
        acted = await _act(db, conn, job["action"], rows)
        last = (rows[-1]["created_at"], rows[-1]["id"]) if rows else after
        over = len(rows) < batch
        await db.fetch("bulk_action_advance", job_id, *last, len(rows), acted, over, conn=conn)
    return not over


async def _act(db: Any, conn: Connection, action: str, rows: list[Any]) -> int:
    """Cancels the runs not over (or reruns the runs over) among ``rows``; how many."""
    terminal = [RunStatus(row["status"]).terminal for row in rows]
    if action == "cancel":
        chosen = [row["id"] for row, over in zip(rows, terminal, strict=True) if not over]
        if not chosen:
            return 0
        return int(await db.fetchval("cancel_runs", chosen, REASON, conn=conn))
    chosen = [row["id"] for row, over in zip(rows, terminal, strict=True) if over]
    if not chosen:
        return 0
    return len(await db.fetch("rerun_many", chosen, conn=conn))


def _job(row: Any) -> BulkJob:
    return BulkJob(
        id=str(row["id"]),
        action=row["action"],
        filter=RunFilter.model_validate(loads(row["filter"])),
        expected=row["expected"],
        state=row["state"],
        matched=row["matched"],
        acted=row["acted"],
        error=row["error"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        ended_at=row["ended_at"],
    )


class BulkRunner:
    """The dashboard process's task that carries out the bulk actions left running, a batch at
    a time, oldest first; it starts with the app (or at the first bulk request, for an app
    mounted where its lifespan does not run) and finds the jobs an earlier process left."""

    def __init__(self, engine: Engine, *, poll: float = POLL, batch: int = BATCH) -> None:
        self.engine = engine
        self.poll = poll
        self.batch = batch
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Starts the task unless it runs already."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="engine bulk actions")

    def wake(self) -> None:
        """A job was started: look now rather than at the next poll."""
        self.start()
        self._wake.set()

    async def close(self) -> None:
        """Stops the task (between two batches, or in one: its transaction rolls back)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                busy = await self.run_once()
            except Exception as exc:  # the database is away: try again at the next poll
                log.warning("bulk.unavailable", error=str(exc))
                busy = False
            if not busy:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll):
                        await self._wake.wait()

    async def run_once(self) -> bool:
        """Advances every running job by one batch; True when some job has more to do."""
        db = await self.engine.database()
        busy = False
        for row in await db.fetch("bulk_actions_running", 100):
            busy = await self._advance(row["id"]) or busy
        return busy

    async def _advance(self, job_id: UUID) -> bool:
        try:
            return await advance(self.engine, job_id, self.batch)
        except Exception as exc:
            if is_infrastructure_error(exc):
                raise
            # A job that cannot go on (a role without the grant, a bad filter): say why.
            log.exception("bulk.failed", job=str(job_id))
            await (await self.engine.database()).fetchval(
                "bulk_action_end", job_id, "failed", f"{type(exc).__name__}: {exc}"
            )
            return False
