"""invoke, send_event, system events and on_failure."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import timedelta
from typing import Any

from helpers import eventually, move_clock, only_run_id

from engine import (
    Context,
    Event,
    NonRetriableError,
    RunStatus,
    Singleton,
    StepError,
    TriggerEvent,
)


def declare_children(app: Any) -> tuple[Any, Any, Any]:
    @app.create_function("double")  # no trigger: it can only be invoked
    async def double(ctx: Context) -> Any:
        return await ctx.step.run("double", lambda: ctx.event.data["n"] * 2)

    @app.create_function("broken", retries=0)
    async def broken(ctx: Context) -> Any:
        raise NonRetriableError("the child broke")

    @app.create_function("slow")
    async def slow(ctx: Context) -> Any:
        await ctx.step.sleep("long", "1h")
        return "late"

    return double, broken, slow


async def test_invoke_returns_the_child_output(make_engine: Any, sql: Any) -> None:
    app = make_engine()
    double, _, _ = declare_children(app)

    @app.create_function("parent", trigger=TriggerEvent("p/go"))
    async def parent(ctx: Context) -> Any:
        value = await ctx.step.invoke("call", function=double, data={"n": 21})
        return {"value": value}

    async with app.worker():
        [event_id] = await app.send(Event(name="p/go"))
        run = await app.wait_for_run(await only_run_id(app, event_id))
    assert run.status is RunStatus.COMPLETED and run.output == {"value": 42}
    assert run.steps[0].kind == "invoke" and run.steps[0].output == 42
    child = await sql.fetchrow(
        "SELECT r.status, r.parent_run_id::text AS parent, e.name, e.data::text AS data "
        "FROM engine.runs r JOIN engine.events e ON e.seq = r.event_seq "
        "WHERE r.function_id = 'double'"
    )
    assert child["status"] == "COMPLETED" and child["parent"] == run.run_id
    assert child["name"] == "engine/function.invoked" and child["data"] == '{"n": 21}'


async def test_a_failed_child_raises_step_error_in_the_parent(make_engine: Any) -> None:
    app = make_engine()
    _, broken, _ = declare_children(app)

    @app.create_function("parent", trigger=TriggerEvent("p/go"))
    async def parent(ctx: Context) -> Any:
        try:
            await ctx.step.invoke("call", function=broken)
        except StepError as error:
            return {"type": error.error_type, "message": error.error_message}
        return None

    async with app.worker():
        [event_id] = await app.send(Event(name="p/go"))
        run = await app.wait_for_run(await only_run_id(app, event_id))
    assert run.output == {"type": "NonRetriableError", "message": "the child broke"}
    assert run.steps[0].status == "FAILED"


async def test_invoke_times_out(make_engine: Any, sql: Any) -> None:
    app = make_engine()
    _, _, slow = declare_children(app)

    @app.create_function("parent", trigger=TriggerEvent("p/go"))
    async def parent(ctx: Context) -> Any:
        try:
            await ctx.step.invoke("call", function=slow, timeout="10m")
        except StepError as error:
            return str(error)
        return "no timeout"

    async with app.worker(poll_interval="50ms"):
        [event_id] = await app.send(Event(name="p/go"))
        run_id = await only_run_id(app, event_id)
        await eventually(lambda: _status(app, run_id, "WAITING"))
        await move_clock(sql, timedelta(minutes=11))
        run = await app.wait_for_run(run_id)
    assert "timed out" in run.output


async def test_a_function_without_trigger_is_not_started_by_events(make_engine: Any) -> None:
    app = make_engine()
    declare_children(app)
    async with app.worker():
        [event_id] = await app.send(Event(name="double", data={"n": 1}))
        await asyncio.sleep(0.3)
        assert await app.runs_for_event(event_id) == []


async def test_invoke_across_apps(make_engine: Any) -> None:
    """The child belongs to another app; that app's worker runs it."""
    billing = make_engine("billing")
    double, _, _ = declare_children(billing)
    shop = make_engine("shop")

    @shop.create_function("parent", trigger=TriggerEvent("p/go"))
    async def parent(ctx: Context) -> Any:
        return await ctx.step.invoke("call", function=double, data={"n": 5})

    async with billing.worker(), shop.worker():
        [event_id] = await shop.send(Event(name="p/go"))
        run = await shop.wait_for_run(await only_run_id(shop, event_id))
    assert run.output == 10


