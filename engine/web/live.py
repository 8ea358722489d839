"""Live pages: server-sent events that carry a page's first rows whenever they change.

The engine NOTIFYs ``engine_wakeup`` when events arrive and when queued runs are created (a
hint without data, see schema.sql), but not when a run changes status (that would put a NOTIFY
on every step's path). So a live page reads its first rows again on every notification and,
between them, every ``interval`` seconds: a keyset query of one page, cheap however many runs
exist. A stream sends the rows only when they changed.

One LISTEN connection serves every open page of the dashboard; it starts with the first stream
(:class:`~engine.listener.Listener` reconnects it if it drops).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.responses import StreamingResponse

from ..app import Engine
from ..listener import Listener
from ..logs import engine_logger

log = engine_logger()

# A stream ends after this long (the browser's EventSource reconnects at once): a server that
# stops never waits long on a page left open.
STREAM_LIFETIME = 300.0
KEEPALIVE = 15.0


class Live:
    """Wake-ups for live pages: NOTIFYs of the reader's database, and a timer."""

    def __init__(self, reader: Engine, *, interval: float = 1.0) -> None:
        self.interval = interval
        self._reader = reader
        self._changed = asyncio.Event()
        self._ending = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _ensure_listening(self) -> None:
        if self._task is None or self._task.done():
            db = await self._reader.database()
            listener = Listener(db, self._wake)
            self._task = asyncio.create_task(listener.run(), name="dashboard listener")

    async def wait(self, within: float | None = None) -> None:
        """Returns at the next notification, or after ``within`` seconds (default: the
        interval)."""
        await self._ensure_listening()
        changed = self._changed
        waits = [asyncio.ensure_future(changed.wait()), asyncio.ensure_future(self._ending.wait())]
        try:
            await asyncio.wait(
                waits,
                timeout=self.interval if within is None else within,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            for waiting in waits:
                waiting.cancel()

    def end_streams(self) -> None:
        """Ends every open stream (the server stops: it need not wait for open pages)."""
        self._ending.set()

    async def close(self) -> None:
        """Stops listening (the app's shutdown)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def response(
        self, rows: Callable[[], Awaitable[str]], *, interval: float | None = None
    ) -> StreamingResponse:
        """The HTTP answer of a live page's stream (:meth:`stream`), unbuffered by proxies."""
        return StreamingResponse(
            self.stream(rows, interval=interval),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def stream(
        self,
        rows: Callable[[], Awaitable[str]],
        *,
        interval: float | None = None,
        lifetime: float = STREAM_LIFETIME,
    ) -> AsyncIterator[str]:
        """Server-sent events: a ``rows`` event with the HTML of ``rows()`` each time it
        changes, a comment now and then to keep proxies from closing the connection."""
        loop = asyncio.get_running_loop()
        end = loop.time() + lifetime
        last: str | None = None
        quiet_since = loop.time()
        yield "retry: 1000\n\n"
        while loop.time() < end and not self._ending.is_set():
            try:
                html = await rows()
            except Exception as error:  # the database went away: say so, try again later
                log.warning("dashboard.live_failed", error=str(error) or repr(error))
                html = last or ""
            if html != last:
                last = html
                quiet_since = loop.time()
                yield message("rows", html)
            elif loop.time() - quiet_since > KEEPALIVE:
                quiet_since = loop.time()
                yield ": keepalive\n\n"
            await self.wait(interval)


def message(event: str, data: str) -> str:
    """One server-sent event: every line of ``data`` prefixed with ``data:``."""
    lines = "".join(f"data: {line}\n" for line in data.splitlines() or [""])
    return f"event: {event}\n{lines}\n"
