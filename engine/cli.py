"""The engine command: dev, worker, migrate, functions list and send.

Exit codes: 0 done; 1 a failure (the database cannot be reached, a demo failed); 2 bad input
(an option, a file or module that cannot be loaded, an invalid expression or event); 130
interrupted (Ctrl-C). An error is one line on stderr; --debug adds its traceback.

Without --database-url or $DATABASE_URL, worker, migrate and send use the database of the
`engine dev` running in this folder (it writes where it listens to .engine/url).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import json
import os
import signal
import sys
import traceback
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

from . import embedded, telemetry
from .app import Engine
from .db import Database
from .durations import parse_duration
from .errors import ConfigurationError, InvalidEventError, SchemaMissingError
from .events import Event
from .logs import LEVELS, configure_logging
from .testing import clock_preserved

INTERRUPTED = 130
_DEFAULT_LEVEL = {"dev": "warning", "worker": "info"}


class UsageError(Exception):
    """Bad input on the command line: exit status 2."""


class Failure(Exception):
    """The command could not do its work: exit status 1, with this message."""


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
def _duration(text: str) -> str:
    try:
        parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _timestamp(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no time zone (add Z or +02:00)")
    return moment


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the descriptions' paragraphs, and shows the defaults that say something."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


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
    migrate = _command(commands, "migrate", "apply the engine's schema (idempotent)", _migrate)
    _database_option(migrate)
    _functions_parser(commands)
    _send_parser(commands)
    return parser


def _command(
    commands: Any, name: str, summary: str, handler: Callable[[argparse.Namespace], int]
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=summary, description=summary, formatter_class=_Formatter
    )
    parser.set_defaults(handler=handler)
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
run in the same folder use it when given no --database-url."""
    dev.add_argument("target", help="a file (examples/quickstart.py) or module[:attribute]")
    dev.add_argument(
        "--data-dir",
        default=embedded.DEFAULT_STATE,
        help="where engine dev keeps its database and its URL",
    )
    dev.add_argument(
        "--serve", action="store_true", help="keep the worker running after demo() returns"
    )
    _worker_options(dev)


def _worker_parser(commands: Any) -> None:
    worker = _command(commands, "worker", "run a worker for module:app", _worker)
    worker.add_argument("target", help="module:attribute naming an Engine (or a file path)")
    _database_option(worker, "the Engine's database_url, else $DATABASE_URL, else engine dev's")
    _worker_options(worker)


def _functions_parser(commands: Any) -> None:
    functions = commands.add_parser(
        "functions", help="the function registry", formatter_class=_Formatter
    )
    listing = _command(
        functions.add_subparsers(required=True, metavar="SUBCOMMAND"),
        "list",
        "registered functions: triggers, active or not (an inactive function is one no live"
        " worker served for a while: new events do not start it), live workers, runs by status",
        _functions_list,
    )
    listing.add_argument("--app", default=None, help="one app's functions (default: all)")
    _database_option(listing)


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


def _database_option(
    parser: argparse.ArgumentParser, default: str = "$DATABASE_URL, else engine dev's"
) -> None:
    parser.add_argument(
        "--database-url", default=None, help=f"a PostgreSQL URL; default: {default}"
    )


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


# -- the database ----------------------------------------------------------------------------------
def _database_url(given: str | None, *, fallback: str | None = None) -> str:
    """``--database-url``, else ``fallback`` (an Engine's own), else $DATABASE_URL, else the
    URL of an ``engine dev`` running in this folder."""
    url = given or fallback or os.environ.get("DATABASE_URL") or embedded.running_url()
    if not url:
        raise UsageError(
            "no database: pass --database-url, set $DATABASE_URL, or start `engine dev` in this"
            " folder"
        )
    return url


async def _reaching(url: str, action: Awaitable[Any]) -> Any:
    """Awaits ``action``, saying which database could not be reached if that is the error."""
    try:
        return await action
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        hint = " (is `engine dev` running?)" if url == embedded.running_url() else ""
        raise Failure(f"cannot reach the database at {url}: {reason}{hint}") from error


# -- commands --------------------------------------------------------------------------------------
def _dev(args: argparse.Namespace) -> int:
    module, app = load_target(args.target)  # a missing file is said before anything is created
    with _interruptible():
        url, _server = embedded.start(args.data_dir)
    url_file = embedded.write_url(args.data_dir, url)
    try:
        print(f"engine dev: PostgreSQL at {url} (state in {args.data_dir})", file=sys.stderr)
        app.database_url = url
        code: int = _run(_dev_session(app, args, getattr(module, "demo", None)))
        return code
    finally:
        embedded.forget_url(url_file, url)