async def test_send_event_is_memoized(make_engine: Any, sql: Any) -> None:
    """A replay returns the recorded ids and sends nothing again; the events start runs."""
    app = make_engine()
    started: Counter[str] = Counter()

    @app.create_function("fan", trigger=TriggerEvent("f/go"))
    async def fan(ctx: Context) -> Any:
        ids = await ctx.step.send_event(
            "send", [Event(name="f/item", data={"i": i}) for i in range(3)]
        )
        await ctx.step.sleep("replay", "10ms")  # a second execution replays the send
        return ids

    @app.create_function("item", trigger=TriggerEvent("f/item"))
    async def item(ctx: Context) -> Any:
        started[str(ctx.event.data["i"])] += 1

    async with app.worker():
        [event_id] = await app.send(Event(name="f/go"))
        run = await app.wait_for_run(await only_run_id(app, event_id))
        assert len(run.output) == 3
        for sent in run.output:
            await app.wait_for_run(await only_run_id(app, sent))
    assert started == {"0": 1, "1": 1, "2": 1}
    assert await sql.fetchval("SELECT count(*) FROM engine.events WHERE name = 'f/item'") == 3


async def test_send_event_with_an_invalid_event_fails_the_step(make_engine: Any) -> None:
    app = make_engine()

    @app.create_function("bad-send", trigger=TriggerEvent("b/go"))
    async def bad_send(ctx: Context) -> Any:
        try:
            await ctx.step.send_event("send", Event(name="engine/forged"))
        except StepError as error:
            return error.error_type
        return None

    async with app.worker():
        [event_id] = await app.send(Event(name="b/go"))
        run = await app.wait_for_run(await only_run_id(app, event_id))
    assert run.output == "InvalidEventError"


async def test_on_failure_runs_with_the_failure_event(make_engine: Any) -> None:
    app = make_engine()
    seen: list[dict[str, Any]] = []

    async def handler(ctx: Context) -> None:
        seen.append({"name": ctx.event.name, **ctx.event.data})

    @app.create_function("fragile", trigger=TriggerEvent("x/go"), retries=0, on_failure=handler)
    async def fragile(ctx: Context) -> Any:
        await ctx.step.run("boom", _boom)

    async with app.worker():
        [event_id] = await app.send(Event(name="x/go", data={"k": 1}))
        run = await app.wait_for_run(await only_run_id(app, event_id))
        await eventually(lambda: _truthy(seen))
    assert run.status is RunStatus.FAILED
    [failure] = seen
    assert failure["name"] == "engine/function.failed"
    assert failure["function_id"] == "fragile" and failure["run_id"] == run.run_id
    assert failure["event"]["data"] == {"k": 1}
    assert failure["error"]["type"] == "StepError" and "kaboom" in failure["error"]["message"]


async def test_system_events_trigger_functions(make_engine: Any) -> None:
    """engine/function.finished is sent for every terminal run, with result or error."""
    app = make_engine()
    finished: list[dict[str, Any]] = []

    @app.create_function("work", trigger=TriggerEvent("w/go"), retries=0)
    async def work(ctx: Context) -> Any:
        if ctx.event.data.get("fail"):
            raise NonRetriableError("no")
        return "done"

    @app.create_function(
        "audit",
        trigger=TriggerEvent("engine/function.finished", "event.data.function_id == 'work'"),
    )
    async def audit(ctx: Context) -> None:
        finished.append(ctx.event.data)

    async with app.worker():
        await app.send([Event(name="w/go"), Event(name="w/go", data={"fail": True})])
        await eventually(lambda: _truthy(len(finished) == 2))
        await asyncio.sleep(0.2)  # audit's own finish must not trigger audit again
    assert len(finished) == 2
    by_outcome = {("result" in f): f for f in finished}
    assert by_outcome[True]["result"] == "done"
    assert by_outcome[False]["error"]["message"] == "no"


