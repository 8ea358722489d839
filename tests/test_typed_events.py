"""Typed events: pydantic schemas on triggers, sends, waits and send_event steps."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import textwrap
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from helpers import eventually, move_clock, only_run_id, status_is
from pydantic import BaseModel, Field, RootModel

from engine import (
    Batch,
    ConfigurationError,
    Context,
    Engine,
    Event,
    EventSchemaError,
    InvalidEventError,
    RunStatus,
    StepError,
    TriggerEvent,
)


class OrderCreated(BaseModel):
    order_id: str
    total: float
    items: list[str] = Field(default_factory=list)


class Paid(BaseModel):
    order_id: str
    amount: int


def typed_order(app: Engine) -> list[Any]:
    """``order``: typed by OrderCreated; records what it saw of its event, across a sleep."""
    seen: list[Any] = []

    @app.create_function("order", trigger=TriggerEvent("order/created", schema=OrderCreated))
    async def order(ctx: Context[OrderCreated]) -> dict[str, Any]:
        seen.append(ctx.event.data)
        await ctx.step.sleep("nap", "1h")
        return {"total": ctx.event.data.total, "type": type(ctx.event.data).__name__}

    return seen


async def test_the_function_receives_its_schema_instance_on_every_execution(
    make_engine: Any, sql: asyncpg.Connection
) -> None:
    """ctx.event.data is an OrderCreated (coerced as pydantic does: "120.5" is a float), before
    and after a sleep: each execution validates the same stored event the same way."""
    app = make_engine()
    seen = typed_order(app)
    async with app.worker(poll_interval="50ms"):
        [event_id] = await app.send(
            Event(name="order/created", data={"order_id": "A-1", "total": "120.5"})
        )
        run_id = await only_run_id(app, event_id)
        await eventually(lambda: status_is(app, run_id, RunStatus.SLEEPING))
        await move_clock(sql, timedelta(hours=2))
        run = await app.wait_for_run(run_id)
    assert run.status is RunStatus.COMPLETED, run.error
    assert run.output == {"total": 120.5, "type": "OrderCreated"}
    assert seen == [OrderCreated(order_id="A-1", total=120.5)] * 2
    stored = await app.get_event(event_id)
    assert stored is not None and stored.data == {"order_id": "A-1", "total": "120.5"}


async def test_send_refuses_an_event_its_schema_refuses_and_stores_nothing(
    make_engine: Any, sql: asyncpg.Connection
) -> None:
    """Engine(event_schemas=...): the whole send is refused with pydantic's message."""
    app = make_engine(event_schemas={"order/created": OrderCreated})
    good = Event(name="order/created", data={"order_id": "A-1", "total": 3})
    bad = Event(name="order/created", data={"order_id": "A-2", "total": "lots"})
    with pytest.raises(InvalidEventError) as raised:
        await app.send([good, bad])
    message = str(raised.value)
    assert "does not match its schema OrderCreated" in message
    assert "total" in message and "Input should be a valid number" in message
    assert type(raised.value.__cause__).__name__ == "ValidationError"
    assert await sql.fetchval("SELECT count(*) FROM engine.events") == 0
    assert len(await app.send(good)) == 1


async def test_a_send_checks_and_stores_the_json_form_of_its_data(
    make_engine: Any, sql: asyncpg.Connection
) -> None:
    """A dataclass inside an event's data is stored as its JSON object, and event_schemas check
    that JSON form: the data is turned into plain JSON values once, when the send checks it,
    and the same values are checked and stored."""

    @dataclasses.dataclass
    class Customer:
        name: str
        vip: bool

    class Signup(BaseModel):
        customer: dict[str, Any]
        plan: str

    app = make_engine(event_schemas={"user/signup": Signup})
    data = {"customer": Customer("Ada", vip=True), "plan": "pro"}
    [event_id] = await app.send(Event(name="user/signup", data=data))
    stored = await sql.fetchval("SELECT data FROM engine.events WHERE id = $1", event_id)
    assert json.loads(stored) == {"customer": {"name": "Ada", "vip": True}, "plan": "pro"}


async def test_a_trigger_schema_does_not_guard_sends(make_engine: Any) -> None:
    """A trigger's schema types what its function receives; only event_schemas guard sends (two
    functions may take two versions of one event: see the test on ``v``)."""
    app = make_engine()
    typed_order(app)
    assert len(await app.send(Event(name="order/created", data={"total": 1}))) == 1


