"""The Functions page (every function: triggers, flow control, runs by status, backlog and what
waits; live) and the Function page (the same in full, next cron fires, and Invoke)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from .. import render as text_render
from ..errors import EngineError, InvalidEventError
from ..runs import RunStatus
from .event_pages import parse_event
from .layout import Page, dashboard, form_fields, redirect, render, render_text
from .overview import INVOKED, FunctionOverview, function_overviews, invoke_function

# The figures of every function are read again at most this often on a live page: exact counts
# of unfinished runs (partial indexes) and a bounded sample of recent ones per function.
LIVE_INTERVAL = 5.0
NOT_OVER = [s.value for s in RunStatus if not s.terminal]
OVER = [s.value for s in RunStatus if s.terminal]


def _helpers() -> dict[str, Any]:
    return {
        "trigger_text": text_render.trigger_text,
        "flow_lines": text_render.flow_lines,
        "not_over": NOT_OVER,
        "over": OVER,
    }


async def _rows_context(request: Request) -> dict[str, Any]:
    functions = await function_overviews(dashboard(request).reader)
    return {
        "functions": functions,
        "several_apps": len({f.app_id for f in functions}) > 1,
        "now": datetime.now(UTC),
        **_helpers(),
    }


async def functions_page(request: Request) -> Response:
    """``/functions``: one row per registered function, live."""
    context = await _rows_context(request)
    context.update(title="Functions", page="functions")
    return render(request, "functions.html", context)


async def functions_stream(request: Request) -> Response:
    """``/functions/stream``: server-sent events with the rows whenever they change."""
    board = dashboard(request)

    async def rows() -> str:
        return render_text(request, "function_rows.html", await _rows_context(request))

    return board.live.response(rows, interval=max(board.live.interval, LIVE_INTERVAL))


async def _function(request: Request) -> FunctionOverview:
    app_id, function_id = request.path_params["app_id"], request.path_params["function_id"]
    functions = await function_overviews(dashboard(request).reader, app_id=app_id)
    for function in functions:
        if function.function_id == function_id:
            return function
    raise HTTPException(404, f"no function {function_id} in app {app_id}")


async def function_page(
    request: Request, *, form: dict[str, str] | None = None, status: int = 200
) -> Response:
    """``/functions/{app}/{id}``: the function in full, and the Invoke form."""
    function = await _function(request)
    context = {
        "title": f"Function {function.function_id}",
        "page": "functions",
        "function": function,
        "form": form or {"data": "{}", "error": ""},
        "invoked_name": INVOKED,
        "now": datetime.now(UTC),
        **_helpers(),
    }
    return render(request, "function.html", context, status=status)


async def invoke(request: Request) -> Response:
    """``POST /functions/{app}/{id}/invoke``: starts a run with the form's JSON as its event's
    data, then shows the run."""
    board = dashboard(request)
    app_id, function_id = request.path_params["app_id"], request.path_params["function_id"]
    data = str((await form_fields(request)).get("data") or "")
    try:
        event = parse_event(INVOKED, data, "")
        invoked = await invoke_function(board.engine, app_id, function_id, event.data)
    except InvalidEventError as error:
        return await function_page(request, form={"data": data, "error": str(error)}, status=400)
    except EngineError as error:  # no such function (any more)
        raise HTTPException(404, str(error)) from None
    notice = f"Invoked {function_id}."
    if invoked.status is RunStatus.SKIPPED:
        notice = f"Invoked {function_id}: its flow control skipped the run ({invoked.reason})."
    return redirect(request, f"/runs/{invoked.run_id}?{urlencode({'notice': notice})}")


def routes() -> list[BaseRoute]:
    """The Functions and Function pages' routes."""
    return [
        Route("/functions", functions_page),
        Route("/functions/stream", functions_stream),
        Route("/functions/{app_id}/{function_id:path}/invoke", invoke, methods=["POST"]),
        Route("/functions/{app_id}/{function_id:path}", function_page),
    ]


PAGE = Page(key="functions", label="Functions", path="/functions", shortcut="f", routes=routes)
