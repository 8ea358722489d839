"""The dashboard (engine.web) against a real PostgreSQL, driven in process through httpx's ASGI
transport: pages render real runs, filters and the search by expression choose the right ones,
pages follow each other by keyset, actions act and refuse cross-site requests, a token guards
it, and it refuses to listen beyond this machine without one."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from helpers import dev_environment, eventually, only_run_id, start_engine_dev
from starlette.applications import Starlette
from starlette.routing import Mount

from engine import Context, Engine, Event, NonRetriableError, RunStatus, TriggerEvent
from engine.web import create_app
from engine.web.security import BindingError, check_binding, is_loopback
from engine.web.serve import start

ORIGIN = "http://127.0.0.1:8288"


def client(app: Any, base: str = ORIGIN) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base)


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf-token" content="([0-9a-f]+)"', html)
    assert found, "the page carries no CSRF token"
    return found.group(1)


def shop(app: Engine) -> None:
    """``busy``: a step that fails once, a sleep and a wait; ``fragile``: fails for good at
    its second step; ``pack``: completes at once."""

    @app.create_function("busy", trigger=TriggerEvent("t/busy"), retries=2)
    async def busy(ctx: Context) -> Any:
        def flaky(n: int, *, unit: str) -> str:
            if ctx.attempt < 1:
                raise ValueError("the first try fails")
            return f"ok {n} {unit}"

        await ctx.step.run("flaky", flaky, ctx.event.data.get("n"), unit="parcel")
        await ctx.step.sleep("nap", "30ms")
        return await ctx.step.wait_for_event("reply", event="t/reply", timeout="1h")

    @app.create_function("fragile", trigger=TriggerEvent("t/fragile"), retries=0)
    async def fragile(ctx: Context) -> Any:
        await ctx.step.run("first", lambda: 1)

        def second() -> int:
            if not ctx.event.data.get("fixed"):
                raise NonRetriableError("second step refuses")
            return 2

        return await ctx.step.run("second", second)

    @app.create_function("pack", trigger=TriggerEvent("t/pack"))
    async def pack(ctx: Context) -> Any:
        return {"packed": ctx.event.data.get("n")}


async def run_of(app: Engine, event: Event) -> str:
    [event_id] = await app.send(event)
    return await only_run_id(app, event_id)


async def status_is(app: Engine, run_id: str, status: RunStatus) -> None:
    async def reached() -> bool:
        return (await app.get_run(run_id)).status is status

    await eventually(reached, timeout=20)


@pytest.fixture
async def shop_app(make_engine: Any) -> AsyncIterator[Engine]:
    app = make_engine("shop")
    shop(app)
    async with app.worker(poll_interval="100ms"):
        yield app


# -- pages -----------------------------------------------------------------------------------------
async def test_the_pages_render_real_runs_and_the_timeline_has_each_bar(shop_app: Engine) -> None:
    """Runs, Run, Events and Event pages render a waiting run with a retried step, a sleep and
    a wait (each a bar with its details), and a failed run with its error and traceback."""
    app = shop_app
    busy = await run_of(app, Event(name="t/busy", data={"n": 1}))
    await status_is(app, busy, RunStatus.WAITING)
    fragile = await run_of(app, Event(name="t/fragile"))
    await app.wait_for_run(fragile)
    async with client(create_app(app)) as http:
        runs = await http.get("/runs")
        assert runs.status_code == 200
        assert busy in runs.text and fragile in runs.text
        assert "WAITING" in runs.text and "FAILED" in runs.text
        for params in (
            {"status": "WAITING"},
            {"status": "going"},
            {"status": ["QUEUED", "WAITING"], "q": "event.data.n == 1"},
        ):
            going = (await http.get("/runs", params=params)).text  # runs not over: their indexes
            assert busy in going and fragile not in going, params
        page = (await http.get(f"/runs/{busy}")).text
        for label in ("flaky #1 ✗", "flaky #2 ✓", "sleep nap", "wait reply"):
            assert label in page, label
        assert "the first try fails" in page and "Traceback" in page  # the failed attempt
        # Each attempt's input (its arguments), the failed one's too: two blocks.
        assert page.count("<h4>input</h4>") == 2
        assert "&#34;unit&#34;: &#34;parcel&#34;" in page
        assert 'id="cancel"' in page
        failed = (await http.get(f"/runs/{fragile}")).text
        assert "second step refuses" in failed and "NonRetriableError" in failed
        events = (await http.get("/events")).text
        assert "t/busy" in events and f"/runs/{busy}" in events
        assert "engine/function.failed" not in events  # the engine's own, on request only
        system = (await http.get("/events", params={"system": "1"})).text
        assert "engine/function.failed" in system and "t/busy" in system
        run = await app.get_run(busy)
        event_page = await http.get(f"/events/{run.event.id}")
        assert event_page.status_code == 200 and busy in event_page.text
        assert (await http.get("/runs/00000000-0000-0000-0000-000000000000")).status_code == 404
        assert (await http.get("/events/no-such-event")).status_code == 404


async def test_filters_and_the_search_by_expression_choose_runs(shop_app: Engine) -> None:
    """Function, status, event name, time range and a CEL search over the event each narrow
    the list; an invalid expression says why."""
    app = shop_app
    packs = [await run_of(app, Event(name="t/pack", data={"n": n})) for n in range(5)]
    fragile = await run_of(app, Event(name="t/fragile"))
    for run_id in [*packs, fragile]:
        await app.wait_for_run(run_id)
    async with client(create_app(app)) as http:

        async def listed(**params: Any) -> set[str]:
            response = await http.get("/runs", params=params)
            assert response.status_code == 200, response.text
            return set(re.findall(r'<tr data-id="([0-9a-f-]{36})"', response.text))

        assert await listed(function="pack") == set(packs)
        assert await listed(status="FAILED") == {fragile}
        assert await listed(status="ended") == {*packs, fragile}
        assert await listed(status="going") == set()
        assert await listed(event="t/fragile") == {fragile}
        assert await listed(q="event.data.n >= 3") == set(packs[3:])
        assert await listed(q="event.data.n >= 3", status="FAILED") == set()
        assert await listed(range="15m") == {*packs, fragile}
        future = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S")
        assert await listed(since=future) == set()
        assert await listed(until=future) == {*packs, fragile}
        bad = await http.get("/runs", params={"q": "event.data.n >"})
        assert bad.status_code == 400 and "invalid expression" in bad.text
        assert (await http.get("/runs", params={"status": "NOPE"})).status_code == 400
        assert (await http.get("/runs", params={"cursor": "garbage"})).status_code == 400


async def test_pages_follow_each_other_by_keyset(shop_app: Engine) -> None:
    """With two runs a page, the Older links walk every run once, newest first; a search
    pages the same way."""
    app = shop_app
    packs = [await run_of(app, Event(name="t/pack", data={"n": n})) for n in range(5)]
    for run_id in packs:
        await app.wait_for_run(run_id)
    async with client(create_app(app)) as http:
        for params in ({"limit": "2"}, {"limit": "2", "q": "event.data.n % 2 == 0"}):
            seen: list[str] = []
            url: str | None = "/runs"
            query: dict[str, Any] | None = params
            while url is not None:
                page = (await http.get(url, params=query)).text
                seen += re.findall(r'<tr data-id="([0-9a-f-]{36})"', page)
                older = re.search(r'href="([^"]+)" id="older"', page)
                url, query = (older.group(1).replace("&amp;", "&"), None) if older else (None, None)
            expected = packs[::-1] if "q" not in params else [packs[4], packs[2], packs[0]]
            assert seen == expected, params


async def test_a_search_reads_a_bounded_number_of_runs_per_page(
    shop_app: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A search that finds nothing among the runs it may evaluate per page (an expression with
    no prefilter: each run read is evaluated), or read (with one), says how many it read and
    offers the older ones; the next page goes on from there and finds the match."""
    from engine.web import run_pages

    monkeypatch.setattr(run_pages, "SEARCH_BATCH", 2)
    monkeypatch.setattr(run_pages, "SEARCH_SCAN", 4)
    monkeypatch.setattr(run_pages, "PREFILTERED_BATCH", 2)
    monkeypatch.setattr(run_pages, "SEARCH_READ", 4)
    app = shop_app
    packs = [await run_of(app, Event(name="t/pack", data={"n": n})) for n in range(6)]
    for run_id in packs:
        await app.wait_for_run(run_id)
    async with client(create_app(app)) as http:
        for search in ("!(event.data.n > 0)", "event.data.n == 0"):
            first = (await http.get("/runs", params={"q": search})).text
            assert "The search read 4 runs" in first and "No runs among the 4 read" in first
            older = re.search(r'href="([^"]+)" id="older"', first)
            assert older, search
            second = (await http.get(older.group(1).replace("&amp;", "&"))).text
            assert re.findall(r'<tr data-id="([0-9a-f-]{36})"', second) == [packs[0]], search
            assert 'id="older"' not in second


