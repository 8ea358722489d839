"""Poison events (#11): what Python cannot read never enters, and no single row stops a batch.

Hostile events are sent through SQL as the least-privileged ``engine_sender`` role, as any
client in any language can. The database refuses them with the reason (``engine.check_event``);
rows stored before those limits existed (written here straight into the tables) are
dead-lettered or fail their run with the reason, while every other event and run goes on.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from helpers import eventually, only_run_id
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import Context, Engine, Event, InvalidEventError, TriggerEvent
from engine.events import event_from_row, validate_outgoing
from engine.serialization import loads

ROLES_SQL = Path(__file__).parent.parent / "ops" / "roles.sql"
DEEP = '{"a": ' * 1500 + "1" + "}" * 1500  # 9 KB: Python's decoders give up near 1,000
HUGE_INT = '{"n": ' + "9" * 5000 + "}"  # int() refuses more than 4,300 digits
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def as_user(url: str, user: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc}"))


@pytest.fixture
async def sender_url(database_url: str, sql: Any) -> AsyncIterator[str]:
    """The URL of a login role granted engine_sender (ops/roles.sql), and nothing else."""
    await sql.execute(ROLES_SQL.read_text())
    user = f"poison_sender_{os.getpid()}_{abs(hash(database_url)) % 10_000}"
    await sql.execute(f"DROP ROLE IF EXISTS {user}")
    await sql.execute(f"CREATE ROLE {user} LOGIN IN ROLE engine_sender")
    yield as_user(database_url, user)
    await sql.execute(f"DROP OWNED BY {user}")
    await sql.execute(f"DROP ROLE IF EXISTS {user}")


@pytest.fixture
async def sender(sender_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection as engine_sender."""
    conn = await asyncpg.connect(sender_url)
    yield conn
    await conn.close()


async def send_as(
    conn: asyncpg.Connection,
    name: str,
    data: str = "{}",
    *,
    event_id: str | None = None,
    ts: str | None = None,
    traceparent: str | None = None,
) -> str:
    """engine.send_event with every argument as text, so that any timestamp can be written."""
    value: str = await conn.fetchval(
        "SELECT engine.send_event($1, $2::jsonb, $3, $4::text::timestamptz, $5)",
        name,
        data,
        event_id,
        ts,
        traceparent,
    )
    return value


REFUSED = [
    ("depth 1,500", {"data": DEEP}, "nested more than 100 levels"),
    ("depth 101", {"data": '{"a": ' * 100 + "{}" + "}" * 100}, "nested more than 100 levels"),
    ("5,000 digits", {"data": HUGE_INT}, "number beyond"),
    ("1e400", {"data": '{"x": [1e400]}'}, "number beyond"),
    ("-1e400", {"data": '{"x": -1e400}'}, "number beyond"),
    ("BC ts", {"ts": "0044-03-15 00:00:00+00 BC"}, "out of range"),
    ("year 1 ts", {"ts": "0001-01-01 00:00:00+00"}, "out of range"),
    ("-infinity ts", {"ts": "-infinity"}, "out of range"),
    ("infinity ts", {"ts": "infinity"}, "out of range"),
    ("long id", {"event_id": "i" * 3000}, "id is 3000 characters"),
    ("empty id", {"event_id": ""}, "id is 0 characters"),
    ("1 MB traceparent", {"traceparent": "0" * 1_000_000}, "not a W3C traceparent"),
    ("odd traceparent", {"traceparent": "hello"}, "not a W3C traceparent"),
    ("zero trace id", {"traceparent": f"00-{'0' * 32}-b7ad6b7169203331-01"}, "W3C"),
    ("long name", {"name": "n" * 513}, "the limit is 512"),
    ("list data", {"data": "[1]"}, "must be a JSON object"),
]


