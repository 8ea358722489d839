"""What the dashboard's Functions, Workers and Bulk pages show, and the actions they take.

Every figure is read through named queries (``engine/sql/queries.sql``) and stays cheap with
millions of finished runs in the tables:

* runs not over (queued, running, sleeping, retrying, waiting), the backlog and what waits on
  flow control are counted exactly, through the partial indexes that hold only unfinished runs
  (``runs_due_idx``, ``runs_leased_idx``): finished runs are never read;
* finished runs are counted among each function's newest ``recent_cap`` runs of the last
  ``recent_window`` (a bounded walk of ``runs_function_idx``): a rate over recent runs, which
  is what a person watching a function wants, where an exact count of a million finished runs
  would read them all at every refresh. The gauges snapshot (``engine.gauges``) was the other
  candidate: it holds unfinished runs only, and is taken at the metrics interval (a minute);
* a bulk action's preview counts at most ``PREVIEW_CAP`` matching runs ("at least 10,000").
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID, uuid4

from pydantic import BaseModel, ConfigDict

from ..cron import CronSchedule
from ..cursors import parse_run_cursor, run_cursor
from ..errors import EngineError
from ..events import Event, validate_outgoing
from ..flow import FLOW_OPTIONS, admission
from ..runs import RunStatus
from ..serialization import dumps, loads
from ..telemetry import current_traceparent

if TYPE_CHECKING:
    from ..app import Engine
    from ..db import Database, Record

RECENT_WINDOW = timedelta(hours=24)
RECENT_CAP = 500
NEXT_FIRES = 5
PREVIEW_CAP = 10_000
BULK_BATCH = 500
BULK_MAX = 10_000
LEASES_SHOWN = 5000
INVOKED = "engine/function.invoked"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


# -- Functions -------------------------------------------------------------------------------------
class CronInfo(_Frozen):
    """A cron trigger and when it fires next."""

    cron: str
    next_fires: list[datetime]
    """The tick the scheduler fires next (in the past while it is overdue), then the
    schedule's following ones."""


class FlowWait(_Frozen):
    """Runs of a function that wait for something other than their own due time."""

    status: str
    reason: str
    """``concurrency``, ``throttle``, ``debounce`` or ``batch`` (flow control), or
    ``unserved`` (no live worker serves the function)."""
    runs: int
    detail: str | None = None
    """The concurrency slot waited for, or one of the runs' waiting reasons."""


class RecentRuns(_Frozen):
    """A function's runs created since ``since``, counted among its newest ``cap``."""

    since: datetime
    cap: int
    counts: dict[str, int]
    """By status."""
    oldest: datetime | None
    """The creation time of the oldest run counted."""

    @property
    def total(self) -> int:
        """Runs counted."""
        return sum(self.counts.values())

    @property
    def capped(self) -> bool:
        """True when more runs were created since ``since`` than were counted."""
        return self.total >= self.cap


class FunctionOverview(_Frozen):
    """One function as the Functions page shows it."""

    app_id: str
    function_id: str
    active: bool
    """False when no live worker served it for a while: new events do not start it."""
    workers: int
    triggers: list[dict[str, Any]]
    """In their registry form: ``{"event", "expression"}`` or ``{"cron"}``."""
    crons: list[CronInfo]
    config: dict[str, Any]
    """``retries``, ``timeouts``, ``cancel`` and the flow control options (registry form)."""
    unfinished: dict[str, int]
    """Runs not over, by status (exact)."""
    backlog: int
    """Runs due and claimed by no worker."""
    oldest_due: datetime | None
    """When the oldest run of the backlog was due."""
    waiting: list[FlowWait]
    recent: RecentRuns

    @property
    def flow(self) -> dict[str, Any]:
        """The flow control options declared (concurrency, throttle, rate limit...)."""
        return {k: self.config[k] for k in FLOW_OPTIONS if k in self.config}


