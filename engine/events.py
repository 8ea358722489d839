"""Events: what triggers functions.

An event has a ``name``, ``data`` (a JSON object), an optional ``id`` (a second event with the same
id within 24 hours is stored once and starts nothing) and an optional ``ts`` (a future ``ts``
schedules the runs it triggers for then). Names starting with ``engine/`` are reserved for the
events the engine sends itself.

The same limits hold in Python and in the database (``engine.check_event``), since events may
arrive by SQL: names of 1 to 512 characters, ids and versions (``v``) of 1 to 512, data a JSON
object of at most 512 KiB, nested at most 100 levels deep (the data object is the first level),
with numbers a double can hold (magnitude at most 1.7976931348623157e308), a ``ts`` between
0001-01-02 and 9999-12-30 UTC, 5,000 events per send. Past these, Python could not read the
event back (its JSON decoders recurse, ``int()`` refuses more than 4,300 digits, ``datetime`` ends
at year 1 and 9999), and every router would fail on it.

Every refusal is an :class:`~engine.errors.InvalidEventError` with the reason, whether it comes
from ``Event(...)`` itself (an empty name, data that is not an object: pydantic's validation
error is turned into it), from :func:`validate_outgoing` (the limits above) or from the database.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Generic

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from typing_extensions import TypeVar

from .errors import InvalidEventError
from .serialization import (
    NotSerializable,
    dumps_plain,
    loads,
    loads_or_none,
    stored_size,
    text_problem,
    to_jsonable,
)

RESERVED_PREFIX = "engine/"
MAX_NAME_LENGTH = 512
MAX_DATA_BYTES = 512 * 1024
MAX_EVENTS_PER_SEND = 5000
MAX_ID_LENGTH = 512  # ids and versions: 2 KiB of UTF-8 at most, under a btree entry's ~2.7 KB
MAX_DEPTH = 100
MAX_NUMBER = sys.float_info.max
MIN_TS = datetime(1, 1, 2, tzinfo=UTC)
MAX_TS = datetime(9999, 12, 30, tzinfo=UTC)


DataT = TypeVar("DataT", default=dict[str, Any])
"""The type of an event's ``data``: a plain JSON object unless a schema types it."""


