"""The Events page (a live stream of events with the runs each started, a form to send one)
and the Event page (its data, its runs, replay)."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any
from urllib.parse import urlencode

from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from ..app import Engine
from ..cursors import event_cursor, parse_event_cursor
from ..errors import InvalidEventError
from ..events import Event, StoredEvent, stored_event_from_row
from ..runs import RunStatus, RunSummary
from .layout import Page, dashboard, form_fields, redirect, render, render_text

PAGE_SIZE = 50
# The runs shown under the events of a page, in all (an event that started thousands of runs
# shows its first ones and a link to the rest).
MAX_RUNS_SHOWN = 1000
RUNS_PER_EVENT = 8
LIVE_INTERVAL = 2.0


async def _events_context(request: Request, *, first_page: bool = False) -> dict[str, Any]:
    """The events of the page the query asks for, each with the runs it started. The engine's
    own events (``engine/function.finished``...) only with ``system=1`` or by name: they
    would outnumber the rest."""
    reader = dashboard(request).reader
    name = request.query_params.get("name") or None
    cursor = None if first_page else request.query_params.get("cursor") or None
    errors: list[str] = []
    if cursor:
        try:
            parse_event_cursor(cursor)
        except ValueError:
            errors.append("that page's cursor is not one of this list")
            cursor = None
    system = request.query_params.get("system") == "1"
    before = None if cursor is None else parse_event_cursor(cursor)
    db = await reader.database()
    rows = await db.fetch("dashboard_events", name, system or bool(name), before, PAGE_SIZE + 1)
    events = [stored_event_from_row(row) for row in rows[:PAGE_SIZE]]
    more = len(rows) > PAGE_SIZE
    return {
        "events": events,
        "cursor": event_cursor(events[-1].seq) if more else None,
        "runs": await _runs_of(reader, events),
        "name": name or "",
        "system": system,
        "errors": errors,
        "runs_per_event": RUNS_PER_EVENT,
    }


async def _runs_of(reader: Engine, events: list[StoredEvent]) -> dict[int, list[Any]]:
    """The runs each event started, by the event's seq: one query for the page."""
    seqs = [event.seq for event in events if event.runs]
    if not seqs:
        return {}
    db = await reader.database()
    rows = await db.fetch("dashboard_event_runs", seqs, MAX_RUNS_SHOWN)
    found: dict[int, list[Any]] = defaultdict(list)
    for row in rows:
        found[row["event_seq"]].append(row)
    return found


async def events_page(request: Request, *, form: dict[str, str] | None = None) -> Response:
    """``/events``: the send form and the events newest first (live on the first page)."""
    context = await _events_context(request)
    send_error = (form or {}).get("error", "")
    context.update(
        title="Events",
        page="events",
        form=form or {"name": "", "data": "{}", "id": ""},
        send_error=send_error,
        notice=request.query_params.get("notice", ""),
        live=not request.query_params.get("cursor"),
    )
    return render(request, "events.html", context, status=400 if send_error else 200)


async def events_rows(request: Request) -> Response:
    """``/events/rows``: the first rows alone (what the live stream sends)."""
    return render(request, "event_rows.html", await _events_context(request, first_page=True))


async def events_stream(request: Request) -> Response:
    """``/events/stream``: server-sent events with the first rows whenever they change (a
    NOTIFY of a new event reads them at once)."""
    board = dashboard(request)

    async def rows() -> str:
        context = await _events_context(request, first_page=True)
        return render_text(request, "event_rows.html", context)

    return board.live.response(rows, interval=max(board.live.interval, LIVE_INTERVAL))


def parse_event(name: str, data: str, event_id: str) -> Event:
    """The event a form describes, validated as ``app.send`` validates it.

    Raises:
        InvalidEventError: the data is no JSON object, or the event is refused (why).
    """
    try:
        value = json.loads(data or "{}")
    except json.JSONDecodeError as error:
        raise InvalidEventError(f"the data is not JSON: {error}") from None
    if not isinstance(value, dict):
        raise InvalidEventError(f"the data must be a JSON object, not {type(value).__name__}")
    try:
        return Event(name=name.strip(), data=value, id=event_id.strip() or None)
    except ValidationError as error:  # Event raises InvalidEventError; this is a safety net
        raise InvalidEventError(str(error)) from None


async def send_event(request: Request) -> Response:
    """``POST /events``: sends the form's event; shows why when it is refused."""
    board = dashboard(request)
    form = await form_fields(request)
    fields = {key: str(form.get(key) or "") for key in ("name", "data", "id")}
    try:
        event = parse_event(fields["name"], fields["data"], fields["id"])
        [event_id] = await board.engine.send(event)
    except InvalidEventError as error:
        return await events_page(request, form={**fields, "error": str(error)})
    return redirect(request, f"/events/{event_id}?{urlencode({'notice': 'Sent.'})}")


async def event_page(request: Request) -> Response:
    """``/events/{id}``: the event, its data and the runs it started."""
    reader = dashboard(request).reader
    event_id = request.path_params["event_id"]
    event = await reader.get_event(event_id)
    if event is None:
        raise HTTPException(404, f"no event {event_id}")
    db = await reader.database()
    rows = await db.fetch("dashboard_event_runs", [event.seq], MAX_RUNS_SHOWN)
    runs = [_summary(row, event) for row in rows]
    context = {
        "title": f"Event {event.name}",
        "page": "events",
        "event": event,
        "runs": runs,
        "several_apps": len({r.app_id for r in runs}) > 1,
        "notice": request.query_params.get("notice", ""),
    }
    return render(request, "event.html", context)


def _summary(row: Any, event: StoredEvent) -> RunSummary:
    """A run of the ``dashboard_event_runs`` query, with its event."""
    return RunSummary(
        run_id=str(row["id"]),
        app_id=row["app_id"],
        function_id=row["function_id"],
        status=RunStatus(row["status"]),
        waiting_reason=row["waiting_reason"],
        event_name=event.name,
        event_id=event.id,
        created_at=row["created_at"],
        started_at=row["started_at"],
        ended_at=row["ended_at"],
    )


async def replay_event(request: Request) -> Response:
    """``POST /events/{id}/replay``: the same name, data and version again, as a new event
    (``engine events replay``)."""
    board = dashboard(request)
    event_id = request.path_params["event_id"]
    original = await board.reader.get_event(event_id)
    if original is None:
        raise HTTPException(404, f"no event {event_id}")
    [new_id] = await board.engine.send(Event(name=original.name, data=original.data, v=original.v))
    notice = f"Replay of {event_id}."
    return redirect(request, f"/events/{new_id}?{urlencode({'notice': notice})}")


def routes() -> list[BaseRoute]:
    """The Events and Event pages' routes."""
    return [
        Route("/events", events_page),
        Route("/events", send_event, methods=["POST"]),
        Route("/events/rows", events_rows),
        Route("/events/stream", events_stream),
        Route("/events/{event_id:path}/replay", replay_event, methods=["POST"]),
        Route("/events/{event_id:path}", event_page),
    ]


PAGE = Page(key="events", label="Events", path="/events", shortcut="e", routes=routes)
