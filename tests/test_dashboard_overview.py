"""The dashboard's Functions, Workers and Bulk pages: their data (engine/web/overview.py) against
real runs of real workers, and the pages over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import html
import itertools
import os
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from zoneinfo import ZoneInfo

import httpx
import pytest
from helpers import eventually

from engine import (
    Concurrency,
    Context,
    Engine,
    EngineError,
    Event,
    InvalidEventError,
    RateLimit,
    Throttle,
    TriggerCron,
    TriggerEvent,
)
from engine.db import Database
from engine.web import create_app, overview
from engine.web.overview import (
    FunctionOverview,
    RunFilter,
    bulk_cancel,
    bulk_preview,
    bulk_rerun,
    function_overviews,
    invoke_function,
    worker_overview,
)


def _shop(app: Engine, gate: asyncio.Event) -> None:
    """``pack`` completes; ``hold`` (one at a time) holds its step until ``gate`` opens;
    ``nightly`` fires at 3:00 in Paris; ``park`` waits a day for an event."""

    @app.create_function("pack", trigger=TriggerEvent("shop/pack"))
    async def pack(ctx: Context) -> str:
        return "packed"

    @app.create_function(
        "hold",
        trigger=TriggerEvent("shop/hold"),
        concurrency=Concurrency(limit=1),
        throttle=Throttle(limit=100, period="1s", burst=100),
    )
    async def hold(ctx: Context) -> str:
        return str(await ctx.step.run("held", gate.wait))

    @app.create_function("nightly", trigger=TriggerCron("TZ=Europe/Paris 0 3 * * *"))
    async def nightly(ctx: Context) -> None:
        return None

    @app.create_function("park", trigger=TriggerEvent("shop/park"))
    async def park(ctx: Context) -> None:
        await ctx.step.wait_for_event("paid", event="shop/paid", timeout="1d")


def _one(functions: list[FunctionOverview], function_id: str) -> FunctionOverview:
    [found] = [f for f in functions if f.function_id == function_id]
    return found


async def test_functions_show_config_crons_counts_and_what_waits_on_flow_control(
    make_engine: Any,
) -> None:
    """Each function: its triggers, flow control, next cron fires, runs by status, and the runs
    parked on its concurrency limit with the slot they wait for."""
    app, gate = make_engine("shop"), asyncio.Event()
    _shop(app, gate)
    async with app.worker(poll_interval="50ms"):
        await app.send([Event(name="shop/pack") for _ in range(3)])
        await app.send([Event(name="shop/hold") for _ in range(3)])

        async def parked() -> Any:
            hold = _one(await function_overviews(app), "hold")
            parked = sum(w.runs for w in hold.waiting)
            return hold if parked == 2 and hold.unfinished.get("RUNNING") else None

        hold = await eventually(parked)
        assert hold.unfinished == {"RUNNING": 1, "QUEUED": 2}
        [wait] = hold.waiting
        assert (wait.status, wait.reason, wait.runs) == ("QUEUED", "concurrency", 2)
        assert wait.detail == "fn:shop/hold"
        assert set(hold.flow) == {"concurrency", "throttle"}
        assert hold.flow["concurrency"] == [
            {"limit": 1, "key": None, "scope": "fn", "ordering": None}
        ]
        assert hold.triggers == [{"event": "shop/hold", "expression": None}]
        assert hold.workers == 1 and hold.active
        gate.set()

        async def settled() -> Any:
            functions = await function_overviews(app)
            done = [_one(functions, f).recent.counts.get("COMPLETED") for f in ("pack", "hold")]
            # The counts come from separate queries: the last run may end between them.
            over = not _one(functions, "hold").unfinished
            return functions if done == [3, 3] and over else None

        functions = await eventually(settled)
    hold = _one(functions, "hold")
    assert hold.unfinished == {} and hold.waiting == [] and hold.backlog == 0
    assert hold.recent.total == 3 and not hold.recent.capped
    nightly = _one(functions, "nightly")
    assert nightly.triggers == [{"cron": "TZ=Europe/Paris 0 3 * * *"}]
    [cron] = nightly.crons
    assert len(cron.next_fires) == overview.NEXT_FIRES
    paris = [fire.astimezone(ZoneInfo("Europe/Paris")) for fire in cron.next_fires]
    assert all((p.hour, p.minute) == (3, 0) for p in paris)
    assert [b - a for a, b in itertools.pairwise(paris)] == [timedelta(days=1)] * 4
    assert cron.next_fires[0] > datetime.now(UTC)


async def test_recent_counts_stop_at_their_cap(make_engine: Any) -> None:
    """Finished runs are counted among a function's newest runs only: past the cap, the count
    says it is partial."""
    app = make_engine("shop")
    _shop(app, asyncio.Event())
    async with app.worker(poll_interval="50ms"):
        ids = await app.send([Event(name="shop/pack") for _ in range(3)])
        for event_id in ids:
            [run] = await app.runs_for_event(event_id, at_least=1)
            await app.wait_for_run(run.run_id)
    pack = _one(await function_overviews(app, recent_cap=2), "pack")
    assert pack.recent.counts == {"COMPLETED": 2} and pack.recent.capped
    old = _one(await function_overviews(app, recent_window=timedelta(0)), "pack")
    assert old.recent.total == 0


async def test_backlog_and_runs_no_worker_serves(make_engine: Any, sql: Any) -> None:
    """Runs of a function whose app has no worker are backlog (due, claimed by nobody); once the
    function is retired they say that no worker serves it."""
    other = make_engine("other")

    @other.create_function("lonely", trigger=TriggerEvent("other/go"))
    async def lonely(ctx: Context) -> None:
        return None

    await other.database()  # registered, with no worker of its own
    app = make_engine("shop")
    _shop(app, asyncio.Event())
    async with app.worker(poll_interval="50ms"):  # routes every app's events
        ids = await other.send([Event(name="other/go"), Event(name="other/go")])
        for event_id in ids:
            await app.runs_for_event(event_id, at_least=1)
    lonely_now = _one(await function_overviews(app, app_id="other"), "lonely")
    assert lonely_now.unfinished == {"QUEUED": 2} and lonely_now.backlog == 2
    assert lonely_now.oldest_due is not None and lonely_now.waiting == []
    await sql.execute(
        "UPDATE engine.functions SET live_until = now() - interval '1 s' WHERE app_id = 'other';"
        "SELECT engine.retire_functions()"
    )
    lonely_later = _one(await function_overviews(app, app_id="other"), "lonely")
    assert not lonely_later.active
    [wait] = lonely_later.waiting
    assert (wait.reason, wait.runs) == ("unserved", 2)
    assert wait.detail == "no live worker serves this function"


async def test_invoke_starts_a_run_with_the_payload_as_its_event_data(
    make_engine: Any, sql: Any
) -> None:
    """Any registered function, even one no event triggers, runs with the payload as
    ``ctx.event.data`` of an ``engine/function.invoked`` event; its flow control applies."""
    app = make_engine("shop")

    @app.create_function("charge", rate_limit=RateLimit(limit=1, period="1h"))
    async def charge(ctx: Context) -> dict[str, Any]:
        return {"name": ctx.event.name, "data": ctx.event.data}

    async with app.worker(poll_interval="50ms"):
        invoked = await invoke_function(app, "shop", "charge", {"amount": 12, "who": "ann"})
        assert invoked.status.value == "QUEUED"
        run = await app.wait_for_run(invoked.run_id)
        second = await invoke_function(app, "shop", "charge", {"amount": 1})
    assert run.status.value == "COMPLETED"
    assert run.output == {
        "name": "engine/function.invoked",
        "data": {"amount": 12, "who": "ann"},
    }
    assert run.event.id == invoked.event_id
    assert second.status.value == "SKIPPED" and "rate limit" in (second.reason or "")
    before = await sql.fetchval("SELECT count(*) FROM engine.events")
    with pytest.raises(InvalidEventError):
        await invoke_function(app, "shop", "charge", [1, 2])  # type: ignore[arg-type]
    with pytest.raises(EngineError, match="no function 'nope'"):
        await invoke_function(app, "shop", "nope", {})
    assert await sql.fetchval("SELECT count(*) FROM engine.events") == before


async def test_workers_show_their_leases_and_the_steps_executing(
    make_engine: Any, sql: Any
) -> None:
    """A live worker lists its functions and the run it holds, with the step its heartbeat
    reported executing; a run leased to a worker that is gone is listed apart."""
    app, gate = make_engine("shop"), asyncio.Event()
    _shop(app, gate)
    async with app.worker(poll_interval="50ms", lease="3s") as worker:
        [event_id] = await app.send(Event(name="shop/hold"))
        [run] = await app.runs_for_event(event_id, at_least=1)

        async def reported() -> Any:
            page = await worker_overview(app)
            mine = [w for w in page.workers if w.owner == str(worker.owner)]
            return page if mine and mine[0].leases and mine[0].leases[0].executing else None

        page = await eventually(reported)
        gate.set()
        await app.wait_for_run(run.run_id)
    [me] = [w for w in page.workers if w.owner == str(worker.owner)]
    assert me.alive and me.app_id == "shop"
    assert set(me.functions) == {"pack", "hold", "nightly", "park"}
    [lease] = me.leases
    assert (lease.run_id, lease.function_id, lease.token) == (run.run_id, "hold", 1)
    assert lease.expires_at is not None and lease.claimed_at is not None
    [step] = lease.executing
    assert (step.step_id, step.attempt) == ("held", 0)
    assert page.orphaned == []
    after = await worker_overview(app)
    assert all(w.owner != str(worker.owner) for w in after.workers)  # it left when it stopped

    # A worker killed outright leaves its lease behind until another takes the run over (the
    # report of the steps executing was the previous execution's: not shown).
    await sql.execute(
        "UPDATE engine.runs SET status = 'RUNNING', lease_owner = gen_random_uuid(),"
        " lease_token = lease_token + 1, lease_expires_at = engine.now() + interval '1 h'"
        " WHERE id = $1",
        run.run_id,
    )
    [orphan] = (await worker_overview(app)).orphaned
    assert orphan.run_id == run.run_id and orphan.executing == []


async def _park(app: Engine, count: int, name: str = "shop/park") -> list[str]:
    """Starts ``count`` runs of ``park`` (waiting a day) and returns their ids once waiting."""
    ids = await app.send([Event(name=name) for _ in range(count)])
    runs = [(await app.runs_for_event(i, at_least=1))[0].run_id for i in ids]
    await eventually(lambda: _all_waiting(app, runs))
    return runs


async def test_bulk_cancel_then_rerun_what_a_filter_matches(make_engine: Any) -> None:
    """The preview counts the matching runs; cancel ends those not over, in batches; a rerun of
    the cancelled ones starts one new run each and leaves other runs alone."""
    app = make_engine("shop")
    _shop(app, asyncio.Event())
    async with app.worker(poll_interval="50ms"):
        parked = await _park(app, 5)
        [packed] = await app.send(Event(name="shop/pack"))
        [pack_run] = await app.runs_for_event(packed, at_least=1)
        await app.wait_for_run(pack_run.run_id)
        preview = await bulk_preview(app, RunFilter(function_id="park"))
        assert (preview.runs, preview.not_over, preview.at_least) == (5, 5, False)
        everything = await bulk_preview(app, RunFilter(app_id="shop"))
        assert (everything.runs, everything.not_over) == (6, 5)

        cancelled = await bulk_cancel(app, preview.filter, batch=2)
        assert (cancelled.matched, cancelled.acted, cancelled.cursor) == (5, 5, None)
        assert {(await app.get_run(r)).status.value for r in parked} == {"CANCELLED"}

        again = await bulk_preview(app, RunFilter(statuses=["CANCELLED"]))
        assert (again.runs, again.not_over) == (5, 0)
        rerun = await bulk_rerun(app, again.filter, batch=2)
        assert (rerun.matched, rerun.acted, rerun.skipped) == (5, 5, 0)
        assert len(set(rerun.new_runs) - set(parked)) == 5
        new = [await app.get_run(r) for r in rerun.new_runs]
        assert {r.function_id for r in new} == {"park"}
        assert {r.event.id for r in new} == {(await app.get_run(r)).event.id for r in parked}

        # Rerunning runs not over would run a function twice at once for one event: skipped.
        await eventually(lambda: _all_waiting(app, rerun.new_runs))
        waiting = await bulk_preview(app, RunFilter(statuses=["WAITING"]))
        nothing = await bulk_rerun(app, waiting.filter)
        assert (nothing.matched, nothing.acted, nothing.skipped) == (5, 0, 5)


async def _all_waiting(app: Engine, runs: list[str]) -> bool:
    return {(await app.get_run(r)).status.value for r in runs} == {"WAITING"}


async def test_bulk_filters_stay_bounded_by_the_preview_and_can_be_continued(
    make_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An action acts on the runs created before its preview, by event name; one that stops at
    its maximum returns where to go on; a preview past its cap says "at least"."""
    app = make_engine("shop")
    _shop(app, asyncio.Event())
    async with app.worker(poll_interval="50ms"):
        await _park(app, 4)
        preview = await bulk_preview(app, RunFilter(event_name="shop/park"))
        assert preview.runs == 4
        later = await _park(app, 1)
        assert (await bulk_preview(app, RunFilter(event_name="shop/nothing"))).runs == 0
        first = await bulk_cancel(app, preview.filter, max_runs=3, batch=2)
        assert (first.acted, first.cursor is not None) == (3, True)
        rest = await bulk_cancel(app, preview.filter, cursor=first.cursor)
        assert (rest.matched, rest.acted, rest.cursor) == (1, 1, None)
        assert (await app.get_run(later[0])).status.value == "WAITING"  # created after

        monkeypatch.setattr(overview, "PREVIEW_CAP", 3)
        capped = await bulk_preview(app, RunFilter(event_name="shop/park"))
        assert (capped.runs, capped.at_least) == (3, True)
        await bulk_cancel(app, capped.filter)


