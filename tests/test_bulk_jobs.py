"""Bulk actions as durable jobs (engine.web.bulk_jobs): an action posted on the Bulk page is
recorded and answered at once, then carried out in batches by the dashboard's runner until every
matching run is done, even across a restart; a form posted twice starts one job; two runners
never act on a run twice; a job can be stopped; the page shows its progress. Previews and
batches read through an index of the runs' status."""

from __future__ import annotations

import asyncio
import contextlib
import html
import re
from collections.abc import AsyncIterator
from typing import Any
from uuid import uuid4

import asyncpg
import httpx
from helpers import eventually

from engine import Context, Engine, Event, RunStatus, TriggerEvent
from engine.db import queries
from engine.web import bulk_jobs, create_app
from engine.web.bulk_jobs import BulkRunner, advance, bulk_actions, start_bulk_action
from engine.web.overview import RunFilter, bulk_preview

ORIGIN = "http://127.0.0.1:8288"
RUNS = 23  # more than three batches of BATCH_SIZE
BATCH_SIZE = 7


def park(app: Engine) -> None:
    """``park`` waits a day for an event; ``pack`` completes at once."""

    @app.create_function("park", trigger=TriggerEvent("shop/park"))
    async def parked(ctx: Context) -> Any:
        return await ctx.step.wait_for_event("reply", event="shop/reply", timeout="1d")

    @app.create_function("pack", trigger=TriggerEvent("shop/pack"))
    async def pack(ctx: Context) -> str:
        return "packed"


async def started(app: Engine, name: str, count: int, status: RunStatus) -> list[str]:
    """Sends ``count`` events and returns their runs once each has ``status``."""
    ids = await app.send([Event(name=name) for _ in range(count)])
    runs = [(await app.runs_for_event(i, at_least=1))[0].run_id for i in ids]

    async def reached() -> bool:
        return all([(await app.get_run(r)).status is status for r in runs])

    await eventually(reached, timeout=30)
    return runs


async def statuses(app: Engine, runs: list[str]) -> set[str]:
    return {(await app.get_run(r)).status.value for r in runs}


@contextlib.asynccontextmanager
async def client(app: Engine) -> AsyncIterator[httpx.AsyncClient]:
    """The dashboard in process; its bulk runner (started by the first bulk request: httpx's
    transport runs no lifespan) is closed at the end."""
    web = create_app(app)
    transport = httpx.ASGITransport(app=web)
    try:
        async with httpx.AsyncClient(transport=transport, base_url=ORIGIN) as http:
            yield http
    finally:
        await web.state.dashboard.bulk.close()


def csrf_of(text: str) -> str:
    found = re.search(r'name="csrf-token" content="([0-9a-f]+)"', text)
    assert found
    return found.group(1)


async def test_a_bulk_cancel_from_the_page_goes_on_by_itself_past_one_batch(
    make_engine: Any, monkeypatch: Any
) -> None:
    """The action answers at once; the runner cancels all 23 runs in batches of 7; the page
    lists the job, done, with what it did; the same form posted again starts nothing more."""
    monkeypatch.setattr(bulk_jobs, "BATCH", BATCH_SIZE)
    app = make_engine("shop")
    park(app)
    async with app.worker(poll_interval="50ms"), client(app) as http:
        runs = await started(app, "shop/park", RUNS, RunStatus.WAITING)
        page = await http.get("/bulk", params={"function": "park"})
        assert re.search(rf'id="match-count">{RUNS}</span>', page.text)
        cancel = html.unescape(re.findall(r'action="(/bulk/cancel\?[^"]+)"', page.text)[0])
        key = re.findall(r'name="key" value="([0-9a-f-]+)"', page.text)[0]
        form = {"csrf": csrf_of(page.text), "key": key, "expected": str(RUNS)}
        posted = await http.post(cancel, data=form)
        assert posted.status_code == 303
        assert "in+the+background" in posted.headers["location"]

        async def all_cancelled() -> bool:
            return await statuses(app, runs) == {"CANCELLED"}

        await eventually(all_cancelled, timeout=60)
        await eventually(lambda: _state(app, "done"), timeout=10)
        [job] = await bulk_actions(app)
        assert (job.matched, job.acted, job.percent) == (RUNS, RUNS, 100)
        shown = (await http.get("/bulk")).text
        assert f'<tr data-id="{job.id}" class="job job-done">' in shown
        assert f'<span class="job-acted">{RUNS}</span> cancelled' in shown
        again = await http.post(cancel, data=form)  # a double click, a reload
        assert "Already+started" in again.headers["location"]
        assert len(await bulk_actions(app)) == 1


async def _state(app: Engine, state: str) -> bool:
    return [j.state for j in await bulk_actions(app)] == [state]


async def test_a_restart_mid_way_resumes_after_the_last_committed_batch(
    make_engine: Any, sql: asyncpg.Connection
) -> None:
    """One batch done, then the process is gone (its runner closed: a batch in flight would roll
    back); a new runner (another process, after a restart) finds the job and finishes it, and
    every run is cancelled once."""
    app = make_engine("shop")
    park(app)
    async with app.worker(poll_interval="50ms"):
        runs = await started(app, "shop/park", RUNS, RunStatus.WAITING)
        preview = await bulk_preview(app, RunFilter(function_id="park"))
        job_id, new = await start_bulk_action(
            app, "cancel", preview.filter, key=uuid4(), expected=preview.runs
        )
        assert new
        assert await advance(app, job_id, BATCH_SIZE)  # the first process's one batch
        first = BulkRunner(app, batch=BATCH_SIZE, poll=0.05)
        first.start()
        await first.close()  # gone, perhaps mid-batch
        row = await sql.fetchrow("SELECT * FROM engine.bulk_actions WHERE id = $1", job_id)
        assert row is not None
        assert row["state"] == "running" and row["matched"] % BATCH_SIZE == 0
        assert row["matched"] == await sql.fetchval(
            "SELECT count(*) FROM engine.runs WHERE function_id = 'park' AND status = 'CANCELLED'"
        )
        second = BulkRunner(app, batch=BATCH_SIZE, poll=0.05)
        second.start()  # as a dashboard's lifespan does at startup
        try:
            await eventually(lambda: _state(app, "done"), timeout=60)
        finally:
            await second.close()
        assert await statuses(app, runs) == {"CANCELLED"}
        [job] = await bulk_actions(app)
        assert (job.matched, job.acted) == (RUNS, RUNS)
        cancelled_events = await sql.fetchval(
            "SELECT count(*) FROM engine.events WHERE name = 'engine/function.cancelled'"
        )
        assert cancelled_events == RUNS  # each run ended once


