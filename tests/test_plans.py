"""The hot path's plans on a loaded database: the claim, routing and wake-up statements read the
partial indexes meant for them, whatever else the tables hold.

The database holds finished runs (with their events, steps and executions), 10,000 runs asleep
for 30 days and 10,000 runs waiting for an event that never comes, all copies of runs the engine
made (bench/fill.py), then VACUUM ANALYZE, as autovacuum leaves a table. Each test calls the
engine's named queries (engine/sql/queries.sql) as the worker calls them, on a session where
auto_explain reports the plan of every statement, those inside the PL/pgSQL functions included
(``log_nested_statements``), as notices; with ``plan_cache_mode`` forced to custom plans, and to
generic plans (asyncpg prepares every statement, and PL/pgSQL caches its statements' plans:
after five executions, a generic plan is used when it looks no worse). The worker's entry
points force generic plans for what they run (schema.sql), whatever the session's setting.
Everything runs in one transaction, rolled back after the test.

The checks name indexes, not plan shapes: no sequential scan of a table that grows with the
runs, one run by id through the primary key, and the index each statement exists for.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import pytest

from engine import Engine
from engine.db import queries
from engine.records import StepKind, StepRecord, StepStatus
from engine.router import EVENT_BATCH
from engine.testdb import TestDatabases, blocking

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
import fill  # bench/fill.py, shared with bench/scale.py

sys.path.remove(str(Path(__file__).parent.parent / "bench"))

FINISHED = 50_000  # a table scan of this many runs is far costlier than any index: it shows
PARKED = 10_000  # sleeping, and as many waiting
APP = "plans"
FUNCTIONS = [fill.THREE_STEPS, fill.SLEEPER, fill.WAITER]
TRIGGERS = {fill.THREE_STEPS: "scale/three", fill.SLEEPER: "scale/sleep", fill.WAITER: "scale/wait"}
LEASE = timedelta(seconds=30)
# Tables that grow with the runs and events: never read whole by the hot path.
GROWING = {"runs", "events", "steps", "run_executions", "step_attempts"}
# The matchers grow with the runs that wait: a sequential scan that stops at its first row (an
# EXISTS on the name most of them wait for) is the right plan; one that reads them all is not.
MATCHERS_READ = 100
# The index that finds one run by id.
BY_ID = {"runs_pkey"}

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def loaded(engine_test_databases: TestDatabases) -> Iterator[str]:
    """A database of the test server filled as the module's docstring says (once for the
    module: the filling is most of its time)."""
    url = blocking(engine_test_databases.create())
    try:
        blocking(_load(url))
        yield url
    finally:
        blocking(engine_test_databases.drop(url))


async def _load(url: str) -> None:
    app = Engine(APP, url, retention=None)
    fill.define(app)
    try:
        await fill.load(app, finished=FINISHED, sleeping=PARKED, waiting=PARKED)
    finally:
        await app.close()


@dataclass(frozen=True)
class Scan:
    """One node of a reported plan that reads a table."""

    node: str  # Seq Scan, Index Scan, Index Only Scan, Bitmap Heap Scan...
    relation: str | None
    index: str | None
    condition: str  # its index condition and filter, as EXPLAIN prints them
    rows_read: float  # rows it returned plus those its filter removed, per loop
    query: str  # the statement it belongs to

    def __str__(self) -> str:
        where = self.index or self.relation
        return f"{self.node} on {where} [{self.condition}] in: {' '.join(self.query.split())}"


class Plans:
    """The plans auto_explain reports to one session (as notices), read as :class:`Scan`s."""

    def __init__(self) -> None:
        self.scans: list[Scan] = []

    def heard(self, _conn: object, message: asyncpg.PostgresLogMessage) -> None:
        """The session's log listener: keeps the scans of each reported plan."""
        text = message.message
        if " plan:" in text:
            report = json.loads(text.split(" plan:", 1)[1])
            self.scans.extend(_scans(report["Plan"], report.get("Query Text", "")))


def _scans(node: dict[str, Any], query: str) -> Iterator[Scan]:
    if "Relation Name" in node or "Index Name" in node:
        condition = " ".join(
            str(node[k]) for k in ("Index Cond", "Recheck Cond", "Filter") if k in node
        )
        read = node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0) / max(
            node.get("Actual Loops", 1), 1
        )
        yield Scan(
            node["Node Type"],
            node.get("Relation Name"),
            node.get("Index Name"),
            condition,
            read,
            query,
        )
    for child in node.get("Plans", []):
        yield from _scans(child, query)