async def function_overviews(
    engine: Engine,
    *,
    app_id: str | None = None,
    recent_window: timedelta = RECENT_WINDOW,
    recent_cap: int = RECENT_CAP,
    next_fires: int = NEXT_FIRES,
) -> list[FunctionOverview]:
    """Every registered function (of ``app_id``, or of every app), with its triggers, next
    cron fires, flow control, runs by status, backlog and what waits on flow control."""
    db = await engine.database()
    now: datetime = await db.fetchval("now")
    registry = await db.fetch("overview_functions", app_id)
    unfinished = _by_function(await db.fetch("overview_unfinished", app_id, now))
    since = now - recent_window
    recent = _by_function(await db.fetch("overview_recent", app_id, since, recent_cap))
    return [
        _function_overview(
            row,
            unfinished.get((row["app_id"], row["function_id"]), []),
            RecentRuns(since=since, cap=recent_cap, **_recent(recent, row)),
            now,
            next_fires,
        )
        for row in registry
    ]


def _by_function(rows: Iterable[Record]) -> dict[tuple[str, str], list[Record]]:
    grouped: dict[tuple[str, str], list[Record]] = {}
    for row in rows:
        grouped.setdefault((row["app_id"], row["function_id"]), []).append(row)
    return grouped


def _recent(recent: dict[tuple[str, str], list[Record]], row: Record) -> dict[str, Any]:
    rows = recent.get((row["app_id"], row["function_id"]), [])
    return {
        "counts": {r["status"]: r["runs"] for r in rows},
        "oldest": min((r["oldest"] for r in rows), default=None),
    }


def _function_overview(
    row: Record, unfinished: list[Record], recent: RecentRuns, now: datetime, next_fires: int
) -> FunctionOverview:
    counts: dict[str, int] = {}
    for group in unfinished:
        counts[group["status"]] = counts.get(group["status"], 0) + group["runs"]
    dues = [g["oldest_due"] for g in unfinished if g["oldest_due"] is not None]
    return FunctionOverview(
        app_id=row["app_id"],
        function_id=row["function_id"],
        active=row["active"],
        workers=row["workers"],
        triggers=loads(row["triggers"]),
        crons=[_cron(c, now, next_fires) for c in loads(row["crons"])],
        config=loads(row["config"]),
        unfinished=counts,
        backlog=sum(g["backlog"] for g in unfinished),
        oldest_due=min(dues, default=None),
        waiting=_waits(unfinished),
        recent=recent,
    )


def _cron(entry: dict[str, Any], now: datetime, count: int) -> CronInfo:
    """The stored next tick, then the schedule's following ones after it (or after now, for an
    overdue tick: the scheduler fires the latest missed tick once, then goes on from now)."""
    first = datetime.fromisoformat(entry["next_at"])
    fires = [first]
    try:
        schedule = CronSchedule.parse(entry["cron"])
    except EngineError:  # a schedule this version cannot parse: show the stored tick only
        return CronInfo(cron=entry["cron"], next_fires=fires)
    tick = max(first, now)
    while len(fires) < count:
        tick = schedule.next_after(tick)
        fires.append(tick)
    return CronInfo(cron=entry["cron"], next_fires=fires)


def _waits(unfinished: list[Record]) -> list[FlowWait]:
    waits = []
    for group in unfinished:
        reason = group["flow"] or ("unserved" if group["unserved"] else None)
        if reason is None:
            continue
        detail = group["blocked_on"] if reason == "concurrency" else group["example"]
        waits.append(
            FlowWait(status=group["status"], reason=reason, runs=group["runs"], detail=detail)
        )
    return sorted(waits, key=lambda w: (-w.runs, w.reason, w.detail or ""))


# -- Invoke ----------------------------------------------------------------------------------------
class Invoked(_Frozen):
    """The run an Invoke started."""

    run_id: str
    event_id: str
    status: RunStatus
    """``QUEUED``, or ``SKIPPED`` when the function's flow control refused the run."""
    reason: str | None = None
    """Why it was skipped."""