class Event(BaseModel, Generic[DataT]):
    """An event, as sent and as received by a function (``ctx.event``).

    ``Event`` holds its ``data`` as a plain dict. ``Event[OrderCreated]`` holds it as an
    ``OrderCreated`` (a pydantic model): what a function declared with a schema receives (see
    docs/typed-events.md); sent, it is stored as the model's JSON.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=MAX_NAME_LENGTH)
    # An unparametrized Event's data is a dict: the default, and what a model given is dumped to.
    data: DataT = Field(default_factory=dict)  # type: ignore[assignment]
    id: str | None = None
    ts: datetime | None = None
    v: str | None = None

    @model_validator(mode="wrap")
    @classmethod
    def _invalid_event_error(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """One error type for a refused event: pydantic's becomes InvalidEventError (which
        pydantic lets through, as it is no ValueError)."""
        try:
            return handler(value)
        except ValidationError as exc:
            reasons = "; ".join(
                f"{'.'.join(map(str, error['loc'])) or 'event'}: {error['msg']}"
                for error in exc.errors()
            )
            raise InvalidEventError(f"invalid event: {reasons}") from None

    @field_validator("data", mode="before")
    @classmethod
    def _null_data_is_empty(cls, value: Any) -> Any:
        if value is None:
            return {}
        # A model stays one in an Event[Model] (validated as it is), and becomes its JSON in a
        # plain Event, under its aliases so that the model reads its JSON back.
        if isinstance(value, BaseModel) and not cls.__pydantic_generic_metadata__["args"]:
            return plain_data(value)
        return value

    @field_validator("ts")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("ts must be a timezone-aware datetime")
        return value


def validate_outgoing(
    events: Event[Any] | dict[str, Any] | Sequence[Event[Any] | dict[str, Any]],
    *,
    system: bool = False,
) -> list[dict[str, Any]]:
    """Checks events before sending and returns their JSON form.

    Raises:
        InvalidEventError: with the reason, before anything is stored.
    """
    # One event may also come as a plain dict (a request body): it is validated the same way.
    batch = [events] if isinstance(events, Event | dict) else list(events)
    if len(batch) > MAX_EVENTS_PER_SEND:
        raise InvalidEventError(
            f"cannot send {len(batch)} events at once; the limit is {MAX_EVENTS_PER_SEND}"
        )
    return [_checked(event, system) for event in batch]


def _check_text_fields(event: Event[Any]) -> None:
    """PostgreSQL text holds neither U+0000 nor lone surrogates: refuse them, naming the field."""
    for field in ("name", "id", "v"):
        value = getattr(event, field) or ""
        problem = text_problem(value)
        if problem is not None:
            raise InvalidEventError(f"event {field} {value!r} cannot be stored: {problem}")


def _check_lengths(event: Event[Any]) -> None:
    for field in ("id", "v"):
        value = getattr(event, field)
        if value is not None and not 1 <= len(value) <= MAX_ID_LENGTH:
            raise InvalidEventError(
                f"event {event.name!r}: {field} is {len(value)} characters long;"
                f" the limit is 1 to {MAX_ID_LENGTH}"
            )


def _check_ts(event: Event[Any]) -> None:
    if event.ts is None:
        return
    try:
        in_range = MIN_TS <= event.ts.astimezone(UTC) <= MAX_TS
    except OverflowError:  # year 1 in a time zone east of UTC: before year 1 in UTC
        in_range = False
    if not in_range:
        raise InvalidEventError(
            f"event {event.name!r}: ts {event.ts.isoformat()} is out of range;"
            " it must be between 0001-01-02 and 9999-12-30 (UTC)"
        )


def json_problem(value: Any) -> str | None:
    """Why Python could not read ``value`` (plain JSON types) back from the database, or None.

    Walks iteratively (a hostile value may be nested deeper than Python recurses): no
    container at level ``MAX_DEPTH`` (the value itself is level 0), no number beyond a double.
    """
    pending: list[tuple[Any, int]] = [(value, 0)]
    while pending:
        item, level = pending.pop()
        if isinstance(item, dict | list):
            if level >= MAX_DEPTH:
                return f"it is nested more than {MAX_DEPTH} levels deep; the limit is {MAX_DEPTH}"
            children = item.values() if isinstance(item, dict) else item
            pending.extend((child, level + 1) for child in children)
        elif (
            isinstance(item, int | float) and not isinstance(item, bool) and abs(item) > MAX_NUMBER
        ):
            return f"it holds a number beyond +/-{MAX_NUMBER!r} (the largest double)"
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def plain_data(data: Any) -> Any:
    """An event's data as JSON types: a model (of an ``Event[Model]``) as its JSON under its
    aliases, which its own validation reads back."""
    if isinstance(data, BaseModel):
        return data.model_dump(mode="json", by_alias=True)
    return data


def _stored_data(event: Event[Any]) -> tuple[Any, int]:
    """The event's data as plain JSON values (what is stored) and its stored size, or
    InvalidEventError saying why it cannot be stored."""
    try:
        plain = to_jsonable(plain_data(event.data))
        problem = json_problem(plain)
        if problem is None:
            return plain, stored_size(dumps_plain(plain))
    except RecursionError:
        problem = f"it is nested more than {MAX_DEPTH} levels deep; the limit is {MAX_DEPTH}"
    except NotSerializable as exc:
        problem = str(exc)
    raise InvalidEventError(f"event {event.name!r}: data cannot be stored: {problem}")


def _checked(event: Any, system: bool) -> dict[str, Any]:
    if not isinstance(event, Event):
        event = Event.model_validate(event)  # raises InvalidEventError with the reason
    _check_text_fields(event)
    if not system and event.name.startswith(RESERVED_PREFIX):
        raise InvalidEventError(
            f"event name {event.name!r} uses the reserved prefix {RESERVED_PREFIX!r}"
        )
    _check_lengths(event)
    _check_ts(event)
    # The payload holds the data's plain form, walked once here: it is encoded as it is
    # (dumps_plain) on its way to the database.
    data, size = _stored_data(event)
    if size > MAX_DATA_BYTES:
        raise InvalidEventError(
            f"event {event.name!r}: data is {size} bytes; the limit is {MAX_DATA_BYTES}"
        )
    payload: dict[str, Any] = {"name": event.name, "data": data}
    if event.id is not None:
        payload["id"] = event.id
    if event.ts is not None:
        payload["ts"] = event.ts.isoformat()
    if event.v is not None:
        payload["v"] = event.v
    return payload


def event_from_row(row: dict[str, Any]) -> Event:
    """Builds the event a function sees from its stored JSON form."""
    return Event.model_validate(row)


class StoredEvent(BaseModel):
    """An event as the engine stored it (listings, ``engine events show``)."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    data: dict[str, Any]
    ts: datetime
    """When it happened (its runs start then, if later than ``received_at``)."""
    v: str | None = None
    received_at: datetime
    """When the engine stored it."""
    status: str
    """``pending`` (not routed yet, or due later), ``routed`` (its runs, if any, were
    started), ``dead-lettered`` (it could not be routed: ``error`` says why)."""
    error: dict[str, Any] | None = None
    runs: int
    """How many runs it started."""
    seq: int
    """Its place in the order events were stored."""


class EventPage(BaseModel):
    """A page of stored events, newest first."""

    model_config = ConfigDict(frozen=True)

    events: list[StoredEvent]
    cursor: str | None
    """Pass it back as ``cursor=`` for the next (older) page; None on the last page."""


def stored_event_from_row(row: Any) -> StoredEvent:
    """Builds a :class:`StoredEvent` from a row of the ``event_page`` query."""
    if row["dead_lettered_at"] is not None:
        status = "dead-lettered"
    else:
        status = "pending" if row["pending"] else "routed"
    return StoredEvent(
        id=row["id"],
        name=row["name"],
        data=loads(row["data"]),
        ts=row["ts"],
        v=row["v"],
        received_at=row["received_at"],
        status=status,
        error=loads_or_none(row["error"]),
        runs=row["runs"],
        seq=row["seq"],
    )