async def test_a_search_evaluates_only_the_runs_its_prefilter_keeps(shop_app: Engine) -> None:
    """PostgreSQL drops the runs whose event cannot match the translatable part of the
    expression: CEL evaluates the one run that matches it, not the other five; an untranslated
    expression evaluates every run it reads."""
    from engine.web import run_pages

    app = shop_app
    packs = [await run_of(app, Event(name="t/pack", data={"n": n})) for n in range(6)]
    for run_id in packs:
        await app.wait_for_run(run_id)
    async with client(create_app(app)) as http:
        search = "event.data.n == 4 && event.data.n % 2 == 0"
        page = (await http.get("/runs", params={"q": search})).text
        assert re.findall(r'<tr data-id="([0-9a-f-]{36})"', page) == [packs[4]]
        assert "The search read 6 runs" in page
        assert len(_verdicts_of(run_pages, search, packs)) == 1
        untranslated = "event.data.n % 3 == 1"  # the verdicts are the process's: a new one
        page = (await http.get("/runs", params={"q": untranslated})).text
        assert len(_verdicts_of(run_pages, untranslated, packs)) == 6


def _verdicts_of(run_pages: Any, search: str, runs: list[str]) -> list[str]:
    """The runs among ``runs`` whose verdict the dashboard remembers for ``search``."""
    return [run for run in runs if (search, run) in run_pages._verdicts]


