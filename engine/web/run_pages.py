"""The Runs page (a live, filtered list newest first) and the Run page (a run's story as a
waterfall, with cancel and rerun)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from ..app import Engine
from ..cursors import parse_run_cursor, run_cursor
from ..errors import EngineError, ExpressionError, RunNotFoundError
from ..expressions import Expression
from ..runs import RunInfo, RunStatus, RunSummary, one_finished_status, run_summary_from_row
from ..serialization import loads
from .layout import Page, dashboard, form_fields, redirect, render, render_text
from .prefilter import prefilter
from .timeline import waterfall

PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
# A search by expression reads runs newest first in batches and evaluates the expression in
# Python (cel-python: about a millisecond a run) on those its prefilter keeps: PostgreSQL first
# checks each run's event against the translatable part of the expression (a SQL/JSON path
# predicate, engine/web/prefilter.py, which never drops a match). A page stops once it has
# evaluated SEARCH_SCAN runs or read SEARCH_READ, whatever it found: it answers in bounded
# time, and its cursor goes on from the last run read. A run's verdict is remembered (its
# event never changes): a live page or the next page evaluates only the runs it has not seen.
SEARCH_BATCH = 250  # runs read per query without a prefilter (each is evaluated)
PREFILTERED_BATCH = 2000  # runs read per query with one (PostgreSQL drops most)
SEARCH_SCAN = 1000
SEARCH_READ = 20_000
VERDICTS_KEPT = 200_000
_verdicts: dict[tuple[str, str], bool] = {}
# The status filter's groups: runs not over, and runs that ended.
STATUS_GROUPS = {
    "going": [s.value for s in RunStatus if not s.terminal],
    "ended": [s.value for s in RunStatus if s.terminal],
}
RANGES = {"15m": 15 * 60, "1h": 3600, "6h": 6 * 3600, "24h": 86400, "7d": 7 * 86400}


@dataclass
class RunFilters:
    """What the Runs page shows, from its query string."""

    function: str | None = None
    statuses: list[str] = field(default_factory=list)
    event: str | None = None
    range: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    q: str | None = None
    cursor: str | None = None
    limit: int = PAGE_SIZE
    errors: list[str] = field(default_factory=list)

    def status_group(self) -> str | None:
        """``going`` or ``ended`` when the statuses are exactly that group's."""
        return _group_of(sorted(self.statuses, key=list(RunStatus.__members__).index))

    def query(self, *, cursor: str | None = None) -> str:
        """The query string of these filters (with another cursor)."""
        pairs: list[tuple[str, str]] = []
        for name in ("function", "event", "range", "q"):
            value = getattr(self, name)
            if value:
                pairs.append((name, value))
        group = self.status_group()
        pairs += [("status", group)] if group else [("status", s) for s in self.statuses]
        for name in ("since", "until"):
            moment = getattr(self, name)
            if moment is not None and not self.range:
                pairs.append((name, moment.strftime("%Y-%m-%dT%H:%M:%S")))
        if self.limit != PAGE_SIZE:
            pairs.append(("limit", str(self.limit)))
        if cursor:
            pairs.append(("cursor", cursor))
        return urlencode(pairs)


def _group_of(statuses: list[str]) -> str | None:
    return next((g for g, members in STATUS_GROUPS.items() if members == statuses), None)


