"""``engine check-replay module:app``: would the code as it is now break runs in flight?

It loads the app's module as ``engine worker`` does, replays the recorded history of each of its
runs in flight (and, with ``--since``, each run that ended within it) against the functions as
declared now (:meth:`engine.Engine.check_replay`: no step body runs, nothing is written), and
lists the runs that would fail with a DeterminismError, with the step recorded there and the
one the code asks for instead. Exit status 1 when any would, 0 when none would.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from .app import Engine
from .cli_common import (
    UsageError,
    command,
    database_option,
    database_url,
    duration,
    reaching,
    run,
    schema_name,
    schema_option,
)
from .errors import EngineError
from .replay_check import ReplayReport

LoadTarget = Callable[[str], tuple[ModuleType, Engine]]


def add_commands(commands: Any, load_target: LoadTarget) -> None:
    """Declares ``check-replay`` among the engine command's subcommands; ``load_target``
    imports the user's module (``engine.cli.load_target``)."""

    def handler(args: argparse.Namespace) -> int:
        return _check_replay(args, load_target)

    parser = command(
        commands,
        "check-replay",
        "replay the recorded histories of an app's runs in flight against its code as it is"
        " now, and list the runs it would fail with a DeterminismError (exit status 1 if any)",
        handler,
    )
    parser.add_argument("target", help="module:attribute naming an Engine (or a file path)")
    parser.add_argument(
        "--since",
        type=duration,
        default=None,
        help="also the runs that ended within this long (7d); default: only runs in flight",
    )
    parser.add_argument("--function", default=None, help="only this function's runs")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    database_option(parser, "the Engine's database_url, else $DATABASE_URL, else engine dev's")
    schema_option(parser, of_engine=True)


def _check_replay(args: argparse.Namespace, load_target: LoadTarget) -> int:
    _module, app = load_target(args.target)
    app.database_url = database_url(args.database_url, fallback=app.database_url)
    app.schema = schema_name(args.schema, engine_schema=app.schema)
    report: ReplayReport = run(reaching(app.database_url, _report(app, args)))
    if args.json:
        print(json.dumps(report.model_dump(mode="json"), indent=2))
    else:
        _print(report)
    return 0 if report.ok else 1


async def _report(app: Engine, args: argparse.Namespace) -> ReplayReport:
    try:
        return await app.check_replay(since=args.since, function=args.function)
    except EngineError as error:
        if args.function is not None and args.function not in app.functions:
            raise UsageError(str(error)) from None
        raise
    finally:
        await app.close()


def _print(report: ReplayReport) -> None:
    for problem in report.problems:
        asked = "nothing" if problem.asked_step is None else repr(problem.asked_step)
        print(
            f"{problem.run_id}  {problem.function_id}  {problem.status}  recorded "
            f"{problem.recorded_step!r}, the code asks for {asked}"
        )
        print(f"    {problem.message}")
    verdict = (
        "no run would fail"
        if report.ok
        else f"{len(report.problems)} would fail with a DeterminismError"
    )
    print(f"engine check-replay: {report.checked} run(s) replayed; {verdict}", file=sys.stderr)
