"""The lease-guarded writes of one run find it by primary key, whatever the statistics say.

A checkpoint, a run's end and a note of the steps executing each lock or update one run, checked
against the caller's lease. Written with ``status = 'RUNNING'`` in the WHERE clause, such a
statement may be planned on ``runs_leased_idx`` (the partial index of RUNNING runs): after an
ANALYZE taken while few runs were RUNNING, that plan reads every RUNNING run's index entry for
each write, and a worker's connection keeps its cached plan. These tests take exactly that
moment (statistics with almost no RUNNING run, generic plans forced) and read the plans
PostgreSQL chose for the statements inside the engine's functions (auto_explain, nested
statements, sent to this session as LOG messages).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from engine.db import queries, schema_sql

OWNER = uuid.UUID(int=7)

FILL = """
INSERT INTO engine.events (id, name, data, ts, received_at)
SELECT 'e-' || g, 'plan/event', '{}', now(), now() FROM generate_series(1, 3000) g;
INSERT INTO engine.runs (app_id, function_id, status, event_seq, due_at, created_at, updated_at,
                         ended_at)
SELECT 'plans', 'fn', 'COMPLETED', e.seq, e.ts, e.ts, e.ts, e.ts FROM engine.events e;
ANALYZE engine.runs;
"""


@pytest.fixture
async def explained(sql: asyncpg.Connection) -> AsyncIterator[tuple[asyncpg.Connection, list[str]]]:
    """A session whose statements (nested ones included) log their generic plans to it."""
    if not await sql.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
        pytest.skip("LOAD 'auto_explain' needs a superuser")
    await sql.execute(FILL)
    plans: list[str] = []
    sql.add_log_listener(lambda _conn, message: plans.append(message.message))
    for setting in (
        "LOAD 'auto_explain'",
        "SET auto_explain.log_min_duration = 0",
        "SET auto_explain.log_nested_statements = on",
        "SET client_min_messages = log",
        "SET plan_cache_mode = force_generic_plan",
    ):
        await sql.execute(setting)
    yield sql, plans


async def _leased_run(sql: asyncpg.Connection) -> uuid.UUID:
    """A RUNNING run leased to OWNER (token 1), inserted after the ANALYZE."""
    run_id: uuid.UUID = await sql.fetchval(
        """
        INSERT INTO engine.runs (app_id, function_id, status, event_seq, due_at, lease_owner,
                                 lease_token, lease_expires_at, started_at, created_at, updated_at)
        SELECT 'plans', 'fn', 'RUNNING', min(seq), now(), $1, 1, now() + interval '1 minute',
               now(), now(), now()
        FROM engine.events
        RETURNING id
        """,
        OWNER,
    )
    return run_id


def _runs_plans(plans: list[str]) -> list[str]:
    return [plan for plan in plans if "on runs" in plan]


async def test_a_checkpoint_finds_its_run_by_primary_key(
    explained: tuple[asyncpg.Connection, list[str]],
) -> None:
    sql, plans = explained
    run_id = await _leased_run(sql)
    step = '[{"key": "a", "position": 0, "kind": "run", "status": "COMPLETED", "attempts": 1}]'
    plans.clear()
    verdict = await sql.fetchval(
        "SELECT engine.checkpoint_steps($1, $2, 1, $3::jsonb)", run_id, OWNER, step
    )
    assert verdict == "ok"
    assert any("hold_lease" in p or "FOR KEY SHARE" in p for p in plans), plans
    runs = _runs_plans(plans)
    assert runs and all("runs_leased_idx" not in p for p in runs), runs
    assert any("runs_pkey" in p for p in runs), runs


async def test_a_run_end_and_a_note_find_the_run_by_primary_key(
    explained: tuple[asyncpg.Connection, list[str]],
) -> None:
    sql, plans = explained
    run_id = await _leased_run(sql)
    plans.clear()
    noted = await sql.fetchval(
        "SELECT engine.note_executing($1, $2, 1, $3::jsonb)",
        run_id,
        OWNER,
        '{"token": 1, "v": 1, "steps": []}',
    )
    ended = await sql.fetchval(
        "SELECT engine.finish_run($1, $2, 1, 'COMPLETED', '1'::jsonb, NULL, 0)", run_id, OWNER
    )
    assert (noted, ended) == ("ok", "ok")
    runs = [p for p in _runs_plans(plans) if "Update on runs" in p]
    assert len(runs) >= 2, plans
    assert all("runs_leased_idx" not in p for p in runs), runs
    assert all("runs_pkey" in p for p in runs), runs


async def test_a_stale_lease_is_still_refused(
    explained: tuple[asyncpg.Connection, list[str]],
) -> None:
    """Moving the lease check out of the WHERE clause changed no verdict."""
    sql, _plans = explained
    run_id = await _leased_run(sql)
    other = uuid.UUID(int=8)
    step = '[{"key": "a", "position": 0, "kind": "run", "status": "COMPLETED", "attempts": 1}]'
    assert await sql.fetchval("SELECT engine.hold_lease($1, $2, 1)", run_id, other) is None
    assert await sql.fetchval("SELECT engine.hold_lease($1, $2, 2)", run_id, OWNER) is None
    assert (
        await sql.fetchval(
            "SELECT engine.checkpoint_steps($1, $2, 2, $3::jsonb)", run_id, OWNER, step
        )
        == "lost"
    )
    assert (
        await sql.fetchval(
            "SELECT engine.finish_run($1, $2, 1, 'COMPLETED', '1'::jsonb, NULL, 0)", run_id, other
        )
        == "lost"
    )
    assert (
        await sql.fetchval(
            "SELECT engine.note_executing($1, $2, 2, $3::jsonb)", run_id, OWNER, '{"v": 1}'
        )
        == "lost"
    )
    assert await sql.fetchval("SELECT status FROM engine.runs WHERE id = $1", run_id) == "RUNNING"


# A session whose statements, nested ones included, report their generic plans to it.
GENERIC_PLANS_EXPLAINED = (
    "SET plan_cache_mode = force_generic_plan",
    "SET client_min_messages = log",
    "LOAD 'auto_explain'",
    "SET auto_explain.log_min_duration = 0",
    "SET auto_explain.log_nested_statements = on",
)

CLAIMABLE = """
INSERT INTO engine.runs (app_id, function_id, status, event_seq, due_at, created_at, updated_at)
SELECT 'plans', 'fn', 'QUEUED', e.seq, now() - interval '1 second', now(), now()
FROM engine.events e ORDER BY e.seq LIMIT $1
"""

STEPS = """
INSERT INTO engine.steps (run_id, step_key, position, kind, status, attempts, output, bytes,
                          started_at, ended_at, created_at)