def parse_filters(request: Request, now: datetime) -> RunFilters:
    """The filters of a request; what cannot be understood is listed in ``errors``."""
    params = request.query_params
    found = RunFilters(
        function=params.get("function") or None,
        event=params.get("event") or None,
        q=(params.get("q") or "").strip() or None,
        cursor=params.get("cursor") or None,
    )
    for status in params.getlist("status"):
        if status in RunStatus.__members__:
            found.statuses.append(status)
        elif status in STATUS_GROUPS:
            found.statuses += STATUS_GROUPS[status]
        elif status:
            found.errors.append(f"no status {status!r}")
    _parse_times(found, params.get("range"), params.get("since"), params.get("until"), now)
    limit = params.get("limit", "")
    if limit:
        found.limit = int(limit) if limit.isdigit() and 1 <= int(limit) <= MAX_PAGE_SIZE else 0
        if not found.limit:
            found.errors.append(f"a page holds 1 to {MAX_PAGE_SIZE} runs")
            found.limit = PAGE_SIZE
    if found.cursor:
        try:
            parse_run_cursor(found.cursor)
        except ValueError:
            found.errors.append("that page's cursor is not one of this list")
            found.cursor = None
    return found


def _parse_times(
    found: RunFilters, span: str | None, since: str | None, until: str | None, now: datetime
) -> None:
    if span:
        if span in RANGES:
            found.range = span
            found.since = now - timedelta(seconds=RANGES[span])
        else:
            found.errors.append(f"no time range {span!r}")
        return
    for name, text in (("since", since), ("until", until)):
        if not text:
            continue
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            found.errors.append(f"{name}: {text!r} is not a time (2026-12-02T10:30)")
            continue
        setattr(found, name, moment if moment.tzinfo else moment.replace(tzinfo=UTC))


@dataclass
class RunList:
    """A page of the Runs page."""

    runs: list[RunSummary]
    cursor: str | None
    scanned: int | None = None
    """With a search: the runs read to find these."""


async def list_runs(reader: Engine, filters: RunFilters) -> RunList:
    """The runs the filters choose: a keyset page, or a bounded search by expression."""
    app_id = await _app_of(reader, filters.function)
    if filters.q:
        return await _search(reader, filters, Expression(filters.q, what="search"), app_id)
    db = await reader.database()
    query = _query(filters, "ended_run_summaries", "run_summaries")
    rows = await db.fetch(query, app_id, *_where(filters), filters.limit + 1)
    runs = [run_summary_from_row(row) for row in rows[: filters.limit]]
    last = runs[-1] if len(rows) > filters.limit else None
    return RunList(runs, None if last is None else run_cursor(last.created_at, last.run_id))


def _query(filters: RunFilters, one_finished: str, otherwise: str) -> str:
    """The query that reads the filtered runs through an index of their status where one
    exists (runs not over; one finished status), else by walking every run newest first."""
    if _unfinished(filters):
        return "dashboard_unfinished_runs"
    return one_finished if one_finished_status(filters.statuses) else otherwise


def _unfinished(filters: RunFilters) -> bool:
    """True when the filters ask only for runs not over (the runs page's "what is going on")."""
    return bool(filters.statuses) and not any(RunStatus(s).terminal for s in filters.statuses)


def _where(filters: RunFilters) -> tuple[Any, ...]:
    """The filters as the parameters $2 to $8 of run_summaries and dashboard_run_search."""
    after: tuple[datetime | None, Any] = (None, None)
    if filters.cursor:
        after = parse_run_cursor(filters.cursor)
    statuses = filters.statuses or None
    return (filters.function, statuses, filters.event, filters.since, filters.until, *after)


async def _app_of(reader: Engine, function: str | None) -> str | None:
    """The app of a function id when only one app has it: the query then walks that
    function's index (runs_function_idx leads with the app) instead of every run."""
    if function is None:
        return None
    rows = await (await reader.database()).fetch("dashboard_function_names")
    apps = {row["app_id"] for row in rows if row["function_id"] == function}
    return apps.pop() if len(apps) == 1 else None


@dataclass
class _Scan:
    """Where a search's page stands: what it found, read and evaluated, and its last run."""

    limit: int
    matched: list[RunSummary] = field(default_factory=list)
    read: int = 0
    evaluated: int = 0
    last: RunSummary | None = None

    def over(self) -> bool:
        """True once the page is full or has spent its budget."""
        full = len(self.matched) >= self.limit
        return full or self.evaluated >= SEARCH_SCAN or self.read >= SEARCH_READ

    def page(self, more: bool) -> RunList:
        """The page, with a cursor after the last run read when ``more`` may match."""
        last = self.last
        cursor = run_cursor(last.created_at, last.run_id) if more and last else None
        return RunList(self.matched, cursor, self.read)