async def test_the_pages_read_through_the_engine_reader_role(
    database_url: str, shop_app: Engine, sql: Any
) -> None:
    """A dashboard reading as a login granted only engine_reader (ops/roles.sql) renders every
    page; its actions go through the Engine that may write."""
    from test_security import ROLES_SQL, as_user

    await sql.execute(ROLES_SQL.read_text())
    user = f"dash_reader_{os.getpid()}"
    await sql.execute(f"DROP ROLE IF EXISTS {user}")
    await sql.execute(f"CREATE ROLE {user} LOGIN IN ROLE engine_reader")
    reader = Engine("dashboard", as_user(database_url, user))
    try:
        waiting = await run_of(shop_app, Event(name="t/busy"))
        await status_is(shop_app, waiting, RunStatus.WAITING)
        event_id = (await shop_app.get_run(waiting)).event.id
        async with client(create_app(shop_app, reader=reader)) as http:
            for path in (
                "/runs",
                f"/runs/{waiting}",
                "/events",
                f"/events/{event_id}",
                "/runs?q=event.name%20%3D%3D%20%27t%2Fbusy%27",
                "/runs/rows",
                "/events/rows",
            ):
                page = await http.get(path)
                assert page.status_code == 200, (path, page.text[-2000:])
            token = csrf_of((await http.get("/runs")).text)
            cancelled = await http.post(f"/runs/{waiting}/cancel", data={"csrf": token})
            assert cancelled.status_code == 303
        assert (await shop_app.get_run(waiting)).status is RunStatus.CANCELLED
    finally:
        await reader.close()
        await sql.execute(f"DROP OWNED BY {user}")
        await sql.execute(f"DROP ROLE IF EXISTS {user}")


