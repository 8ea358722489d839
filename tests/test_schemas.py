"""Engine(schema=...): several apps in independent schemas of one database (#17, "Past one
machine"). Two apps with the same app id, function ids and event names live side by side in
the schemas ``engine_billing`` and ``engine_shop`` of one test database (whose default schema
``engine`` stays empty): neither routes, claims, wakes, cancels or prunes the other's work."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections.abc import AsyncIterator
from datetime import timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from helpers import (
    FAST,
    engine_command,
    eventually,
    only_run_id,
    start_engine_dev,
    start_worker_process,
    wait_until,
)
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from starlette.applications import Starlette
from test_metrics import value_of
from test_security import as_user

from engine import (
    ConfigurationError,
    Context,
    Engine,
    Event,
    RunNotFoundError,
    RunStatus,
    TriggerEvent,
    cli,
)
from engine.db import Database, queries, schema_sql
from engine.keys import create_key
from engine.listener import Listener
from engine.pg_schema import DEFAULT_SCHEMA, check_schema_name, render, wakeup_channel
from engine.retention import prune
from engine.testing import run_function
from engine.web.event_api import event_api_routes

SCHEMAS = ("engine_billing", "engine_shop")
ROOT = Path(__file__).parent.parent
ROLES_SQL = ROOT / "ops" / "roles.sql"


def _texts() -> dict[str, str]:
    package = resources.files("engine")
    return {
        "schema.sql": package.joinpath("schema.sql").read_text(),
        "queries.sql": package.joinpath("sql/queries.sql").read_text(),
    }


@pytest.fixture
async def apps(database_url: str) -> AsyncIterator[dict[str, Engine]]:
    """One Engine per schema of :data:`SCHEMAS`, each schema migrated, all with app id
    ``shop`` and the same function (``process``, on ``order/created``), whose output names
    the schema it ran in."""
    engines: dict[str, Engine] = {}
    for schema in SCHEMAS:
        app = Engine("shop", database_url, schema=schema, backoff=FAST)
        assert await app.migrate()
        _declare(app, schema)
        engines[schema] = app
    yield engines
    for app in engines.values():
        await app.close()


def _declare(app: Engine, schema: str) -> None:
    @app.create_function("process", trigger=TriggerEvent("order/created"))
    async def process(ctx: Context) -> dict[str, Any]:
        n = await ctx.step.run("read", lambda: ctx.event.data["n"])
        return {"schema": schema, "n": n}

    @app.create_function("nap", trigger=TriggerEvent("order/sleep"))
    async def nap(ctx: Context) -> None:
        await ctx.step.sleep("long", "1h")


async def _count(sql: asyncpg.Connection, schema: str, table: str) -> int:
    check_schema_name(schema)  # a name the test chose, checked before it goes into SQL text
    count: int = await sql.fetchval(f"SELECT count(*) FROM {schema}.{table}")
    return count


# -- the rendered SQL ----------------------------------------------------------------------------
def test_the_default_schema_renders_to_the_shipped_text() -> None:
    """For ``engine`` nothing is rewritten: existing databases see the very same text (and
    schema hash), and the cached queries are the plain file's."""
    for text in _texts().values():
        assert render(text, DEFAULT_SCHEMA) is text
    assert queries() is queries(DEFAULT_SCHEMA)
    assert wakeup_channel(DEFAULT_SCHEMA) == "engine_wakeup"