async def test_a_typed_event_is_sent_as_its_json_under_its_aliases(make_engine: Any) -> None:
    """Event[Model] keeps the model; the stored data is its JSON, which the model reads back."""

    class Aliased(BaseModel):
        order_id: str = Field(alias="orderId")

    app = make_engine(event_schemas={"aliased": Aliased})
    event = Event[Aliased](name="aliased", data=Aliased(orderId="A-9"))
    assert event.data.order_id == "A-9"
    [event_id] = await app.send(event)
    stored = await app.get_event(event_id)
    assert stored is not None and stored.data == {"orderId": "A-9"}
    # A plain Event given a model holds its JSON.
    assert Event(name="aliased", data=Aliased(orderId="x")).data == {"orderId": "x"}


async def test_an_event_sent_by_sql_that_does_not_validate_fails_its_run_only(
    make_engine: Any, sql: asyncpg.Connection
) -> None:
    """Unchecked at the source (SQL), the event is stored and routed; its run fails at once with
    EventSchemaError and pydantic's message, before any step, without retries; the worker goes
    on with the next event."""
    app = make_engine()
    ran: list[str] = []

    @app.create_function(
        "strict", trigger=TriggerEvent("order/created", schema=OrderCreated), retries=3
    )
    async def strict(ctx: Context[OrderCreated]) -> str:
        return await ctx.step.run("work", lambda: ran.append(ctx.event.data.order_id) or "done")

    async with app.worker(poll_interval="50ms"):
        bad = await sql.fetchval(
            "SELECT engine.send_event('order/created', '{\"order_id\": 5}'::jsonb)"
        )
        good = await sql.fetchval(
            'SELECT engine.send_event(\'order/created\', \'{"order_id": "B", "total": 1}\')'
        )
        failed = await app.wait_for_run(await only_run_id(app, bad))
        done = await app.wait_for_run(await only_run_id(app, good))
    assert failed.status is RunStatus.FAILED
    assert failed.error is not None and failed.error["type"] == EventSchemaError.__name__
    assert "does not match its schema OrderCreated" in failed.error["message"]
    assert "order_id" in failed.error["message"] and "total" in failed.error["message"]
    assert failed.steps == [] and failed.attempt == 0
    assert done.status is RunStatus.COMPLETED and ran == ["B"]


async def test_each_event_of_a_batch_is_typed(make_engine: Any) -> None:
    app = make_engine()

    @app.create_function(
        "batched",
        trigger=TriggerEvent("order/created", schema=OrderCreated),
        batch_events=Batch(max_size=3, timeout="10s"),
    )
    async def batched(ctx: Context[OrderCreated]) -> list[float]:
        return [event.data.total for event in ctx.events]

    async with app.worker(poll_interval="50ms"):
        ids = await app.send(
            [Event(name="order/created", data={"order_id": str(i), "total": i}) for i in range(3)]
        )
        [run] = await app.runs_for_event(ids[0], at_least=1)
        run = await app.wait_for_run(run.run_id)
    assert run.status is RunStatus.COMPLETED and run.output == [0.0, 1.0, 2.0]


async def test_wait_for_event_with_a_schema_returns_typed_data(make_engine: Any) -> None:
    """A matching event comes back as Event[Paid]; one that does not validate raises a StepError
    (EventSchemaError) at the call site, which the function may catch."""
    app = make_engine()

    @app.create_function("order", trigger=TriggerEvent("shop/order"))
    async def order(ctx: Context) -> Any:
        try:
            paid = await ctx.step.wait_for_event(
                "payment", event="shop/paid", match="data.order_id", timeout="1h", schema=Paid
            )
        except StepError as error:
            return {"refused": error.error_type, "message": error.error_message}
        assert paid is not None
        return {"amount": paid.data.amount, "type": type(paid.data).__name__}

    async with app.worker(poll_interval="50ms"):
        [first, second] = await app.send(
            [
                Event(name="shop/order", data={"order_id": "1"}),
                Event(name="shop/order", data={"order_id": "2"}),
            ]
        )
        runs = [await only_run_id(app, first), await only_run_id(app, second)]
        for run_id in runs:
            await eventually(lambda run_id=run_id: status_is(app, run_id, RunStatus.WAITING))
        await app.send(Event(name="shop/paid", data={"order_id": "1", "amount": "12"}))
        await app.send(Event(name="shop/paid", data={"order_id": "2", "amount": "twelve"}))
        ok, refused = [await app.wait_for_run(run_id) for run_id in runs]
    assert ok.output == {"amount": 12, "type": "Paid"}
    assert refused.output["refused"] == "EventSchemaError"
    assert "amount" in refused.output["message"]