@pytest.mark.parametrize(("case", "fields", "reason"), REFUSED, ids=[c[0] for c in REFUSED])
async def test_the_database_refuses_what_python_cannot_read(
    sender: asyncpg.Connection, sql: Any, case: str, fields: dict[str, Any], reason: str
) -> None:
    """As engine_sender: refused with SQLSTATE EN001 and the reason; nothing is stored."""
    arguments = {"name": "shop/poison", **fields}
    with pytest.raises(asyncpg.PostgresError) as refused:
        await send_as(sender, **arguments)
    assert refused.value.sqlstate == "EN001", refused.value
    assert reason in str(refused.value)
    assert len(str(refused.value)) < 400  # the reason, not the value
    assert await sql.fetchval("SELECT count(*) FROM engine.events") == 0


async def test_the_limits_accept_what_python_reads(sender: asyncpg.Connection, sql: Any) -> None:
    """The edges of each limit are accepted, and read back by Python."""
    edge = {
        "deep": json.loads('{"a": ' * 98 + "{}" + "}" * 98),  # 100 levels with data
        "big": 1.7976931348623157e308,
        "digits": int("9" * 300),
        "tiny": 1e-400,
    }
    await send_as(
        sender,
        "shop/edge",
        json.dumps(edge),
        event_id="😀" * 512,
        ts="0001-01-02 00:00:00+00",
        traceparent=TRACEPARENT,
    )
    await send_as(sender, "shop/edge", ts="9999-12-30 00:00:00+00")
    assert await sql.fetchval("SELECT count(*) FROM engine.events") == 2


async def test_python_entry_points_raise_invalid_event_error(make_engine: Any) -> None:
    """`Event(...)`, `app.send` and the database's own refusal: one error type, with the reason."""
    for bad, reason in [
        ({"name": ""}, "at least 1 character"),
        ({"name": "n" * 513}, "at most 512"),
        ({"name": "x", "data": [1]}, "valid dictionary"),
    ]:
        with pytest.raises(InvalidEventError, match=reason):
            Event(**bad)
        with pytest.raises(InvalidEventError, match=reason):
            validate_outgoing(bad)  # type: ignore[arg-type]
    deep: dict[str, Any] = {}
    inner = deep
    for _ in range(1500):
        inner["a"] = inner = {}
    east = timezone(timedelta(hours=5))
    for event, reason in [
        (Event(name="x", data=deep), "nested more than 100"),
        (Event(name="x", data={"n": 10**5000}), "number beyond"),
        (Event(name="x", id="i" * 513), "id is 513 characters"),
        (Event(name="x", v=""), "v is 0 characters"),
        (Event(name="x", ts=datetime(1, 1, 1, tzinfo=east)), "out of range"),
        (Event(name="x", ts=datetime(9999, 12, 31, tzinfo=UTC)), "out of range"),
    ]:
        with pytest.raises(InvalidEventError, match=reason):
            validate_outgoing(event)
    app = make_engine()
    db = await app.database()
    payload = json.dumps([{"name": "x", "data": json.loads(HUGE_INT.replace("9" * 5000, "1e300"))}])
    await db.fetch("send_events", payload, None, False)  # 1e300 is a double
    with pytest.raises(InvalidEventError, match="nested more than 100"):
        await db.fetch("send_events", f'[{{"name": "x", "data": {DEEP}}}]', None, False)
    with pytest.raises(InvalidEventError, match="not a W3C traceparent"):
        await db.fetch("send_events", '[{"name": "x"}]', "x" * 100, False)


async def test_data_is_stored_exactly_as_given(
    sender: asyncpg.Connection, sql: Any, make_engine: Any
) -> None:
    """Nulls are kept, at every level, by engine.send_event and by app.send."""
    data = {"a": None, "b": {"c": None, "d": [None, {"e": None}]}}
    sql_id = await send_as(sender, "shop/nulls", json.dumps(data))
    [python_id] = await make_engine().send(Event(name="shop/nulls", data=data))
    for event_id in (sql_id, python_id):
        stored = await sql.fetchval("SELECT data::text FROM engine.events WHERE id = $1", event_id)
        assert json.loads(stored) == data


# -- rows stored before the limits: no single row stops a batch -------------------------------