@dataclass
class Session:
    """A connection to the loaded database reporting its plans, inside a transaction."""

    conn: asyncpg.Connection[Any]
    plans: Plans

    async def call(self, query: str, *args: Any) -> tuple[list[asyncpg.Record], list[Scan]]:
        """Runs a named query; its rows and the scans of every statement it executed, checked
        against the rules every hot statement keeps (see :func:`check`)."""
        self.plans.scans.clear()
        rows = await self.conn.fetch(queries()[query], *args)
        await self._close_portal()
        scans = list(self.plans.scans)
        check(scans)
        return rows, scans

    async def setup(self, statement: str, *args: Any) -> list[asyncpg.Record]:
        """Sets a scene (its plans are not checked); the rows it returns."""
        rows = await self.conn.fetch(statement, *args)
        await self._close_portal()
        self.plans.scans.clear()
        return rows

    async def _close_portal(self) -> None:
        """Ends the last statement's portal, which reports its plan then: asyncpg leaves it open
        until the next statement (a simple query replaces it)."""
        await self.conn.execute("SELECT 1")
        await asyncio.sleep(0)  # the listener is called soon after the notices arrive


def check(scans: list[Scan]) -> None:
    """No table that grows with the runs is read whole, and a run read by id is read through
    an index of ids (not runs_leased_idx, filtered on the id: every running run read)."""
    whole = [
        s
        for s in scans
        if s.node == "Seq Scan"
        and (s.relation in GROWING or (s.relation == "matchers" and s.rows_read > MATCHERS_READ))
    ]
    assert not whole, "\n".join(map(str, whole))
    by_id = [
        s
        for s in scans
        if s.relation == "runs"
        and s.node in ("Index Scan", "Index Only Scan", "Seq Scan")
        and "(id = " in s.condition
        and "'{}'" not in s.condition  # an empty list: no row, whichever index (any may serve)
        and s.index not in BY_ID
    ]
    assert not by_id, "\n".join(map(str, by_id))


def uses(scans: list[Scan], index: str, *, only: bool = False) -> list[Scan]:
    """The scans that read ``index`` (an index-only scan if ``only``); fails if there are none."""
    found = [s for s in scans if s.index == index and (not only or s.node == "Index Only Scan")]
    assert found, f"no {'index-only ' if only else ''}scan of {index} in:\n" + "\n".join(
        map(str, scans)
    )
    return found


@pytest.fixture(params=["force_custom_plan", "force_generic_plan"])
async def session(loaded: str, request: pytest.FixtureRequest) -> AsyncIterator[Session]:
    """A session on the loaded database reporting every plan (with actual row counts) in the
    plan cache mode of the test's parameter; its transaction is rolled back after the test."""
    conn = await asyncpg.connect(loaded)
    plans = Plans()
    for setting in (
        "LOAD 'auto_explain'",
        "SET auto_explain.log_min_duration = 0",
        "SET auto_explain.log_nested_statements = on",
        "SET auto_explain.log_analyze = on",
        "SET auto_explain.log_timing = off",
        "SET auto_explain.log_format = json",
        "SET auto_explain.log_level = notice",
        f"SET plan_cache_mode = {request.param}",
    ):
        await conn.execute(setting)
    conn.add_log_listener(plans.heard)
    transaction = conn.transaction()
    await transaction.start()
    try:
        yield Session(conn, plans)
    finally:
        await transaction.rollback()
        conn.remove_log_listener(plans.heard)
        await conn.close()


async def _send(session: Session, name: str, data: dict[str, Any]) -> list[Scan]:
    payload = json.dumps([{"name": name, "data": data}])
    _rows, scans = await session.call("send_events", payload, None, False)
    return scans


async def _route(session: Session, owner: UUID) -> tuple[list[asyncpg.Record], list[Scan]]:
    """Routes the queued events as the worker does first (engine.route_simple)."""
    version = await session.conn.fetchval(
        "SELECT value::bigint FROM engine.meta WHERE key = 'registry_version'"
    )
    simple = [
        {"app_id": APP, "function_id": f, "event": TRIGGERS[f], "local": True} for f in FUNCTIONS
    ]
    args = (EVENT_BATCH, json.dumps(simple), [], version, APP, owner, LEASE, 10)
    return await session.call("route_simple", *args)


