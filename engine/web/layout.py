"""What every page of the dashboard shares: the :class:`Page` a page module declares, the
:class:`Dashboard` kept in the app's state, and rendering with the layout
(``templates/base.html``)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse
from starlette.routing import BaseRoute

from .. import render as text_render
from ..app import Engine
from .live import Live
from .security import Guard

if TYPE_CHECKING:
    from .bulk_jobs import BulkRunner


@dataclass(frozen=True)
class Page:
    """A page of the dashboard: its place in the navigation and its routes.

    Attributes:
        key: names the page (``"runs"``); the layout marks the current one.
        label: its link's text.
        path: where its link goes, relative to the dashboard's root (``"/runs"``).
        shortcut: the key that follows ``g`` to go there (``"r"``: ``g r``).
        routes: the page's routes, relative to the dashboard's root.
    """

    key: str
    label: str
    path: str
    shortcut: str
    routes: Callable[[], list[BaseRoute]]


@dataclass
class Dashboard:
    """What the pages share, kept in ``app.state.dashboard``."""

    engine: Engine
    reader: Engine
    guard: Guard
    templates: jinja2.Environment
    live: Live
    pages: list[Page]
    bulk: BulkRunner  # carries out the Bulk page's actions (engine.web.bulk_jobs)


def dashboard(request: Request) -> Dashboard:
    """The dashboard a request is served by."""
    found: Dashboard = request.app.state.dashboard
    return found


def base_path(request: Request) -> str:
    """Where the dashboard is mounted (``""`` at the root, ``"/dashboard"`` when mounted)."""
    return str(request.scope.get("root_path", "")).rstrip("/")


def render_text(request: Request, template: str, context: Mapping[str, Any]) -> str:
    """A template rendered with what every template may use (the base path, the CSRF token,
    the pages of the navigation...)."""
    board = dashboard(request)
    return board.templates.get_template(template).render(
        {
            "request": request,
            "base": base_path(request),
            "csrf": board.guard.csrf_token,
            "pages": board.pages,
            "token_login": bool(board.guard.token),
            **context,
        }
    )


def render(
    request: Request, template: str, context: Mapping[str, Any], *, status: int = 200
) -> HTMLResponse:
    """A page (or a fragment) as a response."""
    return HTMLResponse(render_text(request, template, context), status_code=status)


async def form_fields(request: Request) -> dict[str, str]:
    """The fields of a form the dashboard posted (``application/x-www-form-urlencoded``; the
    guard has bounded its size): the first value of each.

    Parsed here rather than by Starlette, which needs one more package (python-multipart) for
    the multipart forms the dashboard never sends.
    """
    body = (await request.body()).decode("utf-8", errors="replace")
    fields = parse_qs(body, keep_blank_values=True, max_num_fields=64)
    return {name: values[0] for name, values in fields.items()}


def redirect(request: Request, path: str) -> RedirectResponse:
    """A 303 (see other) to ``path`` within the dashboard, after an action."""
    return RedirectResponse(base_path(request) + path, status_code=303)


def templates() -> jinja2.Environment:
    folder = resources.files("engine.web").joinpath("templates")
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(folder)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        clock=_clock,
        took=text_render.took,
        between=text_render.between,
        error_text=text_render.error_text,
        pretty=_pretty,
        iso=lambda moment: "" if moment is None else moment.astimezone(UTC).isoformat(),
        worker=text_render.worker_name,
    )
    return env


def _clock(moment: datetime | None) -> str:
    """A UTC time as the pages show it: ``12:03:45.120`` today, the date too before."""
    if moment is None:
        return "-"
    utc = moment.astimezone(UTC)
    if utc.date() == datetime.now(UTC).date():
        return utc.strftime("%H:%M:%S.") + f"{utc.microsecond // 1000:03d}"
    return utc.strftime("%Y-%m-%d %H:%M:%S")


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str, sort_keys=False)