async def insert_raw_event(
    sql: Any, name: str, data: str, ts: str = "now", queued: bool = True
) -> int:
    """An event written straight into the tables, as a database of an earlier version holds."""
    seq: int = await sql.fetchval(
        "INSERT INTO engine.events (id, name, data, ts, received_at)"
        " VALUES (gen_random_uuid()::text, $1, $2::jsonb, $3::text::timestamptz, engine.now())"
        " RETURNING seq",
        name,
        data,
        ts,
    )
    if queued:
        await sql.execute(
            "INSERT INTO engine.event_queue (seq, due_at) VALUES ($1, engine.now())", seq
        )
    return seq


POISONS = {
    "depth 1,500": (DEEP, "now"),
    "5,000 digits": (HUGE_INT, "now"),
    "BC ts": ('{"x": 1}', "0044-03-15 00:00:00+00 BC"),
    "-infinity ts": ('{"x": 1}', "-infinity"),
}


def victim_app(make_engine: Any, done: list[str]) -> Engine:
    """App `victim`: a plain trigger (routed in SQL) and an expression trigger (in Python)."""
    app = make_engine("victim")

    @app.create_function("plain", trigger=TriggerEvent("v/plain"))
    async def plain(ctx: Context) -> Any:
        return await ctx.step.run("work", lambda: done.append(ctx.event.id or "") or "ok")

    @app.create_function("expr", trigger=TriggerEvent("v/expr", if_exp="event.data.x == 1"))
    async def expr(ctx: Context) -> Any:
        return await ctx.step.run("work", lambda: done.append(ctx.event.id or "") or "ok")

    return app


def other_app(make_engine: Any) -> Engine:
    app = make_engine("other")

    @app.create_function("greet", trigger=TriggerEvent("o/hello"))
    async def greet(ctx: Context) -> Any:
        await ctx.step.sleep("pause", "10ms")
        return await ctx.step.run("say", lambda: f"hello {ctx.event.data['who']}")

    return app


async def fate(sql: Any, seq: int) -> tuple[str, str] | None:
    """How a poisoned event ended: dead-lettered or its runs failed, with the reason; None
    while it is still queued or its run is not over."""
    row = await sql.fetchrow(
        "SELECT dead_lettered_at IS NOT NULL AS dead, error::text AS error,"
        " EXISTS (SELECT 1 FROM engine.event_queue q WHERE q.seq = e.seq) AS queued"
        " FROM engine.events e WHERE seq = $1",
        seq,
    )
    if row["dead"]:
        assert not row["queued"]
        return "dead letter", json.loads(row["error"])["message"]
    runs = await sql.fetch(
        "SELECT status, error::text AS error FROM engine.runs WHERE event_seq = $1", seq
    )
    if row["queued"] or not runs or any(r["status"] != "FAILED" for r in runs):
        return None
    return "run failed", json.loads(runs[0]["error"])["message"]


async def test_poisoned_rows_never_stop_routing_for_anyone(make_engine: Any, sql: Any) -> None:
    """Rows no check refused (a database of an earlier version): each is dead-lettered, or its
    run fails with the reason, in the same batches as good events of this and another app,
    which all start and complete."""
    done: list[str] = []
    victim, other = victim_app(make_engine, done), other_app(make_engine)
    await victim.database()  # registered before the events arrive
    await other.database()
    poisoned = {
        (case, name): await insert_raw_event(sql, name, data, ts)
        for case, (data, ts) in POISONS.items()
        for name in ("v/plain", "v/expr")
    }
    good = await victim.send([Event(name=n, data={"x": 1}) for n in ("v/plain", "v/expr") * 3])
    hello = await other.send([Event(name="o/hello", data={"who": str(i)}) for i in range(5)])
    async with victim.worker(poll_interval="50ms"), other.worker(poll_interval="50ms"):
        for event_id in hello:
            run = await other.wait_for_run(await only_run_id(other, event_id))
            assert run.status == "COMPLETED", run.error
        await eventually(lambda: asyncio.sleep(0, sorted(done) == sorted(good)))
        fates = {key: await eventually(lambda s=seq: fate(sql, s)) for key, seq in poisoned.items()}
    for (case, name), (how, reason) in fates.items():
        assert reason, (case, name)
        if case in ("depth 1,500", "5,000 digits"):  # decoding the data fails
            expected = "cannot be read"
            assert expected in reason, (case, name, how, reason)
    assert await sql.fetchval("SELECT count(*) FROM engine.event_queue") == 0


