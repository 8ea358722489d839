"""The ``engine`` command: ``dev``, ``worker``, ``migrate`` and ``send``."""

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
from pathlib import Path
from types import ModuleType
from typing import Any

from . import telemetry
from .app import Engine
from .db import Database
from .events import Event
from .logs import configure_logging


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``engine`` command."""
    args = _parser().parse_args(argv)
    configure_logging(args.log_level)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(args.handler(args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engine", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("ENGINE_LOG_LEVEL", "info"))
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    dev = commands.add_parser("dev", help="run a module's functions on an embedded PostgreSQL")
    dev.add_argument("target", help="a file (examples/quickstart.py) or module[:attribute]")
    dev.add_argument("--data-dir", default=".engine", help="where the embedded data lives")
    dev.add_argument(
        "--serve", action="store_true", help="keep working after the module's demo() returns"
    )
    _worker_options(dev)
    dev.set_defaults(handler=_dev)

    worker = commands.add_parser("worker", help="run a worker for module:app")
    worker.add_argument("target", help="module:attribute naming an Engine (or a file path)")
    worker.add_argument(
        "--database-url", default=None, help="defaults to the Engine's, then $DATABASE_URL"
    )
    _worker_options(worker)
    worker.set_defaults(handler=_worker)

    migrate = commands.add_parser("migrate", help="apply schema.sql (idempotent)")
    migrate.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    migrate.set_defaults(handler=_migrate)

    send = commands.add_parser("send", help="send an event")
    send.add_argument("name")
    send.add_argument("--data", default="{}", help="a JSON object")
    send.add_argument("--id", default=None)
    send.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    send.set_defaults(handler=_send)
    return parser


def _worker_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--lease", default="30s")
    parser.add_argument("--poll-interval", default="1s")
    parser.add_argument("--grace", default="10s")
    parser.add_argument("--listen-check", default="10s")


def load_target(target: str) -> tuple[ModuleType, Engine]:
    """Imports ``module[:attr]`` or a ``.py`` file and finds its Engine."""
    module_name, _, attribute = target.partition(":")
    if module_name.endswith(".py") or os.sep in module_name:
        path = Path(module_name).resolve()
        sys.path.insert(0, str(path.parent))
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise SystemExit(f"engine: cannot load {module_name}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
    else:
        sys.path.insert(0, os.getcwd())
        module = importlib.import_module(module_name)
    if attribute:
        app = getattr(module, attribute)
    else:
        found = [v for v in vars(module).values() if isinstance(v, Engine)]
        if len(found) != 1:
            raise SystemExit(
                f"engine: {target} has {len(found)} Engine instances; name one as module:attr"
            )
        app = found[0]
    if not isinstance(app, Engine):
        raise SystemExit(f"engine: {target} is not an Engine")
    return module, app


async def _run_worker(app: Engine, args: argparse.Namespace, demo: Any = None) -> None:
    telemetry.configure_from_environment()
    loop = asyncio.get_running_loop()
    try:
        async with app.worker(
            concurrency=args.concurrency,
            lease=args.lease,
            poll_interval=args.poll_interval,
            grace=args.grace,
            listen_check=args.listen_check,
        ) as worker:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, worker.stop)
            if demo is not None:
                await demo(app)
                if not args.serve:
                    return
            await worker.stopped()
    finally:
        await app.close()
        telemetry.shutdown()


async def _dev(args: argparse.Namespace) -> None:
    from . import embedded

    url, _server = embedded.start(args.data_dir)
    os.environ["DATABASE_URL"] = url
    await Database(url).apply_schema()
    module, app = load_target(args.target)
    app.database_url = url
    print(f"engine dev: PostgreSQL at {url} (data in {args.data_dir})", file=sys.stderr)
    await _run_worker(app, args, demo=getattr(module, "demo", None))


async def _worker(args: argparse.Namespace) -> None:
    _module, app = load_target(args.target)
    if args.database_url:
        app.database_url = args.database_url
    await _run_worker(app, args)


async def _migrate(args: argparse.Namespace) -> None:
    if not args.database_url:
        raise SystemExit("engine migrate: pass --database-url or set $DATABASE_URL")
    await Database(args.database_url).apply_schema()
    print("engine migrate: schema applied", file=sys.stderr)


async def _send(args: argparse.Namespace) -> None:
    if not args.database_url:
        raise SystemExit("engine send: pass --database-url or set $DATABASE_URL")
    app = Engine("engine-cli", args.database_url)
    try:
        ids = await app.send(Event(name=args.name, data=json.loads(args.data), id=args.id))
    finally:
        await app.close()
    print(ids[0])
