"""What the dashboard's pages cost over HTTP, with a million runs in the tables.

    python bench/dashboard.py [--runs 1000000] [--unfinished 5000] [--repeat 200]

Fills a database as bench/listing.py does (`--runs` finished runs of 20 functions, one in 50
FAILED, 5 event names; each event's data holds a `total` from 0 to 999), registers the 20
functions and adds `--unfinished` runs not over (queued, waiting, some parked on a concurrency
slot). Then serves the dashboard (`create_app`) with uvicorn on 127.0.0.1 in a process of its
own and times pages through HTTP from this one (httpx, one connection, one request at a time):
the Runs page (first page, a deep keyset page, by function, by status, a search by expression)
and the Functions, Workers and Bulk (preview) pages. Each figure is p50 and p99 of `--repeat`
requests (a tenth as many, 20 at least, for the search and the preview), after a first one
that warms it (plans, shared buffers, and the search's verdicts, which the Runs page remembers
per run: the first request's time is printed apart), next to its floor: the page's own SQL
timed directly on one connection. Last, a bulk cancel of the 5,000 runs not over, as a job
(recorded, then carried out in batches), timed once. The server and its data folder are removed
at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode
from uuid import uuid4

import asyncpg
import httpx

sys.path.insert(0, str(Path(__file__).parent))

import core
import listing

from engine import Engine, RunStatus
from engine.cursors import run_cursor
from engine.db import Database, queries
from engine.web.bulk_jobs import BATCH, advance, start_bulk_action
from engine.web.overview import RunFilter, bulk_preview
from engine.web.prefilter import prefilter
from engine.web.run_pages import PREFILTERED_BATCH

PAGE = 50  # the Runs page's rows
DEEP = 100_000
SEARCH = "event.data.total > 990"  # 9 values in 1,000: the search reads its most per page
UNTRANSLATED = "event.data.total % 100 == 99"  # no prefilter: every run read is evaluated
SERVE = """
import sys, uvicorn
from engine import Engine
from engine.web import create_app
uvicorn.run(create_app(Engine("bench-dashboard", sys.argv[1])), host="127.0.0.1",
            port=int(sys.argv[2]), log_level="warning", access_log=False)
"""
REGISTER = """
INSERT INTO engine.functions (app_id, function_id, triggers, config, live_until)
SELECT 'shop', 'fn-' || n, jsonb_build_array(jsonb_build_object('event', 'order/' || (n % 5),
       'expression', NULL)), jsonb_build_object('retries', 4, 'concurrency',
       jsonb_build_array(jsonb_build_object('limit', 5, 'key', NULL, 'scope', 'fn',
                                            'ordering', NULL))), now() + interval '1 day'
FROM generate_series(0, 19) n;
INSERT INTO engine.events (id, name, data, ts, received_at)
SELECT 'live-' || g, 'order/' || (g % 5), jsonb_build_object('total', g % 1000), now(), now()
FROM generate_series(1, $1) g;
INSERT INTO engine.runs (app_id, function_id, status, event_seq, dedupe_key, due_at, blocked_on,
                         waiting_reason, created_at, updated_at)
SELECT 'shop', 'fn-' || (e.seq % 20), (ARRAY['QUEUED', 'WAITING', 'SLEEPING'])[1 + e.seq % 3],
       e.seq, 'event:' || e.seq,
       CASE WHEN e.seq % 3 = 1 THEN 'infinity' ELSE now() - interval '1 s' END,
       CASE WHEN e.seq % 9 = 0 THEN 'fn:shop/fn-' || (e.seq % 20) END,
       CASE WHEN e.seq % 9 = 0 THEN 'concurrency limit reached' END, e.ts, e.ts
FROM engine.events e WHERE e.id LIKE 'live-%';
ANALYZE;
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def serve(url: str) -> tuple[subprocess.Popen[bytes], str]:
    """The dashboard in a uvicorn process of its own, and its address."""
    port = free_port()
    env = {**os.environ, "ENGINE_LOG_LEVEL": "warning"}
    server = subprocess.Popen([sys.executable, "-c", SERVE, url, str(port)], env=env)
    return server, f"http://127.0.0.1:{port}"