async def test_the_read_only_role_can_read_the_overviews(
    make_engine: Any, database_url: str, sql: Any
) -> None:
    """The queries behind the Functions and Workers pages need no more than engine_reader."""
    app = make_engine("shop")
    _shop(app, asyncio.Event())
    async with app.worker(poll_interval="50ms"):
        await _park(app, 1)
    await sql.execute((Path(__file__).parent.parent / "ops" / "roles.sql").read_text())
    user = f"overview_reader_{os.getpid()}"
    await sql.execute(f"DROP ROLE IF EXISTS {user}")
    await sql.execute(f"CREATE ROLE {user} LOGIN IN ROLE engine_reader")
    parts = urlsplit(database_url)
    reader = Database(
        urlunsplit(parts._replace(netloc=f"{user}@{parts.netloc.rpartition('@')[2]}"))
    )
    await reader.open()
    try:
        assert len(await reader.fetch("overview_functions", None)) == 4
        [parked] = await reader.fetch("overview_unfinished", None, datetime.now(UTC))
        assert (parked["function_id"], parked["status"]) == ("park", "WAITING")
        since = datetime.now(UTC) - timedelta(days=1)
        assert len(await reader.fetch("overview_recent", None, since, 10)) == 1
        assert await reader.fetch("overview_workers") == []
        assert await reader.fetch("overview_leases", 10) == []
        assert (await reader.fetchrow("bulk_preview", *RunFilter().arguments(), 10))["runs"] == 1
    finally:
        await reader.close()
        await sql.execute(f"DROP OWNED BY {user}")
        await sql.execute(f"DROP ROLE {user}")


