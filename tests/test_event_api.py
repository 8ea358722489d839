"""The HTTP event API (#15): POST /e/{event_key} takes one event or a list in Inngest's shape
and answers as Inngest does; every hostile body gets a clear 4xx and stores nothing; keys are
checked on every request (a revoked key is refused at once) with their prefixes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from helpers import eventually
from starlette.applications import Starlette

from engine import Context, Engine, RunStatus, TriggerEvent
from engine.events import MAX_DATA_BYTES
from engine.keys import create_key, revoke_key
from engine.web.event_api import MAX_BODY_BYTES, event_api_routes


@asynccontextmanager
async def serving(app: Engine) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the event API of ``app``, in process (the test's own event loop)."""
    web = Starlette(routes=event_api_routes())
    web.state.engine = app
    transport = httpx.ASGITransport(web)
    async with httpx.AsyncClient(transport=transport, base_url="http://engine") as client:
        yield client


@pytest.fixture
async def api(
    make_engine: Callable[..., Engine],
) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """A client, and the path of a live key that may send any name."""
    app = make_engine("api")
    key = (await create_key(app, "tests")).key
    async with serving(app) as client:
        yield client, f"/e/{key}"


async def stored(sql: asyncpg.Connection) -> tuple[int, int, int]:
    """What a request could have left: events, their dedup ids, and queued routings."""
    row = await sql.fetchrow(
        "SELECT (SELECT count(*) FROM engine.events) AS events,"
        " (SELECT count(*) FROM engine.event_ids) AS ids,"
        " (SELECT count(*) FROM engine.event_queue) AS queued"
    )
    assert row is not None
    return row["events"], row["ids"], row["queued"]