async def test_the_rows_fragment_and_the_live_stream_carry_new_runs(shop_app: Engine) -> None:
    """The live stream sends the first rows, then again when a new run appears (the NOTIFY of
    its event wakes it)."""
    app = shop_app
    web = create_app(app)
    board = web.state.dashboard
    first = await run_of(app, Event(name="t/pack", data={"n": 1}))
    async with client(web) as http:
        rows = await http.get("/runs/rows")
        assert first in rows.text and "<html" not in rows.text
        events_rows = await http.get("/events/rows")
        assert "t/pack" in events_rows.text and "<html" not in events_rows.text

    from starlette.requests import Request

    request = Request({"type": "http", "app": web, "query_string": b"", "headers": []})
    from engine.web.layout import render_text
    from engine.web.run_pages import _rows_context

    async def rendered() -> str:
        return render_text(request, "run_rows.html", await _rows_context(request))

    stream = board.live.stream(rendered, interval=30)
    try:
        assert (await anext(stream)).startswith("retry:")
        assert first in await anext(stream)
        second = await run_of(app, Event(name="t/pack", data={"n": 2}))
        message = await asyncio.wait_for(anext(stream), 10)  # long before the 30 s interval
        assert message.startswith("event: rows") and second in message
    finally:
        await stream.aclose()
        await board.live.close()


# -- actions ---------------------------------------------------------------------------------------
async def test_cancel_rerun_send_and_replay(shop_app: Engine) -> None:
    """Cancel a waiting run, rerun a failed one from its failed step, send an event (and see
    why a bad one is refused, nothing stored), replay an event."""
    app = shop_app
    waiting = await run_of(app, Event(name="t/busy"))
    await status_is(app, waiting, RunStatus.WAITING)
    failed = await run_of(app, Event(name="t/fragile"))
    await app.wait_for_run(failed)
    async with client(create_app(app)) as http:
        token = csrf_of((await http.get("/runs")).text)
        cancelled = await http.post(f"/runs/{waiting}/cancel", data={"csrf": token})
        assert cancelled.status_code == 303
        assert (await app.get_run(waiting)).status is RunStatus.CANCELLED
        assert "Cancelled" in (await http.get(cancelled.headers["location"])).text

        rerun = await http.post(
            f"/runs/{failed}/rerun", data={"csrf": token, "from_step": "second"}
        )
        assert rerun.status_code == 303
        new_id = urlsplit(rerun.headers["location"]).path.rsplit("/", 1)[1]
        assert new_id != failed
        again = await app.wait_for_run(new_id)
        assert [s.step_id for s in again.steps][:1] == ["first"]  # kept from the original
        unknown = await http.post(f"/runs/{failed}/rerun", data={"csrf": token, "from_step": "x"})
        assert "has no step" in parse_qs(urlsplit(unknown.headers["location"]).query)["error"][0]

        sent = await http.post(
            "/events", data={"csrf": token, "name": "t/pack", "data": '{"n": 7}', "id": ""}
        )
        assert sent.status_code == 303
        event_id = urlsplit(sent.headers["location"]).path.rsplit("/", 1)[1]
        assert (await app.get_event(event_id)).data == {"n": 7}  # type: ignore[union-attr]
        before = len((await app.list_events("t/pack")).events)
        for name, data, reason in [
            ("t/pack", "{nope", "not JSON"),
            ("t/pack", "[1]", "JSON object"),
            ("engine/x", "{}", "reserved"),
            ("", "{}", "name"),
        ]:
            refused = await http.post("/events", data={"csrf": token, "name": name, "data": data})
            assert refused.status_code == 400 and reason in refused.text, (name, data)
        assert len((await app.list_events("t/pack")).events) == before

        replayed = await http.post(f"/events/{event_id}/replay", data={"csrf": token})
        assert replayed.status_code == 303
        copy_id = urlsplit(replayed.headers["location"]).path.rsplit("/", 1)[1]
        copy = await app.get_event(copy_id)
        assert copy is not None and copy_id != event_id and copy.data == {"n": 7}


