"""A loaded database in seconds: real runs, made by the engine, copied with SQL.

A few runs are created through the engine (one app with a 3-step function that completes, one
that sleeps for 30 days and one that waits 30 days for an event that never comes); each is then
copied `count` times by `generate_series`, with every row that belongs to it: its event, its
`engine/function.finished` event, and the rows of every table whose foreign key references
`engine.runs` (steps, executions, matchers...: found in the catalog, so a table added later is
copied too). A copy changes only what must differ (ids, event sequence numbers, dedupe keys,
the waited order number, its times, a little older for each copy) and keeps every other column
as the engine wrote it, so the loaded tables have the real shapes, statuses, due times and index
entries whatever the schema adds later.

Used by bench/scale.py and tests/test_plans.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg

from engine import Context, Engine, Event, TriggerEvent

THREE_STEPS = "three-steps"
SLEEPER = "sleeper"
WAITER = "waiter"
PAID = "scale/paid"  # what the waiters wait for (data.order), never sent for them

# The state each template run is left in, by function.
TEMPLATE_STATES = {THREE_STEPS: "COMPLETED", SLEEPER: "SLEEPING", WAITER: "WAITING"}


async def nothing() -> None:
    """A step that does nothing (the steps measure the engine, not the work)."""
    return None


def define(app: Engine) -> None:
    """Registers the three functions whose runs the fill copies on ``app``."""

    @app.create_function(THREE_STEPS, trigger=TriggerEvent("scale/three"))
    async def three_steps(ctx: Context) -> None:
        for name in ("a", "b", "c"):
            await ctx.step.run(name, nothing)

    @app.create_function(SLEEPER, trigger=TriggerEvent("scale/sleep"))
    async def sleeper(ctx: Context) -> None:
        await ctx.step.run("before", nothing)
        await ctx.step.sleep("nap", "30d")

    @app.create_function(WAITER, trigger=TriggerEvent("scale/wait"))
    async def waiter(ctx: Context) -> None:
        await ctx.step.run("before", nothing)
        await ctx.step.wait_for_event("paid", event=PAID, match="data.order", timeout="30d")


async def make_templates(app: Engine) -> dict[str, str]:
    """One run of each function of :func:`define`, run by a worker until it completed, sleeps
    or waits; their ids by function."""
    names = {THREE_STEPS: "scale/three", SLEEPER: "scale/sleep", WAITER: "scale/wait"}
    db = await app.database()
    runs: dict[str, str] = {}
    async with app.worker(concurrency=3):
        for function_id, name in names.items():
            [event_id] = await app.send(Event(name=name, data={"order": 0}))
            while not (found := await app.runs_for_event(event_id)):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            runs[function_id] = str(found[0].run_id)
        for function_id, run_id in runs.items():
            while await db.fetchval("run_status", run_id) != TEMPLATE_STATES[function_id]:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    return runs


# The copies: g, the run's id, its event's seq and its finished event's seq (from a block of
# sequence numbers reserved at once), and how much older than the template it is.
_MAP = """
CREATE TEMP TABLE clone_map ON COMMIT DROP AS
WITH reserved AS (
    SELECT setval(seq, nextval(seq) + 2 * {count}) - 2 * {count} AS base
    FROM pg_get_serial_sequence('engine.events', 'seq') AS seq)
SELECT g, gen_random_uuid() AS run_id, base + g AS seq, base + {count} + g AS finished_seq,
       make_interval(secs => g * {spread}) AS older