SELECT r.id, 's' || g, g, 'run', 'COMPLETED', 1, '{"ok": true}', 20, now(), now(), now()
FROM engine.runs r, generate_series(1, 3) g
"""


async def test_a_claim_reads_no_other_runs_steps_with_plans_cached_on_empty_tables(
    sql: asyncpg.Connection,
) -> None:
    """A worker's connection caches the generic plans of the claim's statements when it first
    claims, on a new database: tables nearly empty. Those plans serve it while the tables grow
    (only an ANALYZE replans them): checking the claimed runs' timeouts and state sizes must
    not read every step of the database then."""
    if not await sql.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
        pytest.skip("LOAD 'auto_explain' needs a superuser")
    plans: list[str] = []
    sql.add_log_listener(lambda _conn, message: plans.append(message.message))
    for setting in GENERIC_PLANS_EXPLAINED:
        await sql.execute(setting)
    await sql.execute(
        "INSERT INTO engine.events (id, name, data, ts, received_at)"
        " SELECT 'e-' || g, 'plan/event', '{}', now(), now() FROM generate_series(1, 3000) g"
    )
    claim = "SELECT id FROM engine.claim_runs('plans', '{fn}', $1, interval '1 minute', 5)"
    await sql.execute(CLAIMABLE, 5)
    assert len(await sql.fetch(claim, OWNER)) == 5  # plans cached: steps and runs near empty
    await sql.execute("UPDATE engine.runs SET status = 'COMPLETED', ended_at = now()")
    await sql.execute(
        "INSERT INTO engine.runs (app_id, function_id, status, event_seq, due_at, created_at,"
        " updated_at, ended_at) SELECT 'plans', 'old', 'COMPLETED', e.seq, now(), now(), now(),"
        " now() FROM engine.events e"
    )
    await sql.execute(STEPS)
    await sql.execute(CLAIMABLE.replace("ORDER BY e.seq", "ORDER BY e.seq DESC"), 5)
    plans.clear()
    assert len(await sql.fetch(claim, OWNER)) == 5
    scans = [p for p in plans if "Seq Scan on steps" in p or "Seq Scan on runs" in p]
    assert not scans, "\n-----\n".join(scans)


async def _analyzed_plans(sql: asyncpg.Connection) -> list[dict[str, Any]]:
    """Makes this session report, as JSON, the plan with actual row counts of every statement it
    runs (nested ones included) under generic plans; returns the list they are collected in."""
    if not await sql.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
        pytest.skip("LOAD 'auto_explain' needs a superuser")
    plans: list[dict[str, Any]] = []

    def collect(_conn: object, message: asyncpg.PostgresLogMessage) -> None:
        text = message.message
        if "{" in text:
            plans.append(json.loads(text[text.index("{") :]))

    sql.add_log_listener(collect)
    for setting in (
        *GENERIC_PLANS_EXPLAINED,
        "SET auto_explain.log_analyze = on",
        "SET auto_explain.log_timing = off",
        "SET auto_explain.log_format = json",
    ):
        await sql.execute(setting)
    return plans


def _rows_read(plans: list[dict[str, Any]], table: str) -> list[tuple[float, str]]:
    """(rows, statement) of every scan of ``table`` in ``plans``, rows counted over all loops."""
    read: list[tuple[float, str]] = []

    def walk(node: dict[str, Any], statement: str) -> None:
        if node.get("Relation Name") == table and "Scan" in node["Node Type"]:
            rows = node.get("Actual Rows", 0) * node.get("Actual Loops", 0)
            read.append((rows + node.get("Rows Removed by Filter", 0), statement))
        for child in node.get("Plans", []):
            walk(child, statement)

    for plan in plans:
        walk(plan["Plan"], " ".join(plan["Query Text"].split())[:160])
    return read


async def test_a_claim_takes_its_few_runs_of_a_batch_without_reading_the_batch(
    sql: asyncpg.Connection,
) -> None:
    """Runs routed from one batch of events share their due time; the claim takes them in event
    order. With an index of (app_id, due_at) alone, each claim read and sorted the whole batch
    to take five of them: draining a batch of N runs cost N^2 rows read."""
    await sql.execute(
        "INSERT INTO engine.events (id, name, data, ts, received_at)"
        " SELECT 'e-' || g, 'plan/event', '{}', now(), now() FROM generate_series(1, 1000) g"
    )
    await sql.execute(CLAIMABLE, 1000)  # one due time for all (now() is the transaction's)
    await sql.execute("ANALYZE engine.runs")
    plans = await _analyzed_plans(sql)
    claim = "SELECT id FROM engine.claim_runs('plans', '{fn}', $1, interval '1 minute', 5)"
    claimed = await sql.fetch(claim, OWNER)
    first = await sql.fetchval("SELECT min(event_seq) FROM engine.runs")
    assert len(claimed) == 5
    assert {
        r["event_seq"]
        for r in await sql.fetch("SELECT event_seq FROM engine.runs WHERE status = 'RUNNING'")
    } == set(range(first, first + 5))  # still the first five events, in order
    due = [(rows, s) for rows, s in _rows_read(plans, "runs") if "WITH due AS" in s]
    assert due and max(rows for rows, _ in due) <= 5 + 32 + 5, due  # the limit and its room


async def test_a_claim_reads_runs_in_due_order_with_plans_cached_on_a_young_table(
    sql: asyncpg.Connection,
) -> None:
    """A worker caches the claim's generic plans at its first claims: on a new database, with
    a few hundred runs in a table never analyzed, a plan of runs_function_idx and a sort looked
    as cheap as reading the due runs in order from runs_due_idx. Kept while a backlog grew
    (until autovacuum analyzed the table, a minute later), it made each claim read and sort
    every due run: a third of the server's CPU in the throughput scenario (perf)."""
    await sql.execute(
        "INSERT INTO engine.events (id, name, data, ts, received_at)"
        " SELECT 'e-' || g, 'plan/event', '{}', now(), now() FROM generate_series(1, 1300) g"
    )
    plans = await _analyzed_plans(sql)
    claim = "SELECT id FROM engine.claim_runs('plans', '{fn}', $1, interval '1 minute', 5)"
    await sql.execute(CLAIMABLE, 300)
    assert len(await sql.fetch(claim, OWNER)) == 5  # plans cached: the worker's first claim
    await sql.execute(CLAIMABLE.replace("ORDER BY e.seq", "ORDER BY e.seq DESC"), 1000)
    plans.clear()
    claimed = await sql.fetch(claim, OWNER)
    assert len(claimed) == 5
    due = [(rows, s) for rows, s in _rows_read(plans, "runs") if "WITH due AS" in s]
    assert due and max(rows for rows, _ in due) <= 5 + 32 + 5, due  # the limit and its room