async def test_an_unreadable_claimed_run_fails_and_the_others_start(
    make_engine: Any, sql: Any
) -> None:
    """claim_runs hands over a run whose event Python cannot read with good runs: it fails
    with the reason under its lease (not handed back forever); the others complete."""
    done: list[str] = []
    victim = victim_app(make_engine, done)
    await victim.database()
    runs = []
    for data, ts in [*POISONS.values(), *[('{"x": 1}', "now")] * 4]:
        seq = await insert_raw_event(sql, "v/plain", data, ts, queued=False)
        runs.append(
            await sql.fetchval(
                "INSERT INTO engine.runs (app_id, function_id, status, event_seq, due_at,"
                " created_at, updated_at) VALUES ('victim', 'plain', 'QUEUED', $1, engine.now(),"
                " engine.now(), engine.now()) RETURNING id",
                seq,
            )
        )

    async def all_over() -> list[Any] | None:
        rows = await sql.fetch(
            "SELECT status, error FROM engine.runs WHERE id = ANY ($1) ORDER BY created_at, id",
            runs,
        )
        return rows if all(r["status"] in ("COMPLETED", "FAILED") for r in rows) else None

    async with victim.worker(poll_interval="50ms"):
        ended = {r["status"] for r in await eventually(all_over)}
        statuses = [
            await sql.fetchval("SELECT status FROM engine.runs WHERE id = $1", run_id)
            for run_id in runs
        ]
    assert ended == {"COMPLETED", "FAILED"}
    assert statuses == ["FAILED"] * len(POISONS) + ["COMPLETED"] * 4
    errors = await sql.fetch(
        "SELECT error ->> 'message' AS message FROM engine.runs WHERE id = ANY ($1)"
        " AND status = 'FAILED'",
        runs,
    )
    assert all("cannot be read in Python" in e["message"] for e in errors), errors
    assert len(done) == 4


@pytest.mark.parametrize("name", ["v/plain", "v/expr"])
async def test_one_failing_insert_dead_letters_its_event_only(
    make_engine: Any, sql: Any, name: str
) -> None:
    """A run row that makes one event's insert fail (here a conflicting run id): that event is
    dead-lettered with the database's reason; the others of its batch are routed and run."""
    done: list[str] = []
    victim = victim_app(make_engine, done)
    await victim.database()
    ids = [await sql.fetchval("SELECT engine.send_event($1, '{\"x\": 1}')", name) for _ in range(5)]
    seqs = [await sql.fetchval("SELECT seq FROM engine.events WHERE id = $1", i) for i in ids]
    function = name.removeprefix("v/")
    await sql.execute(
        "INSERT INTO engine.runs (id, app_id, function_id, status, event_seq, due_at, created_at,"
        " updated_at, ended_at)"
        " VALUES (engine.event_run_id(engine.run_id_salt(), 'victim', $1, $2), 'victim', $1,"
        " 'COMPLETED', $3, engine.now(), engine.now(), engine.now(), engine.now())",
        function,
        seqs[2],
        seqs[0],
    )
    async with victim.worker(poll_interval="50ms"):
        await eventually(lambda: asyncio.sleep(0, len(done) == 4))
        how, reason = await eventually(lambda: fate(sql, seqs[2]))
    assert how == "dead letter"
    assert "runs_pkey" in reason and "could not be created" in reason
    assert sorted(done) == sorted(ids[:2] + ids[3:])


async def test_an_integer_wider_than_cel_compares_as_a_double(make_engine: Any) -> None:
    """CEL's ints have 64 bits; an event may hold wider ones: its expression triggers still
    evaluate (the integer as a double) rather than failing on it."""
    done: list[str] = []
    victim = victim_app(make_engine, done)
    async with victim.worker(poll_interval="50ms"):
        [event_id] = await victim.send(Event(name="v/expr", data={"x": 1, "big": 2**63 + 5}))
        run = await victim.wait_for_run(await only_run_id(victim, event_id))
    assert run.status == "COMPLETED" and done == [event_id]


