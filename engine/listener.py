"""The LISTEN side of wake-ups: a dedicated connection that survives disconnects.

NOTIFY is only a hint. asyncpg never tells the notification callback that the connection died,
so the listener watches for termination, checks the connection's health with a timed query,
reconnects with backoff, LISTENs again, and wakes the worker for a catch-up after every reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from .db import Database
from .logs import engine_logger

log = engine_logger()


class Listener:
    """Calls ``wake()`` on every notification of the database's schema (its
    :attr:`~engine.db.Database.channel`) and after every (re)connect."""

    def __init__(
        self,
        db: Database,
        wake: Callable[[], None],
        *,
        health_interval: float = 10.0,
        health_timeout: float = 5.0,
    ) -> None:
        self._db = db
        self._wake = wake
        self._health_interval = health_interval
        self._health_timeout = health_timeout
        self._connected = False  # listening since the last failure

    async def run(self) -> None:
        """Listens until cancelled."""
        backoff = 0.1
        while True:
            self._connected = False
            try:
                await self._listen_once()
            except Exception as exc:
                if self._connected:  # it listened since the last failure: this one is new
                    backoff = 0.1
                log.warning(
                    "listener.disconnected",
                    error=str(exc) or repr(exc),
                    error_type=type(exc).__name__,
                    retry_in=backoff,
                )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _listen_once(self) -> None:
        conn = await self._db.dedicated()
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        try:
            await conn.add_listener(self._db.channel, self._on_notify)  # the schema's own
            self._connected = True
            log.debug("listener.connected")
            self._wake()  # catch up on whatever happened while not listening
            while not lost.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._health_interval):
                        await lost.wait()
                if not lost.is_set():
                    async with asyncio.timeout(self._health_timeout):
                        await conn.fetchval("SELECT 1")
            raise ConnectionError("the listening connection was closed")
        finally:
            conn.terminate()

    def _on_notify(self, *_args: Any) -> None:
        self._wake()