async def test_routing_reads_each_event_by_its_key_with_plans_cached_on_small_tables(
    sql: asyncpg.Connection,
) -> None:
    """Routing's statements that look up the events of the runs they create must not be
    planned as a hash of the whole events table: a worker's connection keeps the generic plan
    made while the table was small, and every routing then read every event."""
    await sql.execute(
        "INSERT INTO engine.events (id, name, data, ts, received_at)"
        " SELECT 'e-' || g, 'plan/event', '{}', now(), now() FROM generate_series(1, 3000) g"
    )
    await sql.execute("ANALYZE engine.events")
    version = await sql.fetchval(
        "SELECT value::bigint FROM engine.meta WHERE key = 'registry_version'"
    )
    simple = json.dumps(
        [{"app_id": "plans", "function_id": "fn", "event": "plan/new", "local": True}]
    )
    plans = await _analyzed_plans(sql)
    for i in range(3):  # the first executions of a PL/pgSQL statement are planned anew
        await sql.execute(
            "SELECT engine.send_events($1::jsonb)",
            f'[{{"name": "plan/new", "data": {{"i": {i}}}}}]',
        )
        plans.clear()
        rows = await sql.fetch(
            queries()["route_simple"],
            10,
            simple,
            [],
            version,
            "plans",
            OWNER,
            timedelta(minutes=1),
            10,
        )
        assert rows[0]["routed"] == 1 and len(rows) == 2, rows
        assert json.loads(rows[1]["event"])["data"] == {"i": i}
    read = _rows_read(plans, "events")
    assert read and max(rows for rows, _ in read) <= 1, read