async def test_every_action_refuses_a_cross_site_request(shop_app: Engine) -> None:
    """Without the CSRF token, with another Origin or Referer, or a null Origin, each action is
    refused (403) and nothing happens."""
    app = shop_app
    waiting = await run_of(app, Event(name="t/busy"))
    await status_is(app, waiting, RunStatus.WAITING)
    [event_id] = await app.send(Event(name="t/pack"))
    actions = [
        (f"/runs/{waiting}/cancel", {}),
        (f"/runs/{waiting}/rerun", {}),
        ("/events", {"name": "t/pack", "data": "{}"}),
        (f"/events/{event_id}/replay", {}),
    ]
    before = len((await app.list_events("t/pack")).events)
    async with client(create_app(app)) as http:
        token = csrf_of((await http.get("/runs")).text)
        for path, form in actions:
            assert (await http.post(path, data=form)).status_code == 403, path
            assert (await http.post(path, data={**form, "csrf": "0" * 64})).status_code == 403
            for header in (
                {"origin": "https://evil.example"},
                {"origin": "null"},
                {"referer": "https://evil.example/page"},
            ):
                refused = await http.post(path, data={**form, "csrf": token}, headers=header)
                assert refused.status_code == 403, (path, header)
    assert (await app.get_run(waiting)).status is RunStatus.WAITING
    assert len(await app.list_runs("busy")) == 1
    assert len((await app.list_events("t/pack")).events) == before


# -- who may use it --------------------------------------------------------------------------------
async def test_without_a_token_only_loopback_host_names_are_served(make_engine: Any) -> None:
    """A request for another host name (DNS rebinding) is refused; loopback names pass."""
    web = create_app(make_engine())
    async with client(web) as http:
        page = await http.get("/runs")
        assert page.headers["x-frame-options"] == "DENY"  # no clickjacking of its buttons
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    for base, status in [
        ("http://127.0.0.1:8288", 200),
        ("http://localhost:8288", 200),
        ("http://[::1]:8288", 200),
        ("http://attacker.example", 400),
    ]:
        async with client(web, base) as http:
            assert (await http.get("/runs")).status_code == status, base
    async with client(
        create_app(make_engine(), allowed_hosts=["ops.internal"]), "http://ops.internal"
    ) as http:
        assert (await http.get("/runs")).status_code == 200


async def test_a_token_guards_every_page_and_sets_a_strict_cookie(make_engine: Any) -> None:
    """With a token, pages send to the login; a wrong token is refused; the right one sets an
    HttpOnly SameSite=Strict cookie that is not the token; a bearer token works too; the
    event API's prefix would be exempt."""
    web = create_app(make_engine(), token="s3cret-token")
    async with client(web, "https://dash.example") as http:
        first = await http.get("/runs?status=FAILED")
        assert first.status_code == 303
        assert first.headers["location"] == "/login?next=/runs%3Fstatus%3DFAILED"
        assert (await http.get("/runs/stream")).status_code == 303
        login = await http.get("/login")
        token = csrf_of(login.text)
        wrong = await http.post("/login", data={"csrf": token, "token": "nope"})
        assert wrong.status_code == 401
        assert (await http.post("/login", data={"token": "s3cret-token"})).status_code == 403
        right = await http.post(
            "/login?next=/events", data={"csrf": token, "token": "s3cret-token"}
        )
        assert right.status_code == 303 and right.headers["location"] == "/events"
        cookie = right.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Secure" in cookie
        assert "s3cret-token" not in cookie
        assert (await http.get("/runs")).status_code == 200
        assert (await http.post("/logout", data={"csrf": token})).status_code == 303
    async with client(web, "https://dash.example") as http:
        bearer = {"authorization": "Bearer s3cret-token"}
        assert (await http.get("/runs", headers=bearer)).status_code == 200
        assert (await http.get("/runs", headers={"authorization": "Bearer x"})).status_code == 303
        # 10 wrong tokens a minute at most (2 so far: "nope" and the bearer "x"), then even
        # the right one waits.
        for _ in range(8):
            assert (
                await http.post("/login", data={"csrf": token, "token": "x"})
            ).status_code == 401
        right = {"csrf": token, "token": "s3cret-token"}
        assert (await http.post("/login", data=right)).status_code == 429
        redirect = await http.get("/login?next=//evil.example")
        assert redirect.status_code == 200  # the login page, whose form goes back to /runs
        assert "next=/runs" in redirect.text.replace("%2F", "/")


def test_it_refuses_to_listen_beyond_loopback_without_a_token() -> None:
    """Loopback addresses need no token; any other address does."""
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"):
        assert is_loopback(host)
        check_binding(host, None)
    for host in ("0.0.0.0", "::", "192.168.1.10", "dash.example"):
        assert not is_loopback(host)
        with pytest.raises(BindingError, match="ENGINE_DASHBOARD_TOKEN"):
            check_binding(host, None)
        check_binding(host, "a-token")