async def answering(server: subprocess.Popen[bytes], base: str) -> None:
    """Returns once the dashboard answers."""
    async with httpx.AsyncClient(base_url=base) as http:
        for _ in range(300):
            try:
                if (await http.get("/runs")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    server.kill()
    raise RuntimeError("the dashboard did not answer within 30 s")


def stats(samples: list[float]) -> str:
    """p50 and p99 of the timings after the first (warming) one."""
    ms = [s * 1000 for s in samples[1:]]
    return f"{statistics.median(ms):8.2f} {core.percentile(ms, 0.99):8.2f}"


async def timed(action: Callable[[], Awaitable[Any]], repeat: int) -> list[float]:
    """``repeat`` timings after a first, warming call (plans cached, pages in shared
    buffers, a search's verdicts remembered); the first call's time comes first."""
    begin = time.perf_counter()
    await action()
    samples = [time.perf_counter() - begin]
    for _ in range(repeat):
        begin = time.perf_counter()
        await action()
        samples.append(time.perf_counter() - begin)
    return samples


def page(http: httpx.AsyncClient, path: str) -> Callable[[], Awaitable[Any]]:
    async def get() -> None:
        response = await http.get(path)
        if response.status_code != 200:
            raise RuntimeError(f"{path}: {response.status_code} {response.text[:300]}")

    return get


def sql(conn: asyncpg.Connection, name: str, *args: Any) -> Callable[[], Awaitable[Any]]:
    text = queries()[name]
    return lambda: conn.fetch(text, *args)


def search_floor(conn: asyncpg.Connection) -> Callable[[], Awaitable[Any]]:
    """The SQL of the search's first page: batches of PREFILTERED_BATCH runs read with the
    expression's prefilter until they hold a page of candidates (or 20,000 runs are read),
    without evaluating the expression itself."""
    text = queries()["dashboard_run_search"]
    path = prefilter(SEARCH)

    async def batches() -> None:
        after: tuple[Any, Any] = (None, None)
        kept = 0
        for _ in range(20_000 // PREFILTERED_BATCH):
            rows = await conn.fetch(text, *[None] * 6, *after, PREFILTERED_BATCH, path)
            kept += sum(row["candidate"] for row in rows)
            after = (rows[-1]["created_at"], rows[-1]["id"])
            if kept >= PAGE:
                return

    return batches


async def measure(url: str, runs: int, unfinished: int, repeat: int) -> None:
    target = await core.fresh_database(url, "bench_dashboard")
    await Database(target).apply_schema()
    conn = await asyncpg.connect(target)
    server = None
    try:
        begin = time.perf_counter()
        await listing.fill(conn, runs, data="jsonb_build_object('total', g % 1000)")
        await conn.execute(REGISTER.replace("$1", str(int(unfinished))))
        print(f"filled {runs:,} + {unfinished:,} runs in {time.perf_counter() - begin:.1f} s")
        deep = await conn.fetchrow(
            "SELECT created_at, id FROM engine.runs ORDER BY created_at DESC, id DESC"
            f" OFFSET {DEEP - 1} LIMIT 1"
        )
        cursor = run_cursor(deep["created_at"], str(deep["id"]))
        now = await conn.fetchval("SELECT engine.now()")
        server, base = serve(target)
        await answering(server, base)
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            cases = _cases(http, conn, cursor, deep, now)
            print(f"{'page (HTTP)':<34} {'p50 ms':>8} {'p99 ms':>8}   {'floor p50 / p99 ms':>18}")
            for name, (request, floor) in cases.items():
                # A search, and a preview counting rare matches, read many runs: fewer repeats.
                slow = "search" in name or "preview" in name
                times = max(20, repeat // 10) if slow else repeat
                over_http = await timed(request, times)
                line = f"{name:<34} {stats(over_http)}"
                if floor is not None:
                    line += f"   {stats(await timed(floor, times))}"
                line += f"   (first {over_http[0] * 1000:.0f} ms)"
                print(line, flush=True)
        await _one_click(target, now)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        await conn.close()


def _cases(
    http: httpx.AsyncClient, conn: asyncpg.Connection, cursor: str, deep: Any, now: Any
) -> dict[str, tuple[Callable[[], Awaitable[Any]], Callable[[], Awaitable[Any]] | None]]:
    keyset = ("run_summaries", None)
    day = now - timedelta(days=1)
    return {
        "runs: first page": (page(http, "/runs"), sql(conn, *keyset, *[None] * 7, PAGE + 1)),
        f"runs: after {DEEP:,} (cursor)": (
            page(http, f"/runs?{urlencode({'cursor': cursor})}"),
            sql(conn, *keyset, *[None] * 5, deep["created_at"], deep["id"], PAGE + 1),
        ),
        "runs: one function": (
            page(http, "/runs?function=fn-7"),
            sql(conn, *keyset, "fn-7", *[None] * 6, PAGE + 1),
        ),
        "runs: FAILED": (
            page(http, "/runs?status=FAILED"),
            sql(conn, *keyset, None, ["FAILED"], *[None] * 5, PAGE + 1),
        ),
        f"runs: search {SEARCH}": (
            page(http, f"/runs?{urlencode({'q': SEARCH})}"),
            search_floor(conn),
        ),
        f"runs: search {UNTRANSLATED}": (
            page(http, f"/runs?{urlencode({'q': UNTRANSLATED})}"),
            None,
        ),
        "functions": (page(http, "/functions"), _functions_floor(conn, now, day)),
        "workers": (page(http, "/workers"), sql(conn, "overview_leases", 5000)),
        "bulk preview: one function, FAILED": (
            page(http, "/bulk?function=fn-7&status=FAILED"),
            sql(conn, "bulk_preview_ended", "shop", "fn-7", ["FAILED"], None, None, now, 10_001),
        ),
        "bulk preview: one function, CANCELLED": (
            page(http, "/bulk?function=fn-7&status=CANCELLED"),
            sql(conn, "bulk_preview_ended", "shop", "fn-7", ["CANCELLED"], None, None, now, 10_001),
        ),
        "bulk preview: every run, QUEUED": (
            page(http, "/bulk?status=QUEUED"),
            sql(conn, "bulk_preview_unfinished", None, None, ["QUEUED"], None, None, now, 10_001),
        ),
    }


async def _one_click(url: str, now: Any) -> None:
    """A bulk cancel of the runs not over as the Bulk page starts it: a job recorded at once,
    then carried out in batches of BATCH (timed once: it changes the data)."""
    app = Engine("bench-dashboard", url)
    try:
        chosen = RunFilter(statuses=[RunStatus.QUEUED, RunStatus.WAITING, RunStatus.SLEEPING])
        preview = await bulk_preview(app, chosen)
        begin = time.perf_counter()
        job, _ = await start_bulk_action(
            app, "cancel", preview.filter, key=uuid4(), expected=preview.runs
        )
        started = time.perf_counter() - begin
        batches = 1
        while await advance(app, job):
            batches += 1
        took = time.perf_counter() - begin
        [row] = await (await app.database()).fetch("bulk_actions_recent", 1)
    finally:
        await app.close()
    print(
        f"bulk cancel: job recorded in {started * 1000:.1f} ms; {row['acted']:,} runs cancelled"
        f" in {took:.2f} s ({batches} batches of {BATCH}: {took / batches:.2f} s a batch,"
        f" {took / max(row['acted'], 1) * 1000:.2f} ms a run)"
    )


def _functions_floor(
    conn: asyncpg.Connection, now: Any, since: Any
) -> Callable[[], Awaitable[Any]]:
    async def three() -> None:
        await conn.fetch(queries()["overview_functions"], None)
        await conn.fetch(queries()["overview_unfinished"], None, now)
        await conn.fetch(queries()["overview_recent"], None, since, 1000)

    return three


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--unfinished", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    with core.scratch_server("engine-bench-dashboard-") as url:
        asyncio.run(measure(url, args.runs, args.unfinished, args.repeat))


if __name__ == "__main__":
    main()
