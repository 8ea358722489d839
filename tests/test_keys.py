"""Event keys (#15): created with a random key that is shown once and stored hashed, listed
without it, revoked for the very next send, limited to name prefixes; the roles that may use
them; `engine keys`; the upgrade of a version 10 database."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import asyncpg
import pytest
from test_cli_runs import cli, ok, one_line_error
from test_security import logins  # noqa: F401  # the fixture: login roles after ops/roles.sql

from engine import Engine, Event, InvalidEventError
from engine.db import schema_sql
from engine.errors import EventKeyError, EventKeyScopeError, UnknownEventKeyError
from engine.keys import create_key, list_keys, revoke_key, send_with_key


async def stored_events(sql: asyncpg.Connection) -> int:
    count: int = await sql.fetchval("SELECT count(*) FROM engine.events")
    return count


async def test_a_key_is_shown_once_and_only_its_hash_is_stored(
    make_engine: Callable[..., Engine], sql: asyncpg.Connection
) -> None:
    """create_key returns a fresh 256-bit key; the table holds its SHA-256 and nothing that
    contains the key; list_keys shows names, prefixes and times, never a key."""
    app = make_engine()
    first = await create_key(app, "billing", ["billing/", "invoice/", "billing/"])
    second = await create_key(app, "all")
    assert first.key != second.key and len(first.key) >= 43
    assert first.key not in repr(first)
    assert first.prefixes == ["billing/", "invoice/"] and second.prefixes == []
    rows = await sql.fetch("SELECT * FROM engine.event_keys ORDER BY name")
    assert [row["name"] for row in rows] == ["all", "billing"]
    assert bytes(rows[1]["key_hash"]) == hashlib.sha256(first.key.encode()).digest()
    dumped = json.dumps([{k: str(v) for k, v in row.items()} for row in rows])
    assert first.key not in dumped and second.key not in dumped
    listed = await list_keys(app)
    assert [(k.name, k.prefixes, k.revoked_at) for k in listed] == [
        ("billing", ["billing/", "invoice/"], None),
        ("all", [], None),
    ]
    assert "key" not in listed[0].model_dump()


async def test_names_and_prefixes_are_checked_and_names_never_reused(
    make_engine: Callable[..., Engine], sql: asyncpg.Connection
) -> None:
    """A bad name or prefix is refused with the reason; a name is taken for good, even once
    its key is revoked; the database refuses the same for SQL callers."""
    app = make_engine()
    for name in ("", "-x", "a b", "x" * 101, "caf\u00e9"):
        with pytest.raises(EventKeyError, match="is not valid"):
            await create_key(app, name)
    for prefix, reason in (("", "1 to 512"), ("engine/", "reserved"), ("a\x00", "NUL")):
        with pytest.raises(EventKeyError, match=reason):
            await create_key(app, "k", [prefix])
    with pytest.raises(EventKeyError, match="100 at most"):
        await create_key(app, "k", [f"p{i}/" for i in range(101)])
    await create_key(app, "k")
    await revoke_key(app, "k")
    with pytest.raises(EventKeyError, match="exists already"):
        await create_key(app, "k")
    with pytest.raises(asyncpg.PostgresError, match=r"none under"):
        await sql.fetchval("SELECT engine.create_event_key('s', repeat('x', 43), '{engine/a}')")
    with pytest.raises(asyncpg.PostgresError, match="not valid"):
        await sql.fetchval("SELECT engine.create_event_key('a b', repeat('x', 43), '{}')")
    assert [k.name for k in await list_keys(app)] == ["k"]


async def test_a_revoked_key_is_refused_from_the_next_send(
    make_engine: Callable[..., Engine], sql: asyncpg.Connection
) -> None:
    """A live key sends; once revoked (by another connection) the very next send is refused
    and stores nothing; revoking again keeps the first time; an unknown name says so."""
    app = make_engine()
    created = await create_key(app, "web")
    [event_id] = await send_with_key(app, created.key, Event(name="shop/order", data={"n": 1}))
    stored = await sql.fetchval("SELECT data FROM engine.events WHERE id = $1", event_id)
    assert stored == '{"n": 1}'
    revoked = await sql.fetchval("SELECT engine.revoke_event_key('web')")
    with pytest.raises(UnknownEventKeyError):
        await send_with_key(app, created.key, Event(name="shop/order"))
    assert await stored_events(sql) == 1
    assert await revoke_key(app, "web") == revoked
    [listed] = await list_keys(app)
    assert listed.revoked_at == revoked
    with pytest.raises(EventKeyError, match="no event key named 'nope'"):
        await revoke_key(app, "nope")
    for wrong in ("", "short", created.key + "x", "x" * 43, "bad key with spaces" * 3):
        with pytest.raises(UnknownEventKeyError):
            await send_with_key(app, wrong, Event(name="shop/order"))
    assert await stored_events(sql) == 1


async def test_a_key_sends_only_names_within_its_prefixes(
    make_engine: Callable[..., Engine], sql: asyncpg.Connection
) -> None:
    """Every name must start with one of the key's prefixes: one outside refuses the whole
    call; a key without prefixes sends any name but engine/ ones; bad events are refused as
    app.send refuses them."""
    app = make_engine()
    scoped = await create_key(app, "scoped", ["shop/", "billing/invoice."])
    ids = await send_with_key(
        app, scoped.key, [Event(name="shop/order"), {"name": "billing/invoice.paid"}]
    )
    assert len(ids) == 2
    with pytest.raises(EventKeyScopeError, match=r'"billing/refund" is outside'):
        await send_with_key(app, scoped.key, [Event(name="shop/x"), Event(name="billing/refund")])
    anything = await create_key(app, "anything")
    await send_with_key(app, anything.key, Event(name="billing/refund"))
    with pytest.raises(InvalidEventError, match="reserved prefix"):
        await send_with_key(app, anything.key, {"name": "engine/function.failed"})
    with pytest.raises(InvalidEventError, match="data is 600"):
        await send_with_key(app, anything.key, Event(name="a", data={"x": "y" * 600_000}))
    assert await stored_events(sql) == 3


async def test_sql_callers_get_the_same_refusals(
    make_engine: Callable[..., Engine], sql: asyncpg.Connection
) -> None:
    """engine.send_events_with_key: EN004 for no live key, EN005 outside the prefixes, EN001
    for an event the engine refuses (checked in the database too); nothing stored."""
    app = make_engine()
    key = (await create_key(app, "sql", ["a/"])).key
    send = "SELECT engine.send_events_with_key($1, $2::jsonb)"
    with pytest.raises(asyncpg.PostgresError) as unknown:
        await sql.fetch(send, "x" * 43, '[{"name": "a/b"}]')
    with pytest.raises(asyncpg.PostgresError) as outside:
        await sql.fetch(send, key, '[{"name": "a/b"}, {"name": "b/c"}]')
    with pytest.raises(asyncpg.PostgresError) as invalid:
        await sql.fetch(send, key, '[{"name": "a/b", "data": [1]}]')
    assert [e.value.sqlstate for e in (unknown, outside, invalid)] == ["EN004", "EN005", "EN001"]
    assert await stored_events(sql) == 0
    assert len(await sql.fetch(send, key, '[{"name": "a/b"}]')) == 1


async def test_the_sender_role_sends_with_a_key_and_never_sees_the_keys(
    make_engine: Callable[..., Engine],
    logins: dict[str, str],  # noqa: F811
) -> None:
    """After ops/roles.sql, engine_sender may call send_events_with_key (and so send with a
    key) but not read, create or revoke keys; engine_reader lists keys without their hashes."""
    app = make_engine()
    key = (await create_key(app, "ops", ["shop/"])).key
    sender = await asyncpg.connect(logins["sender"])
    try:
        ids = await sender.fetch(
            "SELECT engine.send_events_with_key($1, $2::jsonb)", key, '[{"name": "shop/a"}]'
        )
        assert len(ids) == 1
        for statement in (
            "SELECT * FROM engine.event_keys",
            "SELECT * FROM engine.list_event_keys()",
            "SELECT engine.create_event_key('mine', repeat('x', 43), '{}')",
            "SELECT engine.revoke_event_key('ops')",
            'SELECT engine.send_events(\'[{"name": "shop/a"}]\')',
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await sender.execute(statement)
    finally:
        await sender.close()
    reader = await asyncpg.connect(logins["reader"])
    try:
        rows = await reader.fetch("SELECT * FROM engine.list_event_keys()")
        assert [(row["name"], row["prefixes"]) for row in rows] == [("ops", ["shop/"])]
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await reader.fetch("SELECT key_hash FROM engine.event_keys")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await reader.execute("SELECT engine.revoke_event_key('ops')")
    finally:
        await reader.close()


async def test_a_version_10_database_is_upgraded_in_place(
    make_engine: Callable[..., Engine], sql: asyncpg.Connection
) -> None:
    """schema.sql applied to a version 10 database (no event keys yet, events stored) adds the
    keys and their functions, keeps the events, and is a no-op applied again."""
    app = make_engine()
    [event_id] = await app.send(Event(name="old/event", data={"kept": True}))
    await sql.execute(
        """
        DROP FUNCTION engine.send_events_with_key(text, jsonb, text);
        DROP FUNCTION engine.create_event_key(text, text, text[]);
        DROP FUNCTION engine.list_event_keys();
        DROP FUNCTION engine.revoke_event_key(text);
        DROP FUNCTION engine.event_key_hash(text);
        DROP TABLE engine.event_keys;
        UPDATE engine.meta SET value = '10' WHERE key = 'schema_version';
        """
    )
    await sql.execute(schema_sql())
    assert await sql.fetchval("SELECT engine.schema_version()") == 11
    key = (await create_key(app, "after-upgrade")).key
    await sql.execute(schema_sql())  # again: nothing changes, the key stays
    assert await sql.fetchval("SELECT engine.schema_version()") == 11
    assert [k.name for k in await list_keys(app)] == ["after-upgrade"]
    assert len(await send_with_key(app, key, Event(name="new/event"))) == 1
    assert await sql.fetchval("SELECT data FROM engine.events WHERE id = $1", event_id) == (
        '{"kept": true}'
    )


# -- engine keys -----------------------------------------------------------------------------------
async def test_engine_keys_create_list_and_revoke(
    make_engine: Callable[..., Engine], database_url: str
) -> None:
    """`engine keys create` prints the key on its last line (what it made on stderr), and the
    key sends; `list` shows names, prefixes and state, never a key (--json too); `revoke`
    refuses the key at once."""
    prefixes = ["--prefix", "stripe/", "-p", "github/"]
    created = cli("keys", "create", "webhooks", *prefixes, url=database_url)
    key = ok(created).splitlines()[-1]
    assert "webhooks" in created.stderr and "stripe/, github/" in created.stderr
    app = make_engine()
    assert len(await send_with_key(app, key, Event(name="stripe/charge"))) == 1
    ok(cli("keys", "create", "other", url=database_url))
    listing = ok(cli("keys", "list", url=database_url))
    assert key not in listing
    lines = listing.splitlines()
    assert lines[0].split() == ["NAME", "PREFIXES", "CREATED", "REVOKED"]
    assert lines[2].split()[0] == "webhooks" and lines[2].split()[-1] == "live"
    assert "github/" in listing and "(any name)" in listing
    revoked = cli("keys", "revoke", "webhooks", url=database_url)
    assert "revoked" in ok(revoked)
    with pytest.raises(UnknownEventKeyError):
        await send_with_key(app, key, Event(name="stripe/charge"))
    shown = json.loads(ok(cli("keys", "list", "--json", url=database_url)))
    assert [(k["name"], k["prefixes"], k["revoked_at"] is None) for k in shown] == [
        ("webhooks", ["stripe/", "github/"], False),
        ("other", [], True),
    ]
    assert key not in json.dumps(shown)


async def test_engine_keys_errors_are_one_clear_line(database_url: str) -> None:
    """A taken name or an unknown key: exit 1; a bad name or prefix: exit 2, before
    connecting; one line each."""
    ok(cli("keys", "create", "taken", url=database_url))
    one_line_error(cli("keys", "create", "taken", url=database_url), 1, "exists already")
    one_line_error(cli("keys", "revoke", "nope", url=database_url), 1, "no event key named")
    nowhere = "postgresql://nobody@/nowhere?host=/nonexistent"
    assert cli("keys", "create", "bad name", url=nowhere).returncode == 2
    bad_prefix = cli("keys", "create", "k", "--prefix", "engine/x", url=nowhere)
    assert bad_prefix.returncode == 2 and "reserved" in bad_prefix.stderr
    assert ok(cli("keys", "list", url=database_url)).split("\n")[2].split()[0] == "taken"
