"""The engine command: dev, worker, migrate, send and prune; runs, events and functions
(cli_runs.py); keys (cli_keys.py); check-replay (cli_replay.py).

Exit codes: 0 done; 1 a failure (the database cannot be reached or has no schema, a run or
event does not exist, a demo failed); 2 bad input (an option, a file or module that cannot be
loaded, an invalid expression, event or run id); 130 interrupted (Ctrl-C). An error is one line
on stderr; --debug adds its traceback.

Without --database-url or $DATABASE_URL, the commands use the database of the `engine dev`
running in this folder (it writes where it listens to .engine/url).

The engine lives in the PostgreSQL schema `engine` unless --schema NAME (or $ENGINE_SCHEMA)
names another: one schema per app sharing a database, created by `engine migrate --schema NAME`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib
import importlib.util
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

from . import (
    cli_dashboard,
    cli_keys,
    cli_replay,
    cli_runs,
    embedded,
    event_loop,
    retention,
    telemetry,
)
from .app import Engine
from .cli_common import CLI_APP_ID, Failure, UsageError, routing_outcome
from .cli_common import Formatter as _Formatter
from .cli_common import command as _command
from .cli_common import database_option as _database_option
from .cli_common import database_url as _database_url
from .cli_common import duration as _duration
from .cli_common import reaching as _reaching
from .cli_common import run as _run
from .cli_common import schema_name as _schema_name
from .cli_common import schema_option as _schema_option
from .cli_common import timestamp as _timestamp
from .db import Database
from .errors import ConfigurationError, InvalidEventError, SchemaMissingError
from .events import Event
from .logs import LEVELS, configure_logging
from .testing import clock_preserved

INTERRUPTED = 130
_DEFAULT_LEVEL = {"dev": "warning", "worker": "info"}


class Interrupted(BaseException):
    """Ctrl-C outside the event loop (while the embedded server starts): exit status 130."""


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """Ctrl-C raises :class:`Interrupted` in the block (blocking code: the server's start)."""

    def interrupt(signum: int, frame: Any) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``engine`` command; exits with the status the module docstring lists."""
    args = _parser().parse_args(argv)
    try:
        code = _dispatch(args)
    except (KeyboardInterrupt, Interrupted):
        code = INTERRUPTED
    except BaseException as error:  # every error ends here as one line (the traceback: --debug)
        code = _report(error, args)
    raise SystemExit(code)


def _dispatch(args: argparse.Namespace) -> int:
    level = args.log_level or os.environ.get("ENGINE_LOG_LEVEL") or _DEFAULT_LEVEL.get(args.command)
    try:
        configure_logging(level or "warning")
    except ValueError as error:
        raise UsageError(str(error)) from None
    event_loop.loop_factory()  # a bad $ENGINE_EVENT_LOOP is refused before anything starts
    code: int = args.handler(args)
    return code


def _report(error: BaseException, args: argparse.Namespace) -> int:
    if isinstance(error, SystemExit):
        raise error
    if args.debug:
        traceback.print_exception(error)
    bad_input = isinstance(error, UsageError | ConfigurationError | InvalidEventError)
    known = bad_input or isinstance(error, Failure | SchemaMissingError)
    message = str(error) if known else f"{type(error).__name__}: {error}"
    hint = "" if args.debug else " (--debug shows the traceback)"
    print(f"engine {args.command}: error: {message}{'' if known else hint}", file=sys.stderr)
    return 2 if bad_input else 1


# -- arguments -------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engine", description=__doc__, formatter_class=_Formatter)
    parser.add_argument(
        "--log-level",
        type=str.lower,
        choices=LEVELS,
        default=None,
        help="the lowest level logged (on stderr); default: $ENGINE_LOG_LEVEL, else warning for"
        " dev, info for worker",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(required=True, metavar="COMMAND", dest="command")
    _dev_parser(commands)
    _worker_parser(commands)
    migrate = _command(
        commands,
        "migrate",
        "create or upgrade the engine's schema (idempotent: nothing to do when it is current)",
        _migrate,
    )
    _database_option(migrate)
    _schema_option(migrate)
    cli_runs.add_commands(commands)  # runs, events, functions
    cli_keys.add_commands(commands)  # keys
    cli_replay.add_commands(commands, load_target)  # check-replay
    _send_parser(commands)
    _prune_parser(commands)
    cli_dashboard.add_command(commands)
    return parser


def _dev_parser(commands: Any) -> None:
    dev = _command(commands, "dev", "run a module's functions on an embedded PostgreSQL", _dev)
    dev.description = """\
Starts an embedded PostgreSQL (its data kept in DATA_DIR/pg), applies the schema and runs a
worker for the module's Engine.

If the module defines async def demo(app), engine dev calls it once the worker runs and exits
when it returns (with --serve, the worker keeps running until Ctrl-C); the demo's moves of
durable time are undone when it ends. A module without demo() gets a worker that runs until
Ctrl-C (exit status 130) or SIGTERM (0).

While engine dev runs, DATA_DIR/url holds the server's URL: engine send, worker and migrate
run in the same folder use it when given no --database-url; and the dashboard is served at
http://127.0.0.1:8288 (--port to change it)."""
    dev.add_argument("target", help="a file (examples/quickstart.py) or module[:attribute]")
    dev.add_argument(
        "--data-dir",
        default=embedded.DEFAULT_STATE,
        help="where engine dev keeps its database and its URL",
    )
    dev.add_argument(
        "--serve", action="store_true", help="keep the worker running after demo() returns"
    )
    cli_dashboard.port_option(dev, default_text="default: 8288 (if taken, no dashboard)")
    _schema_option(dev, of_engine=True)
    _worker_options(dev)


def _worker_parser(commands: Any) -> None:
    worker = _command(commands, "worker", "run a worker for module:app", _worker)
    worker.add_argument("target", help="module:attribute naming an Engine (or a file path)")
    _database_option(worker, "the Engine's database_url, else $DATABASE_URL, else engine dev's")
    _schema_option(worker, of_engine=True)
    _worker_options(worker)


def _send_parser(commands: Any) -> None:
    send = _command(commands, "send", "send an event", _send)
    send.add_argument("name", help="the event name, for example order/created")
    send.add_argument("--data", default="{}", help="the event's data: a JSON object")
    send.add_argument(
        "--id", default=None, help="an id: a second event with it within 24 hours starts nothing"
    )
    send.add_argument(
        "--ts",
        type=_timestamp,
        default=None,
        help="when the event happened, ISO 8601 with a zone; a future time schedules its runs",
    )
    send.add_argument(
        "--wait",
        type=_duration,
        default="2s",
        help="how long to wait for a worker to route the event, to say which runs it started",
    )
    _database_option(send)
    _schema_option(send)


def _prune_parser(commands: Any) -> None:
    prune = _command(
        commands,
        "prune",
        "delete finished runs (with their steps and history), routed events and spent"
        " bookkeeping older than a retention, now, in small batches (workers also do it"
        " every few minutes); prints the rows deleted by table",
        _prune,
    )
    prune.add_argument(
        "--older-than", type=_retention, default="30d", help="what ended or arrived before this"
    )
    prune.add_argument(
        "--batch", type=_positive_int, default=retention.PRUNE_BATCH, help="rows per batch"
    )
    _database_option(prune)
    _schema_option(prune)


def _retention(text: str) -> str:
    """A positive duration, or off (also: none)."""
    if text.strip().lower() in ("off", "none"):
        return "off"
    try:
        retention.retention_option(text)
    except ConfigurationError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return value


def _worker_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--concurrency", type=int, default=10, help="runs executed at once")
    parser.add_argument(
        "--lease", type=_duration, default="30s", help="how long a dead worker's runs stay held"
    )
    parser.add_argument(
        "--poll-interval", type=_duration, default="1s", help="the safety-net poll (NOTIFY wakes)"
    )
    parser.add_argument(
        "--grace",
        type=_duration,
        default="10s",
        help="on stop, how long executing steps get to finish",
    )
    parser.add_argument(
        "--listen-check",
        type=_duration,
        default="10s",
        help="how often the LISTEN connection is probed",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="sync step calls run at once, in the worker's own threads (default: --concurrency)",
    )
    parser.add_argument(
        "--alive-file",
        default=None,
        metavar="PATH",
        help="rewrite this file at each heartbeat that reached the database (every lease): a"
        " liveness probe checks its age (ops/k8s)",
    )
    parser.add_argument(
        "--retention",
        type=_retention,
        default=None,
        help="prune finished history older than this (off: never); default: the Engine's"
        " retention (30d unless it says otherwise)",
    )


# -- loading the user's module ---------------------------------------------------------------------
def load_target(target: str) -> tuple[ModuleType, Engine]:
    """Imports ``module[:attr]`` or a ``.py`` file and finds its Engine.

    Raises:
        UsageError: the file or module does not exist, or does not hold exactly one Engine.
    """
    module_name, _, attribute = target.partition(":")
    module = _import(module_name)
    if attribute:
        app = getattr(module, attribute, None)
    else:
        found = [v for v in vars(module).values() if isinstance(v, Engine)]
        if len(found) != 1:
            raise UsageError(f"{target} has {len(found)} Engine instances; name one as module:attr")
        app = found[0]
    if not isinstance(app, Engine):
        raise UsageError(f"{target} is not an Engine")
    return module, app


def _import(module_name: str) -> ModuleType:
    if module_name.endswith(".py") or os.sep in module_name:
        path = Path(module_name).resolve()
        if not path.is_file():
            raise UsageError(f"{module_name}: no such file")
        sys.path.insert(0, str(path.parent))
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise UsageError(f"cannot load {module_name}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        with _loading(module_name):
            spec.loader.exec_module(module)
        return module
    sys.path.insert(0, os.getcwd())
    try:
        with _loading(module_name):
            return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is None or not module_name.startswith(error.name):
            raise  # the module exists; something it imports does not
        raise UsageError(f"no module named {module_name!r} (from {os.getcwd()})") from None


@contextlib.contextmanager
def _loading(name: str) -> Iterator[None]:
    try:
        yield
    except SyntaxError as error:
        raise UsageError(f"{name}: {error.msg} (line {error.lineno})") from error


# -- commands --------------------------------------------------------------------------------------
def _dev(args: argparse.Namespace) -> int:
    module, app = load_target(args.target)  # a missing file is said before anything is created
    with _interruptible():
        url, _server = embedded.start(args.data_dir)
    url_file = embedded.write_url(args.data_dir, url)
    try:
        print(f"engine dev: PostgreSQL at {url} (state in {args.data_dir})", file=sys.stderr)
        app.database_url = url
        app.schema = _schema_name(args.schema, engine_schema=app.schema)
        code: int = _run(_dev_session(app, args, getattr(module, "demo", None)))
        return code
    finally:
        embedded.forget_url(url_file, url)


async def _dev_session(app: Engine, args: argparse.Namespace, demo: Any) -> int:
    await Database(str(app.database_url), schema=app.schema).apply_schema()
    return await _run_worker(app, args, demo, dashboard=True)


def _worker(args: argparse.Namespace) -> int:
    _module, app = load_target(args.target)
    # Everything loaded so far (the engine, the app, their imports) lives as long as the
    # process: kept out of the garbage collector's reach, it is no longer walked by each full
    # collection, a pause of the event loop of 25-40 ms (the collector took a tenth of the
    # worker's CPU per run, half of it in full collections: bench/README "Session 10"). Only
    # this command does it: an application running `app.worker()` owns its heap.
    gc.freeze()
    app.database_url = _database_url(args.database_url, fallback=app.database_url)
    app.schema = _schema_name(args.schema, engine_schema=app.schema)
    code: int = _run(_reaching(app.database_url, _run_worker(app, args)))
    return code


async def _run_worker(
    app: Engine, args: argparse.Namespace, demo: Any = None, *, dashboard: bool = False
) -> int:
    """Runs a worker (and the demo, and the dashboard of ``engine dev``); SIGTERM stops it
    (0), SIGINT too (130), within ``grace``."""
    telemetry.configure_from_environment()
    if args.retention is not None:  # --retention overrides the Engine's
        app.retention = retention.retention_option(
            None if args.retention == "off" else args.retention
        )
    loop = asyncio.get_running_loop()
    signals: list[signal.Signals] = []
    try:
        async with (
            app.worker(
                concurrency=args.concurrency,
                lease=args.lease,
                poll_interval=args.poll_interval,
                grace=args.grace,
                listen_check=args.listen_check,
                threads=args.threads,
                alive_file=args.alive_file,
            ) as worker,
            _serving(app, args, dashboard),
        ):
            demo_task = None if demo is None else asyncio.ensure_future(_demo(app, demo))

            def stop(sig: signal.Signals) -> None:
                signals.append(sig)
                worker.stop()
                if demo_task is not None:
                    demo_task.cancel()

            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop, sig)
            if demo_task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await demo_task
                if not args.serve and not signals:
                    return 0
            await worker.stopped()
    finally:
        await app.close()
        telemetry.shutdown()
    return INTERRUPTED if signal.SIGINT in signals else 0


def _serving(
    app: Engine, args: argparse.Namespace, dashboard: bool
) -> contextlib.AbstractAsyncContextManager[None]:
    if not dashboard:
        return contextlib.nullcontext()
    return cli_dashboard.dev_dashboard(app, args.port)


async def _demo(app: Engine, demo: Callable[[Engine], Awaitable[Any]]) -> None:
    async with clock_preserved(app):
        await demo(app)


def _migrate(args: argparse.Namespace) -> int:
    url = _database_url(args.database_url)
    schema = _schema_name(args.schema)
    applied = _run(_reaching(url, Database(url, schema=schema).apply_schema()))
    done = f"schema {schema} applied" if applied else f"schema {schema} unchanged, nothing to do"
    print(f"engine migrate: {done}", file=sys.stderr)
    return 0


def _prune(args: argparse.Namespace) -> int:
    if args.older_than == "off":
        raise UsageError("--older-than off: nothing to prune")
    age = retention.retention_option(args.older_than)
    assert age is not None
    url = _database_url(args.database_url)
    started = time.monotonic()
    schema = _schema_name(args.schema)
    counts = _run(_reaching(url, _prune_database(url, schema, age, args.batch)))
    for kind, deleted in counts.items():
        print(f"{kind:<20} {deleted:>12}")
    total = sum(counts.values())
    seconds = time.monotonic() - started
    done = f"deleted {total:,} rows older than {args.older_than} in {seconds:.1f} s"
    print(f"engine prune: {done} (a run's steps and history go with it)", file=sys.stderr)
    return 0


async def _prune_database(url: str, schema: str, age: timedelta, batch: int) -> dict[str, int]:
    db = Database(url, max_size=1, schema=schema)
    await db.open()
    try:
        await db.fetchval("schema_version")  # a clear error if the schema is missing
        return await retention.prune(db, age, batch=batch)
    finally:
        await db.close()


def _send(args: argparse.Namespace) -> int:
    try:
        data = json.loads(args.data)
    except json.JSONDecodeError as error:
        raise UsageError(f"--data is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise UsageError(f"--data must be a JSON object, got {type(data).__name__}")
    try:
        event = Event(name=args.name, data=data, id=args.id, ts=args.ts)
    except ValueError as error:
        raise InvalidEventError(_first_reason(error)) from None
    url = _database_url(args.database_url)
    app = Engine(CLI_APP_ID, url, schema=_schema_name(args.schema))
    event_id, outcome = _run(_reaching(url, _send_and_follow(app, event, args.wait)))
    print(event_id)
    print(f"engine send: {outcome}", file=sys.stderr)
    return 0


def _first_reason(error: ValueError) -> str:
    errors = getattr(error, "errors", None)
    if callable(errors):
        first = errors()[0]
        return f"{'.'.join(map(str, first['loc']))}: {first['msg']}"
    return str(error)


async def _send_and_follow(app: Engine, event: Event, wait: str) -> tuple[str, str]:
    """Sends ``event`` through ``app``; says whether it was deduplicated, and which runs it
    started."""
    try:
        db = await app.database()
        known = event.id is not None and await db.fetchval("event_id_known", event.id)
        [event_id] = await app.send(event)
        if known:
            return event_id, (
                f"deduplicated: an event with id {event.id!r} was sent in the last 24 hours;"
                " nothing new was stored or started"
            )
        return event_id, await routing_outcome(app, event, event_id, wait)
    finally:
        await app.close()
