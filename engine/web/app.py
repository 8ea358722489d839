"""The dashboard as an ASGI app: :func:`create_app`, the pages it is made of, login and the
guard every request passes.

A page is a module that declares a :class:`~engine.web.layout.Page` (its entry in the
navigation and its routes) and is listed in :func:`_pages`; the layout
(``templates/base.html``) draws the navigation from that list, so adding a page is adding its
module there.

Reads go through ``reader`` (which may connect as the read-only ``engine_reader`` role); only
the actions (cancel, rerun, send, replay) use ``engine``, the Engine that may write.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable
from urllib.parse import parse_qs, quote

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..app import Engine
from . import bulk_pages, event_pages, function_pages, run_pages, security, worker_pages
from .bulk_jobs import BulkRunner
from .event_api import event_api_routes
from .layout import (
    Dashboard,
    Page,
    base_path,
    dashboard,
    form_fields,
    redirect,
    render,
    templates,
)
from .live import Live
from .security import Guard

# A dashboard form holds at most an event (512 KiB of JSON data, form-encoded up to 3 times
# larger) and a few fields.
MAX_FORM_BYTES = 2 * 1024 * 1024 + 64 * 1024


def create_app(
    engine: Engine,
    *,
    reader: Engine | None = None,
    token: str | None = None,
    allowed_hosts: Iterable[str] | None = None,
    live_interval: float = 1.0,
) -> Starlette:
    """The dashboard as an ASGI app, to serve (``engine dev``, ``engine dashboard``) or to
    mount in one's own app (``Mount("/engine", create_app(app))``).

    Args:
        engine: the Engine that acts: cancels, reruns, sends and replays events. Also in
            ``app.state.engine``.
        reader: the Engine that reads every page (default: ``engine``); it may connect as the
            read-only ``engine_reader`` role (ops/roles.sql).
        token: a login token; without one the dashboard serves only requests for loopback host
            names (``allowed_hosts`` widens that). Serve it beyond this machine only with one.
        allowed_hosts: host names served without a token (default: loopback names); ``["*"]``
            for any, behind an authentication of your own.
        live_interval: seconds between two reads of a live page's first rows (a NOTIFY of a
            new event or run reads at once).
    """
    pages = _pages()
    exempt, extra_routes = _event_api()
    guard = Guard(token=token, exempt=exempt, allowed_hosts=security.allowed(allowed_hosts))
    board = Dashboard(
        engine=engine,
        reader=reader or engine,
        guard=guard,
        templates=templates(),
        live=Live(reader or engine, interval=live_interval),
        pages=pages,
        bulk=BulkRunner(engine),
    )
    routes: list[BaseRoute] = [
        Route("/", _home),
        Route("/login", _login, methods=["GET", "POST"]),
        Route("/logout", _logout, methods=["POST"]),
        Mount("/static", StaticFiles(packages=[("engine.web", "static")]), name="static"),
        *extra_routes,
    ]
    for page in pages:
        routes += page.routes()

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        board.bulk.start()  # carries on the bulk actions an earlier process left running
        yield
        await board.bulk.close()
        await board.live.close()

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: _not_found})
    app.state.engine = engine
    app.state.dashboard = board
    app.add_middleware(GuardMiddleware, guard=guard)
    return app


def _pages() -> list[Page]:
    """The pages, in the order of the navigation (a new page: add its module's PAGE here)."""
    return [
        run_pages.PAGE,
        event_pages.PAGE,
        function_pages.PAGE,
        worker_pages.PAGE,
        bulk_pages.PAGE,
    ]


def _event_api() -> tuple[tuple[str, ...], list[BaseRoute]]:
    """The HTTP event API's routes (``POST /e/{event_key}``): its requests carry an event key
    instead of a login, so the guard lets them through."""
    return ("/e",), event_api_routes()


async def _home(request: Request) -> Response:
    return redirect(request, "/runs")


async def _not_found(request: Request, exc: Exception) -> Response:
    detail = exc.detail if isinstance(exc, HTTPException) else "not found"
    return render(request, "error.html", {"title": "Not found", "message": detail}, status=404)


async def _login(request: Request) -> Response:
    board = dashboard(request)
    target = _next_path(request.query_params.get("next", ""))
    if request.method == "GET":
        if board.guard.logged_in(request):
            return redirect(request, target)
        return render(request, "login.html", {"title": "Log in", "next": target, "error": ""})
    if not board.guard.login_allowed():
        context = {
            "title": "Log in",
            "next": target,
            "error": "Too many wrong tokens: wait a minute.",
        }
        return render(request, "login.html", context, status=429)
    form = await form_fields(request)
    if not board.guard.token_matches(str(form.get("token", ""))):
        board.guard.login_failed()
        context = {"title": "Log in", "next": target, "error": "That is not the token."}
        return render(request, "login.html", context, status=401)
    response = redirect(request, target)
    response.set_cookie(
        security.SESSION_COOKIE,
        board.guard.session_value,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path=base_path(request) or "/",
    )
    return response


async def _logout(request: Request) -> Response:
    response = redirect(request, "/login")
    response.delete_cookie(security.SESSION_COOKIE, path=base_path(request) or "/")
    return response


def _next_path(given: str) -> str:
    """Where to go after logging in: a path of the dashboard, never another site."""
    if not given.startswith("/") or given.startswith("//") or "\\" in given:
        return "/runs"
    return given


class GuardMiddleware:
    """Applies the :class:`~engine.web.security.Guard` to every request (see that module).

    A POST's body is read here (it is small: a dashboard form) to check its CSRF token, then
    handed on unchanged to the route.
    """

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        path = _relative_path(scope)
        if self.guard.is_exempt(path):
            await self.app(scope, receive, send)
            return
        send = _with_headers(send)
        refusal = await self._refusal(request, path, scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        if request.method in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        if body is None:
            await _plain(413, "request too large")(scope, receive, send)
            return
        if not self._csrf_ok(request, body):
            await _plain(403, "refused: the form's CSRF token is missing or wrong")(
                scope, receive, send
            )
            return
        await self.app(scope, _replay(body), send)

    async def _refusal(self, request: Request, path: str, scope: Scope) -> ASGIApp | None:
        if not self.guard.host_allowed(request):
            return _plain(
                400, "host not allowed: without a token the dashboard answers loopback names only"
            )
        if request.method not in ("GET", "HEAD") and not self.guard.same_origin(request):
            return _plain(403, "refused: a cross-site request")
        if path.startswith("/static/") or path == "/login":
            return None
        if self.guard.logged_in(request):
            return None
        if request.method in ("GET", "HEAD") and "text/event-stream" not in request.headers.get(
            "accept", ""
        ):
            root = str(scope.get("root_path", "")).rstrip("/")
            query = request.url.query
            target = path + (f"?{query}" if query else "")
            return RedirectResponse(f"{root}/login?next={quote(target)}", status_code=303)
        return _plain(401, "log in first (or send Authorization: Bearer <token>)")

    def _csrf_ok(self, request: Request, body: bytes) -> bool:
        given = request.headers.get(security.CSRF_HEADER)
        if given is None and "application/x-www-form-urlencoded" in request.headers.get(
            "content-type", ""
        ):
            values = parse_qs(body.decode("latin-1"), max_num_fields=64).get(security.CSRF_FIELD)
            given = values[0] if values else None
        return self.guard.csrf_valid(given)


# Every page of the dashboard: never inside another site's frame (a framed page's buttons
# could be clicked through a decoy: clickjacking), scripts from the dashboard's files only
# (inline style attributes place the timeline's bars).
SECURITY_HEADERS = [
    (b"x-frame-options", b"DENY"),
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline';"
        b" img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
]


def _with_headers(send: Send) -> Send:
    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
        await send(message)

    return sending


def _relative_path(scope: Scope) -> str:
    path = str(scope.get("path", ""))
    root = str(scope.get("root_path", ""))
    return path[len(root) :] if root and path.startswith(root) else path


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_FORM_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


def _plain(status: int, text: str) -> Response:
    return Response(text + "\n", status_code=status, media_type="text/plain")
