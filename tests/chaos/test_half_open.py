"""Chaos 3b: half-open connections. A TCP proxy between the worker and PostgreSQL stops
forwarding on every connection it carries (packets silently dropped, sockets left open, as in a
network partition or a dead NAT entry). No run is lost: queries on dead connections time out
and are retried on new ones, the poll finds the work meanwhile, and the listener's health query
notices its connection is dead, reconnects, and wake-ups resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

from helpers import eventually
from structlog.testing import capture_logs

from engine import Context, Engine, Event, TriggerEvent


class Proxy:
    """Forwards TCP to PostgreSQL's Unix socket; `partition()` silences the connections open."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.generation = 0  # connections of an older generation forward nothing
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    def partition(self) -> None:
        self.generation += 1

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        born = self.generation
        server_r, server_w = await asyncio.open_unix_connection(self.socket_path)
        self.writers += [client_w, server_w]
        await asyncio.gather(
            self._pipe(client_r, server_w, born),
            self._pipe(server_r, client_w, born),
            return_exceptions=True,
        )

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, born: int
    ) -> None:
        while data := await reader.read(65536):
            if self.generation == born:  # after a partition: read and drop, never close
                writer.write(data)
                await writer.drain()
        writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in self.writers:
            writer.close()
        for writer in self.writers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1)
        if self.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 1)


async def test_half_open_connections_cost_latency_never_runs(
    database_url: str, make_engine: Any
) -> None:
    parts = urlsplit(database_url)
    host = parse_qs(parts.query)["host"][0]
    proxy = Proxy(f"{host}/.s.PGSQL.{parts.port or 5432}")
    port = await proxy.start()
    via_proxy = f"postgresql://postgres@127.0.0.1:{port}{parts.path}"
    app = Engine("test", via_proxy, command_timeout=3.0)
    direct = make_engine()  # sends from outside the partition
    started: dict[int, float] = {}

    @app.create_function("ping", trigger=TriggerEvent("chaos/half-open"))
    async def ping(ctx: Context) -> None:
        started.setdefault(ctx.event.data["n"], time.monotonic())

    async def send(n: int) -> float:
        sent = time.monotonic()
        await direct.send(Event(name="chaos/half-open", data={"n": n}))
        await eventually(lambda: _has(started, n), timeout=40)
        return started[n] - sent

    try:
        async with app.worker(poll_interval="5s", listen_check="2s"):
            assert await send(0) < 2.5  # NOTIFY through the proxy
            pool = (await app.database()).pool  # several connections open, all to be cut off
            await asyncio.gather(*(pool.fetchval("SELECT pg_sleep(0.05)") for _ in range(5)))
            proxy.partition()
            with capture_logs() as logs:
                during = await send(1)  # not lost: found by the poll once a query times out
            # The first connection found dead takes its siblings out of the pool: the worker
            # loses one tick to the partition, not one per connection.
            assert [line["event"] for line in logs].count("worker.tick_failed") <= 1, logs
            await asyncio.sleep(5)  # the listener's probe (every 2 s, 2 s timeout) gives up
            after = await send(2)
            assert after < 2.5  # listening again on a new connection
        print(
            f"\nchaos half-open: the event sent during the partition started after"
            f" {during:.1f} s; one sent after the listener's probe, after {after * 1000:.0f} ms"
        )
    finally:
        await app.close()
        await proxy.close()


async def _has(started: dict[int, float], n: int) -> bool:
    return n in started