@pytest.mark.parametrize("name", sorted(_texts()))
def test_the_rendered_sql_names_no_engine_object_for_another_schema(name: str) -> None:
    """Rendered for another schema, nothing names the schema ``engine`` any more: no
    ``engine.`` reference (comments included), no ``SCHEMA engine``, no channel
    ``engine_wakeup`` outside comments;
    and what only contains the word is left as it was (event names, the run id constant)."""
    original = _texts()[name]
    rendered = render(original, "zz_other")
    assert not re.search(r"(?<![\w/])engine\.", rendered)
    code = re.sub(r"--[^\n]*", "", rendered)  # comments may say "the engine"
    assert "engine_wakeup" not in code
    for word in re.finditer(r"\bengine\b", code):
        after = code[word.end() : word.end() + 1]
        before = code[max(word.start() - 15, 0) : word.start()]
        # event names ('engine/...'), a warning's text, the run id's constant
        allowed = after == "/" or code.startswith("engine: ", word.start())
        allowed = allowed or code.startswith("engine' || '.run|", word.start())
        assert allowed, f"{before}>>engine<<{code[word.end() : word.end() + 30]}"
    assert original.count("engine/") == rendered.count("engine/")
    if name == "schema.sql":
        # SECURITY DEFINER functions keep their pinned search_path and name objects in full.
        definers = rendered.count("SECURITY DEFINER SET search_path = pg_catalog, pg_temp")
        assert definers == code.count("SECURITY DEFINER") >= 2
        assert "CREATE SCHEMA IF NOT EXISTS zz_other;" in rendered
        assert "hashtext('zz_other.schema')" in rendered  # the migration's advisory lock key
        assert "pg_notify('zz_other_wakeup'" in rendered
        assert "'zz_other'::regnamespace" in rendered
        assert "'engine' || '.run|" in rendered  # run ids derive the same way in every schema


def test_schema_sql_is_cached_per_schema() -> None:
    """Rendering happens once per name (the queries are looked up, never rewritten, per
    call)."""
    assert schema_sql("zz_cached") is schema_sql("zz_cached")
    assert queries("zz_cached") is queries("zz_cached")
    assert Database("postgresql:///x", schema="zz_cached")._queries is queries("zz_cached")