def _step(
    key: str,
    position: int,
    status: StepStatus = StepStatus.COMPLETED,
    kind: StepKind = StepKind.RUN,
    wake_at: datetime | None = None,
) -> str:
    """A step record as the worker sends it (engine.records.StepRecord)."""
    now = datetime.now(UTC)
    record = StepRecord(key, position, kind, status, wake_at=wake_at, started_at=now, ended_at=now)
    return record.to_json()


def _item(run: UUID, owner: UUID, token: int, steps: list[str], **fields: Any) -> str:
    head = json.dumps({"run": str(run), "owner": str(owner), "token": token, **fields})
    return f'[{head[:-1]}, "steps": [{",".join(steps)}], "output": null, "error": null}}]'


async def test_routing_reads_the_queue_and_the_matchers_by_name(session: Session) -> None:
    """Sending and routing an event read the queue, the event by its seq, and whether a run
    waits for its name from the matchers' name index alone (10,000 matchers of another name)."""
    await _send(session, "scale/three", {})
    rows, scans = await _route(session, uuid4())
    assert rows[0]["routed"] == 1 and len(rows) == 2
    uses(scans, "matchers_name_idx", only=True)
    uses(scans, "events_pkey")


async def test_a_routing_tick_finds_other_apps_functions_by_the_events_name(
    session: Session,
) -> None:
    """A worker's tick, with many functions of other apps registered, passes its own triggers
    only (engine.route_events, engine.router.LOOKUP_ABOVE): the other functions its events
    trigger are found through functions_triggers_idx, reading a few of the 2,000 registered
    here, where the whole registry was carried and parsed."""
    await session.setup(
        "INSERT INTO engine.functions (app_id, function_id, triggers, routes_in_sql)"
        " SELECT 'many', 'fn-' || g, jsonb_build_array(jsonb_build_object("
        "   'event', 'many/' || g, 'expression', null)), true"
        " FROM generate_series(1, 2000) g"
        " UNION ALL SELECT 'many', 'also-three', "
        '   \'[{"event": "scale/three", "expression": null}]\', true'
    )
    await session.setup("SELECT engine.registry_changed()")
    version = await session.conn.fetchval(
        "SELECT value::bigint FROM engine.meta WHERE key = 'registry_version'"
    )
    own = [
        {"app_id": APP, "function_id": f, "event": TRIGGERS[f], "local": True} for f in FUNCTIONS
    ]
    routing = json.dumps({"own": own, "mine": FUNCTIONS})
    await _send(session, "scale/three", {})
    args = (EVENT_BATCH, routing, [], version, APP, uuid4(), LEASE, 10)
    rows, scans = await session.call("route_simple", *args)
    assert rows[0]["routed"] == 1 and not rows[0]["deferred"]
    created = await session.conn.fetch(
        "SELECT app_id, function_id FROM engine.runs WHERE event_seq = (SELECT max(seq)"
        " FROM engine.events) ORDER BY 1, 2"
    )
    assert [tuple(r) for r in created] == [("many", "also-three"), (APP, fill.THREE_STEPS)]
    functions = [
        s for s in scans if s.relation == "functions" or s.index == "functions_triggers_idx"
    ]
    uses(scans, "functions_triggers_idx")
    assert all(s.rows_read <= 2 for s in functions), "\n".join(map(str, functions))


