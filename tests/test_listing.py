"""Listings for people and scripts: runs and events newest first, filtered, a page at a time
(keyset cursors), and the function registry with its flow control (#14)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from helpers import finished, move_clock, shop

from engine import (
    Context,
    Engine,
    Event,
    RunStatus,
    TriggerEvent,
)
from engine.db import queries, schema_sql
from engine.runs import RunSummary


def newest_first(runs: list[RunSummary]) -> list[RunSummary]:
    return sorted(runs, key=lambda run: (run.created_at, run.run_id), reverse=True)


async def all_pages(app: Engine, **filters: Any) -> list[list[str]]:
    """Every page of a listing of runs, following the cursors."""
    pages, cursor = [], None
    while True:
        page = await app.list_run_summaries(cursor=cursor, **filters)
        pages.append([run.run_id for run in page.runs])
        if page.cursor is None:
            return pages
        cursor = page.cursor


async def test_run_summaries_filter_by_function_status_event_and_time(
    make_engine: Any, sql: asyncpg.Connection
) -> None:
    """Runs come newest first, without steps, filtered by function, status (one or several),
    event name and creation time; another app's runs only with all_apps."""
    app, other = make_engine("shop"), make_engine("other")
    shop(app)

    @other.create_function("pack", trigger=TriggerEvent("x/pack"))
    async def other_pack(ctx: Context) -> None:
        return None

    async with app.worker(), other.worker():
        early = await finished(app, [Event(name="x/pack"), Event(name="x/bill")])
        await move_clock(sql, timedelta(hours=1))
        boundary = await sql.fetchval("SELECT engine.now()")
        late = await finished(app, [Event(name="x/bill", data={"fail": True})])
    page = await app.list_run_summaries()
    assert [run.run_id for run in page.runs] == [r.run_id for r in newest_first(page.runs)]
    assert {run.run_id for run in page.runs} == {*early, *late} and page.cursor is None
    assert {run.app_id for run in page.runs} == {"shop"}
    everyone = await app.list_run_summaries(all_apps=True)
    assert len(everyone.runs) == 4 and {run.app_id for run in everyone.runs} == {"shop", "other"}
    pack = await app.list_run_summaries("pack")
    assert [(run.function_id, run.event_name) for run in pack.runs] == [("pack", "x/pack")]
    failed = await app.list_run_summaries(status=RunStatus.FAILED)
    assert [run.run_id for run in failed.runs] == late
    both = await app.list_run_summaries(status=["FAILED", "COMPLETED"])
    assert len(both.runs) == 3
    bills = await app.list_run_summaries(event_name="x/bill")
    assert {run.run_id for run in bills.runs} == {early[1], *late}
    since = await app.list_run_summaries(since=boundary)
    until = await app.list_run_summaries(until=boundary)
    assert [run.run_id for run in since.runs] == late
    assert {run.run_id for run in until.runs} == set(early)
    assert failed.runs[0].event_id and failed.runs[0].ended_at is not None


async def test_run_pages_follow_the_keyset_through_ties_and_new_runs(
    make_engine: Any, sql: asyncpg.Connection
) -> None:
    """Pages cover every run once, in order, even among runs created at the same instant
    (the id breaks the tie); runs created after the first page do not shift the next ones
    (a keyset, not an offset); the last page has no cursor."""
    app = make_engine("shop")
    shop(app)
    async with app.worker():
        await finished(app, [Event(name="x/pack") for _ in range(7)])
        # The same instant for all: only the run id orders them.
        await sql.execute("UPDATE engine.runs SET created_at = '2030-01-01T00:00:00Z'")
        expected = [run.run_id for run in (await app.list_run_summaries(limit=100)).runs]
        pages = await all_pages(app, limit=3)
        assert pages == [expected[0:3], expected[3:6], expected[6:7]]
        first = await app.list_run_summaries(limit=3)
        await finished(app, [Event(name="x/pack") for _ in range(2)])  # newer than them all
        second = await app.list_run_summaries(limit=3, cursor=first.cursor)
    assert [run.run_id for run in second.runs] == expected[3:6]


async def test_run_listing_refuses_bad_arguments(make_engine: Any) -> None:
    app = make_engine("shop")
    events_cursor = (await app.list_events(limit=1)).cursor
    with pytest.raises(ValueError, match="is not a cursor of a listing of runs"):
        await app.list_run_summaries(cursor="bm9wZQ")
    with pytest.raises(ValueError, match="limit must be 1 to 1000"):
        await app.list_run_summaries(limit=0)
    with pytest.raises(ValueError, match="unknown run status"):
        await app.list_run_summaries(status="DONE")
    assert events_cursor is None  # no events: one empty page


