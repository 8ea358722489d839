"""Events: what triggers functions.

An event has a ``name``, ``data`` (a JSON object), an optional ``id`` (a second event with the same
id within 24 hours is stored once and starts nothing) and an optional ``ts`` (a future ``ts``
schedules the runs it triggers for then). Names starting with ``engine/`` are reserved for the
events the engine sends itself.

The same limits hold in Python and in the database (``engine.check_event``), since events may
arrive by SQL: names of 1 to 512 characters, data up to 512 KiB of JSON, 5,000 events per send.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import InvalidEventError
from .serialization import NotSerializable, dumps, stored_size, text_problem

RESERVED_PREFIX = "engine/"
MAX_NAME_LENGTH = 512
MAX_DATA_BYTES = 512 * 1024
MAX_EVENTS_PER_SEND = 5000


class Event(BaseModel):
    """An event, as sent and as received by a function (``ctx.event``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=MAX_NAME_LENGTH)
    data: dict[str, Any] = Field(default_factory=dict)
    id: str | None = None
    ts: datetime | None = None
    v: str | None = None

    @field_validator("data", mode="before")
    @classmethod
    def _null_data_is_empty(cls, value: Any) -> Any:
        if value is None:
            return {}
        if isinstance(value, BaseModel):
            return value.model_dump(mode="json")
        return value

    @field_validator("ts")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("ts must be a timezone-aware datetime")
        return value


def validate_outgoing(events: Event | list[Event], *, system: bool = False) -> list[dict[str, Any]]:
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


def _check_text_fields(event: Event) -> None:
    """PostgreSQL text holds neither U+0000 nor lone surrogates: refuse them, naming the field."""
    for field in ("name", "id", "v"):
        value = getattr(event, field) or ""
        problem = text_problem(value)
        if problem is not None:
            raise InvalidEventError(f"event {field} {value!r} cannot be stored: {problem}")


def _checked(event: Any, system: bool) -> dict[str, Any]:
    if not isinstance(event, Event):
        try:
            event = Event.model_validate(event)
        except ValidationError as exc:
            raise InvalidEventError(f"invalid event: {exc}") from exc
    _check_text_fields(event)
    if not system and event.name.startswith(RESERVED_PREFIX):
        raise InvalidEventError(
            f"event name {event.name!r} uses the reserved prefix {RESERVED_PREFIX!r}"
        )
    try:
        size = stored_size(dumps(event.data))
    except NotSerializable as exc:
        raise InvalidEventError(f"event {event.name!r}: data cannot be stored: {exc}") from exc
    if size > MAX_DATA_BYTES:
        raise InvalidEventError(
            f"event {event.name!r}: data is {size} bytes; the limit is {MAX_DATA_BYTES}"
        )
    payload: dict[str, Any] = {"name": event.name, "data": event.data}
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