async def invoke_function(
    engine: Engine, app_id: str, function_id: str, data: dict[str, Any] | None = None
) -> Invoked:
    """Starts a run of a registered function with ``data`` as its event's data, whatever its
    triggers: the run's event is ``engine/function.invoked``, as for ``ctx.step.invoke`` (and as
    the reference's dev server does with ``inngest/function.invoked``), without a parent run.
    The function's flow control applies (but debounce and batching, which gather routed events).

    Raises:
        InvalidEventError: ``data`` cannot be an event's data (not an object, too large...).
        EngineError: no such function is registered.
    """
    [event] = validate_outgoing(Event.model_validate({"name": INVOKED, "data": data}), system=True)
    db = await engine.database()
    config = await db.fetchval("function_config", app_id, function_id)
    if config is None:
        raise EngineError(f"no function {function_id!r} of app {app_id!r} is registered")
    flow = {k: v for k, v in loads(config).items() if k in FLOW_OPTIONS}
    flow.pop("debounce", None)
    flow.pop("batch_events", None)
    fields = admission(flow, app_id, function_id, event)
    event_id, traceparent = str(uuid4()), current_traceparent()
    async with db.transaction() as conn:
        seq = await db.fetchval(
            "insert_invoked_event", event_id, dumps(event["data"]), traceparent, conn=conn
        )
        row = await db.fetchrow(
            "insert_invoked_run", app_id, function_id, seq, traceparent, dumps(fields), conn=conn
        )
    assert row is not None and row["id"] is not None  # no dedupe key: nothing to conflict with
    return Invoked(
        run_id=str(row["id"]),
        event_id=event_id,
        status=RunStatus(row["status"]),
        reason=row["waiting_reason"],
    )


# -- Workers ---------------------------------------------------------------------------------------
class ExecutingStep(_Frozen):
    """A step executing user code, as its worker's last heartbeat reported it."""

    step_id: str
    attempt: int
    final: bool
    """Its last attempt allowed."""
    started_at: datetime | None = None


class Lease(_Frozen):
    """A run leased to a worker (``RUNNING``)."""

    run_id: str
    app_id: str
    function_id: str
    owner: str | None
    token: int
    """The execution's number (1 for the run's first)."""
    expires_at: datetime | None
    """When another worker may take the run over, unless a heartbeat renews it (on the
    durable clock)."""
    claimed_at: datetime | None
    started_at: datetime | None
    cancel_requested: bool
    executing: list[ExecutingStep]
    """Reported by heartbeats (every third of the lease): up to that long out of date."""


class WorkerOverview(_Frozen):
    """A worker as its heartbeats describe it, with the runs it holds."""

    owner: str
    app_id: str
    functions: list[str]
    started_at: datetime
    seen_at: datetime
    """Its last heartbeat."""
    expires_at: datetime
    alive: bool
    """False once it missed its heartbeats past ``expires_at`` (the next sweep forgets it)."""
    leases: list[Lease]


class WorkersOverview(_Frozen):
    """The Workers page: every worker, and the runs leased to workers no longer listed."""

    clock: datetime
    """The durable time leases are measured on."""
    workers: list[WorkerOverview]
    orphaned: list[Lease]
    """Leased to a worker that is gone: taken over by another once the lease expires."""


async def worker_overview(engine: Engine) -> WorkersOverview:
    """The workers alive (and those expired, until a sweep forgets them), what each holds and
    the leases of runs whose worker is gone."""
    db = await engine.database()
    workers = await db.fetch("overview_workers")
    leases = [_lease(row) for row in await db.fetch("overview_leases", LEASES_SHOWN)]
    held: dict[str, list[Lease]] = {}
    for lease in leases:
        held.setdefault(lease.owner or "", []).append(lease)
    listed = {str(row["owner"]) for row in workers}
    clock = workers[0]["clock"] if workers else await db.fetchval("now")
    return WorkersOverview(
        clock=clock,
        workers=[_worker(row, held.get(str(row["owner"]), [])) for row in workers],
        orphaned=[lease for lease in leases if (lease.owner or "") not in listed],
    )


def _worker(row: Record, leases: list[Lease]) -> WorkerOverview:
    return WorkerOverview(
        owner=str(row["owner"]),
        app_id=row["app_id"],
        functions=list(row["functions"]),
        started_at=row["started_at"],
        seen_at=row["seen_at"],
        expires_at=row["expires_at"],
        alive=row["alive"],
        leases=leases,
    )


