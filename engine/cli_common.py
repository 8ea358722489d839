"""What the engine command's subcommands share (``cli.py``, ``cli_runs.py``, ``cli_keys.py``).

Their errors (and so their exit statuses), the types of their options, how a subcommand is
declared, where the database URL comes from, what an unreachable database says, how a
coroutine runs, and what became of an event just sent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

from . import embedded, event_loop
from .app import Engine
from .durations import parse_duration
from .errors import ConfigurationError
from .events import Event
from .pg_schema import DEFAULT_SCHEMA, check_schema_name

T = TypeVar("T")

CLI_APP_ID = "engine-cli"
"""The app id of the Engine the command builds to send and read (it declares no function)."""


class UsageError(Exception):
    """Bad input on the command line: exit status 2."""


class Failure(Exception):
    """The command could not do its work: exit status 1, with this message."""


# -- arguments -------------------------------------------------------------------------------------
def duration(text: str) -> str:
    """An option's duration (``30s``, ``1h30m``), checked as the command line is read."""
    try:
        parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def timestamp(text: str) -> datetime:
    """An option's ISO 8601 time, which must name its zone."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no time zone (add Z or +02:00)")
    return moment


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the descriptions' paragraphs, and shows the defaults that say something."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def command(
    commands: Any, name: str, summary: str, handler: Callable[[argparse.Namespace], int]
) -> argparse.ArgumentParser:
    """Declares the subcommand ``name`` of ``commands``, run by ``handler``."""
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=summary, description=summary, formatter_class=Formatter
    )
    parser.set_defaults(handler=handler)
    return parser


def group(commands: Any, name: str, summary: str) -> Any:
    """Declares the command group ``name`` (``engine runs``, ``engine keys``); returns what
    its subcommands are declared in."""
    parser = commands.add_parser(name, help=summary, description=summary, formatter_class=Formatter)
    return parser.add_subparsers(required=True, metavar="SUBCOMMAND")


def subcommand(
    group: Any, name: str, summary: str, handler: Callable[[argparse.Namespace], int]
) -> argparse.ArgumentParser:
    """A subcommand of a group, with ``--database-url``, whose errors read ``engine runs show:
    error: ...``."""
    parser = command(group, name, summary, handler)
    parser.set_defaults(command=parser.prog.removeprefix("engine "))
    database_option(parser)
    schema_option(parser)
    return parser


def json_option(parser: argparse.ArgumentParser) -> None:
    """Adds ``--json``: what the command prints, as JSON for scripts."""
    parser.add_argument("--json", action="store_true", help="print JSON (for scripts)")


def print_json(value: Any) -> None:
    """Prints ``value`` as indented JSON, non-ASCII text kept as it is."""
    print(json.dumps(value, indent=2, ensure_ascii=False))


def database_option(
    parser: argparse.ArgumentParser, default: str = "$DATABASE_URL, else engine dev's"
) -> None:
    """Adds ``--database-url``; ``default`` says where the URL comes from without it."""
    parser.add_argument(
        "--database-url", default=None, help=f"a PostgreSQL URL; default: {default}"
    )


SCHEMA_VARIABLE = "ENGINE_SCHEMA"
"""The environment variable naming the engine's schema when a command is given no ``--schema``."""


def schema_option(parser: argparse.ArgumentParser, *, of_engine: bool = False) -> None:
    """Adds ``--schema``: the PostgreSQL schema the engine lives in (``Engine(schema=...)``);
    ``of_engine`` for a command that loads the user's Engine, whose own schema comes first."""
    default = f"${SCHEMA_VARIABLE}, else {DEFAULT_SCHEMA}"
    if of_engine:
        default = f"the Engine's schema= (if not {DEFAULT_SCHEMA}), else {default}"
    parser.add_argument(
        "--schema",
        type=_schema_argument,
        default=None,
        metavar="NAME",
        help=f"the PostgreSQL schema of the engine's tables (one per app sharing the database,"
        f" created by engine migrate --schema NAME); default: {default}",
    )


