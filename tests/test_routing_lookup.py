"""Past ``LOOKUP_ABOVE`` plain triggers of other functions, a worker's routing tick
(``engine.route_simple``) passes its own functions' triggers only; the functions of other apps
(and of other versions of its own) that an event triggers are looked up by the event's name,
with what the worker that registered each said of it (``engine.functions.routes_in_sql``: no
flow control, so its plain triggers route in SQL). Before, every tick carried and parsed every
trigger of the schema (+2.4-3.2 ms a tick with 2,000 functions). Whatever a function's worker did
not say, or said no to, is routed in Python."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
from helpers import eventually, record_queries

from engine import Concurrency, Context, Engine, Event, TriggerEvent
from engine.router import LOOKUP_ABOVE

SLOW_POLL = "60s"  # longer than any test: only the NOTIFY of a send wakes the worker


def _web(make_engine: Any) -> tuple[Engine, asyncio.Event]:
    """The app whose worker routes: one plain function on user/signup."""
    web: Engine = make_engine("web")
    ran = asyncio.Event()

    @web.create_function("welcome", trigger=TriggerEvent("user/signup"))
    async def welcome(ctx: Context) -> str:
        ran.set()
        return "welcome"

    return web, ran


def _billing(make_engine: Any, **options: Any) -> Engine:
    """Another app, with open-account on user/signup (with ``options``) and, past
    LOOKUP_ABOVE, plain functions on names no event below bears."""
    billing: Engine = make_engine("billing")

    @billing.create_function("open-account", trigger=TriggerEvent("user/signup"), **options)
    async def open_account(ctx: Context) -> None:
        return None

    for n in range(LOOKUP_ABOVE + 1):

        @billing.create_function(f"other-{n}", trigger=TriggerEvent(f"other/{n}"))
        async def other(ctx: Context) -> None:
            return None

    return billing


async def _routed_runs(sql: asyncpg.Connection, event_id: str) -> list[tuple[str, str]]:
    rows = await sql.fetch(
        "SELECT r.app_id, r.function_id FROM engine.runs r JOIN engine.events e"
        " ON e.seq = r.event_seq WHERE e.id = $1 ORDER BY 1, 2",
        event_id,
    )
    return [(r["app_id"], r["function_id"]) for r in rows]


async def _route_a_signup(
    make_engine: Any, sql: asyncpg.Connection
) -> list[tuple[str, tuple[Any, ...]]]:
    """Sends user/signup through an Engine that runs no worker (the event waits for the
    routers), while web's worker runs; checks the runs it started (web's and billing's) and
    returns the named queries web's worker ran meanwhile."""
    web, ran = _web(make_engine)
    sender: Engine = make_engine("web")
    async with web.worker(poll_interval=SLOW_POLL):
        calls = record_queries(await web.database())
        [event_id] = await sender.send(Event(name="user/signup"))
        await asyncio.wait_for(ran.wait(), 10)
        runs = await eventually(lambda: _routed_runs(sql, event_id))
    assert runs == [("billing", "open-account"), ("web", "welcome")]
    return calls


async def test_a_tick_passes_its_own_triggers_and_finds_the_others_by_name(
    make_engine: Any, sql: asyncpg.Connection
) -> None:
    billing = _billing(make_engine)
    await billing.database()  # registered; no worker of billing runs
    calls = await _route_a_signup(make_engine, sql)
    ticks = [args for query, args in calls if query == "route_simple"]
    assert ticks
    for args in ticks:
        assert json.loads(args[1]) == {
            "own": [
                {"app_id": "web", "function_id": "welcome", "event": "user/signup", "local": True}
            ],
            "mine": ["welcome"],
        }
        assert args[2] == []  # the complex names of its own functions: none
    assert not [c for c in calls if c[0] == "claim_events"], "routed in Python"
    status = await sql.fetchval(
        "SELECT status FROM engine.runs WHERE app_id = 'billing' AND function_id = 'open-account'"
    )
    assert status == "QUEUED"  # for a worker of billing


async def test_a_function_whose_worker_did_not_say_is_routed_in_python(
    make_engine: Any, sql: asyncpg.Connection
) -> None:
    """A function registered by an engine that did not say whether it routes in SQL (an older
    one, during a rolling deploy): its events take the Python path, which routes them as
    before, for every function they trigger."""
    billing = _billing(make_engine)
    await billing.database()
    await sql.execute("UPDATE engine.functions SET routes_in_sql = NULL WHERE app_id = 'billing'")
    calls = await _route_a_signup(make_engine, sql)
    assert [c for c in calls if c[0] == "claim_events"], "not routed in Python"


async def test_another_apps_flow_control_routes_its_events_in_python(
    make_engine: Any, sql: asyncpg.Connection
) -> None:
    """A function of another app with flow control said it does not route in SQL: its events
    are routed in Python, where its limits are applied (the run carries its concurrency)."""
    billing = _billing(make_engine, concurrency=Concurrency(limit=1))
    await billing.database()
    said = await sql.fetchval(
        "SELECT routes_in_sql FROM engine.functions WHERE function_id = 'open-account'"
    )
    assert said is False
    calls = await _route_a_signup(make_engine, sql)
    assert [c for c in calls if c[0] == "claim_events"], "not routed in Python"
    limits = await sql.fetchval("SELECT concurrency FROM engine.runs WHERE app_id = 'billing'")
    assert limits is not None


async def test_a_registration_says_it_again_over_a_function_an_older_engine_registered(
    make_engine: Any, sql: asyncpg.Connection
) -> None:
    """After an upgrade, the functions registered before say nothing (NULL); the next
    registration of the same triggers and config says it, and one that does not say (an older
    worker still running) leaves what was said."""
    web, _ran = _web(make_engine)
    await web.database()
    await sql.execute("UPDATE engine.functions SET routes_in_sql = NULL")
    again, _ = _web(make_engine)
    await again.database()
    query = "SELECT routes_in_sql FROM engine.functions WHERE function_id = 'welcome'"
    assert await sql.fetchval(query) is True
    entry = {
        "function_id": "welcome",
        "triggers": [{"event": "user/signup", "expression": None}],
        "config": json.loads(
            await sql.fetchval("SELECT config::text FROM engine.functions WHERE app_id = 'web'")
        ),
    }  # as an engine that does not say registers it
    await sql.execute(
        "SELECT engine.register_functions('web', $1::jsonb, false)", json.dumps([entry])
    )
    assert await sql.fetchval(query) is True