def _lease(row: Record) -> Lease:
    return Lease(
        run_id=str(row["id"]),
        app_id=row["app_id"],
        function_id=row["function_id"],
        owner=None if row["lease_owner"] is None else str(row["lease_owner"]),
        token=row["lease_token"],
        expires_at=row["lease_expires_at"],
        claimed_at=row["claimed_at"],
        started_at=row["started_at"],
        cancel_requested=row["cancel_requested"],
        executing=[_executing(step) for step in loads(row["executing"])],
    )


def _executing(step: dict[str, Any]) -> ExecutingStep:
    started = step.get("started_at")
    return ExecutingStep(
        step_id=step.get("id") or step.get("key") or "?",
        attempt=step.get("attempt", 0),
        final=bool(step.get("final")),
        started_at=None if started is None else datetime.fromisoformat(started),
    )


# -- Bulk ------------------------------------------------------------------------------------------
class RunFilter(_Frozen):
    """The runs a bulk action applies to: the Runs page's filters."""

    app_id: str | None = None
    function_id: str | None = None
    statuses: list[RunStatus] = []
    """Any of these (all statuses when empty)."""
    event_name: str | None = None
    since: datetime | None = None
    """Created at or after."""
    until: datetime | None = None
    """Created before."""

    def bounded(self, as_of: datetime) -> RunFilter:
        """The same filter, limited to the runs created before ``as_of``."""
        until = as_of if self.until is None else min(self.until, as_of)
        return self.model_copy(update={"until": until})

    def through(self, one_finished: str, unfinished: str, otherwise: str) -> str:
        """Which of three forms of a query reads these runs through an index of their status:
        ``one_finished`` for one finished status (runs_status_created_idx), ``unfinished`` for
        statuses of runs not over only (the partial indexes of unfinished runs), else
        ``otherwise`` (every run newest first, or a function's runs with its app)."""
        if len(self.statuses) == 1 and self.statuses[0].terminal:
            return one_finished
        if self.statuses and not any(s.terminal for s in self.statuses):
            return unfinished
        return otherwise

    def arguments(self) -> tuple[Any, ...]:
        """The filter's arguments of the ``run_summaries`` and ``bulk_preview`` queries."""
        statuses = [s.value for s in self.statuses] or None
        return (
            self.app_id,
            self.function_id,
            statuses,
            self.event_name,
            self.since,
            self.until,
        )


class BulkPreview(_Frozen):
    """How many runs a filter matches, before a bulk action."""

    filter: RunFilter
    """The filter as the action must receive it: bounded by the preview's time, so that it
    acts on the runs counted (less those that have changed since), not on later ones."""
    runs: int
    not_over: int
    """Of ``runs``: those a cancel applies to; the others a rerun applies to."""
    at_least: bool
    """True when the count stopped at its cap: at least ``runs`` match."""


async def bulk_preview(engine: Engine, run_filter: RunFilter) -> BulkPreview:
    """Counts the runs ``run_filter`` matches (up to ``PREVIEW_CAP``), as of now. The filter it
    returns also names the function's app when only one app has that function (its runs are
    then read through the function's index)."""
    db = await engine.database()
    bounded = await with_app(db, run_filter.bounded(await db.fetchval("now")))
    query = bounded.through("bulk_preview_ended", "bulk_preview_unfinished", "bulk_preview")
    if query == "bulk_preview" and bounded.app_id and bounded.function_id:
        query = "bulk_preview_function"  # spelt out: a generic plan keeps runs_function_idx
    row = await db.fetchrow(query, *bounded.arguments(), PREVIEW_CAP + 1)
    assert row is not None
    runs = min(row["runs"], PREVIEW_CAP)
    return BulkPreview(
        filter=bounded,
        runs=runs,
        not_over=min(row["not_over"], runs),
        at_least=row["runs"] > PREVIEW_CAP,
    )


class BulkResult(_Frozen):
    """What a bulk action did."""

    action: str
    """``cancel`` or ``rerun``."""
    matched: int
    """Runs matching the filter that were looked at."""
    acted: int
    """Runs cancelled, or rerun."""
    new_runs: list[str] = []
    """The runs a rerun started (the first ``BULK_MAX``)."""
    cursor: str | None = None
    """Set when the action stopped at ``max_runs`` with more runs matching: pass it back to go
    on where it stopped."""

    @property
    def skipped(self) -> int:
        """Matching runs the action does not apply to (a cancel: runs over already; a rerun:
        runs not over yet)."""
        return self.matched - self.acted