# -- fuzzing: hostile events through SQL as engine_sender -----------------------------------

HOSTILE_TEXT = st.sampled_from(
    ["", "\x00", "a\x00b", "\ud800", "\u202e\ufeff", "😀" * 600, "'; DROP TABLE engine.events; --"]
)
HOSTILE_DATA = st.one_of(
    st.integers(1, 2000).map(lambda depth: '{"a": ' + "[" * depth + "]" * depth + "}"),
    st.integers(1, 6000).map(lambda digits: '{"n": -' + "9" * digits + "}"),
    st.sampled_from(
        [
            '{"x": 1e400}',
            '{"x": 1e-400}',
            '{"x": 1.7976931348623157e308}',
            '{"x": 1.7976931348623159e308}',
            '{"x": 179769313486231580000000000000000000000000000000000000000000000000000000'
            "000000000000000000000000000000000000000000000000000000000000000000000000000000"
            "000000000000000000000000000000000000000000000000000000000000000000000000000000"
            "000000000000000000000000000000000000000000000000000000000000000000000000000}",
            '{"x": "\\u0000"}',
            '{"x": "\\ud800"}',
            '{"\u202e": "\ufeff\u0085", "x": 1}',
            '"text"',
            "[]",
            "null",
            "not json",
        ]
    ),
    st.dictionaries(
        st.text(max_size=8),
        st.none() | st.text(max_size=8) | st.integers() | st.floats(allow_nan=False),
        max_size=4,
    ).map(json.dumps),
)
HOSTILE_TS = st.one_of(
    st.none(),
    st.sampled_from(
        [
            "infinity",
            "-infinity",
            "0044-03-15 00:00:00+00 BC",
            "0001-01-01 00:00:00+00",
            "0001-01-02 00:00:00+00",
            "9999-12-31 23:59:59+00",
            "294276-12-31 00:00:00+00",
            "epoch",
            "yesterday",
            "not a date",
        ]
    ),
    st.datetimes(timezones=st.just(UTC)).map(str),
)
HOSTILE_TRACEPARENTS = st.one_of(
    st.none(),
    st.just(TRACEPARENT),
    st.just(TRACEPARENT + "-future"),
    st.just("ff" + TRACEPARENT[2:]),
    st.integers(0, 100_000).map(lambda n: "0" * n),
    st.text(max_size=60),
)
FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def in_own_loop(coroutine_function: Any) -> Any:
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coroutine_function())
    finally:
        loop.close()


async def readable_by_python(conn: asyncpg.Connection, event_id: str) -> None:
    """What was stored, Python reads back: the row's timestamps, the data (both decoders), and
    the event as a run sees it."""
    row = await conn.fetchrow(
        "SELECT seq, ts, data::text AS data, engine.run_event(seq)::text AS event"
        " FROM engine.events WHERE id = $1",
        event_id,
    )
    json.loads(row["data"])
    loads(row["data"])
    event_from_row(loads(row["event"]))