# -- the pages ---------------------------------------------------------------------------------
ORIGIN = "http://127.0.0.1:8288"


@contextlib.asynccontextmanager
async def _client(app: Engine) -> AsyncIterator[httpx.AsyncClient]:
    """The dashboard in process; its bulk runner (started by the first bulk request: httpx's
    transport runs no lifespan) is closed at the end."""
    web = create_app(app)
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=web), base_url=ORIGIN
        ) as http:
            yield http
    finally:
        await web.state.dashboard.bulk.close()


async def _bulk_page_once_done(http: httpx.AsyncClient, jobs: int) -> str | None:
    """The Bulk page once its newest ``jobs`` bulk actions are done."""
    text = (await http.get("/bulk")).text
    return text if text.count('class="job job-done"') == jobs else None


def _csrf(text: str) -> str:
    found = re.search(r'name="csrf-token" content="([0-9a-f]+)"', text)
    assert found, "the page carries no CSRF token"
    return found.group(1)


async def test_the_functions_pages_show_each_function_and_its_next_fires(
    make_engine: Any,
) -> None:
    app, gate = make_engine("shop"), asyncio.Event()
    _shop(app, gate)
    async with app.worker(poll_interval="50ms"), _client(app) as http:
        await app.send([Event(name="shop/hold") for _ in range(2)])

        async def parked() -> Any:
            page = await http.get("/functions")
            return page if 'title="fn:shop/hold">concurrency 1</span>' in page.text else None

        page = await eventually(parked)
        assert page.status_code == 200
        for function_id in ("pack", "hold", "nightly", "park"):
            assert f"/functions/shop/{function_id}" in page.text
        assert "cron TZ=Europe/Paris 0 3 * * *" in page.text
        assert "throttle 1/10ms burst 100" in page.text
        nightly = await http.get("/functions/shop/nightly")
        fires = re.findall(r"<li title=\"([^\"]+)\">", nightly.text)
        assert len(fires) == overview.NEXT_FIRES
        assert all(
            datetime.fromisoformat(f).astimezone(ZoneInfo("Europe/Paris")).hour == 3 for f in fires
        )
        hold = await http.get("/functions/shop/hold")
        assert "fn:shop/hold" in hold.text  # the slot a run waits for
        assert (await http.get("/functions/shop/nope")).status_code == 404
        gate.set()


