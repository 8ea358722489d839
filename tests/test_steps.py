"""Steps: memoized, counted, serialized, and checked against the recorded history."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from helpers import only_run_id
from pydantic import BaseModel

from engine import Context, Event, RunStatus, TriggerEvent


class User(BaseModel):
    id: str
    vip: bool


async def test_each_completed_step_runs_once_across_replays(make_engine: Any) -> None:
    """A step that completed is never executed again; replay returns its recorded output."""
    app = make_engine()
    calls: Counter[str] = Counter()

    def effect(name: str) -> str:
        calls[name] += 1
        return name.upper()

    @app.create_function("two-steps", trigger=TriggerEvent("t/go"))
    async def two_steps(ctx: Context) -> Any:
        first = await ctx.step.run("first", effect, "a")
        await ctx.step.sleep("pause", "50ms")  # forces a second execution that replays `first`
        second = await ctx.step.run("second", effect, name="b")
        none = await ctx.step.run("nothing", lambda: None)
        return [first, second, none]

    async with app.worker():
        [event_id] = await app.send(Event(name="t/go"))
        run = await app.wait_for_run(await only_run_id(app, event_id))
    assert run.status is RunStatus.COMPLETED
    assert run.output == ["A", "B", None]
    assert calls == {"a": 1, "b": 1}
    assert [s.step_id for s in run.steps] == ["first", "pause", "second", "nothing"]
    assert run.steps[3].status == "COMPLETED" and run.steps[3].output is None


async def test_repeated_step_ids_get_counters(make_engine: Any) -> None:
    """The same id used again in one run becomes `id:1`, `id:2`..."""
    app = make_engine()

    @app.create_function("loop", trigger=TriggerEvent("t/loop"))
    async def loop(ctx: Context) -> Any:
        return [await ctx.step.run("fetch", lambda i=i: i) for i in range(3)]

    async with app.worker():
        [event_id] = await app.send(Event(name="t/loop"))
        run = await app.wait_for_run(await only_run_id(app, event_id))
    assert run.output == [0, 1, 2]
    assert [s.step_id for s in run.steps] == ["fetch", "fetch:1", "fetch:2"]


async def test_outputs_are_json_round_trips(make_engine: Any) -> None:
    """Tuples come back as lists; a model comes back as the model its callable declares."""
    app = make_engine()
    seen: dict[str, Any] = {}

    async def load_user(user_id: str) -> User:
        return User(id=user_id, vip=True)

    @app.create_function("typed", trigger=TriggerEvent("t/typed"))
    async def typed(ctx: Context) -> Any:
        seen["tuple"] = await ctx.step.run("tuple", lambda: (1, "x"))
        seen["user"] = await ctx.step.run("user", load_user, ctx.event.data["user_id"])
        await ctx.step.sleep("replay", "10ms")
        seen["user_replayed"] = await ctx.step.run("user", load_user, "other")
        return seen["user"]

    async with app.worker():
        [event_id] = await app.send(Event(name="t/typed", data={"user_id": "u1"}))
        run = await app.wait_for_run(await only_run_id(app, event_id))
    assert seen["tuple"] == [1, "x"]
    assert seen["user"] == User(id="u1", vip=True)
    assert run.output == {"id": "u1", "vip": True}
    assert run.steps[1].output == {"id": "u1", "vip": True}


async def test_sync_and_async_callables_get_args_and_do_not_block_each_other(
    make_engine: Any,
) -> None:
    """Sync callables run in threads, so two blocking steps overlap instead of queueing."""
    app = make_engine()
    import threading

    barrier = threading.Barrier(2, timeout=5)

    def blocking(tag: str, *, suffix: str) -> str:
        barrier.wait()  # both threads must be inside at once, or this times out
        return tag + suffix

    async def non_blocking(a: int, b: int) -> int:
        await asyncio.sleep(0)
        return a + b

    @app.create_function("mixed", trigger=TriggerEvent("t/mixed"))
    async def mixed(ctx: Context) -> Any:
        left, right = await asyncio.gather(
            ctx.step.run("left", blocking, "l", suffix="!"),
            ctx.step.run("right", blocking, "r", suffix="?"),
        )
        total = await ctx.step.run("sum", non_blocking, 2, b=3)
        return [left, right, total]

    async with app.worker():
        [event_id] = await app.send(Event(name="t/mixed"))
        run = await app.wait_for_run(await only_run_id(app, event_id))
    assert run.output == ["l!", "r?", 5]


async def test_unserializable_output_fails_that_step_readably(make_engine: Any) -> None:
    """The step fails with its id and the type in the message; earlier history stays."""
    app = make_engine()

    @app.create_function("bad-output", trigger=TriggerEvent("t/bad"))
    async def bad_output(ctx: Context) -> Any:
        await ctx.step.run("good", lambda: {"kept": True})
        await ctx.step.run("bad", object)
        return "unreachable"

    async with app.worker():
        [event_id] = await app.send(Event(name="t/bad"))
        run = await app.wait_for_run(await only_run_id(app, event_id))
    assert run.status is RunStatus.FAILED
    good, bad = run.steps
    assert good.status == "COMPLETED" and good.output == {"kept": True}
    assert bad.status == "FAILED" and bad.attempts == 1
    assert "'bad'" in bad.error["message"] and "object" in bad.error["message"]
    assert run.error is not None and run.error["type"] == "StepError"


async def test_nan_is_not_stored(make_engine: Any) -> None:
    """NaN has no JSON form: the step fails rather than storing something else."""
    app = make_engine()

    @app.create_function("nan", trigger=TriggerEvent("t/nan"))
    async def nan(ctx: Context) -> Any:
        return await ctx.step.run("nan", lambda: float("nan"))

    async with app.worker():
        [event_id] = await app.send(Event(name="t/nan"))
        run = await app.wait_for_run(await only_run_id(app, event_id))
    assert run.status is RunStatus.FAILED
    assert "nan" in run.steps[0].error["message"].lower()


async def test_step_inside_step_fails_run_and_inner_never_runs(make_engine: Any) -> None:
    """Nesting is a programming error: the run fails at once, without retries."""
    app = make_engine()
    inner_calls = []

    @app.create_function("nested", trigger=TriggerEvent("t/nested"), retries=3)
    async def nested(ctx: Context) -> Any:
        async def outer() -> Any:
            return await ctx.step.run("inner", lambda: inner_calls.append(1))

        return await ctx.step.run("outer", outer)

    async with app.worker():
        [event_id] = await app.send(Event(name="t/nested"))
        run = await app.wait_for_run(await only_run_id(app, event_id))
    assert run.status is RunStatus.FAILED
    assert run.error["type"] == "NestedStepError"
    assert "'inner'" in run.error["message"] and "'outer'" in run.error["message"]
    assert inner_calls == []
    assert run.attempt == 0


async def test_step_limit_fails_run_naming_the_limit(make_engine: Any) -> None:
    app = make_engine(max_steps=3)

    @app.create_function("many", trigger=TriggerEvent("t/many"))
    async def many(ctx: Context) -> Any:
        for i in range(5):
            await ctx.step.run(f"s{i}", lambda: None)

    async with app.worker():
        [event_id] = await app.send(Event(name="t/many"))
        run = await app.wait_for_run(await only_run_id(app, event_id))
    assert run.status is RunStatus.FAILED
    assert run.error["type"] == "StepLimitError" and "max_steps" in run.error["message"]
    assert len(run.steps) == 3


async def test_output_limit_fails_run_naming_the_limit(make_engine: Any) -> None:
    app = make_engine(max_output_bytes=1000)

    @app.create_function("big", trigger=TriggerEvent("t/big"))
    async def big(ctx: Context) -> Any:
        try:
            await ctx.step.run("big", lambda: "x" * 5000)
        except Exception:  # a user cannot swallow a limit
            return "swallowed"

    async with app.worker():
        [event_id] = await app.send(Event(name="t/big"))
        run = await app.wait_for_run(await only_run_id(app, event_id))
    assert run.status is RunStatus.FAILED
    assert run.error["type"] == "OutputLimitError" and "max_output_bytes" in run.error["message"]


async def test_changed_code_raises_determinism_error_naming_both_steps(make_engine: Any) -> None:
    """A parallel step that disappears on replay is caught, not silently mismatched."""
    app = make_engine()
    executions = []

    @app.create_function("drifting", trigger=TriggerEvent("t/drift"))
    async def drifting(ctx: Context) -> Any:
        executions.append(1)
        if len(executions) == 1:
            await asyncio.gather(ctx.step.run("a", lambda: 1), ctx.step.run("b", lambda: 2))
        else:
            await ctx.step.run("a", lambda: 1)
            await ctx.step.run("c", lambda: 3)
        await ctx.step.sleep("s", "10ms")

    async with app.worker():
        # The first execution records a and b, then reaches the sleep only on a second pass.
        [event_id] = await app.send(Event(name="t/drift"))
        run = await app.wait_for_run(await only_run_id(app, event_id))
    assert run.status is RunStatus.FAILED
    assert run.error["type"] == "DeterminismError"
    assert "'b'" in run.error["message"] and "'c'" in run.error["message"]


async def test_function_without_steps_completes(make_engine: Any) -> None:
    app = make_engine()

    @app.create_function("plain", trigger=TriggerEvent("t/plain"))
    async def plain(ctx: Context) -> Any:
        return {
            "event": ctx.event.name,
            "data": ctx.event.data,
            "attempt": ctx.attempt,
            "run_id": ctx.run_id,
            "events": len(ctx.events),
        }

    async with app.worker():
        [event_id] = await app.send(Event(name="t/plain", data={"k": "v"}))
        run_id = await only_run_id(app, event_id)
        run = await app.wait_for_run(run_id)
    assert run.output == {
        "event": "t/plain",
        "data": {"k": "v"},
        "attempt": 0,
        "run_id": run_id,
        "events": 1,
    }
    assert run.steps == []


@pytest.mark.parametrize("step_id", ["ünïcødé 🚀", "a:b/c d", "x" * 200])
async def test_odd_step_ids(make_engine: Any, step_id: str) -> None:
    app = make_engine()

    @app.create_function("odd", trigger=TriggerEvent("t/odd"))
    async def odd(ctx: Context) -> Any:
        await ctx.step.run(step_id, lambda: 1)
        await ctx.step.sleep("s", "5ms")
        return await ctx.step.run(step_id, lambda: 2)

    async with app.worker():
        [event_id] = await app.send(Event(name="t/odd"))
        run = await app.wait_for_run(await only_run_id(app, event_id))
    assert run.status is RunStatus.COMPLETED and run.output == 2
    assert [s.step_id for s in run.steps] == [step_id, "s", f"{step_id}:1"]
