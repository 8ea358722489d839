"""The HTTP event API: ``POST /e/{event_key}``, as Inngest's event API takes it.

A sender that speaks to Inngest (its JavaScript or Go SDK, a webhook relay, ``curl``) points at
us by changing a URL. The body is one event or a list, in Inngest's JSON shape: ``name``,
``data``, ``id``, ``ts`` (milliseconds since 1970-01-01 UTC; absent or 0: now) and ``v``. The
answer is Inngest's: ``{"ids": [...], "status": 200}``, or ``{"error": "...", "status": 4xx}``
with nothing of the request stored:

- 413: a body larger than :data:`MAX_BODY_BYTES` (read chunk by chunk, and no further);
- 415: a body that says it is not JSON (a ``Content-Type`` other than JSON, plain text or the
  form type ``curl -d`` sends: Inngest reads all three as JSON), or says a charset but UTF-8;
- 400: a body that is empty, not UTF-8, not JSON, nor an event or a list of them; an event
  ``app.send`` would refuse, with the reason it gives (:class:`~engine.InvalidEventError`);
- 401: no live key (unknown or revoked; a revocation counts from the next request);
- 403: an event name outside the key's prefixes;
- 503: the database cannot be reached or used right now (the sender may retry).

The body is read and checked before the key (one round trip checks the key and stores the
events: :func:`engine.keys.send_checked_with_key`), so a malformed request costs the database
nothing. As Inngest's, the endpoint answers CORS preflights for any origin: the key in the URL
is the credential, and no cookie is used.

:func:`event_api_routes` gives the route to put in a Starlette app whose ``state.engine`` is
the :class:`~engine.Engine` to send with (the dashboard's ``create_app`` does).
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn

import structlog
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from .. import keys
from ..db import is_infrastructure_error
from ..errors import (
    EventKeyScopeError,
    InvalidEventError,
    SchemaMissingError,
    UnknownEventKeyError,
)
from ..events import MAX_DATA_BYTES, MAX_DEPTH, MAX_EVENTS_PER_SEND, Event, validate_outgoing

if TYPE_CHECKING:
    from ..app import Engine

log = structlog.get_logger("engine")

MAX_BODY_BYTES = 4 * MAX_DATA_BYTES
"""The largest body taken (2 MiB): one event of the largest data (512 KiB stored) fits, with
room for JSON escapes and whitespace; a larger batch is sent in several requests."""

# Read as JSON, as Inngest does: no type (or plain text, what a browser sends without a CORS
# preflight), JSON, and the form type that `curl -d` sends by default.
_JSON_TYPES = frozenset({"", "application/json", "text/plain", "application/x-www-form-urlencoded"})
_CORS = {"Access-Control-Allow-Origin": "*"}
_PREFLIGHT_MAX_AGE = "3600"  # seconds a browser keeps a preflight's answer (Inngest's hour)
_TRACEPARENT = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_INT_DIGITS = 400  # an integer of more digits is beyond a double: refused at once


class Refused(Exception):
    """A request refused before any event is stored: its status and the reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def event_api_routes() -> list[BaseRoute]:
    """The route of ``POST /e/{event_key}`` (and its CORS preflight), for a Starlette app
    whose ``state.engine`` is the :class:`~engine.Engine` to send with."""
    return [Route("/e/{event_key}", receive_events, methods=["POST", "OPTIONS"], name="events")]


async def receive_events(request: Request) -> Response:
    """Stores the events of the body with the key of the path; answers as Inngest does."""
    if request.method == "OPTIONS":
        return _preflight(request)
    try:
        payload = await read_events(request)
        ids = await keys.send_checked_with_key(
            _engine(request),
            request.path_params["event_key"],
            payload,
            traceparent=_traceparent(request),
        )
    except Exception as error:
        refusal = _refusal(error)
        if refusal is None:
            raise
        return _error(*refusal)
    return JSONResponse({"ids": ids, "status": 200}, headers=_CORS)


# What each refusal answers; an error of none of these is the server's own (500).
_STATUSES: tuple[tuple[type[Exception], int], ...] = (
    (UnknownEventKeyError, 401),
    (EventKeyScopeError, 403),
    (InvalidEventError, 400),
)


def _refusal(error: Exception) -> tuple[int, str] | None:
    """The status and reason that answer ``error``, or None if it is no refusal."""
    if isinstance(error, Refused):
        return error.status, str(error)
    for kind, status in _STATUSES:
        if isinstance(error, kind):
            return status, str(error)
    if isinstance(error, SchemaMissingError) or is_infrastructure_error(error):
        # The sender may retry; what went wrong is for the server's log, not for it.
        log.warning("event_api.unavailable", error=f"{type(error).__name__}: {error}")
        return 503, "the database is unavailable right now; try again later"
    return None


def _engine(request: Request) -> Engine:
    engine: Engine | None = getattr(request.app.state, "engine", None)
    if engine is None:
        raise RuntimeError("the app serving event_api_routes() needs state.engine (an Engine)")
    return engine


def _error(status: int, reason: str) -> Response:
    return JSONResponse({"error": reason, "status": status}, status_code=status, headers=_CORS)


def _preflight(request: Request) -> Response:
    asked = request.headers.get("access-control-request-headers")
    return Response(
        status_code=204,
        headers={
            **_CORS,
            "Access-Control-Allow-Methods": "POST, OPTIONS",
            "Access-Control-Allow-Headers": asked or "Content-Type",
            "Access-Control-Max-Age": _PREFLIGHT_MAX_AGE,
            "Vary": "Access-Control-Request-Headers",
        },
    )