async def test_hostile_events_from_sql_are_refused_or_read_and_routed(
    sender_url: str, database_url: str, make_engine: Any
) -> None:
    """Hostile events sent by engine_sender are refused with the reason (nothing stored), or
    stored in a form Python reads back; then workers route every one of them, and events of
    another app sent afterwards start and complete."""
    done: list[str] = []
    victim, other = victim_app(make_engine, done), other_app(make_engine)
    await victim.database()
    await other.database()
    outcomes: list[str] = []

    @FUZZ
    @given(
        name=st.one_of(st.sampled_from(["v/plain", "v/expr"]), HOSTILE_TEXT, st.text(max_size=20)),
        data=HOSTILE_DATA,
        event_id=st.one_of(st.none(), HOSTILE_TEXT, st.integers(0, 3000).map(lambda n: "i" * n)),
        ts=HOSTILE_TS,
        traceparent=HOSTILE_TRACEPARENTS,
    )
    def check(
        name: str, data: str, event_id: str | None, ts: str | None, traceparent: str | None
    ) -> None:
        async def attempt() -> None:
            conn = await asyncpg.connect(sender_url)
            owner = await asyncpg.connect(database_url)
            try:
                before = await owner.fetchval("SELECT count(*) FROM engine.events")
                try:
                    stored_id = await send_as(
                        conn, name, data, event_id=event_id, ts=ts, traceparent=traceparent
                    )
                except (asyncpg.PostgresError, asyncpg.DataError, UnicodeEncodeError) as error:
                    assert str(error)
                    assert len(str(error)) < 1000  # the reason, not the value
                    assert await owner.fetchval("SELECT count(*) FROM engine.events") == before
                    outcomes.append(type(error).__name__)
                    return
                await readable_by_python(owner, stored_id)
                outcomes.append("stored")
            finally:
                await conn.close()
                await owner.close()

        in_own_loop(attempt)

    await asyncio.to_thread(check)
    assert "stored" in outcomes and "UnknownPostgresError" in outcomes  # EN001: check_event
    sql = await asyncpg.connect(database_url)
    try:
        async with victim.worker(poll_interval="50ms"), other.worker(poll_interval="50ms"):
            hello = await other.send(
                [Event(name="o/hello", data={"who": str(i)}) for i in range(3)]
            )
            for event_id in hello:
                run = await other.wait_for_run(await only_run_id(other, event_id))
                assert run.status == "COMPLETED", run.error

            async def all_routed_and_over() -> bool:
                return not await sql.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM engine.event_queue WHERE due_at <= engine.now())"
                    " OR EXISTS (SELECT 1 FROM engine.runs WHERE status NOT IN"
                    " ('COMPLETED', 'FAILED', 'CANCELLED', 'SKIPPED'))"
                )

            await eventually(all_routed_and_over, timeout=30)
        # Everything stored was readable: no dead letter, no failed run.
        assert await sql.fetchval("SELECT count(*) FROM engine.events WHERE error IS NOT NULL") == 0
        assert (
            await sql.fetchval("SELECT count(*) FROM engine.runs WHERE status <> 'COMPLETED'") == 0
        )
    finally:
        await sql.close()


class Rollback(Exception):
    """Leaves the database as it was after a send that was accepted."""


ZONES = st.sampled_from([UTC, timezone(timedelta(hours=14)), timezone(timedelta(hours=-12))])


async def test_python_and_the_database_agree_on_every_limit(database_url: str) -> None:
    """validate_outgoing (Python) and check_event (SQL) refuse exactly the same events."""

    @FUZZ
    @given(
        depth=st.integers(0, 120),
        number=st.one_of(
            st.integers(),
            st.integers(min_value=10**307, max_value=10**309),
            st.just(int(1.7976931348623157e308)),
            st.just(int(1.7976931348623157e308) + 1),
            st.floats(allow_nan=False, allow_infinity=False),
        ),
        id_length=st.integers(0, 600),
        ts=st.one_of(
            st.datetimes(timezones=ZONES),
            st.datetimes(max_value=datetime(1, 1, 3), timezones=ZONES),
            st.datetimes(min_value=datetime(9999, 12, 29), timezones=ZONES),
        ),
    )
    def check(depth: int, number: int | float, id_length: int, ts: datetime) -> None:
        data: Any = number
        for _ in range(depth):
            data = [data]
        event = {"name": "x", "data": {"d": data}, "id": "i" * id_length, "ts": ts.isoformat()}
        try:
            validate_outgoing(event)  # type: ignore[arg-type]
            python_refuses = None
        except InvalidEventError as error:
            python_refuses = str(error)

        async def database_refuses() -> str | None:
            conn = await asyncpg.connect(database_url)
            try:
                async with conn.transaction():
                    await conn.fetch("SELECT engine.send_events($1::jsonb)", json.dumps([event]))
                    raise Rollback
            except Rollback:
                return None
            except asyncpg.PostgresError as error:
                return str(error)
            finally:
                await conn.close()

        sql_refuses = in_own_loop(database_refuses)
        assert (python_refuses is None) == (sql_refuses is None), (python_refuses, sql_refuses)

    await asyncio.to_thread(check)
