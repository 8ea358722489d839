"""The HTTP event API (#15) against its floor, on an embedded PostgreSQL with durable settings.

    python bench/http_events.py [--events 20000] [--connections 16] [--batch 100]
                                [--latency 300] [--repeat 3]

One uvicorn process serves ``POST /e/{key}`` (engine/web/event_api.py) on loopback; this
process posts to it and runs the worker. Figures, each the median of the repeats (min, max):

- accepted/s: events stored per second over HTTP, one event per request, ``--connections``
  keep-alive connections posting at once (no worker running: only the intake is measured);
  then ``--batch`` events per request. The floor: ``app.send`` called directly, as many
  concurrent callers, one event (then a batch) per call.
- latency: a request's start to the first step of the run its event starts (one request at a
  time, a worker in this process records the time in the step), p50/p99; the floor: the same
  from ``app.send``.

The posting client is a few lines of asyncio speaking HTTP/1.1 with keep-alive (requests built
once), so that the client's own cost stays small beside the server's on a 2-core machine. The
load average of the machine is printed with the figures (other work on it moves them), and
everything is written to bench/results/http_events.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

from engine import Context, Engine, Event, TriggerEvent
from engine.db import Database
from engine.embedded import start
from engine.keys import create_key
from engine.logs import configure_logging


# -- the server (a process of its own: python bench/http_events.py --serve URL PORT) ---------------
def serve(url: str, port: int) -> None:
    """Serves the event API on 127.0.0.1:``port`` with an Engine on ``url`` (no access log:
    the key is in the path, and logging each request is no part of the intake's cost)."""
    import uvicorn
    from starlette.applications import Starlette

    from engine.web.event_api import event_api_routes

    web = Starlette(routes=event_api_routes())
    web.state.engine = Engine("bench-http-server", url, pool_size=20)
    uvicorn.run(web, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def start_server(url: str) -> tuple[subprocess.Popen[bytes], int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    command = [sys.executable, __file__, "--serve", url, str(port)]
    server = subprocess.Popen(command)
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
            return server, port
        if time.monotonic() > deadline or server.poll() is not None:
            server.kill()
            raise RuntimeError("the event API server did not start")
        time.sleep(0.05)


# -- the client ------------------------------------------------------------------------------------
def request(port: int, key: str, body: bytes) -> bytes:
    """One POST /e/{key} request, built once and sent as many times as needed."""
    head = (
        f"POST /e/{key} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class Connection:
    """A keep-alive HTTP/1.1 connection that posts prepared requests one after the other."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def post(self, prepared: bytes) -> dict[str, Any]:
        self.writer.write(prepared)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        answer: dict[str, Any] = json.loads(await self.reader.readexactly(length))
        if status != 200:
            raise RuntimeError(f"refused: {status} {answer}")
        return answer

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def concurrently(callers: int, calls: int, call: Callable[[int], Awaitable[object]]) -> float:
    """Runs ``calls`` calls of ``call`` (given each caller's number) from ``callers`` tasks at
    once; the seconds it took."""
    remaining = iter(range(calls))

    async def caller(number: int) -> None:
        for _ in remaining:
            await call(number)

    started = time.perf_counter()
    async with asyncio.TaskGroup() as tasks:
        for number in range(callers):
            tasks.create_task(caller(number))
    return time.perf_counter() - started


# -- the figures -----------------------------------------------------------------------------------
async def accepted_over_http(port: int, key: str, args: argparse.Namespace, batch: int) -> float:
    """Events stored per second, ``batch`` events per request."""
    body = json.dumps([{"name": "bench/http", "data": {"n": 1}}] * batch).encode()
    if batch == 1:
        body = json.dumps({"name": "bench/http", "data": {"n": 1}}).encode()
    prepared = request(port, key, body)
    connections = [await Connection.open(port) for _ in range(args.connections)]
    try:
        requests: int = args.events // batch
        seconds = await concurrently(
            args.connections, requests, lambda n: connections[n].post(prepared)
        )
    finally:
        for connection in connections:
            await connection.close()
    return requests * batch / seconds


async def accepted_by_send(url: str, args: argparse.Namespace, batch: int) -> float:
    """The floor: ``app.send`` from as many concurrent callers."""
    app = Engine("bench-http-floor", url, pool_size=20)
    events = [Event(name="bench/http", data={"n": 1}) for _ in range(batch)]
    try:
        await app.database()
        requests: int = args.events // batch
        seconds = await concurrently(args.connections, requests, lambda _: app.send(events))
    finally:
        await app.close()
    return requests * batch / seconds


async def latencies(url: str, port: int, key: str, count: int) -> dict[str, float]:
    """Request (or send) to the first step of the run, one at a time: p50 and p99 in ms."""
    app = Engine("bench-http-latency", url)
    stamps: dict[str, float] = {}
    arrived = asyncio.Event()

    async def stamp(label: str) -> None:
        stamps.setdefault(label, time.perf_counter())
        arrived.set()

    @app.create_function("first-step", trigger=TriggerEvent("bench/latency"))
    async def first_step(ctx: Context) -> None:
        await ctx.step.run("stamp", stamp, ctx.event.data["i"])

    connection = await Connection.open(port)
    figures: dict[str, list[float]] = {"http": [], "send": []}
    try:
        async with app.worker(concurrency=10):
            await asyncio.sleep(0.5)
            for i in range(2 * count):
                way = "http" if i % 2 else "send"  # interleaved: the same load for both
                event = {"name": "bench/latency", "data": {"i": f"{way}-{i}"}}
                arrived.clear()
                started = time.perf_counter()
                if way == "http":
                    await connection.post(request(port, key, json.dumps(event).encode()))
                else:
                    await app.send(Event.model_validate(event))
                await arrived.wait()
                figures[way].append((stamps[f"{way}-{i}"] - started) * 1000)
    finally:
        await connection.close()
        await app.close()
    return {
        f"{way}_{name}_ms": _percentile(samples, q)
        for way, samples in figures.items()
        for name, q in (("p50", 0.5), ("p99", 0.99))
    }


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(samples: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {
        key: {
            "median": statistics.median(s[key] for s in samples),
            "min": min(s[key] for s in samples),
            "max": max(s[key] for s in samples),
        }
        for key in samples[0]
    }


async def one_repeat(url: str, port: int, key: str, args: argparse.Namespace) -> dict[str, float]:
    figures = {
        "http_events_per_s": await accepted_over_http(port, key, args, 1),
        "send_events_per_s": await accepted_by_send(url, args, 1),
        "http_batched_events_per_s": await accepted_over_http(port, key, args, args.batch),
        "send_batched_events_per_s": await accepted_by_send(url, args, args.batch),
    }
    await _empty(url)  # the latency's worker would otherwise route these first
    figures.update(await latencies(url, port, key, args.latency))
    await _empty(url)
    return figures


async def commit_ms(url: str, commits: int = 200) -> float:
    """What one commit of a one-row INSERT costs on this server now (the disk's share of every
    figure, which other work on the machine moves), in ms."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE TEMP TABLE probe (x int)")
        started = time.perf_counter()
        for _ in range(commits):
            await conn.execute("INSERT INTO probe VALUES (1)")
        return (time.perf_counter() - started) * 1000 / commits
    finally:
        await conn.close()


async def _empty(url: str) -> None:
    """Forgets the events sent so far, so that each figure starts from the same tables."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("TRUNCATE engine.event_queue, engine.events CASCADE")
    finally:
        await conn.close()


async def main(args: argparse.Namespace) -> None:
    configure_logging("warning")
    folder = Path(tempfile.mkdtemp(prefix="engine-bench-http-"))
    url, server = start(folder / "pg")
    try:
        await Database(url).apply_schema()
        keys_app = Engine("bench-http-keys", url)
        key = (await create_key(keys_app, f"bench-{os.getpid()}")).key
        await keys_app.close()
        api, port = start_server(url)
        try:
            load_before = os.getloadavg()
            commit_before = await commit_ms(url)
            repeats = [await one_repeat(url, port, key, args) for _ in range(args.repeat)]
            commit_after = await commit_ms(url)
            load_after = os.getloadavg()
        finally:
            api.terminate()
            api.wait(timeout=30)
        figures = summarize(repeats)
        for name, figure in figures.items():
            spread = f"{figure['min']:.2f}-{figure['max']:.2f}"
            print(f"{name:<28} {figure['median']:>10.2f}  ({spread})")
        ratios = {
            "http/send, one event a request": "http_events_per_s",
            f"http/send, {args.batch} events a request": "http_batched_events_per_s",
        }
        for label, name in ratios.items():
            floor = figures[name.replace("http", "send")]["median"]
            print(f"{label:<36} {figures[name]['median'] / floor:.2f}")
        for way in ("p50", "p99"):
            ratio = figures[f"http_{way}_ms"]["median"] / figures[f"send_{way}_ms"]["median"]
            print(f"latency {way} http/send{'':<20} {ratio:.2f}")
        print(f"load average (1, 5, 15 min): before {load_before}, after {load_after}")
        print(f"CPUs: {os.cpu_count()}")
        print(f"one INSERT commit: {commit_before:.2f} ms before, {commit_after:.2f} ms after")
        out = Path(__file__).parent / "results"
        out.mkdir(exist_ok=True)
        result = {
            "date": time.strftime("%Y-%m-%d"),
            "args": vars(args),
            "load_average": {"before": load_before, "after": load_after},
            "commit_ms": {"before": commit_before, "after": commit_after},
            "figures": figures,
        }
        (out / "http_events.json").write_text(json.dumps(result, indent=2))
    finally:
        server.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20_000, help="events per intake figure")
    parser.add_argument("--connections", type=int, default=16, help="concurrent posters")
    parser.add_argument("--batch", type=int, default=100, help="events per batched request")
    parser.add_argument("--latency", type=int, default=300, help="samples of each latency")
    parser.add_argument("--repeat", type=int, default=3)
    return parser.parse_args()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        serve(sys.argv[2], int(sys.argv[3]))
    else:
        asyncio.run(main(arguments()))
