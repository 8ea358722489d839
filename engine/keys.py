"""Event keys: what authenticates a sender of the HTTP event API (``POST /e/{key}``).

A key is a random token of 256 bits (:func:`secrets.token_urlsafe`), shown once when it is
created; the database keeps only its SHA-256 (``engine.event_keys``), which cannot be used to
send. A key may be limited to event name prefixes: an event whose name starts with none of them
is refused. Revoking a key refuses it from the next request on: every send checks the key in
the same statement that stores the events (``engine.send_events_with_key``), with no cache.

``engine keys create NAME [--prefix P ...]``, ``engine keys list`` and ``engine keys revoke
NAME`` call these functions (``cli_keys.py``); the HTTP endpoint calls :func:`send_with_key`
(``web/event_api.py``).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from .errors import EventKeyError, UnknownEventKeyError
from .events import MAX_NAME_LENGTH, RESERVED_PREFIX, Event, validate_outgoing
from .serialization import dumps_plain, text_problem

if TYPE_CHECKING:
    from .app import Engine

KEY_BYTES = 32
"""Random bytes in a key: 256 bits, written in 43 URL-safe characters."""
MAX_PREFIXES = 100
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# What token_urlsafe writes: anything else is no key of ours, refused without a round trip.
_KEY = re.compile(r"[A-Za-z0-9_-]{32,128}")


class EventKey(BaseModel):
    """An event key as listed: never the key itself, which is not stored."""

    model_config = ConfigDict(frozen=True)

    name: str
    prefixes: list[str]
    """The event name prefixes it may send; empty: any name (but ``engine/``)."""
    created_at: datetime
    revoked_at: datetime | None = None
    """When it was revoked (refused from then on); None while it is live."""


class NewEventKey(EventKey):
    """A key just created, with the key itself: the only time it is known."""

    key: str = Field(repr=False)


def check_name(name: str) -> str:
    """``name`` if it is a valid key name (1 to 100 letters, digits, ``.``, ``_`` or ``-``,
    starting with a letter or a digit).

    Raises:
        EventKeyError: saying why it is not.
    """
    if not _NAME.fullmatch(name):
        raise EventKeyError(
            f"event key name {name!r} is not valid: 1 to 100 letters, digits, '.', '_' or '-',"
            " starting with a letter or a digit"
        )
    return name


def check_prefix(prefix: str) -> str:
    """``prefix`` if an event name could start with it (1 to 512 characters, not reserved).

    Raises:
        EventKeyError: saying why it could not.
    """
    if not 1 <= len(prefix) <= MAX_NAME_LENGTH:
        raise EventKeyError(f"prefix {prefix!r}: prefixes have 1 to {MAX_NAME_LENGTH} characters")
    problem = text_problem(prefix)
    if problem is not None:
        raise EventKeyError(f"prefix {prefix!r} cannot be stored: {problem}")
    if prefix.startswith(RESERVED_PREFIX):
        raise EventKeyError(
            f"prefix {prefix!r} is under the reserved {RESERVED_PREFIX!r}: no key may send there"
        )
    return prefix


def _checked_prefixes(prefixes: Iterable[str]) -> list[str]:
    unique = list(dict.fromkeys(check_prefix(prefix) for prefix in prefixes))
    if len(unique) > MAX_PREFIXES:
        raise EventKeyError(f"{len(unique)} prefixes; a key has {MAX_PREFIXES} at most")
    return unique


def generate_key() -> str:
    """A new random key (256 bits, URL-safe: it goes into the endpoint's path)."""
    return secrets.token_urlsafe(KEY_BYTES)


async def create_key(app: Engine, name: str, prefixes: Iterable[str] = ()) -> NewEventKey:
    """Creates the key ``name``, limited to ``prefixes`` (none: any event name).

    The key is in the result and nowhere else: the database keeps its hash.

    Raises:
        EventKeyError: the name or a prefix is not valid, or a key of that name exists (names
            are never reused, even once revoked).
    """
    chosen = _checked_prefixes(prefixes)
    key = generate_key()
    db = await app.database()
    created: datetime = await db.fetchval("create_event_key", check_name(name), key, chosen)
    return NewEventKey(name=name, prefixes=chosen, created_at=created, key=key)


async def list_keys(app: Engine) -> list[EventKey]:
    """Every key, live or revoked, oldest first (without the keys, which are not stored)."""
    db = await app.database()
    return [EventKey(**dict(row)) for row in await db.fetch("list_event_keys")]


async def revoke_key(app: Engine, name: str) -> datetime:
    """Revokes the key ``name``: it is refused from the next request on. Returns when it was
    revoked (the first time, if it was already).

    Raises:
        EventKeyError: no key has that name.
    """
    db = await app.database()
    revoked: datetime | None = await db.fetchval("revoke_event_key", name)
    if revoked is None:
        raise EventKeyError(f"no event key named {name!r}")
    return revoked


async def send_with_key(
    app: Engine,
    key: str,
    events: Event | dict[str, Any] | Sequence[Event | dict[str, Any]],
    *,
    traceparent: str | None = None,
) -> list[str]:
    """Sends events as :meth:`Engine.send <engine.Engine.send>` does, with the event key
    ``key``, in one round trip; returns their ids.

    Raises:
        InvalidEventError: an event was refused (the reasons ``app.send`` gives).
        UnknownEventKeyError: no live key is ``key`` (unknown, or revoked).
        EventKeyScopeError: an event's name starts with none of the key's prefixes.

        In every case nothing of this call was stored.
    """
    return await send_checked_with_key(app, key, validate_outgoing(events), traceparent=traceparent)


async def send_checked_with_key(
    app: Engine, key: str, payload: list[dict[str, Any]], *, traceparent: str | None = None
) -> list[str]:
    """:func:`send_with_key` for events checked already: ``payload`` is what
    :func:`~engine.events.validate_outgoing` returned (the database checks them again, and
    refuses what it would have refused)."""
    if not _KEY.fullmatch(key):
        raise UnknownEventKeyError("unknown or revoked event key")
    db = await app.database()
    rows = await db.fetch("send_events_with_key", key, dumps_plain(payload), traceparent)
    return [row["id"] for row in rows]
