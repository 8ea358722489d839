"""The commands that show what ran and act on it: ``engine runs`` (list, show, cancel, rerun),
``engine events`` (list, show, replay) and ``engine functions list``.

They go through the public :class:`~engine.Engine` API, with an Engine of app id ``engine-cli``
that declares no function, and see every app of the database. Tables for people (``render.py``;
rich fits them to the terminal, and to 80 columns without colours when piped); ``--json`` for
scripts: the API's models as JSON (``engine runs show --json`` prints
``RunInfo.model_dump(mode="json")``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from rich.console import Console

from . import render
from .app import MAX_PAGE, Engine
from .cli_common import (
    Failure,
    UsageError,
    duration,
    group,
    json_option,
    print_json,
    read_database_option,
    routing_outcome,
    subcommand,
    timestamp,
    with_engine,
)
from .cursors import parse_event_cursor, parse_run_cursor
from .durations import parse_duration
from .errors import RunNotFoundError
from .events import Event
from .runs import RunStatus, summary_of

WIDE = 110  # columns from which engine runs list also shows each run's event


def add_commands(commands: Any) -> None:
    """Declares ``runs``, ``events`` and ``functions`` among the engine command's
    subcommands."""
    _runs_parser(commands)
    _events_parser(commands)
    _functions_parser(commands)


# -- arguments -------------------------------------------------------------------------------------
def moment(text: str) -> datetime:
    """A time option: ISO 8601 with a zone, or a duration meaning that long ago (``2h``)."""
    try:
        ago = parse_duration(text)
    except ValueError:
        return timestamp(text)
    return datetime.now(UTC) - ago


def _limit(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_PAGE:
        raise argparse.ArgumentTypeError(f"{text!r} is not a page size from 1 to {MAX_PAGE}")
    return int(text)


def _cursor_of(parse: Callable[[str], object]) -> Callable[[str], str]:
    def checked(text: str) -> str:
        try:
            parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return text

    return checked


def _page_options(
    parser: argparse.ArgumentParser, what: str, parse_cursor: Callable[[str], object]
) -> None:
    parser.add_argument(
        "--since", type=moment, help=f"{what} at or after: ISO 8601 with a zone, or 2h (ago)"
    )
    parser.add_argument("--until", type=moment, help=f"{what} before (same forms)")
    parser.add_argument("--limit", type=_limit, default=20, help="rows per page")
    parser.add_argument(
        "--cursor",
        type=_cursor_of(parse_cursor),
        help="where the previous page ended (printed under it): the next page",
    )
    json_option(parser)


def _runs_parser(commands: Any) -> None:
    runs = group(commands, "runs", "list, show, cancel and rerun runs")
    listing = subcommand(
        runs, "list", "runs of every app, newest first, a page at a time", _runs_list
    )
    listing.add_argument("--function", "-f", help="one function's runs (its id, in any app)")
    listing.add_argument(
        "--status",
        "-s",
        action="append",
        type=str.upper,
        choices=[status.value for status in RunStatus],
        metavar="STATUS",
        help="runs in this status (repeat for several): QUEUED, RUNNING, SLEEPING, RETRYING,"
        " WAITING, COMPLETED, FAILED, CANCELLED, SKIPPED",
    )
    listing.add_argument("--event", "-e", help="runs started by events of this name")
    _page_options(listing, "runs created", parse_run_cursor)
    read_database_option(listing)
    show = subcommand(
        runs,
        "show",
        "a run: its steps with every attempt, its pauses, and a timeline of where time went",
        _runs_show,
    )
    show.add_argument("run_id", metavar="RUN_ID")
    json_option(show)
    read_database_option(show)
    cancel = subcommand(
        runs, "cancel", "cancel runs (one executing ends between steps)", _runs_cancel
    )
    cancel.add_argument("run_ids", metavar="RUN_ID", nargs="+")
    json_option(cancel)
    rerun = subcommand(
        runs, "rerun", "start a run's function again with the same event", _runs_rerun
    )
    rerun.add_argument("run_id", metavar="RUN_ID")
    rerun.add_argument(
        "--from-step",
        metavar="STEP_ID",
        help="keep the outputs of the steps recorded before this one and resume from it",
    )


def _events_parser(commands: Any) -> None:
    events = group(commands, "events", "list, show and replay events")
    listing = subcommand(
        events, "list", "stored events, newest first, a page at a time", _events_list
    )
    listing.add_argument("--name", "-n", help="events of this name")
    _page_options(listing, "events received", parse_event_cursor)
    read_database_option(listing)
    show = subcommand(events, "show", "an event, its data and the runs it started", _events_show)
    show.add_argument("event_id", metavar="EVENT_ID")
    json_option(show)
    read_database_option(show)
    replay = subcommand(
        events,
        "replay",
        "send a copy of an event: same name, data and version, a new id and time (so its"
        " deduplication does not apply); prints the new id",
        _events_replay,
    )
    replay.add_argument("event_id", metavar="EVENT_ID")
    replay.add_argument(
        "--wait",
        type=duration,
        default="2s",
        help="how long to wait for a worker to route the copy, to say which runs it started",
    )


def _functions_parser(commands: Any) -> None:
    functions = group(commands, "functions", "the function registry")
    listing = subcommand(
        functions,
        "list",
        "registered functions: triggers, flow control, active or not (an inactive function is"
        " one no live worker served for a while: new events do not start it), live workers,"
        " runs by status",
        _functions_list,
    )
    listing.add_argument("--app", default=None, help="one app's functions (default: all)")
    json_option(listing)
    read_database_option(listing)


# -- plumbing --------------------------------------------------------------------------------------
def _console() -> Console:
    return Console(highlight=False)


def _run_id(text: str) -> str:
    try:
        return str(UUID(text))
    except ValueError:
        raise UsageError(f"{text!r} is not a run id: run ids are UUIDs") from None


def _next_page(cursor: str | None) -> None:
    if cursor is not None:
        print(f"more: the next page is --cursor {cursor}", file=sys.stderr)


# -- runs ------------------------------------------------------------------------------------------
def _runs_list(args: argparse.Namespace) -> int:
    page = with_engine(
        args,
        lambda app: app.list_run_summaries(
            args.function,
            args.status,
            event_name=args.event,
            since=args.since,
            until=args.until,
            limit=args.limit,
            cursor=args.cursor,
            all_apps=True,
        ),
    )
    if args.json:
        print_json(page.model_dump(mode="json"))
    elif page.runs:
        console = _console()
        wide = console.width >= WIDE
        console.print(render.runs_table(page.runs, datetime.now(UTC), with_event=wide))
    else:
        print("No runs.")
    _next_page(page.cursor)
    return 0


def _runs_show(args: argparse.Namespace) -> int:
    run_id = _run_id(args.run_id)
    try:
        info = with_engine(args, lambda app: app.get_run(run_id))
    except RunNotFoundError:
        raise Failure(f"no run {run_id}") from None
    if args.json:
        print_json(info.model_dump(mode="json"))
    else:
        _console().print(render.run_view(info, datetime.now(UTC)))
    return 0


def _runs_cancel(args: argparse.Namespace) -> int:
    run_ids = [_run_id(text) for text in args.run_ids]

    async def cancel(app: Engine) -> dict[str, RunStatus | None]:
        found: dict[str, RunStatus | None] = {}
        for run_id in run_ids:
            try:
                found[run_id] = await app.cancel_run(run_id)
            except RunNotFoundError:
                found[run_id] = None
        return found

    results = with_engine(args, cancel)
    if args.json:
        print_json([{"run_id": k, "status": v} for k, v in results.items()])
    else:
        for run_id, status in results.items():
            if status is not None:
                print(f"{run_id}  {_cancel_outcome(status)}")
    missing = [run_id for run_id, status in results.items() if status is None]
    if missing:
        raise Failure(f"no run {', '.join(missing)}")
    return 0


def _cancel_outcome(status: RunStatus) -> str:
    if status is RunStatus.CANCELLED:
        return "CANCELLED"
    if status is RunStatus.RUNNING:
        return "RUNNING: cancel requested; it ends after the step executing now"
    return f"{status}: already over, nothing to cancel"


def _runs_rerun(args: argparse.Namespace) -> int:
    run_id = _run_id(args.run_id)

    async def rerun(app: Engine) -> str:
        try:
            steps = [step.step_id for step in (await app.get_run(run_id)).steps]
        except RunNotFoundError:
            raise Failure(f"no run {run_id}") from None
        if args.from_step is not None and args.from_step not in steps:
            known = ", ".join(steps) or "none"
            raise UsageError(f"run {run_id} has no step {args.from_step!r}; its steps: {known}")
        return await app.rerun(run_id, args.from_step)

    new_id = with_engine(args, rerun)
    print(new_id)
    print(f"engine runs rerun: started run {new_id}", file=sys.stderr)
    return 0


# -- events ----------------------------------------------------------------------------------------
def _events_list(args: argparse.Namespace) -> int:
    page = with_engine(
        args,
        lambda app: app.list_events(
            args.name, since=args.since, until=args.until, limit=args.limit, cursor=args.cursor
        ),
    )
    if args.json:
        print_json(page.model_dump(mode="json"))
    elif page.events:
        _console().print(render.events_table(page.events, datetime.now(UTC)))
    else:
        print("No events.")
    _next_page(page.cursor)
    return 0


def _events_show(args: argparse.Namespace) -> int:
    async def show(app: Engine) -> tuple[Any, list[Any]]:
        event = await app.get_event(args.event_id)
        if event is None:
            raise Failure(f"no event {args.event_id}")
        runs = await app.runs_for_event(args.event_id)
        return event, [summary_of(r) for r in runs]

    event, runs = with_engine(args, show)
    if args.json:
        print_json(
            {
                "event": event.model_dump(mode="json"),
                "runs": [r.model_dump(mode="json") for r in runs],
            }
        )
    else:
        _console().print(render.event_view(event, runs, datetime.now(UTC)))
    return 0


def _events_replay(args: argparse.Namespace) -> int:
    async def replay(app: Engine) -> tuple[str, str]:
        original = await app.get_event(args.event_id)
        if original is None:
            raise Failure(f"no event {args.event_id}")
        copy = Event(name=original.name, data=original.data, v=original.v)
        [new_id] = await app.send(copy)
        return new_id, await routing_outcome(app, copy, new_id, args.wait)

    new_id, outcome = with_engine(args, replay)
    print(new_id)
    print(f"engine events replay: {outcome}", file=sys.stderr)
    return 0


# -- functions -------------------------------------------------------------------------------------
def _functions_list(args: argparse.Namespace) -> int:
    functions = with_engine(args, lambda app: app.list_functions(all_apps=True))
    if args.app is not None:
        functions = [f for f in functions if f.app_id == args.app]
    if args.json:
        print_json([f.model_dump(mode="json") for f in functions])
    elif functions:
        _console().print(render.functions_table(functions))
    else:
        print("No functions.")
    return 0
