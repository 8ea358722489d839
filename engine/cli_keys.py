"""``engine keys``: create, list and revoke the event keys of the HTTP event API (``keys.py``).

``engine keys create NAME [--prefix P ...]`` prints the new key on the last line of its output
(and nowhere else, ever: only its hash is stored), so that a script can take it with
``KEY=$(engine keys create NAME)``; what it created is said on stderr, first. ``engine keys
list`` never shows a key; ``engine keys revoke NAME`` refuses the key from the next request on.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import keys, render
from .cli_common import Failure, group, json_option, print_json, subcommand, with_engine
from .errors import EventKeyError


def add_commands(commands: Any) -> None:
    """Declares ``keys`` (create, list, revoke) among the engine command's subcommands."""
    keys_group = group(
        commands, "keys", "create, list and revoke the event keys of the HTTP event API"
    )
    create = subcommand(
        keys_group,
        "create",
        "create an event key for POST /e/{key}; prints it on its last line, the only time it"
        " is shown (only its hash is stored)",
        _create,
    )
    create.add_argument("name", type=_checked(keys.check_name), help="a name to list it by")
    create.add_argument(
        "--prefix",
        "-p",
        dest="prefixes",
        action="append",
        default=[],
        type=_checked(keys.check_prefix),
        metavar="PREFIX",
        help="let the key send only event names starting with PREFIX (repeat for several;"
        " none: any name)",
    )
    listing = subcommand(
        keys_group, "list", "every event key, live or revoked (never the keys)", _list
    )
    json_option(listing)
    revoke = subcommand(
        keys_group, "revoke", "revoke an event key: refused from the next request on", _revoke
    )
    revoke.add_argument("name", metavar="NAME")


def _checked(check: Callable[[str], str]) -> Callable[[str], str]:
    """An argument type that refuses what ``check`` refuses, before connecting (exit 2)."""

    def checked(text: str) -> str:
        try:
            return check(text)
        except EventKeyError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return checked


def _create(args: argparse.Namespace) -> int:
    try:
        created = with_engine(args, lambda app: keys.create_key(app, args.name, args.prefixes))
    except EventKeyError as error:
        raise Failure(str(error)) from None
    scope = ", ".join(created.prefixes) if created.prefixes else "any event name"
    print(
        f"engine keys create: created key {created.name!r} ({scope}); it is shown once, on the"
        " next line: store it now (POST /e/<key>)",
        file=sys.stderr,
        flush=True,
    )
    print(created.key)
    return 0


def _list(args: argparse.Namespace) -> int:
    found = with_engine(args, keys.list_keys)
    if args.json:
        print_json([key.model_dump(mode="json") for key in found])
    elif found:
        Console(highlight=False).print(keys_table(found))
    else:
        print("No event keys.")
    return 0


def keys_table(found: list[keys.EventKey]) -> Table:
    """One row per key: its name, prefixes, when it was created and revoked (UTC)."""
    grid = render.table("NAME", "PREFIXES", "CREATED", "REVOKED")
    for key in found:
        grid.add_row(
            Text(key.name, overflow="fold"),
            Text("\n".join(key.prefixes) or "(any name)"),
            Text(_when(key.created_at)),
            Text(_when(key.revoked_at), style="red") if key.revoked_at else Text("live", "green"),
        )
    return grid


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%SZ")


def _revoke(args: argparse.Namespace) -> int:
    try:
        revoked = with_engine(args, lambda app: keys.revoke_key(app, args.name))
    except EventKeyError as error:
        raise Failure(str(error)) from None
    print(f"{args.name}  revoked {_when(revoked)}: requests with it are refused")
    return 0
