"""Serving the dashboard with uvicorn inside an event loop that runs other things too (the
worker of ``engine dev``), and the refusal to serve it beyond this machine without a token."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import uvicorn
from starlette.types import ASGIApp

from .security import check_binding

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8288  # the port Inngest's dev server uses: its users know it


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the process's owner (the worker of ``engine
    dev``, ``engine dashboard``) handles SIGINT and SIGTERM and stops the server itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class Served:
    """A dashboard being served: its address, and how to stop it."""

    url: str
    app: ASGIApp
    server: uvicorn.Server
    task: asyncio.Task[None]

    async def stop(self) -> None:
        """Stops serving; open live pages are closed (their browsers reconnect elsewhere)."""
        board = getattr(getattr(self.app, "state", None), "dashboard", None)
        if board is not None:
            board.live.end_streams()
        self.server.should_exit = True
        await self.task


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one).

    Raises:
        OSError: the address is taken or cannot be bound.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def url_of(sock: socket.socket) -> str:
    """``http://host:port`` of a bound socket."""
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


async def start(app: ASGIApp, *, host: str, port: int, token: str | None) -> Served:
    """Serves ``app`` on ``host:port`` in this event loop, once the socket listens.

    Raises:
        BindingError: ``host`` is not loopback and there is no token.
        OSError: the port is taken.
    """
    check_binding(host, token)
    sock = bind(host, port)
    config = uvicorn.Config(
        app,
        log_config=None,  # the engine's logging stays as configured
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=2,  # live pages hold connections open
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="dashboard")
    # uvicorn says it started only by a flag; starting takes milliseconds (the socket listens).
    while not server.started and not task.done():  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    if task.done():
        task.result()  # an exception while starting
        raise RuntimeError("the dashboard stopped as it started")
    return Served(url=url_of(sock), app=app, server=server, task=task)