async def _search(
    reader: Engine, filters: RunFilters, check: Expression, app_id: str | None
) -> RunList:
    """Runs whose event matches ``check``, read in keyset batches of the filtered runs that its
    prefilter keeps, within the page's budget (``SEARCH_SCAN`` evaluated, ``SEARCH_READ``
    read)."""
    db = await reader.database()
    where = list(_where(filters))
    path = prefilter(check.source)
    batch = SEARCH_BATCH if path is None else PREFILTERED_BATCH
    query = _search_query(filters)
    scan = _Scan(filters.limit)
    while True:
        rows = await db.fetch(query, app_id, *where, batch, path)
        if await asyncio.to_thread(_take, scan, check, rows):
            return scan.page(more=True)
        if not rows or rows[-1]["scanned"] < batch:
            return scan.page(more=False)
        where[-2:] = [rows[-1]["created_at"], rows[-1]["id"]]


def _take(scan: _Scan, check: Expression, rows: list[Any]) -> bool:
    """Adds a batch's runs to the page in order, evaluating those the prefilter kept (in a
    thread: a batch may take a quarter second); True once the page is over."""
    if len(_verdicts) > VERDICTS_KEPT:
        _verdicts.clear()
    before = scan.read
    for row in rows:
        summary = run_summary_from_row(row)
        if row["candidate"]:
            scan.evaluated += 1
            if _verdict(check, row):
                scan.matched.append(summary)
        scan.last = summary
        scan.read = before + row["place"]
        if scan.over():
            return True
    return False


def _verdict(check: Expression, row: Any) -> bool:
    """Whether a run's event matches, remembered per expression and run."""
    key = (check.source, str(row["id"]))
    verdict = _verdicts.get(key)
    if verdict is None:
        verdict = _verdicts[key] = check.matches({"event": loads(row["event"])})
    return verdict


def _search_query(filters: RunFilters) -> str:
    """The search's query: through an index of the runs' status where one exists."""
    if _unfinished(filters):
        return "dashboard_unfinished_search"
    if one_finished_status(filters.statuses):
        return "dashboard_ended_search"
    return "dashboard_run_search"


async def _function_names(reader: Engine) -> list[str]:
    rows = await (await reader.database()).fetch("dashboard_function_names")
    return sorted({row["function_id"] for row in rows})


# -- handlers --------------------------------------------------------------------------------------
async def runs_page(request: Request) -> Response:
    """``/runs``: the filters, the first rows (live when on the first page) and paging."""
    board = dashboard(request)
    filters = parse_filters(request, datetime.now(UTC))
    listing = RunList([], None)
    if not filters.errors:
        try:
            listing = await list_runs(board.reader, filters)
        except ExpressionError as error:
            filters.errors.append(str(error))
    context = {
        "title": "Runs",
        "page": "runs",
        "filters": filters,
        "listing": listing,
        "functions": await _function_names(board.reader),
        "statuses": list(RunStatus),
        "ranges": list(RANGES),
        "several_apps": len({r.app_id for r in listing.runs}) > 1,
    }
    return render(request, "runs.html", context, status=400 if filters.errors else 200)


async def runs_rows(request: Request) -> Response:
    """``/runs/rows``: the rows alone (what the live stream sends)."""
    return render(request, "run_rows.html", await _rows_context(request))


async def _rows_context(request: Request) -> dict[str, Any]:
    filters = parse_filters(request, datetime.now(UTC))
    filters.cursor = None
    listing = RunList([], None)
    if not filters.errors:
        with contextlib.suppress(ExpressionError):  # the page itself says why
            listing = await list_runs(dashboard(request).reader, filters)
    several = len({r.app_id for r in listing.runs}) > 1
    return {"listing": listing, "several_apps": several}


