"""The dashboard on the command line: ``engine dev`` serves it beside its worker (``--port``),
``engine dashboard`` serves it alone against any database."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

from .app import Engine
from .cli_common import CLI_APP_ID, Failure, UsageError, reaching, run, schema_name, schema_option
from .cli_common import command as _command
from .cli_common import database_url as _database_url
from .logs import engine_logger

log = engine_logger()


def port_option(parser: argparse.ArgumentParser, *, default_text: str) -> None:
    """``--port``: 0 picks a free one."""
    parser.add_argument(
        "--port",
        type=_port,
        default=None,
        help=f"the dashboard's port (0: a free one); {default_text}",
    )


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0 to 65535)")
    return int(text)


@contextlib.asynccontextmanager
async def dev_dashboard(app: Engine, port: int | None) -> AsyncIterator[None]:
    """Serves the dashboard of ``engine dev`` on 127.0.0.1 while the block runs, and says
    where on stderr. With no ``--port`` and 8288 taken (another ``engine dev``), the worker
    runs without a dashboard rather than not at all."""
    from .web import create_app
    from .web.security import token_from_environment
    from .web.serve import DEFAULT_HOST, DEFAULT_PORT, start

    token = token_from_environment()
    try:
        served = await start(
            create_app(app, token=token),
            host=DEFAULT_HOST,
            port=DEFAULT_PORT if port is None else port,
            token=token,
        )
    except OSError as error:
        if port is not None:
            raise Failure(f"cannot serve the dashboard on port {port}: {error.strerror}") from None
        print(
            f"engine dev: no dashboard: port {DEFAULT_PORT} is taken ({error.strerror}); --port 0"
            " picks a free one",
            file=sys.stderr,
        )
        yield
        return
    print(f"engine dev: dashboard at {served.url}", file=sys.stderr)
    try:
        yield
    finally:
        await served.stop()


def add_command(commands: Any) -> None:
    """``engine dashboard``."""
    parser = _command(commands, "dashboard", "serve the dashboard for a database", _dashboard)
    parser.description = """\
Serves the dashboard (runs, events...) for the database at --database-url, until Ctrl-C.

It reads through --database-url, which may log in as a role granted the read-only
engine_reader (ops/roles.sql), and acts (cancel, rerun, send, replay) through
--actions-database-url (default: the same URL), a role that may write (engine_worker).
With --read-database-url (a streaming replica), pages read there instead and --database-url
is the primary: the live pages' LISTEN connection and (by default) the actions go to it.

Bound to a loopback address (the default) it needs no login; bound to any other address it
refuses to start unless $ENGINE_DASHBOARD_TOKEN holds a token, which the pages then ask for."""
    parser.add_argument(
        "--database-url",
        default=None,
        help="a PostgreSQL URL to read; default: $DATABASE_URL, else engine dev's",
    )
    parser.add_argument(
        "--actions-database-url",
        default=None,
        help="a PostgreSQL URL to act through (cancel, rerun, send); default: --database-url",
    )
    parser.add_argument(
        "--read-database-url",
        default=None,
        help="a PostgreSQL URL to read the pages from (a replica); --database-url is then the"
        " primary, for LISTEN and actions",
    )
    schema_option(parser)
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    port_option(parser, default_text="default: 8288")


def _dashboard(args: argparse.Namespace) -> int:
    from .web.security import BindingError, check_binding, token_from_environment

    token = token_from_environment()
    try:
        check_binding(args.host, token)  # before connecting to anything
    except BindingError as error:
        raise UsageError(str(error)) from None
    url = _database_url(args.database_url)
    actions = args.actions_database_url or url
    # The reader is an Engine on the replica whose LISTEN goes to the primary (a standby
    # cannot LISTEN); its pages call its database() directly.
    read = args.read_database_url
    schema = schema_name(args.schema)
    reader = Engine(
        CLI_APP_ID, read or url, listen_database_url=url if read else None, schema=schema
    )
    writer = Engine(CLI_APP_ID, actions, schema=schema)
    serving = _serve(reader, writer, args.host, args.port, token)
    code: int = run(reaching(read or url, serving))
    return code


async def _serve(
    reader: Engine, writer: Engine, host: str, port: int | None, token: str | None
) -> int:
    from .web import create_app
    from .web.serve import DEFAULT_PORT, start

    try:
        await reader.database()  # a clear error now if the database cannot be read
        try:
            served = await start(
                create_app(writer, reader=reader, token=token),
                host=host,
                port=DEFAULT_PORT if port is None else port,
                token=token,
            )
        except OSError as error:
            raise Failure(f"cannot listen on {host}:{port}: {error.strerror}") from None
        print(f"engine dashboard: serving at {served.url}", file=sys.stderr)
        stopped = asyncio.Event()
        signals: list[signal.Signals] = []
        loop = asyncio.get_running_loop()

        def stop(sig: signal.Signals) -> None:
            signals.append(sig)
            stopped.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop, sig)
        waiting = asyncio.ensure_future(stopped.wait())
        await asyncio.wait([waiting, served.task], return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        await served.stop()
        return 130 if signal.SIGINT in signals else 0
    finally:
        await reader.close()
        await writer.close()