async def _boom() -> None:
    raise NonRetriableError("kaboom")


async def _status(app: Any, run_id: str, status: str) -> bool:
    return (await app.get_run(run_id)).status.value == status


async def _truthy(value: Any) -> Any:
    return value


async def test_parallel_invoke_send_and_wait(make_engine: Any) -> None:
    """gather() over an invoke, a send_event, a wait and a plain step: one suspension holds
    both waiting steps, and the event sent by the run resumes its own wait."""
    app = make_engine()
    double, _, _ = declare_children(app)

    @app.create_function("together", trigger=TriggerEvent("g/go"))
    async def together(ctx: Context) -> Any:
        doubled, sent, echoed, plain = await asyncio.gather(
            ctx.step.invoke("call", function=double, data={"n": 4}),
            ctx.step.send_event("send", Event(name="g/echo", data={"k": "v"})),
            ctx.step.wait_for_event("echo", event="g/echo", timeout="1h"),
            ctx.step.run("plain", lambda: "p"),
        )
        return [doubled, len(sent), echoed and echoed.data, plain]

    async with app.worker():
        [event_id] = await app.send(Event(name="g/go"))
        run = await app.wait_for_run(await only_run_id(app, event_id))
    assert run.status is RunStatus.COMPLETED, run.error
    assert run.output == [8, 1, {"k": "v"}, "p"]
    assert {s.step_id: s.kind for s in run.steps} == {
        "call": "invoke",
        "send": "send",
        "echo": "wait",
        "plain": "run",
    }


async def test_invoking_an_unregistered_function_fails_the_run(make_engine: Any) -> None:
    other = make_engine("elsewhere")  # never connects: its function is not registered
    double, _, _ = declare_children(other)
    app = make_engine()

    @app.create_function("parent", trigger=TriggerEvent("p/go"))
    async def parent(ctx: Context) -> Any:
        return await ctx.step.invoke("call", function=double)

    async with app.worker():
        [event_id] = await app.send(Event(name="p/go"))
        run = await app.wait_for_run(await only_run_id(app, event_id))
    assert run.status is RunStatus.FAILED
    assert run.error is not None and "no such function" in run.error["message"]


async def test_flow_control_applies_to_invoked_runs(make_engine: Any) -> None:
    """The child's singleton holds for invoked runs too: a second invoke while the first child is
    active is skipped, and the parent gets a StepError saying why."""
    app = make_engine()

    @app.create_function("exclusive", singleton=Singleton(mode="skip"))
    async def exclusive(ctx: Context) -> Any:
        await ctx.step.sleep("hold", "1h")

    @app.create_function("parent", trigger=TriggerEvent("p/go"))
    async def parent(ctx: Context) -> Any:
        try:
            await ctx.step.invoke("call", function=exclusive, timeout="2h")
        except StepError as error:
            return [error.error_type, error.error_message]
        return "invoked"

    async with app.worker():
        [first] = await app.send(Event(name="p/go"))
        first_run = await only_run_id(app, first)
        await eventually(lambda: _status(app, first_run, "WAITING"))
        [second] = await app.send(Event(name="p/go"))
        run = await app.wait_for_run(await only_run_id(app, second))
    assert run.output[0] == "InvokeSkippedError"
    assert "singleton" in run.output[1]
    skipped = [r for r in await app.list_runs("exclusive") if r.status is RunStatus.SKIPPED]
    assert len(skipped) == 1
