"""The Workers page: the workers alive (from their heartbeats), what each holds (its leases and
the steps executing in them) and the leases of workers that are gone; live."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from .layout import Page, dashboard, render, render_text
from .overview import worker_overview

LIVE_INTERVAL = 2.0


async def _rows_context(request: Request) -> dict[str, Any]:
    return {"overview": await worker_overview(dashboard(request).reader)}


async def workers_page(request: Request) -> Response:
    """``/workers``: every worker with its leases, live."""
    context = await _rows_context(request)
    context.update(title="Workers", page="workers")
    return render(request, "workers.html", context)


async def workers_stream(request: Request) -> Response:
    """``/workers/stream``: server-sent events with the rows whenever they change."""
    board = dashboard(request)

    async def rows() -> str:
        return render_text(request, "worker_rows.html", await _rows_context(request))

    return board.live.response(rows, interval=max(board.live.interval, LIVE_INTERVAL))


def routes() -> list[BaseRoute]:
    """The Workers page's routes."""
    return [Route("/workers", workers_page), Route("/workers/stream", workers_stream)]


PAGE = Page(key="workers", label="Workers", path="/workers", shortcut="w", routes=routes)