async def test_invoke_from_the_function_page(make_engine: Any, sql: Any) -> None:
    """The form's JSON becomes the run's event data; bad JSON is refused with the reason and
    stores nothing; a form without the CSRF token is refused."""
    app = make_engine("shop")

    @app.create_function("charge")
    async def charge(ctx: Context) -> Any:
        return ctx.event.data

    async with app.worker(poll_interval="50ms"), _client(app) as http:
        token = _csrf((await http.get("/functions/shop/charge")).text)
        invoked = await http.post(
            "/functions/shop/charge/invoke", data={"csrf": token, "data": '{"amount": 3}'}
        )
        assert invoked.status_code == 303
        run_id = urlsplit(invoked.headers["location"]).path.rsplit("/", 1)[1]
        assert (await app.wait_for_run(run_id)).output == {"amount": 3}
        before = await sql.fetchval("SELECT count(*) FROM engine.events")
        for data, reason in (("{nope", "not JSON"), ("[1]", "JSON object")):
            refused = await http.post(
                "/functions/shop/charge/invoke", data={"csrf": token, "data": data}
            )
            assert refused.status_code == 400 and reason in refused.text
        forged = await http.post("/functions/shop/charge/invoke", data={"data": "{}"})
        assert forged.status_code == 403
        assert await sql.fetchval("SELECT count(*) FROM engine.events") == before