async def test_send_event_steps_validate_against_the_apps_schemas(
    make_engine: Any, sql: asyncpg.Connection
) -> None:
    """A send_event step whose event does not match fails (StepError) and sends nothing."""
    app = make_engine(event_schemas={"shop/paid": Paid})

    @app.create_function("payer", trigger=TriggerEvent("shop/pay"))
    async def payer(ctx: Context) -> str:
        try:
            await ctx.step.send_event("bad", Event(name="shop/paid", data={"order_id": "1"}))
        except StepError as error:
            assert error.error_type == "InvalidEventError"
            assert "amount" in error.error_message
        await ctx.step.send_event(
            "good", Event(name="shop/paid", data=Paid(order_id="1", amount=3))
        )
        return "sent"

    async with app.worker(poll_interval="50ms"):
        [event_id] = await app.send(Event(name="shop/pay"))
        run = await app.wait_for_run(await only_run_id(app, event_id))
    assert run.status is RunStatus.COMPLETED, run.error
    rows = await sql.fetch("SELECT data FROM engine.events WHERE name = 'shop/paid'")
    assert [row["data"] for row in rows] == ['{"amount": 3, "order_id": "1"}']


async def test_v_is_seen_by_the_function_and_by_trigger_expressions(make_engine: Any) -> None:
    """The sender's schema version: ``ctx.event.v``, and ``event.v`` in a trigger's if_exp, so
    that two versions of one event go to two functions side by side."""
    app = make_engine()

    class OrderV2(BaseModel):
        order_id: str
        amount_cents: int

    @app.create_function(
        "v1", trigger=TriggerEvent("order/created", if_exp='event.v != "2"', schema=OrderCreated)
    )
    async def v1(ctx: Context[OrderCreated]) -> Any:
        return [ctx.event.v, ctx.event.data.total]

    @app.create_function(
        "v2", trigger=TriggerEvent("order/created", if_exp='event.v == "2"', schema=OrderV2)
    )
    async def v2(ctx: Context[OrderV2]) -> Any:
        return [ctx.event.v, ctx.event.data.amount_cents]

    async with app.worker(poll_interval="50ms"):
        [old, new] = await app.send(
            [
                Event(name="order/created", data={"order_id": "1", "total": 2.5}),
                Event(name="order/created", v="2", data={"order_id": "2", "amount_cents": 250}),
            ]
        )
        [old_run] = await app.runs_for_event(old, at_least=1)
        [new_run] = await app.runs_for_event(new, at_least=1)
        old_run = await app.wait_for_run(old_run.run_id)
        new_run = await app.wait_for_run(new_run.run_id)
    assert (old_run.function_id, old_run.output) == ("v1", [None, 2.5])
    assert (new_run.function_id, new_run.output) == ("v2", ["2", 250])


async def test_an_invoked_function_gets_its_one_schema(make_engine: Any) -> None:
    """invoke's data is typed by the child's schema when its triggers declare one; data that
    does not match fails the child, and so the invoke step."""
    app = make_engine()

    @app.create_function("child", trigger=TriggerEvent("order/created", schema=OrderCreated))
    async def child(ctx: Context[OrderCreated]) -> float:
        return ctx.event.data.total * 2

    @app.create_function("parent", trigger=TriggerEvent("go"))
    async def parent(ctx: Context) -> Any:
        doubled = await ctx.step.invoke("ok", function=child, data={"order_id": "1", "total": 2})
        try:
            await ctx.step.invoke("bad", function=child, data={"order_id": "1"})
        except StepError as error:
            return [doubled, error.error_type]
        return [doubled, None]

    async with app.worker(poll_interval="50ms"):
        [event_id] = await app.send(Event(name="go"))
        run = await app.wait_for_run(await only_run_id(app, event_id))
    assert run.output == [4.0, "EventSchemaError"]