async def test_events_newest_first_with_filters_pages_and_their_state(
    make_engine: Any, sql: asyncpg.Connection
) -> None:
    """Events list newest first (filtered by name and time, a page at a time); one event shows
    its state (pending until routed, then routed) and how many runs it started."""
    app = make_engine("shop")
    shop(app)
    [pending] = await app.send(Event(name="x/pack", data={"n": 0}))
    stored = await app.get_event(pending)
    assert stored is not None and (stored.status, stored.runs) == ("pending", 0)
    async with app.worker():
        await finished(app, [Event(name="x/pack", data={"n": 1})])
        await move_clock(sql, timedelta(hours=1))
        boundary = await sql.fetchval("SELECT engine.now()")
        [mine] = await finished(app, [Event(name="x/bill", id="order-7", data={"n": 2})])
    listed = (await app.list_events()).events
    mine_only = [event.name for event in listed if not event.name.startswith("engine/")]
    assert mine_only == ["x/bill", "x/pack", "x/pack"]  # with each run's engine/function.finished
    assert [event.seq for event in listed] == sorted((e.seq for e in listed), reverse=True)
    bill = await app.get_event("order-7")
    assert bill is not None and (bill.status, bill.runs, bill.data) == ("routed", 1, {"n": 2})
    assert (await app.get_event(pending)).status == "routed"  # type: ignore[union-attr]
    assert await app.get_event("no-such-event") is None
    packs = (await app.list_events("x/pack")).events
    assert [event.data["n"] for event in packs] == [1, 0]
    late = (await app.list_events(since=boundary)).events
    early = (await app.list_events(until=boundary)).events
    assert [e.id for e in late if e.name == "x/bill"] == ["order-7"]
    assert {e.name for e in early} == {"x/pack", "engine/function.finished"}
    pages, cursor, seen = 0, None, []
    while True:
        page = await app.list_events(limit=2, cursor=cursor)
        seen += [event.seq for event in page.events]
        pages += 1
        if (cursor := page.cursor) is None:
            break
    assert seen == [event.seq for event in listed] and pages == (len(listed) + 1) // 2
    assert mine


async def test_list_functions_shows_flow_control_and_runs(make_engine: Any) -> None:
    app = make_engine("shop")
    shop(app)
    async with app.worker():
        await finished(app, [Event(name="x/bill", data={"fail": True})])
        functions = {f.function_id: f for f in await app.list_functions()}
    bill = functions["bill"]
    assert bill.triggers == [{"event": "x/bill", "expression": None}]
    assert bill.config["concurrency"][0]["limit"] == 3 and "throttle" in bill.config
    assert bill.runs == {"FAILED": 1} and bill.active and bill.workers == 1
    assert functions["pack"].runs == {}


async def test_an_older_database_gets_function_list_with_config(sql: asyncpg.Connection) -> None:
    """Applying the schema to a database whose function_list has no config column (version 9,
    or an earlier build of 10) replaces it: CREATE OR REPLACE alone cannot add a column."""
    await sql.execute("DROP FUNCTION engine.function_list(text)")
    await sql.execute(
        "CREATE FUNCTION engine.function_list(p_app text) RETURNS TABLE (app_id text,"
        " function_id text, triggers jsonb, active boolean, workers bigint, runs jsonb)"
        " LANGUAGE sql AS 'SELECT NULL::text, NULL::text, NULL::jsonb, false, 0::bigint,"
        " NULL::jsonb WHERE false'"
    )
    await sql.execute(schema_sql())
    names = await sql.fetchval(
        "SELECT proargnames FROM pg_proc WHERE oid = 'engine.function_list(text)'::regprocedure"
    )
    assert "config" in names
    assert await sql.fetchval("SELECT engine.schema_version()") == 11


async def test_a_finished_status_is_listed_through_its_index(sql: Any) -> None:
    """A listing of one finished status reads the index of finished runs by status: walking
    every run newest first past the other statuses took 525 ms with a million runs when the
    status matched none of them. Checked on the generic plan, the one a prepared statement
    ends up with."""
    query = queries()["ended_run_summaries"]
    await sql.execute("SET plan_cache_mode = force_generic_plan")
    await sql.execute("SET enable_seqscan = off")  # an empty table: a scan would do as well
    await sql.execute(f"PREPARE ended AS {query}")
    plan = await sql.fetchval(
        "EXPLAIN (FORMAT JSON) EXECUTE ended"
        "(NULL, NULL, ARRAY['CANCELLED'], NULL, NULL, NULL, NULL, NULL, 51)"
    )
    assert "runs_status_created_idx" in plan, plan
    assert '"Sort"' not in plan  # read in order: the page stops after its rows