async def _dev_session(app: Engine, args: argparse.Namespace, demo: Any) -> int:
    await Database(str(app.database_url)).apply_schema()
    return await _run_worker(app, args, demo)


def _worker(args: argparse.Namespace) -> int:
    _module, app = load_target(args.target)
    app.database_url = _database_url(args.database_url, fallback=app.database_url)
    code: int = _run(_reaching(app.database_url, _run_worker(app, args)))
    return code


def _run(work: Awaitable[Any]) -> Any:
    """Runs ``work`` in a new event loop (Ctrl-C before a worker runs: KeyboardInterrupt)."""

    async def main() -> Any:
        return await work

    return asyncio.run(main())


async def _run_worker(app: Engine, args: argparse.Namespace, demo: Any = None) -> int:
    """Runs a worker (and the demo); SIGTERM stops it (0), SIGINT too (130), within ``grace``."""
    telemetry.configure_from_environment()
    loop = asyncio.get_running_loop()
    signals: list[signal.Signals] = []
    try:
        async with app.worker(
            concurrency=args.concurrency,
            lease=args.lease,
            poll_interval=args.poll_interval,
            grace=args.grace,
            listen_check=args.listen_check,
            threads=args.threads,
        ) as worker:
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


async def _demo(app: Engine, demo: Callable[[Engine], Awaitable[Any]]) -> None:
    async with clock_preserved(app):
        await demo(app)


def _migrate(args: argparse.Namespace) -> int:
    url = _database_url(args.database_url)
    applied = _run(_reaching(url, Database(url).apply_schema()))
    done = "schema applied" if applied else "schema unchanged, nothing to do"
    print(f"engine migrate: {done}", file=sys.stderr)
    return 0


def _functions_list(args: argparse.Namespace) -> int:
    url = _database_url(args.database_url)
    rows = _run(_reaching(url, _function_rows(url, args.app)))
    print(f"{'APP/FUNCTION':<40} {'STATE':<8} {'WORKERS':>7}  TRIGGERS  RUNS")
    for row in rows:
        triggers = ", ".join(_trigger_text(t) for t in json.loads(row["triggers"]))
        runs = json.loads(row["runs"])
        counts = " ".join(f"{status}={runs[status]}" for status in sorted(runs)) or "-"
        state = "active" if row["active"] else "inactive"
        name = f"{row['app_id']}/{row['function_id']}"
        print(f"{name:<40} {state:<8} {row['workers']:>7}  {triggers or '-'}  {counts}")
    return 0


async def _function_rows(url: str, app_id: str | None) -> list[Any]:
    db = Database(url, max_size=1)
    await db.open()
    try:
        return await db.fetch("function_list", app_id)
    finally:
        await db.close()


def _trigger_text(trigger: dict[str, Any]) -> str:
    if "cron" in trigger:
        return f"cron {trigger['cron']}"
    condition = trigger.get("expression")
    return str(trigger.get("event")) + (f" if {condition}" if condition else "")


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
    event_id, outcome = _run(_reaching(url, _send_and_follow(url, event, args.wait)))
    print(event_id)
    print(f"engine send: {outcome}", file=sys.stderr)
    return 0


def _first_reason(error: ValueError) -> str:
    errors = getattr(error, "errors", None)
    if callable(errors):
        first = errors()[0]
        return f"{'.'.join(map(str, first['loc']))}: {first['msg']}"
    return str(error)


async def _send_and_follow(url: str, event: Event, wait: str) -> tuple[str, str]:
    """Sends ``event``; says whether it was deduplicated, and which runs it started."""
    app = Engine("engine-cli", url)
    try:
        db = await app.database()
        known = event.id is not None and await db.fetchval("event_id_known", event.id)
        [event_id] = await app.send(event)
        if known:
            return event_id, (
                f"deduplicated: an event with id {event.id!r} was sent in the last 24 hours;"
                " nothing new was stored or started"
            )
        return event_id, await _routing_outcome(app, event, event_id, wait)
    finally:
        await app.close()


async def _routing_outcome(app: Engine, event: Event, event_id: str, wait: str) -> str:
    db = await app.database()
    if event.ts is not None and event.ts > await db.fetchval("now"):
        return f"stored; its runs start at {event.ts.isoformat()}"
    deadline = asyncio.get_running_loop().time() + parse_duration(wait).total_seconds()
    while await db.fetchval("event_pending", event_id):
        if asyncio.get_running_loop().time() >= deadline:
            return f"stored; not routed within {wait}: is a worker running (engine dev, worker)?"
        await asyncio.sleep(0.02)
    runs = await app.runs_for_event(event_id)
    if not runs:
        return "stored; it started no run (no function's trigger matched it)"
    started = ", ".join(f"{run.function_id} {run.run_id}" for run in runs)
    return f"started {len(runs)} run(s): {started}"