def _schema_argument(text: str) -> str:
    try:
        return check_schema_name(text)
    except ConfigurationError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def schema_name(given: str | None, *, engine_schema: str = DEFAULT_SCHEMA) -> str:
    """``--schema``, else ``engine_schema`` (a loaded Engine's own) unless it is the default,
    else $ENGINE_SCHEMA, else ``engine``.

    Raises:
        UsageError: $ENGINE_SCHEMA is not a valid schema name.
    """
    if given is not None:
        return given
    if engine_schema != DEFAULT_SCHEMA:
        return engine_schema
    variable = os.environ.get(SCHEMA_VARIABLE) or DEFAULT_SCHEMA
    try:
        return check_schema_name(variable)
    except ConfigurationError as error:
        raise UsageError(f"${SCHEMA_VARIABLE}: {error}") from None


def read_database_option(parser: argparse.ArgumentParser) -> None:
    """Adds ``--read-database-url`` to a command that only reads: it then reads there (a
    replica) and never connects to ``--database-url``."""
    parser.add_argument(
        "--read-database-url",
        default=None,
        help="a PostgreSQL URL to read from instead (a replica, or a read-only role);"
        " --database-url is then not needed",
    )


# -- the database ----------------------------------------------------------------------------------
def database_url(given: str | None, *, fallback: str | None = None) -> str:
    """``--database-url``, else ``fallback`` (an Engine's own), else $DATABASE_URL, else the
    URL of an ``engine dev`` running in this folder."""
    url = given or fallback or os.environ.get("DATABASE_URL") or embedded.running_url()
    if not url:
        raise UsageError(
            "no database: pass --database-url, set $DATABASE_URL, or start `engine dev` in this"
            " folder"
        )
    return url


# SQLSTATE classes of a server that answers but will not let us in: a connection refused (08),
# bad credentials (28), a database that does not exist (3D).
_REFUSED_CLASSES = ("08", "28", "3D")


async def reaching(url: str, action: Awaitable[Any]) -> Any:
    """Awaits ``action``, saying which database could not be reached, or would not let us in,
    if that is the error."""
    try:
        return await action
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        hint = " (is `engine dev` running?)" if url == embedded.running_url() else ""
        raise Failure(f"cannot reach the database at {url}: {reason}{hint}") from error
    except Exception as error:
        if str(getattr(error, "sqlstate", ""))[:2] not in _REFUSED_CLASSES:
            raise
        raise Failure(f"cannot use the database at {url}: {error}") from error


def with_engine(args: argparse.Namespace, work: Callable[[Engine], Awaitable[T]]) -> T:
    """Runs ``work`` with an Engine (of app id ``engine-cli``) on the command's database and
    schema (its reads on ``--read-database-url`` where the command has it); says so if it
    cannot be reached."""
    read = getattr(args, "read_database_url", None)
    # A read-only command given a read URL needs no other: the Engine connects lazily, and
    # its reads never open the primary.
    url = database_url(args.database_url, fallback=read)
    shown = read or url
    schema = schema_name(args.schema)

    async def session() -> T:
        app = Engine(CLI_APP_ID, url, read_database_url=read, schema=schema)
        try:
            return await work(app)
        finally:
            await app.close()

    result: T = run(reaching(shown, session()))
    return result


def run(work: Awaitable[Any]) -> Any:
    """Runs ``work`` in a new event loop, uvloop's when installed (see :mod:`engine.event_loop`;
    Ctrl-C before a worker runs: KeyboardInterrupt)."""

    async def main() -> Any:
        return await work

    return event_loop.run(main())


# -- events ----------------------------------------------------------------------------------------
async def routing_outcome(app: Engine, event: Event, event_id: str, wait: str) -> str:
    """What the event just sent did: scheduled for later, started which runs, started none, or
    not routed within ``wait`` (no worker running)."""
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