@pytest.mark.parametrize(
    "name",
    [
        *["Engine", "1engine", "engine-billing", "engine;drop", 'engine"', "", "é", "x" * 57],
        *["pg_engine", "public", "information_schema", "engine billing", "engine.x"],
    ],
)
def test_an_invalid_schema_name_is_refused(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Only a plain lowercase identifier is taken (so it can go into SQL text as it is), by
    the Engine, the database layer and the command line alike (exit status 2, before
    connecting)."""
    url = "postgresql://nowhere.invalid/x"
    with pytest.raises(ConfigurationError, match="schema"):
        Engine("x", url, schema=name)
    with pytest.raises(ConfigurationError, match="schema"):
        Database(url, schema=name)
    with pytest.raises(SystemExit) as exited:
        cli.main(["migrate", "--schema", name, "--database-url", url])
    assert exited.value.code == 2
    assert "argument --schema: schema" in capsys.readouterr().err
    check_schema_name("x" * 56)  # the longest name leaves room for its channel's suffix


# -- two apps side by side -------------------------------------------------------------------------
async def test_two_apps_in_two_schemas_run_only_their_own_work(
    apps: dict[str, Engine], sql: asyncpg.Connection
) -> None:
    """Same app id, function ids, event names and even event ids in both schemas: each worker
    routes and runs only its own schema's events; each app lists only its own runs and
    functions; the default schema sees nothing."""
    async with (
        apps[SCHEMAS[0]].worker(poll_interval="50ms"),
        apps[SCHEMAS[1]].worker(poll_interval="50ms"),
    ):
        sent: dict[str, list[str]] = {}
        for offset, (schema, app) in enumerate(apps.items()):
            events = [Event(name="order/created", data={"n": offset * 10 + i}) for i in (1, 2)]
            events.append(Event(name="order/created", id="same-id", data={"n": offset}))
            sent[schema] = await app.send(events)
        for offset, (schema, app) in enumerate(apps.items()):
            outputs = []
            for event_id in sent[schema]:
                run = await app.wait_for_run(await only_run_id(app, event_id))
                assert run.status is RunStatus.COMPLETED
                outputs.append(run.output)
            expected = [offset * 10 + 1, offset * 10 + 2, offset]
            assert outputs == [{"schema": schema, "n": n} for n in expected]
    for schema, app in apps.items():
        runs = await app.list_runs(all_apps=True)
        assert len(runs) == 3 and {r.output["schema"] for r in runs} == {schema}
        page = await app.list_run_summaries(all_apps=True)
        assert len(page.runs) == 3
        assert {f.function_id for f in await app.list_functions(all_apps=True)} == {
            "process",
            "nap",
        }
        assert await app.get_event("same-id") is not None
    for table in ("events", "runs", "functions", "workers"):
        assert await _count(sql, DEFAULT_SCHEMA, table) == 0


async def test_a_notify_in_one_schema_does_not_wake_the_other(apps: dict[str, Engine]) -> None:
    """Each schema's triggers NOTIFY its own channel: a listener of one schema is woken by its
    own sends only. Notifications reach a listener in commit order, so once the second
    schema's listener has seen its own send, the first schema's earlier one would have come
    before it."""
    billing, shop = [await apps[s].database() for s in SCHEMAS]
    assert billing.channel == "engine_billing_wakeup" and shop.channel == "engine_shop_wakeup"
    wakes: dict[str, int] = dict.fromkeys(SCHEMAS, 0)
    woken = {schema: asyncio.Event() for schema in SCHEMAS}

    def waker(schema: str) -> Any:
        def wake() -> None:
            wakes[schema] += 1
            woken[schema].set()

        return wake

    listeners = [
        asyncio.create_task(Listener(db, waker(schema)).run())
        for schema, db in zip(SCHEMAS, (billing, shop), strict=True)
    ]
    try:
        await eventually(lambda: _all_woken(wakes))  # each woke once: connected
        await apps[SCHEMAS[0]].send(Event(name="order/created", data={"n": 1}))
        await eventually(lambda: _woken_twice(wakes, SCHEMAS[0]))
        await apps[SCHEMAS[1]].send(Event(name="order/created", data={"n": 2}))
        await eventually(lambda: _woken_twice(wakes, SCHEMAS[1]))
        assert wakes == {SCHEMAS[0]: 2, SCHEMAS[1]: 2}
    finally:
        for task in listeners:
            task.cancel()
        await asyncio.gather(*listeners, return_exceptions=True)


async def _all_woken(wakes: dict[str, int]) -> bool:
    return all(wakes.values())


async def _woken_twice(wakes: dict[str, int], schema: str) -> bool:
    return wakes[schema] >= 2


async def test_cancel_retention_and_durable_time_stay_in_their_schema(
    apps: dict[str, Engine], sql: asyncpg.Connection
) -> None:
    """Cancelling a function's runs, pruning finished history and moving durable time in one
    schema leave the other's runs (same app, same function ids) as they were."""
    billing, shop = (apps[s] for s in SCHEMAS)
    ids: dict[str, dict[str, str]] = {}
    for schema, app in apps.items():
        async with app.worker(poll_interval="50ms"):
            [done, sleeping] = await app.send(
                [Event(name="order/created", data={"n": 1}), Event(name="order/sleep")]
            )
            ids[schema] = {
                "done": await only_run_id(app, done),
                "sleeping": await only_run_id(app, sleeping),
            }
            await app.wait_for_run(ids[schema]["done"])
            await eventually(lambda app=app, schema=schema: _sleeping(app, ids[schema]))
    assert await billing.cancel_runs("nap") == 1
    assert (await billing.get_run(ids[SCHEMAS[0]]["sleeping"])).status is RunStatus.CANCELLED
    assert (await shop.get_run(ids[SCHEMAS[1]]["sleeping"])).status is RunStatus.SLEEPING

    shop_now = await sql.fetchval(f"SELECT {SCHEMAS[1]}.now() - now()")
    shop_events = await _count(sql, SCHEMAS[1], "events")
    await asyncio.wait_for(_advance(billing, timedelta(days=2)), 30)
    assert await sql.fetchval(f"SELECT {SCHEMAS[1]}.now() - now()") - shop_now < timedelta(hours=1)

    deleted = await prune(await billing.database(), timedelta(days=1), pause=0)
    assert deleted["runs"] == 2
    for key in ("done", "sleeping"):
        with pytest.raises(RunNotFoundError):
            await billing.get_run(ids[SCHEMAS[0]][key])
    assert (await shop.get_run(ids[SCHEMAS[1]]["done"])).status is RunStatus.COMPLETED
    assert (await shop.get_run(ids[SCHEMAS[1]]["sleeping"])).status is RunStatus.SLEEPING
    assert await _count(sql, SCHEMAS[1], "events") == shop_events


async def _sleeping(app: Engine, ids: dict[str, str]) -> bool:
    return (await app.get_run(ids["sleeping"])).status is RunStatus.SLEEPING


async def _advance(app: Engine, by: timedelta) -> None:
    from engine.testing import advance_clock

    await advance_clock(app, by)


# -- migrating -------------------------------------------------------------------------------------
async def test_migrating_a_schema_is_idempotent_and_creates_nothing_elsewhere(
    database_url: str, sql: asyncpg.Connection
) -> None:
    """The first migrate creates the schema; the second does nothing (its hash is in the
    schema's own meta table); the default schema's hash is untouched."""
    default_hash = await sql.fetchval("SELECT value FROM engine.meta WHERE key = 'schema_hash'")
    app = Engine("x", database_url, schema="engine_once")
    try:
        assert await app.migrate() is True
        assert await app.migrate() is False
        assert await sql.fetchval("SELECT engine_once.schema_version()") == 11
        await app.send(Event(name="a/b"))
    finally:
        await app.close()
    after = await sql.fetchval("SELECT value FROM engine.meta WHERE key = 'schema_hash'")
    assert after == default_hash
    assert await _count(sql, "engine_once", "events") == 1
    assert await _count(sql, DEFAULT_SCHEMA, "events") == 0


async def test_the_migration_lock_is_per_schema(database_url: str) -> None:
    """Creating a schema takes an advisory lock derived from its name: a migration of the
    default schema holding its lock does not hold up a new schema's."""
    holder = await asyncpg.connect(database_url)
    try:
        async with holder.transaction():
            await holder.execute("SELECT pg_advisory_xact_lock(hashtext('engine.schema'))")
            applied = await asyncio.wait_for(
                Database(database_url, schema="engine_locked").apply_schema(), 60
            )
        assert applied
    finally:
        await holder.close()


async def test_an_engine_in_a_schema_not_migrated_says_which_command_creates_it(
    database_url: str,
) -> None:
    app = Engine("x", database_url, schema="engine_absent")
    try:
        with pytest.raises(Exception, match="engine migrate --schema engine_absent"):
            await app.send(Event(name="a/b"))
    finally:
        await app.close()


def test_engine_migrate_and_the_commands_take_schema_and_engine_schema(
    database_url: str,
) -> None:
    """``engine migrate --schema`` creates a working schema (again: nothing to do);
    ``$ENGINE_SCHEMA`` is the default of every command; ``engine send`` and ``engine runs
    list`` use the schema they are given."""
    url = ["--database-url", database_url]
    first = engine_command("migrate", "--schema", "engine_cli", *url, cwd=ROOT)
    assert first.returncode == 0 and "schema engine_cli applied" in first.stderr, first.stderr
    again = engine_command("migrate", "--schema", "engine_cli", *url, cwd=ROOT)
    assert "schema engine_cli unchanged" in again.stderr, again.stderr
    by_variable = engine_command("migrate", *url, cwd=ROOT, env={"ENGINE_SCHEMA": "engine_env"})
    assert "schema engine_env applied" in by_variable.stderr, by_variable.stderr

    sent = engine_command(
        "send", "cli/hello", "--wait", "0s", "--schema", "engine_cli", *url, cwd=ROOT
    )
    assert sent.returncode == 0, sent.stderr
    listed = engine_command(
        "events", "list", "--json", *url, cwd=ROOT, env={"ENGINE_SCHEMA": "engine_cli"}
    )
    assert listed.returncode == 0 and sent.stdout.strip() in listed.stdout, listed.stderr
    elsewhere = engine_command("events", "list", "--json", "--schema", "engine_env", *url, cwd=ROOT)
    assert elsewhere.returncode == 0 and sent.stdout.strip() not in elsewhere.stdout

    bad = engine_command("runs", "list", *url, cwd=ROOT, env={"ENGINE_SCHEMA": "Bad-Name"})
    assert bad.returncode == 2 and "$ENGINE_SCHEMA" in bad.stderr, bad.stderr
    missing = engine_command("runs", "list", "--schema", "engine_nowhere", *url, cwd=ROOT)
    assert missing.returncode == 1
    assert "engine migrate --schema engine_nowhere" in missing.stderr, missing.stderr


async def test_engine_worker_serves_the_schema_it_is_given(
    database_url: str, sql: asyncpg.Connection
) -> None:
    """``engine worker --schema`` runs the loaded Engine's functions on that schema (the
    Engine itself names none), and ``$ENGINE_SCHEMA`` does the same."""
    for schema, options, env in (
        ("engine_w_option", ("--schema", "engine_w_option"), {}),
        ("engine_w_env", (), {"ENGINE_SCHEMA": "engine_w_env"}),
    ):
        sender = Engine("sender", database_url, schema=schema)
        await sender.migrate()
        worker = start_worker_process("dev_app:app", database_url, *options, env=env)
        try:
            [event_id] = await sender.send(Event(name="dev/hello"))
            [run] = await sender.runs_for_event(event_id, at_least=1, timeout=60)
            assert (await sender.wait_for_run(run.run_id, timeout=60)).output == "hello"
        finally:
            worker.terminate()
            worker.wait(timeout=30)
            await sender.close()
    assert await _count(sql, DEFAULT_SCHEMA, "functions") == 0


def test_engine_dev_runs_the_app_in_the_schema_it_is_given(dev_dir: Path) -> None:
    """``engine dev --schema`` creates that schema on its embedded server and serves it;
    ``engine send`` in the folder reaches it with the same ``--schema``, and without it says
    that the default schema is not there."""
    dev = start_engine_dev(ROOT / "tests" / "apps" / "dev_app.py", dev_dir, "--schema", "dev_x")
    try:
        wait_until((dev_dir / ".engine" / "url").exists, 60, "engine dev wrote its URL")
        sent = engine_command("send", "dev/hello", "--schema", "dev_x", cwd=dev_dir)
        assert "engine send: started 1 run(s): dev-hello " in sent.stderr, sent.stderr
        default = engine_command("send", "dev/hello", cwd=dev_dir)
        assert default.returncode == 1 and "engine migrate" in default.stderr, default.stderr
        dev.send_signal(signal.SIGINT)
        _, stderr = dev.communicate(timeout=15)
        assert dev.returncode == 130, stderr
    finally:
        if dev.poll() is None:
            dev.kill()
            dev.communicate(timeout=15)


def test_the_help_of_every_command_that_connects_offers_schema(
    capsys: pytest.CaptureFixture[str],
) -> None:
    commands = [
        ["migrate"],
        ["worker"],
        ["dev"],
        ["send"],
        ["prune"],
        ["dashboard"],
        ["check-replay"],
        ["runs", "list"],
        ["runs", "cancel"],
        ["events", "list"],
        ["functions", "list"],
        ["keys", "create"],
    ]
    for command in commands:
        with pytest.raises(SystemExit) as exited:
            cli.main([*command, "--help"])
        shown = capsys.readouterr().out
        assert exited.value.code == 0 and "--schema NAME" in shown, command
        assert "ENGINE_SCHEMA" in shown, command


# -- the rest of what an Engine does -------------------------------------------------------------
async def test_run_function_runs_in_the_given_schema(
    apps: dict[str, Engine], sql: asyncpg.Connection
) -> None:
    """The testing kit's run_function takes the app's schema."""
    app = apps[SCHEMAS[1]]
    run = await run_function(
        app.functions["process"],
        Event(name="order/created", data={"n": 5}),
        database_url=app.database_url,
        schema=SCHEMAS[1],
    )
    assert run.output == {"schema": SCHEMAS[1], "n": 5}
    assert await _count(sql, SCHEMAS[1], "runs") == 1
    assert await _count(sql, SCHEMAS[0], "runs") == 0


async def test_event_keys_and_the_http_event_api_belong_to_a_schema(
    apps: dict[str, Engine], sql: asyncpg.Connection
) -> None:
    """A key created in one schema sends there, and is unknown to the other schema's API."""
    billing, shop = (apps[s] for s in SCHEMAS)
    key = (await create_key(billing, "k")).key
    for app, status in ((billing, 200), (shop, 401)):
        web = Starlette(routes=event_api_routes())
        web.state.engine = app
        transport = httpx.ASGITransport(web)
        async with httpx.AsyncClient(transport=transport, base_url="http://engine") as client:
            response = await client.post(f"/e/{key}", json={"name": "order/created"})
        assert response.status_code == status, response.text
    assert await _count(sql, SCHEMAS[0], "events") == 1
    assert await _count(sql, SCHEMAS[1], "events") == 0


async def test_the_dashboard_of_a_schema_shows_its_runs_only(apps: dict[str, Engine]) -> None:
    from engine.web import create_app

    billing, shop = (apps[s] for s in SCHEMAS)
    async with billing.worker(poll_interval="50ms"):
        [event_id] = await billing.send(Event(name="order/created", data={"n": 1}))
        run_id = await only_run_id(billing, event_id)
        await billing.wait_for_run(run_id)
    for app, shown in ((billing, True), (shop, False)):
        transport = httpx.ASGITransport(create_app(app))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            page = await client.get("/runs")
        assert page.status_code == 200
        assert (run_id in page.text) is shown


async def test_the_gauges_of_each_schema_are_told_apart(
    apps: dict[str, Engine],
    metric_reader: InMemoryMetricReader,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two apps of the same id in two schemas, in one process: each schema's sleeping runs
    are reported under its own ``engine.schema``, not summed or overwritten."""
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "100")
    async with (
        apps[SCHEMAS[0]].worker(poll_interval="50ms"),
        apps[SCHEMAS[1]].worker(poll_interval="50ms"),
    ):
        for count, app in enumerate(apps.values(), start=1):
            await app.send([Event(name="order/sleep") for _ in range(count)])

        async def each_its_own() -> bool:
            paused = {
                schema: value_of(
                    metric_reader,
                    "engine.run.paused",
                    "shop",
                    {"engine.schema": schema, "engine.run.status": "SLEEPING"},
                )
                for schema in SCHEMAS
            }
            return paused == {SCHEMAS[0]: 1, SCHEMAS[1]: 2}

        await eventually(each_its_own, timeout=20)


# -- roles -----------------------------------------------------------------------------------------
async def test_roles_sql_grants_another_schema_to_its_own_roles(
    apps: dict[str, Engine], sql: asyncpg.Connection, database_url: str
) -> None:
    """ops/roles.sql with ``engine.schema`` set grants the schema to ``<schema>_sender``,
    ``_worker`` and ``_reader``: a worker login runs the app there and cannot read another
    schema; a sender login sends there only."""
    schema = SCHEMAS[0]
    await sql.execute(f"SET engine.schema = '{schema}'")
    await sql.execute(ROLES_SQL.read_text())
    await sql.execute("RESET engine.schema")
    user = f"schemas_worker_{os.getpid()}"
    await sql.execute(f"DROP ROLE IF EXISTS {user}")
    await sql.execute(f"CREATE ROLE {user} LOGIN IN ROLE {schema}_worker")
    try:
        login = as_user(database_url, user)
        app = Engine("shop", login, schema=schema, backoff=FAST)
        _declare(app, schema)
        try:
            async with app.worker(poll_interval="50ms"):
                [event_id] = await app.send(Event(name="order/created", data={"n": 3}))
                run = await app.wait_for_run(await only_run_id(app, event_id))
            assert run.output == {"schema": schema, "n": 3}
        finally:
            await app.close()
        conn = await asyncpg.connect(login)
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetchval(f"SELECT count(*) FROM {SCHEMAS[1]}.runs")
        finally:
            await conn.close()
        await sql.execute(f"GRANT {schema}_sender TO {user}")
        await sql.execute(f"REVOKE {schema}_worker FROM {user}")
        conn = await asyncpg.connect(login)
        try:  # a sender: its schema's send_event (SECURITY DEFINER) and nothing else
            assert await conn.fetchval(f"SELECT {schema}.send_event('order/created', '{{}}')")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetchval(f"SELECT count(*) FROM {schema}.events")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetchval(f"SELECT {SCHEMAS[1]}.send_event('order/created', '{{}}')")
        finally:
            await conn.close()
    finally:
        await sql.execute(f"DROP OWNED BY {user}")
        await sql.execute(f"DROP ROLE {user}")