async def test_serving_on_another_address_without_a_token_fails_before_binding(
    make_engine: Any,
) -> None:
    with pytest.raises(BindingError):
        await start(create_app(make_engine()), host="0.0.0.0", port=0, token=None)


def test_engine_dashboard_refuses_a_public_address_without_a_token() -> None:
    """`engine dashboard --host 0.0.0.0` exits 2 with what to do, before connecting."""
    env = {k: v for k, v in dev_environment().items() if k != "ENGINE_DASHBOARD_TOKEN"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine",
            "dashboard",
            "--host",
            "0.0.0.0",
            "--database-url",
            "postgresql://nobody@127.0.0.1:1/none",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "ENGINE_DASHBOARD_TOKEN" in done.stderr


async def test_the_app_mounts_under_a_prefix(shop_app: Engine) -> None:
    """Mounted at /engine in another app, links and redirects keep the prefix."""
    outer = Starlette(routes=[Mount("/engine", create_app(shop_app))])
    run_id = await run_of(shop_app, Event(name="t/pack"))
    await shop_app.wait_for_run(run_id)
    async with client(outer) as http:
        home = await http.get("/engine/")
        assert home.status_code == 303 and home.headers["location"] == "/engine/runs"
        page = (await http.get("/engine/runs")).text
        assert f'href="/engine/runs/{run_id}"' in page and "/engine/static/dashboard.css" in page
        assert (await http.get("/engine/static/dashboard.js")).status_code == 200


# -- serving ---------------------------------------------------------------------------------------
async def test_engine_dashboard_serves_a_database_until_interrupted(
    database_url: str, shop_app: Engine
) -> None:
    """`engine dashboard --port 0` prints its address, serves the runs, and Ctrl-C stops it
    (exit 130)."""
    run_id = await run_of(shop_app, Event(name="t/pack"))
    await shop_app.wait_for_run(run_id)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "engine",
            "dashboard",
            "--database-url",
            database_url,
            "--port",
            "0",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=dev_environment(),
    )
    try:
        line = await asyncio.to_thread(process.stderr.readline)  # type: ignore[union-attr]
        url = re.search(r"serving at (http://127\.0\.0\.1:\d+)", line)
        assert url, line
        async with httpx.AsyncClient(base_url=url.group(1)) as http:
            page = await http.get("/runs")
            assert page.status_code == 200 and run_id in page.text
        process.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(process.wait, 30) == 130
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()


def test_engine_dev_serves_the_dashboard_beside_its_worker(dev_dir: Path) -> None:
    """`engine dev --port 0` prints the dashboard's address; it answers while the worker
    runs; SIGTERM stops both."""
    target = dev_dir / "app.py"
    target.write_text(
        "from engine import Engine, TriggerEvent\n"
        "app = Engine('devapp')\n"
        "@app.create_function('hello', trigger=TriggerEvent('t/hello'))\n"
        "async def hello(ctx):\n    return 'hi'\n"
    )
    process = start_engine_dev(target, dev_dir, "--port", "0")
    try:
        url = None
        assert process.stderr is not None
        for line in process.stderr:
            found = re.search(r"dashboard at (http://127\.0\.0\.1:\d+)", line)
            if found:
                url = found.group(1)
                break
        assert url, "engine dev printed no dashboard address"
        page = httpx.get(f"{url}/runs", timeout=10)
        assert page.status_code == 200 and "hello" in page.text
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()


async def test_engine_dev_goes_on_without_a_dashboard_when_the_default_port_is_taken(
    make_engine: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another `engine dev` holds 8288: the worker runs without a dashboard and says why; a
    port asked for with --port that is taken is an error."""
    from engine import cli_dashboard
    from engine.cli_common import Failure
    from engine.web import serve

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    monkeypatch.setattr(serve, "DEFAULT_PORT", taken)
    app = make_engine()
    try:
        async with cli_dashboard.dev_dashboard(app, None):
            pass
        assert f"no dashboard: port {taken} is taken" in capsys.readouterr().err
        with pytest.raises(Failure, match=f"cannot serve the dashboard on port {taken}"):
            async with cli_dashboard.dev_dashboard(app, taken):
                pass
    finally:
        holder.close()