async def test_migrate_replaces_the_claim_index_of_an_earlier_build(
    sql: asyncpg.Connection,
) -> None:
    """A database migrated by an earlier build has runs_due_idx on (app_id, due_at) only:
    applying schema.sql replaces it, and applying it again leaves it alone."""
    await sql.execute(
        "DROP INDEX engine.runs_due_idx;"
        " CREATE INDEX runs_due_idx ON engine.runs (app_id, due_at)"
        " WHERE status IN ('QUEUED', 'SLEEPING', 'RETRYING', 'WAITING')"
    )
    definition = "SELECT pg_get_indexdef('engine.runs_due_idx'::regclass)"
    await sql.execute(schema_sql())
    assert "(app_id, due_at, event_seq) WHERE" in await sql.fetchval(definition)
    oid = await sql.fetchval("SELECT 'engine.runs_due_idx'::regclass::oid")
    await sql.execute(schema_sql())
    assert await sql.fetchval("SELECT 'engine.runs_due_idx'::regclass::oid") == oid


LEASED = """
INSERT INTO engine.runs (app_id, function_id, status, event_seq, due_at, lease_owner,
                         lease_token, lease_expires_at, started_at, created_at, updated_at)
SELECT 'plans', 'fn', 'RUNNING', e.seq, now(), $1, 1, now() + interval '1 minute', now(), now(),
       now()
FROM engine.events e WHERE NOT EXISTS (SELECT 1 FROM engine.runs r WHERE r.event_seq = e.seq)
ORDER BY e.seq LIMIT $2
RETURNING id
"""


async def test_a_batch_of_writes_reads_only_its_runs_with_plans_cached_on_a_young_table(
    sql: asyncpg.Connection,
) -> None:
    """A batch of checkpoints is written as one statement (engine.checkpoint_set), a batch of
    run ends as that statement and an update of its runs (engine.finish_set), whose generic
    plans a worker's connection caches at its first batches, on a new database. Planned with a
    few runs in the table, looking the batch's runs up as a hash of every run looked as cheap
    as one lookup each; kept while the table grew, that plan read every run at every batch (the
    throughput scenario: seven times the buffers of one call per item). A batch reads its own
    runs, by id, whatever the size of the table when its plans were made."""
    await sql.execute(
        "INSERT INTO engine.events (id, name, data, ts, received_at)"
        " SELECT 'e-' || g, 'plan/event', '{}', now(), now() FROM generate_series(1, 2100) g"
    )
    plans = await _analyzed_plans(sql)

    def item(run: uuid.UUID, key: str, **end: Any) -> dict[str, Any]:
        step = {"key": key, "position": 0, "kind": "run", "status": "COMPLETED", "attempts": 1,
                "output": 1}  # fmt: skip
        return {"run": str(run), "owner": str(OWNER), "token": 1, "steps": [step], **end}

    async def batches(runs: list[uuid.UUID]) -> None:
        checkpoints = json.dumps([item(run, "a") for run in runs[:4]])
        results = await sql.fetch(
            "SELECT result FROM engine.checkpoint_many($1::jsonb)", checkpoints
        )
        assert [r["result"] for r in results] == ["ok"] * 4
        end = {"status": "FAILED", "output": None, "error": {"message": "no"}, "log_lines": 0}
        ends = json.dumps([item(run, "b", **end) for run in runs[4:]])
        results = await sql.fetch("SELECT result FROM engine.finish_many($1::jsonb)", ends)
        assert [r["result"] for r in results] == ["ok"] * 4

    young = [r["id"] for r in await sql.fetch(LEASED, OWNER, 8)]
    await sql.execute("ANALYZE engine.runs; ANALYZE engine.steps")
    await batches(young)  # the plans cached: the worker's first batches
    await sql.execute(CLAIMABLE.replace("'QUEUED'", "'COMPLETED'"), 2000)
    grown = [r["id"] for r in await sql.fetch(LEASED, OWNER, 8)]
    plans.clear()
    await batches(grown)
    for table in ("runs", "run_executions"):
        read = [(rows, s) for rows, s in _rows_read(plans, table) if "WITH items AS" in s]
        assert read and max(rows for rows, _ in read) <= 4, (table, read)