def refused(response: httpx.Response, status: int, reason: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == status and reason in body["error"], body
    assert response.headers["access-control-allow-origin"] == "*"


async def test_one_event_is_stored_and_starts_its_function(
    make_engine: Callable[..., Engine], sql: asyncpg.Connection
) -> None:
    """One posted event: Inngest's answer with its id, stored exactly as sent (nulls kept),
    routed to a function that a worker runs to completion."""
    app = make_engine("shop")

    @app.create_function("ship", trigger=TriggerEvent("shop/order.paid"))
    async def ship(ctx: Context) -> dict[str, Any]:
        return {"shipped": ctx.event.data["order"]}

    key = (await create_key(app, "shop", ["shop/"])).key
    async with serving(app) as client, app.worker():
        data = {"order": 42, "note": None, "lines": [{"sku": "a", "qty": 2}]}
        response = await client.post(f"/e/{key}", json={"name": "shop/order.paid", "data": data})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == 200 and len(body["ids"]) == 1
        [event_id] = body["ids"]
        runs = await app.runs_for_event(event_id, at_least=1)
        run = await app.wait_for_run(runs[0].run_id)
    assert run.status is RunStatus.COMPLETED and run.output == {"shipped": 42}
    row = await sql.fetchrow("SELECT name, data, v FROM engine.events WHERE id = $1", event_id)
    assert row is not None and json.loads(row["data"]) == data
    assert response.headers["access-control-allow-origin"] == "*"


async def test_a_list_keeps_its_order_and_inngest_fields(
    api: tuple[httpx.AsyncClient, str], make_engine: Callable[..., Engine]
) -> None:
    """A list: ids in order; `id` deduplicates as with app.send (the same id back, stored
    once); `ts` is milliseconds since 1970 (0: now), `v` is kept, data null is {}."""
    client, path = api
    app = make_engine("reader")
    ts = datetime(2026, 3, 1, 12, 30, 15, 250_000, tzinfo=UTC)
    batch = [
        {"name": "a/one", "data": {"i": 1}, "id": "order-1", "ts": int(ts.timestamp() * 1000)},
        {"name": "a/two", "data": None, "v": "2026-01-01.1", "ts": 0},
        {"name": "a/three"},
    ]
    response = await client.post(path, json=batch)
    assert response.status_code == 200, response.text
    ids = response.json()["ids"]
    assert ids[0] == "order-1" and len(set(ids)) == 3
    again = await client.post(path, json=batch[0])
    assert again.json() == {"ids": ["order-1"], "status": 200}
    page = await app.list_events(limit=10)
    events = {event.id: event for event in page.events}
    assert len(events) == 3
    assert events["order-1"].ts == ts and events["order-1"].data == {"i": 1}
    assert events[ids[1]].v == "2026-01-01.1" and events[ids[1]].data == {}
    now = datetime.now(UTC)
    assert abs(events[ids[1]].ts - now) < timedelta(minutes=1)


async def test_a_future_ts_schedules_the_runs(
    api: tuple[httpx.AsyncClient, str], sql: asyncpg.Connection
) -> None:
    """A `ts` in the future is when the event's runs are due, as with Event(ts=...)."""
    client, path = api
    later = datetime.now(UTC) + timedelta(hours=2)
    response = await client.post(
        path, json={"name": "a/later", "ts": int(later.timestamp() * 1000)}
    )
    [event_id] = response.json()["ids"]
    due = await sql.fetchval(
        "SELECT q.due_at FROM engine.event_queue q JOIN engine.events e USING (seq)"
        " WHERE e.id = $1",
        event_id,
    )
    assert abs(due - later) < timedelta(milliseconds=1)


HUGE = b'{"name": "a/b", "data": {"x": "' + b"y" * (MAX_BODY_BYTES + 10) + b'"}}'
DEEP = b'{"name": "a/b", "data": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
TOO_DEEP = b'{"name": "a/b", "data": {"x": ' + b"[" * 150 + b"]" * 150 + b"}}"
BIG_DATA = json.dumps({"name": "a/b", "data": {"x": "y" * MAX_DATA_BYTES}}).encode()
MANY = json.dumps([{"name": "a/b"}] * 5001).encode()
JSON = {"content-type": "application/json"}

# (what, body, headers, status, part of the reason)
HOSTILE: list[tuple[str, bytes, dict[str, str], int, str]] = [
    ("empty", b"", JSON, 400, "the body is empty"),
    ("blank", b" \n\t ", JSON, 400, "the body is empty"),
    ("invalid UTF-8", b'{"name": "a/\xff"}', JSON, 400, "not UTF-8 text (byte 12)"),
    ("a byte order mark", b'\xef\xbb\xbf{"name": "a/b"}', JSON, 400, "not JSON"),
    ("not JSON", b"name=a/b", {}, 400, "not JSON: Expecting value"),
    ("truncated", b'{"name": "a/b"', JSON, 400, "not JSON"),
    ("trailing data", b'{"name": "a/b"} {"name": "a/c"}', JSON, 400, "Extra data"),
    ("a string", b'"a/b"', JSON, 400, "not a string"),
    ("a number", b"42", JSON, 400, "not a number"),
    ("null", b"null", JSON, 400, "not null"),
    ("a boolean", b"true", JSON, 400, "not a boolean"),
    ("a list of numbers", b"[1, 2]", JSON, 400, "events[0]: an event is a JSON object"),
    ("a list of lists", b"[[]]", JSON, 400, "not a list"),
    ("too large", HUGE, JSON, 413, f"larger than {MAX_BODY_BYTES} bytes"),
    ("nested past recursion", DEEP, JSON, 400, "nested more than 100 levels"),
    ("nested past the limit", TOO_DEEP, JSON, 400, "nested more than 100 levels"),
    ("data too large", BIG_DATA, JSON, 400, "the limit is 524288"),
    ("too many events", MANY, JSON, 400, "cannot send 5001 events at once"),
    ("no name", b'{"data": {}}', JSON, 400, "name: Field required"),
    ("an empty name", b'{"name": ""}', JSON, 400, "name: String should have at least 1"),
    ("a name of another type", b'{"name": 5}', JSON, 400, "name: Input should be a valid string"),
    ("data not an object", b'{"name": "a/b", "data": [1]}', JSON, 400, "data: Input should be"),
    ("data a string", b'{"name": "a/b", "data": "x"}', JSON, 400, "data: Input should be"),
    ("an id of another type", b'{"name": "a/b", "id": 7}', JSON, 400, "id: Input should be"),
    ("an empty id", b'{"name": "a/b", "id": ""}', JSON, 400, "id is 0 characters long"),
    ("a v of another type", b'{"name": "a/b", "v": 1}', JSON, 400, "v: Input should be"),
    ("ts as text", b'{"name": "a/b", "ts": "2026-01-01"}', JSON, 400, "whole number of milli"),
    ("ts a boolean", b'{"name": "a/b", "ts": true}', JSON, 400, "whole number of milli"),
    ("ts a fraction", b'{"name": "a/b", "ts": 1.5}', JSON, 400, "whole number of milli"),
    ("ts past year 9999", b'{"name": "a/b", "ts": 253402300800000}', JSON, 400, "out of range"),
    ("ts far past", b'{"name": "a/b", "ts": -1e20}', JSON, 400, "out of range"),
    ("an unknown field", b'{"name": "a/b", "user": {}}', JSON, 400, "user: Extra inputs"),
    ("a reserved name", b'{"name": "engine/function.failed"}', JSON, 400, "reserved prefix"),
    ("a NUL in the name", b'{"name": "a/\\u0000"}', JSON, 400, "NUL character"),
    ("a NUL in data", b'{"name": "a", "data": {"x": "\\u0000"}}', JSON, 400, "NUL character"),
    ("a lone surrogate", b'{"name": "a", "data": {"\\ud800": 1}}', JSON, 400, "lone surrogate"),
    ("NaN", b'{"name": "a/b", "data": {"x": NaN}}', JSON, 400, "NaN is not a JSON number"),
    ("Infinity", b'{"name": "a/b", "data": {"x": -Infinity}}', JSON, 400, "not a JSON number"),
    ("beyond a double", b'{"name": "a/b", "data": {"x": 1e400}}', JSON, 400, "largest double"),
    ("a huge integer", b'{"name": "a", "data": {"x": ' + b"9" * 5000 + b"}}", JSON, 400, "double"),
    (
        "an integer past a double",
        b'{"name": "a", "data": {"x": 1' + b"0" * 310 + b"}}",
        JSON,
        400,
        "largest double",
    ),
    ("one bad event of a list", b'[{"name": "a/ok"}, {"name": ""}]', JSON, 400, "events[1]: "),
    ("XML", b"<event/>", {"content-type": "application/xml"}, 415, "must be JSON"),
    ("a form", b"x", {"content-type": "multipart/form-data; boundary=x"}, 415, "must be JSON"),
    (
        "Latin-1",
        b'{"name": "a/b"}',
        {"content-type": "application/json; charset=latin-1"},
        415,
        "must be UTF-8",
    ),
]


@pytest.mark.parametrize("case", HOSTILE, ids=[case[0] for case in HOSTILE])
async def test_a_hostile_body_gets_a_clear_4xx_and_stores_nothing(
    api: tuple[httpx.AsyncClient, str],
    sql: asyncpg.Connection,
    case: tuple[str, bytes, dict[str, str], int, str],
) -> None:
    """Each refused body is answered {"error": reason, "status": 4xx}; nothing is stored."""
    client, path = api
    _, body, headers, status, reason = case
    before = await stored(sql)
    refused(await client.post(path, content=body, headers=headers), status, reason)
    assert await stored(sql) == before == (0, 0, 0)


async def test_an_endless_body_is_cut_at_the_bound(
    api: tuple[httpx.AsyncClient, str], sql: asyncpg.Connection
) -> None:
    """A body with no length (chunked) is read chunk by chunk and refused once past the bound:
    an endless one is not read to its end."""
    client, path = api
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        head = b'{"name": "a/b", "data": {"x": "'
        sent += len(head)
        yield head
        while True:
            sent += 65536
            yield b"y" * 65536

    refused(await client.post(path, content=endless()), 413, "larger than")
    assert MAX_BODY_BYTES < sent <= MAX_BODY_BYTES + 2 * 65536
    assert await stored(sql) == (0, 0, 0)


async def test_json_plain_text_and_curl_forms_are_read_as_json(
    api: tuple[httpx.AsyncClient, str],
) -> None:
    """As Inngest does: no type, text/plain (a browser's request without preflight), +json and
    the form type `curl -d` sends are all read as JSON."""
    client, path = api
    for content_type in (
        None,
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "application/vnd.api+json",
        'application/json; charset="utf-8"',
    ):
        headers = {"content-type": content_type} if content_type else {}
        response = await client.post(path, content=b'{"name": "a/b"}', headers=headers)
        assert response.status_code == 200, (content_type, response.text)


async def test_unknown_and_revoked_keys_are_refused_at_once(
    make_engine: Callable[..., Engine], sql: asyncpg.Connection
) -> None:
    """401 for a key that does not exist (or is not one of ours at all); a revoked key is
    refused from the very next request; nothing stored by a refused request."""
    app = make_engine("api")
    key = (await create_key(app, "soon-revoked")).key
    event = {"name": "a/b"}
    async with serving(app) as client:
        assert (await client.post(f"/e/{key}", json=event)).status_code == 200
        for wrong in ("x" * 43, key[:-1], "short", "%00" * 20, "a b c d e f g h i j k l m n o p"):
            refused(await client.post(f"/e/{wrong}", json=event), 401, "unknown or revoked")
        await revoke_key(app, "soon-revoked")
        refused(await client.post(f"/e/{key}", json=event), 401, "unknown or revoked")
        refused(await client.post(f"/e/{key}", json=[]), 401, "unknown or revoked")
    assert await stored(sql) == (1, 0, 1)


async def test_a_key_limited_to_prefixes_sends_nothing_else(
    make_engine: Callable[..., Engine], sql: asyncpg.Connection
) -> None:
    """403 for a name outside the key's prefixes, naming it; a list with one such name stores
    none of its events; names inside are taken."""
    app = make_engine("api")
    key = (await create_key(app, "stripe", ["stripe/"])).key
    async with serving(app) as client:
        refused(await client.post(f"/e/{key}", json={"name": "github/push"}), 403, "github/push")
        mixed = [{"name": "stripe/charge"}, {"name": "stripe.fake/x"}]
        refused(await client.post(f"/e/{key}", json=mixed), 403, '"stripe.fake/x" is outside')
        assert await stored(sql) == (0, 0, 0)
        response = await client.post(f"/e/{key}", json=[{"name": "stripe/charge"}])
        assert response.status_code == 200
    assert await stored(sql) == (1, 0, 1)


async def test_cors_preflight_and_other_methods(api: tuple[httpx.AsyncClient, str]) -> None:
    """As Inngest's event API: a preflight from any origin is answered for POST (the key in
    the URL is the credential, no cookie); GET is not a method of the endpoint."""
    client, path = api
    preflight = await client.options(
        path,
        headers={
            "origin": "https://shop.example",
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type, x-inngest-sdk",
        },
    )
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert preflight.headers["access-control-allow-headers"] == "content-type, x-inngest-sdk"
    assert "access-control-allow-credentials" not in preflight.headers
    assert (await client.get(path)).status_code == 405


async def test_the_senders_traceparent_is_kept_and_a_bad_one_ignored(
    api: tuple[httpx.AsyncClient, str], sql: asyncpg.Connection
) -> None:
    """A W3C traceparent header joins the event (and its runs) to the sender's trace; one that
    is not valid is ignored, not a reason to refuse the event."""
    client, path = api
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    for header in (parent, "00-zz-bad-01"):
        response = await client.post(path, json={"name": "a/b"}, headers={"traceparent": header})
        assert response.status_code == 200
    rows = await sql.fetch("SELECT traceparent FROM engine.events ORDER BY seq")
    assert [row["traceparent"] for row in rows] == [parent, None]


async def test_a_database_that_cannot_be_reached_is_a_503(tmp_path: Any) -> None:
    """The sender may retry later: 503, and the reason stays in the server's log."""
    app = Engine("api", f"postgresql://postgres@/postgres?host={tmp_path}")
    try:
        async with serving(app) as client:
            response = await client.post("/e/" + "x" * 43, json={"name": "a/b"})
    finally:
        await app.close()
    refused(response, 503, "unavailable")
    assert str(tmp_path) not in response.text


async def test_runs_start_from_posted_events_as_from_app_send(
    make_engine: Callable[..., Engine],
) -> None:
    """A list posted starts one run per event, whose ctx.event has what was posted."""
    app = make_engine("shop")
    seen: list[dict[str, Any]] = []

    @app.create_function("note", trigger=TriggerEvent("shop/note"))
    async def note(ctx: Context) -> None:
        seen.append({"data": ctx.event.data, "id": ctx.event.id, "v": ctx.event.v})

    key = (await create_key(app, "notes", ["shop/"])).key
    async with serving(app) as client, app.worker():
        batch = [{"name": "shop/note", "data": {"n": n}, "v": "1"} for n in range(3)]
        response = await client.post(f"/e/{key}", json=batch)
        ids = response.json()["ids"]

        async def all_ran() -> bool:
            return len(seen) == 3

        await eventually(all_ran)
    assert sorted(s["data"]["n"] for s in seen) == [0, 1, 2]
    assert {s["id"] for s in seen} == set(ids) and {s["v"] for s in seen} == {"1"}


async def test_the_dashboard_serves_it_past_its_login_and_csrf_checks(
    make_engine: Callable[..., Engine], sql: asyncpg.Connection
) -> None:
    """In create_app (engine dev, engine dashboard) the event key is the authentication: a
    dashboard with a token, for a non-loopback host, takes a cross-site POST with no login
    and no CSRF token on /e/, while its pages still ask for a login."""
    from engine.web import create_app

    app = make_engine("api")
    key = (await create_key(app, "dashboard")).key
    web = create_app(app, token="s3cret-token")
    transport = httpx.ASGITransport(web)
    async with httpx.AsyncClient(transport=transport, base_url="https://dash.example") as client:
        response = await client.post(
            f"/e/{key}", json={"name": "a/b"}, headers={"origin": "https://shop.example"}
        )
        assert response.status_code == 200, response.text
        refused(await client.post("/e/" + "x" * 43, json={"name": "a/b"}), 401, "unknown")
        assert (await client.get("/events")).status_code == 303  # the login page
        assert (await client.options(f"/e/{key}")).status_code == 204
    assert await stored(sql) == (1, 0, 1)


async def test_a_client_that_goes_away_mid_body_stores_nothing(
    make_engine: Callable[..., Engine], sql: asyncpg.Connection
) -> None:
    """A sender that disconnects before its body ends gets a 400 (which nobody reads), not a
    server error, and nothing of its request is stored."""
    web = Starlette(routes=event_api_routes())
    web.state.engine = make_engine("api")
    path = "/e/" + (await create_key(web.state.engine, "gone")).key
    messages = iter(
        [
            {"type": "http.request", "body": b'{"name": "a/b", "da', "more_body": True},
            {"type": "http.disconnect"},
        ]
    )
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
        "server": ("engine", 80),
        "client": ("127.0.0.1", 50000),
        "scheme": "http",
        "root_path": "",
    }
    await web(scope, receive, send)
    assert sent[0]["status"] == 400
    assert b"went away" in sent[1]["body"]
    assert await stored(sql) == (0, 0, 0)