async def test_a_routed_send_runs_the_cached_plans_of_its_statements(session: Session) -> None:
    """A send routed in its own transaction (engine.send_and_route, a worker in the sender's
    process) runs the cached (generic) plans of its statements, whatever the session's
    plan_cache_mode. Left to choose, PostgreSQL planned five of them again at every send,
    since a custom plan always looked cheaper for a lookup by ``= ANY (array)``; each executes
    in microseconds. A cached plan refers to the variables of the function as parameters
    (``$1``); a custom plan has their values."""
    version = await session.conn.fetchval(
        "SELECT value::bigint FROM engine.meta WHERE key = 'registry_version'"
    )
    simple = [{"app_id": APP, "function_id": fill.THREE_STEPS, "event": "scale/three"}]
    payload = json.dumps([{"name": "scale/three", "data": {}}])
    args = (payload, None, json.dumps(simple), [], version, APP, uuid4(), LEASE, 10)
    rows, scans = await session.call("send_and_route", *args)
    assert rows[0]["routed"] == 1 and len(rows) == 2
    events = [s for s in scans if s.relation == "events" and s.condition]  # reads, by seq
    assert events, "the send did not read its events back"
    custom = [s for s in events if "$" not in s.condition]
    assert not custom, "\n".join(map(str, custom))
    # Among 50,000 finished runs and their events: each read finds its rows by key (meta
    # holds a few settings).
    reads = [s for s in scans if s.relation not in (None, "meta") and s.node != "ModifyTable"]
    slow = [s for s in reads if not s.index or s.rows_read > 2]
    assert not slow, "\n".join(map(str, slow))


async def test_a_step_and_a_run_end_read_the_run_by_its_primary_key(session: Session) -> None:
    """A checkpoint and a run's end (group-committed as the worker sends them) find the run by
    its id, among 50,000 finished runs and the running ones, through runs_pkey."""
    owner = uuid4()
    await _send(session, "scale/three", {})
    rows, _scans = await _route(session, owner)
    run, token = rows[1]["id"], rows[1]["lease_token"]
    done, scans = await session.call(
        "checkpoint_many", _item(run, owner, token, [_step("a", 0), _step("b", 1)])
    )
    assert done[0]["result"] == "ok"
    uses(scans, "runs_pkey")
    item = _item(run, owner, token, [_step("c", 2)], status="COMPLETED", log_lines=0)
    done, scans = await session.call("finish_many", item)
    assert done[0]["result"] == "ok"
    uses(scans, "runs_pkey")


async def test_a_run_end_reads_only_the_functions_a_system_event_triggers(
    session: Session,
) -> None:
    """Whether a run's engine/function.finished starts a function is answered from the
    functions by trigger name (functions_triggers_idx), not by reading the triggers of every
    function registered: 2,000 of them here, and one that engine/function.failed triggers."""
    await session.setup(
        "INSERT INTO engine.functions (app_id, function_id, triggers)"
        " SELECT 'many', 'fn-' || g, jsonb_build_array(jsonb_build_object('event', 'many/' || g))"
        " FROM generate_series(1, 2000) g"
        " UNION ALL SELECT 'many', 'on-failure', '[{\"event\": \"engine/function.failed\"}]'"
    )
    owner = uuid4()
    await _send(session, "scale/three", {})
    rows, _scans = await _route(session, owner)
    run, token = rows[1]["id"], rows[1]["lease_token"]
    item = _item(run, owner, token, [_step("a", 0)], status="COMPLETED", log_lines=0)
    done, scans = await session.call("finish_many", item)
    assert done[0]["result"] == "ok"
    functions = [
        s for s in scans if s.relation == "functions" or (s.index or "").startswith("functions_")
    ]
    assert functions, "the run's end did not look for functions its events trigger"
    assert all(s.rows_read <= 1 for s in functions), "\n".join(map(str, functions))


async def test_due_sleepers_are_claimed_through_the_index_of_due_runs(session: Session) -> None:
    """Five of the 10,000 sleepers come due: the claim finds them through runs_due_idx without
    reading the others (nor the 10,000 waiters, nor the finished runs), and the next due time
    comes from the same index."""
    await session.setup(
        "WITH woken AS (UPDATE engine.runs SET due_at = now() WHERE id IN (SELECT id FROM"
        " engine.runs WHERE function_id = $1 AND status = 'SLEEPING' LIMIT 5) RETURNING id)"
        " UPDATE engine.steps s SET wake_at = now() FROM woken w"
        " WHERE s.run_id = w.id AND s.status = 'SLEEPING'",
        fill.SLEEPER,
    )
    owner = uuid4()
    args = (APP, FUNCTIONS, owner, LEASE, 10, 32 * 1024 * 1024)
    claimed, scans = await session.call("claim_runs", *args)
    assert len(claimed) == 5
    due = uses(scans, "runs_due_idx")
    assert max(s.rows_read for s in due) <= 5 + 1, "\n".join(map(str, due))
    # The cached plan, whatever the session's setting (see the routed send's test): custom
    # plans of the claim's statements were made again at every claim.
    assert all("$" in s.condition for s in due), "\n".join(map(str, due))
    uses(scans, "runs_leased_idx")  # runs whose lease expired, taken over first
    uses(scans, "steps_pkey")
    _rows, scans = await session.call("next_due", APP, FUNCTIONS)
    uses(scans, "runs_due_idx")
    run = claimed[0]
    due_at = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    sleep = _step("nap", 1, StepStatus.SLEEPING, StepKind.SLEEP, datetime.fromisoformat(due_at))
    fields = {"status": "SLEEPING", "due": due_at, "reason": "sleeping", "attempt": 0}
    item = _item(run["id"], owner, run["lease_token"], [sleep], **fields, log_lines=0)
    done, scans = await session.call("suspend_many", item)
    assert done[0]["result"] == "ok"
    uses(scans, "runs_pkey")
    _rows, scans = await session.call("heartbeat", owner, LEASE, [r["id"] for r in claimed], "{}")
    uses(scans, "runs_pkey")


