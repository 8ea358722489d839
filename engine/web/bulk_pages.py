"""The Bulk page: the Runs page's filters, a preview of how many runs they match, then cancel
every match not over or rerun every match that is over, in batches.

The preview bounds the filter by its own time (``until``): the action's form carries that
bound, so the action applies to the runs the preview counted (less those that changed since),
never to runs created after it, nor to the runs a rerun creates. An action without a bound (a
request that skipped the preview) is refused.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from ..runs import RunStatus
from .layout import Page, dashboard, form_fields, redirect, render
from .overview import (
    BulkPreview,
    BulkResult,
    RunFilter,
    bulk_cancel,
    bulk_preview,
    bulk_rerun,
)
from .run_pages import RANGES, RunFilters, parse_filters

# Runs one click acts on at most (then the page offers to go on): each batch is a transaction
# of its own, and a request should answer within seconds (cancelling 5,000 took 14 s with 1M
# runs on a loaded 2-core machine: bench/dashboard.py).
MAX_PER_REQUEST = 2000
ACTIONS = {"cancel": bulk_cancel, "rerun": bulk_rerun}


def run_filter(filters: RunFilters) -> RunFilter:
    """The bulk filter of the Runs page's filters."""
    return RunFilter(
        function_id=filters.function,
        statuses=[RunStatus(s) for s in filters.statuses],
        event_name=filters.event,
        since=filters.since,
        until=filters.until,
    )


def action_query(bounded: RunFilter) -> str:
    """The query string that carries a previewed (bounded) filter to its action, to the
    microsecond (the Runs page's own query keeps seconds)."""
    pairs: list[tuple[str, str]] = []
    if bounded.function_id:
        pairs.append(("function", bounded.function_id))
    pairs += [("status", s.value) for s in bounded.statuses]
    if bounded.event_name:
        pairs.append(("event", bounded.event_name))
    for name in ("since", "until"):
        moment = getattr(bounded, name)
        if moment is not None:
            pairs.append((name, moment.astimezone(UTC).isoformat()))
    return urlencode(pairs)


def _errors(filters: RunFilters) -> list[str]:
    errors = list(filters.errors)
    if filters.q:
        errors.append(
            "bulk actions do not take a search by expression: choose the runs by function, "
            "status, event name and time"
        )
    return errors


async def bulk_page(request: Request) -> Response:
    """``/bulk``: the filters and, for the filters given, the preview and the actions."""
    board = dashboard(request)
    filters = parse_filters(request, datetime.now(UTC))
    errors = _errors(filters)
    preview: BulkPreview | None = None
    if not errors:
        preview = await bulk_preview(board.reader, run_filter(filters))
    context: dict[str, Any] = {
        "title": "Bulk",
        "page": "bulk",
        "filters": filters,
        "errors": errors,
        "preview": preview,
        "query": "" if preview is None else action_query(preview.filter),
        "functions": await _function_names(request),
        "statuses": list(RunStatus),
        "ranges": list(RANGES),
        "notice": request.query_params.get("notice", ""),
        "resume": request.query_params.get("resume", ""),
        "resume_action": request.query_params.get("action", ""),
        "max_per_request": MAX_PER_REQUEST,
    }
    return render(request, "bulk.html", context, status=400 if errors else 200)


async def _function_names(request: Request) -> list[str]:
    rows = await (await dashboard(request).reader.database()).fetch("overview_functions", None)
    return sorted({row["function_id"] for row in rows})


async def bulk_action(request: Request) -> Response:
    """``POST /bulk/{cancel|rerun}?<previewed filter>``: acts on up to ``MAX_PER_REQUEST``
    matching runs, then shows the preview again with what was done (and a way to go on)."""
    board = dashboard(request)
    action = request.path_params["action"]
    if action not in ACTIONS:
        raise HTTPException(404, f"no bulk action {action!r}")
    filters = parse_filters(request, datetime.now(UTC))
    errors = _errors(filters)
    if filters.until is None:
        errors.append("preview the runs first: an action applies to the runs a preview counted")
    if errors:
        return _refused(request, "; ".join(errors))
    resume = (await form_fields(request)).get("resume") or None
    try:
        result = await ACTIONS[action](
            board.engine, run_filter(filters), cursor=resume, max_runs=MAX_PER_REQUEST
        )
    except ValueError as error:  # a resume cursor that is not one
        return _refused(request, str(error))
    pairs = [("notice", _notice(result))]
    if result.cursor:
        pairs += [("resume", result.cursor), ("action", action)]
    return redirect(request, f"/bulk?{action_query(run_filter(filters))}&{urlencode(pairs)}")


def _refused(request: Request, message: str) -> Response:
    return render(request, "error.html", {"title": "Bulk", "message": message}, status=400)


def _notice(result: BulkResult) -> str:
    done = "Cancelled" if result.action == "cancel" else "Reran"
    left = "already over" if result.action == "cancel" else "not over yet"
    text = f"{done} {result.acted:,} of {result.matched:,} matching runs"
    if result.skipped:
        text += f" ({result.skipped:,} {left}, left alone)"
    if result.cursor:
        text += f"; stopped after {result.matched:,}: more match, go on below"
    return text + "."


def routes() -> list[BaseRoute]:
    """The Bulk page's routes."""
    return [
        Route("/bulk", bulk_page),
        Route("/bulk/{action:str}", bulk_action, methods=["POST"]),
    ]


PAGE = Page(key="bulk", label="Bulk", path="/bulk", shortcut="b", routes=routes)
