"""The Bulk page: the Runs page's filters, a preview of how many runs they match, then cancel
every match not over or rerun every match that is over, as a job that goes on by itself.

The preview bounds the filter by its own time (``until``): the action's form carries that
bound, so the action applies to the runs the preview counted (less those that changed since),
never to runs created after it, nor to the runs a rerun creates. An action without a bound (a
request that skipped the preview) is refused. An action only records its job
(engine.web.bulk_jobs) and answers: the dashboard's :class:`~engine.web.bulk_jobs.BulkRunner`
carries it out in batches, and the page follows its progress live.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode
from uuid import UUID, uuid4

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from ..runs import RunStatus
from .bulk_jobs import ACTIONS, bulk_actions, start_bulk_action, stop_bulk_action
from .layout import Page, dashboard, form_fields, redirect, render, render_text
from .overview import BulkPreview, RunFilter, bulk_preview, with_app
from .run_pages import RANGES, RunFilters, parse_filters

JOBS_SHOWN = 10  # the newest bulk actions listed, with their progress


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
        "key": str(uuid4()),  # the actions' idempotency key: a form posted twice starts one job
        "functions": await _function_names(request),
        "statuses": list(RunStatus),
        "ranges": list(RANGES),
        "notice": request.query_params.get("notice", ""),
        **await _jobs_context(request),
    }
    return render(request, "bulk.html", context, status=400 if errors else 200)


async def _jobs_context(request: Request) -> dict[str, Any]:
    board = dashboard(request)
    board.bulk.start()  # an app mounted without its lifespan starts its runner here
    return {"jobs": await bulk_actions(board.reader, JOBS_SHOWN)}


async def bulk_stream(request: Request) -> Response:
    """``/bulk/stream``: server-sent events with the bulk actions whenever they move."""
    board = dashboard(request)

    async def rows() -> str:
        return render_text(request, "bulk_rows.html", await _jobs_context(request))

    return board.live.response(rows)


async def _function_names(request: Request) -> list[str]:
    rows = await (await dashboard(request).reader.database()).fetch("overview_functions", None)
    return sorted({row["function_id"] for row in rows})


async def bulk_action(request: Request) -> Response:
    """``POST /bulk/{cancel|rerun}?<previewed filter>``: records the action as a job (its form's
    ``key`` is the job's id, so posting it twice starts one) and shows the page, where the job's
    progress follows live."""
    board = dashboard(request)
    action = request.path_params["action"]
    if action not in ACTIONS:
        raise HTTPException(404, f"no bulk action {action!r}")
    filters = parse_filters(request, datetime.now(UTC))
    errors = _errors(filters)
    if filters.until is None:
        errors.append("preview the runs first: an action applies to the runs a preview counted")
    form = await form_fields(request)
    key = _uuid(str(form.get("key") or "")) or uuid4()
    expected = str(form.get("expected") or "0")
    if errors:
        return _refused(request, "; ".join(errors))
    chosen = await with_app(await board.engine.database(), run_filter(filters))
    job_id, new = await start_bulk_action(
        board.engine, action, chosen, key=key, expected=int(expected) if expected.isdigit() else 0
    )
    board.bulk.wake()
    verb = "Cancelling" if action == "cancel" else "Rerunning"
    notice = f"{verb} the matching runs in the background." if new else "Already started."
    pairs = [("notice", notice), ("job", str(job_id))]
    return redirect(request, f"/bulk?{action_query(run_filter(filters))}&{urlencode(pairs)}")


async def stop_job(request: Request) -> Response:
    """``POST /bulk/jobs/{id}/stop``: stops a bulk action between two batches."""
    board = dashboard(request)
    job_id = _uuid(request.path_params["job_id"])
    if job_id is None:
        raise HTTPException(404, "no such bulk action")
    stopped = await stop_bulk_action(board.engine, job_id)
    notice = "Stopped." if stopped else "That bulk action was not running."
    return redirect(request, f"/bulk?{urlencode({'notice': notice})}")


def _uuid(text: str) -> UUID | None:
    try:
        return UUID(text)
    except ValueError:
        return None


def _refused(request: Request, message: str) -> Response:
    return render(request, "error.html", {"title": "Bulk", "message": message}, status=400)


def routes() -> list[BaseRoute]:
    """The Bulk page's routes."""
    return [
        Route("/bulk", bulk_page),
        Route("/bulk/stream", bulk_stream),
        Route("/bulk/jobs/{job_id}/stop", stop_job, methods=["POST"]),
        Route("/bulk/{action:str}", bulk_action, methods=["POST"]),
    ]


PAGE = Page(key="bulk", label="Bulk", path="/bulk", shortcut="b", routes=routes)