async def test_an_event_resumes_its_waiter_through_indexes(session: Session) -> None:
    """The event one waiter (of 10,000 waiting for the same name) waits for: routing claims it,
    finds that waiter's matcher without reading the others', and resumes it by key."""
    await _send(session, fill.PAID, {"order": 7})
    events, scans = await session.call("claim_events", EVENT_BATCH)
    assert len(events) == 1 and events[0]["awaited"]
    candidates, scans = await session.call("matcher_candidates", [events[0]["seq"]])
    assert len(candidates) == 1
    matchers = [s for s in scans if s.relation == "matchers" or "matchers" in (s.index or "")]
    assert max(s.rows_read for s in matchers) <= 10, "\n".join(map(str, matchers))
    uses(scans, "matchers_value_idx")
    match = [{"run_id": str(candidates[0]["run_id"]), "key": "paid", "event_seq": events[0]["seq"]}]
    resolved, scans = await session.call("resolve_matches", json.dumps(match))
    assert resolved[0][0] == 1
    uses(scans, "matchers_pkey")
    uses(scans, "steps_pkey")


async def test_a_new_wait_looks_back_through_the_events_by_name(session: Session) -> None:
    """A run waits again, long after its trigger: registering its matcher looks for events of
    that name since the trigger through events_name_idx, not by reading every event since."""
    owner = uuid4()
    [(run, token)] = await session.setup(
        "WITH oldest AS (SELECT run_id FROM engine.matchers ORDER BY since_seq LIMIT 1),"
        " gone AS (DELETE FROM engine.matchers m USING oldest o WHERE m.run_id = o.run_id),"
        " step AS (DELETE FROM engine.steps s USING oldest o"
        "          WHERE s.run_id = o.run_id AND s.step_key = 'paid')"
        " UPDATE engine.runs r SET status = 'RUNNING', lease_owner = $1,"
        "        lease_token = r.lease_token + 1, lease_expires_at = now() + interval '30s'"
        " FROM oldest o WHERE r.id = o.run_id RETURNING r.id, r.lease_token",
        owner,
    )
    [[newer]] = await session.setup(
        "SELECT count(*) FROM engine.events WHERE seq > (SELECT event_seq FROM engine.runs"
        " WHERE id = $1)",
        run,
    )
    expires = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    matcher = {
        "key": "paid",
        "kind": "wait",
        "event_name": fill.PAID,
        "match_path": ["order"],
        "match_value": 123456,
        "expression": None,
        "expires_at": expires,
        "on_timeout": {"status": "COMPLETED", "output": None},
    }
    steps = [_step("paid", 1, StepStatus.WAITING, StepKind.WAIT)]
    args = (run, owner, token, f"[{','.join(steps)}]", json.dumps([matcher]))
    found, scans = await session.call("register_matchers", *args)
    assert found == []
    events = [s for s in scans if s.relation == "events" or s.index == "events_name_idx"]
    assert newer > 10_000 and max(s.rows_read for s in events) <= 10, "\n".join(map(str, events))


async def test_the_sweep_reads_only_runs_with_a_deadline(session: Session) -> None:
    """The sweep each worker runs finds runs past a timeout through runs_deadline_idx (none
    here: no function has one)."""
    _rows, scans = await session.call("sweep", 100)
    uses(scans, "runs_deadline_idx")