FROM reserved, generate_series(1, {count}) g
"""

# Every table with a foreign key to engine.runs (id), and the column that holds it.
_CHILDREN = """
SELECT c.conrelid::regclass::text AS tab, a.attname AS col
FROM pg_constraint c
JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
WHERE c.contype = 'f' AND c.confrelid = 'engine.runs'::regclass AND cardinality(c.conkey) = 1
ORDER BY 1
"""

_COLUMNS = """
SELECT attname FROM pg_attribute
WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped
ORDER BY attnum
"""

# What a copy changes, by table and column (t: the template's row, m: the copy's clone_map row);
# every other column is the template's. The run's event: a new id and seq, and data.order = g
# (what a waiter's match= looks for); its engine/function.finished event (whose id is the run's)
# names the copy; a matcher looks only at events after the copy's own and waits for its order.
_OLDER = "t.{col} - m.older"
_CHANGES: dict[str, dict[str, str]] = {
    "engine.events": {
        "seq": "m.seq",
        "id": "'clone:' || m.run_id",
        "data": "t.data || jsonb_build_object('order', m.g)",
        "ts": _OLDER,
        "received_at": _OLDER,
    },
    "finished": {
        "seq": "m.finished_seq",
        "id": "m.run_id::text",
        "data": "t.data || jsonb_build_object('run_id', m.run_id)",
        "ts": _OLDER,
        "received_at": _OLDER,
    },
    "engine.runs": {
        "id": "m.run_id",
        "event_seq": "m.seq",
        "dedupe_key": "'event:' || m.seq",
        **dict.fromkeys(("created_at", "started_at", "ended_at", "updated_at", "rank_at"), _OLDER),
        # a finished run was due when it was created; a sleeping or waiting one stays due when
        # its template is
        "due_at": "CASE WHEN t.ended_at IS NOT NULL THEN t.due_at - m.older ELSE t.due_at END",
    },
    "engine.matchers": {
        "since_seq": "m.seq",
        "match_value": "to_jsonb(m.g)",
    },
}

# Which template rows each copy copies, by table.
_WHERE = {
    "engine.events": "t.seq = (SELECT r.event_seq FROM engine.runs r WHERE r.id = $1::uuid)",
    "finished": "t.id = $1::text AND t.name = 'engine/function.finished'",
    "engine.runs": "t.id = $1::uuid",
}


async def _copy(
    conn: asyncpg.Connection[Any], table: str, key: str, column: str, run_id: str
) -> None:
    """Copies the rows of ``table`` that belong to template run ``run_id`` once for each row
    of clone_map (``key``: their entry in _CHANGES and _WHERE, else a child table whose
    ``column`` holds the run id)."""
    changes = _CHANGES.get(key, {})
    if key not in _WHERE:
        changes = {**changes, column: "m.run_id"}
    names = [row["attname"] for row in await conn.fetch(_COLUMNS, table)]
    select = ", ".join(changes.get(name, "t.{col}").format(col=name) for name in names)
    where = _WHERE.get(key, f"t.{column} = $1::uuid")
    await conn.execute(
        f"INSERT INTO {table} OVERRIDING SYSTEM VALUE "
        f"SELECT {select} FROM clone_map m, {table} t WHERE {where}",
        run_id,
    )


async def clone(conn: asyncpg.Connection[Any], run_id: str, count: int, spread: float) -> float:
    """Copies run ``run_id`` ``count`` times in one transaction (see the module's docstring);
    copy g is ``g * spread`` seconds older. Returns the seconds it took."""
    begin = time.perf_counter()
    children = await conn.fetch(_CHILDREN)
    async with conn.transaction():
        # The copies are consistent by construction: foreign keys are not re-checked row by
        # row, nor do the NOTIFY triggers fire (nothing is due).
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute(_MAP.format(count=int(count), spread=float(spread)))
        for table, key, column in (
            ("engine.events", "engine.events", "seq"),
            ("engine.events", "finished", "id"),
            ("engine.runs", "engine.runs", "id"),
            *((child["tab"], child["tab"], child["col"]) for child in children),
        ):
            await _copy(conn, table, key, column, run_id)
    return time.perf_counter() - begin


async def load(
    app: Engine, *, finished: int, sleeping: int, waiting: int, spread: float = 0.001
) -> dict[str, float]:
    """Fills ``app``'s database (the functions of :func:`define` registered on it) with
    ``finished`` completed 3-step runs, ``sleeping`` runs asleep for 30 days and ``waiting``
    runs waiting for an event that never comes, then VACUUM ANALYZE (so the planner sees them,
    and index-only scans are possible, as autovacuum would make them). Returns the seconds each
    part took."""
    templates = await make_templates(app)
    conn = await asyncpg.connect((await app.database()).url)
    took: dict[str, float] = {}
    try:
        for function_id, count in ((THREE_STEPS, finished), (SLEEPER, sleeping), (WAITER, waiting)):
            if count > 0:
                took[function_id] = await clone(conn, templates[function_id], count, spread)
        begin = time.perf_counter()
        await conn.execute("VACUUM ANALYZE")
        took["vacuum_analyze"] = time.perf_counter() - begin
    finally:
        await conn.close()
    return took