async def bulk_cancel(
    engine: Engine,
    run_filter: RunFilter,
    *,
    cursor: str | None = None,
    batch: int = BULK_BATCH,
    max_runs: int = BULK_MAX,
) -> BulkResult:
    """Cancels every run ``run_filter`` matches that is not over (newest first, ``batch`` at a
    time, each batch its own transaction), looking at ``max_runs`` matching runs at most.

    Runs suspended or queued end ``CANCELLED`` at once; executing ones between steps.
    """
    db = await engine.database()
    matched = acted = 0
    async for ids, statuses, next_cursor in _batches(db, run_filter, cursor, batch, max_runs):
        matched += len(ids)
        chosen = [i for i, s in zip(ids, statuses, strict=True) if not RunStatus(s).terminal]
        if chosen:
            acted += await db.fetchval("cancel_runs", chosen, "cancelled in bulk (dashboard)")
        cursor = next_cursor
    return BulkResult(action="cancel", matched=matched, acted=acted, cursor=cursor)


async def bulk_rerun(
    engine: Engine,
    run_filter: RunFilter,
    *,
    cursor: str | None = None,
    batch: int = BULK_BATCH,
    max_runs: int = BULK_MAX,
) -> BulkResult:
    """Reruns every run ``run_filter`` matches that is over (a new run of its function with the
    same event, as :meth:`~engine.Engine.rerun`), ``batch`` at a time, looking at ``max_runs``
    matching runs at most. Runs not over are left alone: rerunning one would run its function
    twice for one event at the same time.

    Give a filter bounded in time (:meth:`RunFilter.bounded`, as :func:`bulk_preview`
    returns it): the new runs are created now, and must not match the filter themselves.
    """
    db = await engine.database()
    matched, new_runs = 0, []
    async for ids, statuses, next_cursor in _batches(db, run_filter, cursor, batch, max_runs):
        matched += len(ids)
        chosen = [i for i, s in zip(ids, statuses, strict=True) if RunStatus(s).terminal]
        if chosen:
            new_runs += [str(row["id"]) for row in await db.fetch("rerun_many", chosen)]
        cursor = next_cursor
    return BulkResult(
        action="rerun", matched=matched, acted=len(new_runs), new_runs=new_runs, cursor=cursor
    )


async def with_app(db: Database, run_filter: RunFilter) -> RunFilter:
    """The filter with its function's app when it names a function without one and a single
    app has that function: runs_function_idx leads with the app, so without it a rare match
    is looked for among every run."""
    if run_filter.function_id is None or run_filter.app_id is not None:
        return run_filter
    rows = await db.fetch("dashboard_function_names")
    apps = {row["app_id"] for row in rows if row["function_id"] == run_filter.function_id}
    return run_filter.model_copy(update={"app_id": apps.pop()}) if len(apps) == 1 else run_filter


async def _batches(
    db: Database, run_filter: RunFilter, cursor: str | None, batch: int, max_runs: int
) -> AsyncIterator[tuple[list[UUID], list[str], str | None]]:
    """Pages of matching runs newest first: ``(ids, statuses, cursor)``; the cursor is where
    the next page would start, None after the last page."""
    seen = 0
    query = run_filter.through("ended_run_summaries", "bulk_unfinished_runs", "run_summaries")
    after: tuple[datetime | None, UUID | None] = (
        (None, None) if cursor is None else parse_run_cursor(cursor)
    )
    while seen < max_runs:
        size = min(batch, max_runs - seen)
        rows = await db.fetch(query, *run_filter.arguments(), *after, size)
        seen += len(rows)
        more = len(rows) == size
        next_cursor = run_cursor(rows[-1]["created_at"], str(rows[-1]["id"])) if more else None
        yield [r["id"] for r in rows], [r["status"] for r in rows], next_cursor
        if not more:
            return
        after = (rows[-1]["created_at"], rows[-1]["id"])