async def runs_stream(request: Request) -> Response:
    """``/runs/stream``: server-sent events with the first rows whenever they change."""
    board = dashboard(request)

    async def rows() -> str:
        context = await _rows_context(request)
        return render_text(request, "run_rows.html", context)

    return board.live.response(rows)


async def run_page(request: Request) -> Response:
    """``/runs/{id}``: status, event, output or error, the waterfall and the actions."""
    board = dashboard(request)
    run_id = request.path_params["run_id"]
    try:
        run = await board.reader.get_run(run_id)
    except RunNotFoundError as error:
        raise HTTPException(404, str(error)) from None
    now = datetime.now(UTC)
    context = {
        "title": f"Run {run.function_id}",
        "page": "runs",
        "run": run,
        "chart": waterfall(run, now),
        "moved": moved(run),
        "now": now,
        "notice": request.query_params.get("notice", ""),
        "error": request.query_params.get("error", ""),
    }
    return render(request, "run.html", context)


def moved(run: RunInfo) -> str:
    """What changes when a run moves: its status, steps, attempts, pauses and executions."""
    attempts = sum(len(step.attempts) for step in run.steps)
    lasting = sum(pause.ended_at is None for pause in run.pauses)
    parts = (run.status.value, len(run.steps), attempts, len(run.pauses), lasting)
    return "/".join(map(str, (*parts, len(run.executions), run.ended_at)))


async def run_stream(request: Request) -> Response:
    """``/runs/{id}/stream``: a ``rows`` event whenever the run moves (its status, a step, a
    pause or an execution more); the page then reloads itself."""
    board = dashboard(request)
    run_id = request.path_params["run_id"]

    async def signature() -> str:
        return moved(await board.reader.get_run(run_id))

    return board.live.response(signature)


async def cancel_run(request: Request) -> Response:
    """``POST /runs/{id}/cancel``."""
    board = dashboard(request)
    run_id = request.path_params["run_id"]
    try:
        status = await board.engine.cancel_run(run_id)
    except RunNotFoundError as error:
        raise HTTPException(404, str(error)) from None
    notice = (
        "Cancelled."
        if status == RunStatus.CANCELLED
        else f"Cancel requested: the run is {status.value}; it stops between steps."
        if not status.terminal
        else f"The run had ended ({status.value}): nothing to cancel."
    )
    return redirect(request, f"/runs/{run_id}?{urlencode({'notice': notice})}")


async def rerun_run(request: Request) -> Response:
    """``POST /runs/{id}/rerun``: the same event again, from the start or from a step."""
    board = dashboard(request)
    run_id = request.path_params["run_id"]
    form = await form_fields(request)
    from_step = str(form.get("from_step") or "") or None
    try:
        new_id = await board.engine.rerun(run_id, from_step=from_step)
    except RunNotFoundError as error:
        raise HTTPException(404, str(error)) from None
    except EngineError as error:
        return redirect(request, f"/runs/{run_id}?{urlencode({'error': str(error)})}")
    where = f"from step {from_step}" if from_step else "from the start"
    notice = f"Rerun of {run_id} {where}."
    return redirect(request, f"/runs/{new_id}?{urlencode({'notice': notice})}")


def routes() -> list[BaseRoute]:
    """The Runs and Run pages' routes."""
    return [
        Route("/runs", runs_page),
        Route("/runs/rows", runs_rows),
        Route("/runs/stream", runs_stream),
        Route("/runs/{run_id}", run_page),
        Route("/runs/{run_id}/stream", run_stream),
        Route("/runs/{run_id}/cancel", cancel_run, methods=["POST"]),
        Route("/runs/{run_id}/rerun", rerun_run, methods=["POST"]),
    ]


PAGE = Page(key="runs", label="Runs", path="/runs", shortcut="r", routes=routes)