async def test_the_workers_page_shows_what_each_worker_holds(make_engine: Any) -> None:
    app, gate = make_engine("shop"), asyncio.Event()
    _shop(app, gate)
    async with app.worker(poll_interval="50ms", lease="3s") as worker, _client(app) as http:
        await app.send(Event(name="shop/hold"))

        async def executing() -> Any:
            page = await http.get("/workers")
            return page if "▶ held" in page.text else None

        page = await eventually(executing)
        assert str(worker.owner)[:8] in page.text and "alive" in page.text
        gate.set()


async def test_the_bulk_page_previews_then_cancels_and_reruns(make_engine: Any) -> None:
    """The preview counts the runs the filters match; its cancel applies to them; an action
    that skipped the preview, or a forged one, is refused."""
    app = make_engine("shop")
    _shop(app, asyncio.Event())
    async with app.worker(poll_interval="50ms"), _client(app) as http:
        parked = await _park(app, 3)
        runs = await http.get("/runs?function=park")
        [to_bulk] = re.findall(r'href="(/bulk\?[^"]*)"[^>]*id="to-bulk"', runs.text)
        page = await http.get(html.unescape(to_bulk))  # the Runs page's filters, carried over
        assert page.status_code == 200
        assert re.search(r'id="match-count">3</span>', page.text)
        cancel = html.unescape(re.findall(r'action="(/bulk/cancel\?[^"]+)"', page.text)[0])
        assert (await http.post(cancel, data={})).status_code == 403
        unbounded = await http.post("/bulk/cancel?function=park", data={"csrf": _csrf(page.text)})
        assert unbounded.status_code == 400 and "preview" in unbounded.text
        done = await http.post(cancel, data={"csrf": _csrf(page.text)})
        assert done.status_code == 303  # at once: the dashboard's runner carries it out

        async def cancelled() -> bool:
            return {(await app.get_run(r)).status.value for r in parked} == {"CANCELLED"}

        await eventually(cancelled)
        after = await eventually(lambda: _bulk_page_once_done(http, 1))
        assert '<span class="job-acted">3</span> cancelled of' in after

        rerun = html.unescape(re.findall(r'action="(/bulk/rerun\?[^"]+)"', after)[0])
        again = await http.post(rerun, data={"csrf": _csrf(page.text)})
        assert again.status_code == 303
        shown = await eventually(lambda: _bulk_page_once_done(http, 2))
        assert '<span class="job-acted">3</span> rerun of' in shown
        searched = await http.get("/bulk?q=event.data.x+%3E+1")
        assert searched.status_code == 400 and "search by expression" in searched.text