async def test_two_runners_on_one_rerun_start_one_new_run_per_run(make_engine: Any) -> None:
    """Two dashboard processes carry out the same bulk rerun at once: each batch goes to one of
    them (its row lock), so every finished run is rerun exactly once."""
    app = make_engine("shop")
    park(app)
    async with app.worker(poll_interval="50ms"):
        await started(app, "shop/pack", RUNS, RunStatus.COMPLETED)
        preview = await bulk_preview(app, RunFilter(function_id="pack"))
        await start_bulk_action(app, "rerun", preview.filter, key=uuid4(), expected=preview.runs)
        runners = [BulkRunner(app, batch=BATCH_SIZE, poll=0.01) for _ in range(2)]
        for runner in runners:
            runner.start()
        try:
            await eventually(lambda: _state(app, "done"), timeout=60)
        finally:
            await asyncio.gather(*(runner.close() for runner in runners))
        [job] = await bulk_actions(app)
        assert (job.matched, job.acted) == (RUNS, RUNS)
        everything = await app.list_run_summaries("pack", limit=500)
        assert len(everything.runs) == 2 * RUNS


async def test_a_stopped_bulk_action_goes_no_further(make_engine: Any, monkeypatch: Any) -> None:
    """Stopped between two batches with the page's Stop button, a job keeps what it did and
    does nothing more."""
    monkeypatch.setattr(BulkRunner, "start", lambda self: None)  # batches by hand, here
    app = make_engine("shop")
    park(app)
    async with app.worker(poll_interval="50ms"), client(app) as http:
        runs = await started(app, "shop/park", RUNS, RunStatus.WAITING)
        preview = await bulk_preview(app, RunFilter(function_id="park"))
        job_id, _ = await start_bulk_action(
            app, "cancel", preview.filter, key=uuid4(), expected=preview.runs
        )
        assert await advance(app, job_id, BATCH_SIZE)
        page = await http.get("/bulk")
        assert "job-running" in page.text and 'class="ghost small stop-job"' in page.text
        stop = html.unescape(re.findall(r'action="(/bulk/jobs/[^"]+/stop)"', page.text)[0])
        stopped = await http.post(stop, data={"csrf": csrf_of(page.text)})
        assert "Stopped" in stopped.headers["location"]
        assert not await advance(app, job_id, BATCH_SIZE)
        [job] = await bulk_actions(app)
        assert (job.state, job.matched) == ("stopped", BATCH_SIZE)
        assert sorted(await statuses(app, runs)) == ["CANCELLED", "WAITING"]


async def _generic_plan(sql: asyncpg.Connection, name: str, arguments: str) -> str:
    """The generic plan (a prepared statement's, in the end) of a named query."""
    await sql.execute("SET plan_cache_mode = force_generic_plan")
    await sql.execute("SET enable_seqscan = off")  # an empty table: a scan would do as well
    await sql.execute(f"PREPARE {name} AS {queries()[name]}")
    plan: str = await sql.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE {name}({arguments})")
    return plan


async def test_a_preview_counts_through_an_index_of_the_runs_status(
    sql: asyncpg.Connection,
) -> None:
    """One finished status is counted through the index of finished runs by status, statuses of
    runs not over through the partial indexes of unfinished runs, one function of a known app
    through the function's index: a rare status of one function took 0.6-1.3 s with a million
    runs when every run was read."""
    now = "now()"
    ended = await _generic_plan(
        sql, "bulk_preview_ended", f"NULL, 'fn', ARRAY['FAILED'], NULL, NULL, {now}, 10001"
    )
    assert "runs_status_created_idx" in ended, ended
    going = await _generic_plan(
        sql, "bulk_preview_unfinished", f"NULL, NULL, ARRAY['QUEUED'], NULL, NULL, {now}, 10001"
    )
    assert "runs_due_idx" in going or "runs_leased_idx" in going, going
    assert "Seq Scan" not in going
    one = await _generic_plan(
        sql, "bulk_preview_function", f"'shop', 'fn', NULL, NULL, NULL, {now}, 10001"
    )
    assert "runs_function_idx" in one, one


async def test_a_function_without_its_app_is_previewed_with_its_app(make_engine: Any) -> None:
    """The Bulk page names a function without its app: the preview's filter gets the app when
    only one app has that function (so its index applies), and counts the same runs."""
    app = make_engine("shop")
    park(app)
    async with app.worker(poll_interval="50ms"):
        await started(app, "shop/pack", 3, RunStatus.COMPLETED)
        preview = await bulk_preview(app, RunFilter(function_id="pack", statuses=["COMPLETED"]))
        assert (preview.filter.app_id, preview.runs) == ("shop", 3)
        other = make_engine("other")
        park(other)
        await other.database()  # registers a "pack" of another app
        both = await bulk_preview(app, RunFilter(function_id="pack"))
        assert (both.filter.app_id, both.runs) == (None, 3)
