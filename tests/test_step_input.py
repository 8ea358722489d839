"""A ``step.run`` step's input (engine.step_input): the arguments its callable was given are kept
with the step and with each failed attempt, in the write that records them; none are stored for
a call without arguments; an input over the limit is replaced by its size; a value without a
JSON form by its type; ``record_step_input=False`` turns it off, per app or per function."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from helpers import only_run_id
from pydantic import BaseModel

from engine import ConfigurationError, Context, Engine, Event, TriggerEvent
from engine.records import StepKind, StepRecord, StepStatus
from engine.runs import RunInfo
from engine.serialization import loads
from engine.step_input import MAX_INPUT_BYTES, StepInput, encode_input


class Order(BaseModel):
    order_id: int
    total: float


def add(a: int, b: int, *, scale: int = 1) -> int:
    return (a + b) * scale


def shop(app: Engine, **options: Any) -> None:
    """``steps``: a step with arguments (one a model), one without, a retried one, one with a
    huge argument and one with an argument that has no JSON form."""
    tries = {"flaky": 0}

    @app.create_function("steps", trigger=TriggerEvent("t/steps"), retries=2, **options)
    async def steps(ctx: Context) -> Any:
        total = await ctx.step.run("add", add, 1, 2, scale=3)
        await ctx.step.run("none", lambda: "nothing given")

        def flaky(order: Order) -> int:
            tries["flaky"] += 1
            if tries["flaky"] == 1:
                raise ValueError("the first try fails")
            return order.order_id

        await ctx.step.run("flaky", flaky, Order(order_id=7, total=9.5))
        await ctx.step.run("huge", len, "x" * (MAX_INPUT_BYTES + 10))
        await ctx.step.run("lock", lambda _lock: "locked", object())
        return total


async def run_once(app: Engine) -> RunInfo:
    [event_id] = await app.send(Event(name="t/steps"))
    run = await app.wait_for_run(await only_run_id(app, event_id))
    assert run.status == "COMPLETED", run.error
    return run


async def test_the_input_of_each_run_step_is_recorded_and_get_run_returns_it(
    make_engine: Any, sql: asyncpg.Connection
) -> None:
    """get_run gives each step's arguments (args and kwargs, a model as its JSON), and each
    attempt's, the retried one's too; a step without arguments stores nothing."""
    app = make_engine()
    shop(app)
    async with app.worker(poll_interval="50ms"):
        run = await run_once(app)
    steps = {s.step_id: s for s in run.steps}
    assert steps["add"].input == StepInput(args=[1, 2], kwargs={"scale": 3})
    assert steps["add"].attempts[0].input == steps["add"].input
    assert steps["none"].input is None
    assert await sql.fetchval(
        "SELECT input IS NULL FROM engine.steps WHERE run_id = $1 AND step_key = 'none'",
        run.run_id,
    )
    order = StepInput(args=[{"order_id": 7, "total": 9.5}])
    assert steps["flaky"].input == order
    assert [a.outcome for a in steps["flaky"].attempts] == ["RETRYING", "COMPLETED"]
    assert [a.input for a in steps["flaky"].attempts] == [order, order]


async def test_an_input_over_the_limit_is_replaced_by_its_size_and_an_object_by_its_type(
    make_engine: Any,
) -> None:
    """Over 64 KiB only the size is kept; an argument without a JSON form is named by its type,
    and the step runs as usual in both cases."""
    app = make_engine()
    shop(app)
    async with app.worker(poll_interval="50ms"):
        run = await run_once(app)
    steps = {s.step_id: s for s in run.steps}
    huge = steps["huge"].input
    assert huge is not None and huge.args == [] and huge.omitted_bytes is not None
    assert huge.omitted_bytes > MAX_INPUT_BYTES
    assert steps["huge"].output == MAX_INPUT_BYTES + 10
    assert steps["lock"].input == StepInput(args=[{"unserializable": "builtins.object"}])


@pytest.mark.parametrize(
    ("engine_option", "function_option", "recorded"),
    [(False, None, False), (True, False, False), (False, True, True)],
)
async def test_record_step_input_turns_it_off_per_app_or_per_function(
    make_engine: Any,
    sql: asyncpg.Connection,
    engine_option: bool,
    function_option: bool | None,
    recorded: bool,
) -> None:
    """``Engine(record_step_input=False)`` stores no step's input, unless the function asks for
    it; ``create_function(record_step_input=False)`` stores none of that function's."""
    app = make_engine(record_step_input=engine_option)
    options = {} if function_option is None else {"record_step_input": function_option}
    shop(app, **options)
    async with app.worker(poll_interval="50ms"):
        run = await run_once(app)
    stored = await sql.fetchval(
        "SELECT count(*) FROM engine.steps WHERE run_id = $1 AND input IS NOT NULL", run.run_id
    )
    kept = await sql.fetchval(
        "SELECT count(*) FROM engine.step_attempts WHERE run_id = $1 AND input IS NOT NULL",
        run.run_id,
    )
    assert (stored, kept) == ((4, 1) if recorded else (0, 0))
    assert all((s.input is not None) == recorded for s in run.steps if s.step_id != "none")
    config = (await app.list_functions())[0].config
    assert config.get("record_step_input", True) is recorded


def test_record_step_input_must_be_a_boolean() -> None:
    app = Engine("t", "postgresql://unused")
    with pytest.raises(ConfigurationError, match="record_step_input"):
        app.create_function("f", record_step_input="no")(_handler)  # type: ignore[arg-type]


async def _handler(ctx: Context) -> None:
    return None


def test_encode_input_bounds_and_forms() -> None:
    """The encoded form: none without arguments, args and kwargs otherwise, the size alone over
    the limit, a marker for a value PostgreSQL cannot store (a NUL) or JSON cannot hold."""
    assert encode_input((), {}) is None
    assert loads(encode_input((1, "a"), {"k": [True]}) or "") == {
        "args": [1, "a"],
        "kwargs": {"k": [True]},
    }
    whole = len('{"args":["' + "x" * 100 + '"],"kwargs":{}}')
    assert loads(encode_input(("x" * 100,), {}, limit=50) or "") == {"omitted_bytes": whole}
    nul = loads(encode_input(("a\x00b", 2), {}) or "")
    assert nul == {"args": [{"unserializable": "builtins.str"}, 2], "kwargs": {}}
    cycle: list[Any] = []
    cycle.append(cycle)
    assert loads(encode_input((cycle,), {}) or "")["args"] == [{"unserializable": "builtins.list"}]


def test_a_record_without_input_encodes_as_before() -> None:
    """A record without input has no ``input`` key (the SQL then writes NULL); one with input
    carries it as given, before the output."""
    record = StepRecord("k", 0, StepKind.RUN, StepStatus.COMPLETED)
    assert "input" not in loads(record.to_json("1"))
    record.input_json = '{"args":[1],"kwargs":{}}'
    decoded = loads(record.to_json("1"))
    assert decoded["input"] == {"args": [1], "kwargs": {}} and decoded["output"] == 1