def _traceparent(request: Request) -> str | None:
    """The sender's W3C traceparent (version 00), so that runs join its trace; one that is
    not valid is ignored, as the W3C recommendation says."""
    given = request.headers.get("traceparent", "").strip()
    return given if _TRACEPARENT.fullmatch(given) else None


# -- the body --------------------------------------------------------------------------------------
async def read_events(request: Request) -> list[dict[str, Any]]:
    """The events of the request's body, checked as ``app.send`` checks them (their JSON form,
    for :func:`engine.keys.send_checked_with_key`).

    Raises:
        Refused: with the status and reason to answer.
    """
    _check_content_type(request.headers.get("content-type", ""))
    body = _decoded(await _body(request))
    single = isinstance(body, dict)
    if not single and not isinstance(body, list):
        raise Refused(
            400,
            "the body must be an event (a JSON object) or a list of events,"
            f" not {_json_type(body)}",
        )
    batch: list[Any] = [body] if single else body
    if len(batch) > MAX_EVENTS_PER_SEND:
        raise Refused(
            400, f"cannot send {len(batch)} events at once; the limit is {MAX_EVENTS_PER_SEND}"
        )
    return [_checked(raw, None if single else index) for index, raw in enumerate(batch)]


def _check_content_type(header: str) -> None:
    media, _, parameters = header.partition(";")
    media = media.strip().lower()
    if media not in _JSON_TYPES and not media.endswith("+json"):
        raise Refused(415, f"the body must be JSON (Content-Type: application/json), not {media}")
    for parameter in parameters.split(";"):
        name, _, value = parameter.partition("=")
        charset = value.strip().strip('"').lower()
        if name.strip().lower() == "charset" and charset not in ("utf-8", "utf8"):
            raise Refused(415, f"the body must be UTF-8, not {charset}")


async def _body(request: Request) -> bytes:
    """The body, read chunk by chunk up to :data:`MAX_BODY_BYTES` and no further."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and (len(declared) > 12 or int(declared) > MAX_BODY_BYTES):
        _too_large()
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                _too_large()
            chunks.append(chunk)
    except ClientDisconnect:  # nobody will read the answer; it only must not be a 500
        raise Refused(400, "the client went away before the end of the body") from None
    return b"".join(chunks)


def _too_large() -> NoReturn:
    raise Refused(
        413,
        f"the body is larger than {MAX_BODY_BYTES} bytes: send the events in several requests",
    )


def _decoded(body: bytes) -> Any:
    """The body's JSON value, read with Python's own parser (integers stay exact, as they do
    through ``app.send``), refusing what no event may hold before it is built."""
    try:
        text = body.decode()
    except UnicodeDecodeError as error:
        raise Refused(400, f"the body is not UTF-8 text (byte {error.start})") from None
    if not text.strip():
        raise Refused(400, "the body is empty: send an event (a JSON object) or a list of events")
    try:
        return json.loads(
            text, parse_constant=_no_constant, parse_float=_finite, parse_int=_bounded_int
        )
    except RecursionError:
        raise Refused(
            400, f"the body is nested more than {MAX_DEPTH} levels deep; the limit is {MAX_DEPTH}"
        ) from None
    except json.JSONDecodeError as error:
        raise Refused(
            400, f"the body is not JSON: {error.msg} (line {error.lineno} column {error.colno})"
        ) from None
    except ValueError as error:
        raise Refused(400, f"the body is not JSON an event may hold: {error}") from None


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        _beyond_double(text)
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        _beyond_double(text)
    return int(text)


def _beyond_double(text: str) -> NoReturn:
    shown = text if len(text) <= 24 else f"{text[:12]}...({len(text)} characters)"
    raise ValueError(f"{shown} is beyond +/-1.7976931348623157e308 (the largest double)")


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    return "null" if value is None else "a number"


# -- one event -------------------------------------------------------------------------------------
def _checked(raw: Any, index: int | None) -> dict[str, Any]:
    """One event of the body, in Inngest's shape, checked as ``app.send`` checks it.

    Raises:
        InvalidEventError: the reason, prefixed with the event's place in a list.
    """
    try:
        return validate_outgoing(_event(raw))[0]
    except InvalidEventError as error:
        if index is None:
            raise
        raise InvalidEventError(f"events[{index}]: {error}") from None


def _event(raw: Any) -> Event:
    if not isinstance(raw, dict):
        raise InvalidEventError(f"an event is a JSON object, not {_json_type(raw)}")
    fields = dict(raw)
    ts = fields.pop("ts", None)
    if ts is not None and ts != 0:  # Inngest's 0: not given (now)
        fields["ts"] = _moment(ts, fields.get("name"))
    return Event.model_validate(fields)


def _moment(ts: Any, name: Any) -> datetime:
    """Inngest's ``ts``, milliseconds since 1970-01-01 UTC, as the event's aware ``ts``."""
    whole = isinstance(ts, float) and ts.is_integer()
    if not (isinstance(ts, int) and not isinstance(ts, bool)) and not whole:
        raise InvalidEventError(
            f"event {name!r}: ts must be a whole number of milliseconds since 1970-01-01 UTC,"
            f" not {json.dumps(ts)[:40]}"
        )
    try:
        return _EPOCH + timedelta(milliseconds=int(ts))
    except OverflowError:
        raise InvalidEventError(
            f"event {name!r}: ts {int(ts)} is out of range; it must be between 0001-01-02 and"
            " 9999-12-30 (UTC)"
        ) from None