def test_declaration_errors_are_caught_at_registration() -> None:
    with pytest.raises(ConfigurationError, match="pydantic model class"):
        TriggerEvent("x", schema=dict)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="RootModel"):
        TriggerEvent("x", schema=RootModel[list[int]])
    with pytest.raises(ConfigurationError, match="event_schemas"):
        Engine("x", "postgresql://unused", event_schemas={"x": int})  # type: ignore[dict-item]
    app = Engine("x", "postgresql://unused")
    with pytest.raises(ConfigurationError, match="different schemas"):

        @app.create_function(
            "f",
            trigger=[
                TriggerEvent("order/created", if_exp="event.data.total > 1", schema=OrderCreated),
                TriggerEvent("order/created", schema=Paid),
            ],
        )
        async def f(ctx: Context) -> None: ...

    with pytest.raises(ConfigurationError, match=r"declared Context\[Paid\] but its triggers"):

        @app.create_function("g", trigger=TriggerEvent("order/created", schema=OrderCreated))
        async def g(ctx: Context[Paid]) -> None: ...

    with pytest.raises(ConfigurationError, match="OrderCreated, no schema"):

        @app.create_function(
            "h", trigger=[TriggerEvent("a", schema=OrderCreated), TriggerEvent("b")]
        )
        async def h(ctx: Context[OrderCreated]) -> None: ...

    @app.create_function("fine", trigger=TriggerEvent("order/created", schema=OrderCreated))
    async def fine(ctx: Context[OrderCreated]) -> None: ...


async def test_a_wait_with_a_bad_schema_fails_the_run(make_engine: Any) -> None:
    app = make_engine()

    @app.create_function("f", trigger=TriggerEvent("go"))
    async def f(ctx: Context) -> None:
        await ctx.step.wait_for_event("w", event="x", schema=int)  # type: ignore[type-var]

    async with app.worker(poll_interval="50ms"):
        [event_id] = await app.send(Event(name="go"))
        run = await app.wait_for_run(await only_run_id(app, event_id))
    assert run.status is RunStatus.FAILED and run.error is not None
    assert "pydantic model class" in run.error["message"]


TYPED_APP = """
from pydantic import BaseModel
from engine import Context, Engine, Event, TriggerEvent

class OrderCreated(BaseModel):
    order_id: str
    total: float

class Paid(BaseModel):
    amount: int

app = Engine("typed", event_schemas={"order/created": OrderCreated})

@app.create_function("order", trigger=TriggerEvent("order/created", schema=OrderCreated))
async def order(ctx: Context[OrderCreated]) -> float:
    total: float = ctx.event.data.total
    first: OrderCreated = ctx.events[0].data
    paid = await ctx.step.wait_for_event("paid", event="shop/paid", schema=Paid)
    amount: int = 0 if paid is None else paid.data.amount
    untyped = await ctx.step.wait_for_event("any", event="shop/any")
    extra: dict[str, object] = {} if untyped is None else untyped.data
    await ctx.step.send_event("s", Event[Paid](name="shop/paid", data=Paid(amount=1)))
    return total + amount + len(first.order_id) + len(extra)

@app.create_function("plain", trigger=TriggerEvent("x"))
async def plain(ctx: Context) -> object:
    return ctx.event.data["anything"]
"""

WRONG = """
async def wrong(ctx: Context[OrderCreated]) -> None:
    ctx.event.data.totl
    ctx.event.data["total"]
    paid = await ctx.step.wait_for_event("paid", event="shop/paid", schema=Paid)
    assert paid is not None
    paid.data.amonut
"""


def _mypy(source: str, folder: Path) -> tuple[str, int]:
    from mypy import api

    path = folder / "typed_app.py"
    path.write_text(textwrap.dedent(source))
    stdout, stderr, status = api.run(["--strict", "--cache-dir", str(folder / ".mypy"), str(path)])
    return stdout + stderr, status


@pytest.mark.timeout(300)
async def test_mypy_understands_typed_contexts(tmp_path: Path) -> None:
    """A small typed app type-checks under --strict; wrong attributes on typed data (a trigger's
    and a wait's) and dict access on a model are reported, so the typing cannot regress."""
    ok, status = await asyncio.to_thread(_mypy, TYPED_APP, tmp_path)
    assert status == 0, ok
    report, status = await asyncio.to_thread(_mypy, TYPED_APP + WRONG, tmp_path)
    assert status == 1, report
    assert '"OrderCreated" has no attribute "totl"' in report
    assert '"Paid" has no attribute "amonut"' in report
    assert '"OrderCreated" is not indexable' in report
    assert report.count("error:") == 3, report
