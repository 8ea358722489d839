"""Steps: memoized, counted, serialized, and checked against the recorded history."""

from __future__ import annotations

import asyncio
import gc
from collections import Counter
from typing import Any

import pytest
from helpers import only_run_id
from pydantic import BaseModel

from engine import Context, Event, NonRetriableError, RunStatus, TriggerEvent


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
    assert bad.status == "FAILED" and bad.attempt_count == 1
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
            await asyncio.gather(ctx.step.run("a", lambda: 1), ctx.step.run("c", lambda: 3))
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


async def _run_once(app: Any, name: str) -> Any:
    async with app.worker():
        [event_id] = await app.send(Event(name=name))
        return await app.wait_for_run(await only_run_id(app, event_id))


async def test_parallel_groups_of_sequential_steps_replay_after_a_sleep(make_engine: Any) -> None:
    """gather() of sequential groups, then a sleep: the replay matches every step by id, in
    whatever order the loop now runs the groups, and each step runs once (#12)."""
    app = make_engine()
    calls: Counter[str] = Counter()

    def step(name: str) -> Any:
        async def body() -> str:
            calls[name] += 1
            await asyncio.sleep(0.001 * (len(name) % 3))  # the groups interleave
            return name

        return body

    @app.create_function("fan", trigger=TriggerEvent("t/fan"))
    async def fan(ctx: Context) -> Any:
        async def group_1() -> list[str]:
            return [await ctx.step.run("1a", step("1a")), await ctx.step.run("1b", step("1b"))]

        async def group_2() -> list[str]:
            return [await ctx.step.run(s, step(s)) for s in ("2a", "2b", "2c")]

        done = await asyncio.gather(group_1(), group_2(), ctx.step.run("3", step("3")))
        await ctx.step.sleep("pause", "20ms")
        return [done, await ctx.step.run("after", step("after"))]

    run = await _run_once(app, "t/fan")
    assert run.status is RunStatus.COMPLETED, run.error
    assert run.output == [[["1a", "1b"], ["2a", "2b", "2c"], "3"], "after"]
    assert set(calls.values()) == {1} and len(calls) == 7


async def test_a_step_failing_after_parallel_groups_is_retried(make_engine: Any) -> None:
    """A retry replays the groups before the failed step: no false DeterminismError (#12)."""
    app = make_engine()
    calls: Counter[str] = Counter()

    def flaky() -> str:
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise RuntimeError("once")
        return "ok"

    @app.create_function("fan-retry", trigger=TriggerEvent("t/fan-retry"))
    async def fan_retry(ctx: Context) -> Any:
        async def group(prefix: str) -> list[Any]:
            return [await ctx.step.run(f"{prefix}{i}", lambda i=i: i) for i in range(3)]

        await asyncio.gather(group("x"), group("y"))
        return await ctx.step.run("flaky", flaky)

    run = await _run_once(app, "t/fan-retry")
    assert run.status is RunStatus.COMPLETED, run.error
    assert run.output == "ok" and calls["flaky"] == 2


async def test_a_renamed_step_is_refused_before_it_runs(make_engine: Any) -> None:
    """A branch that asks, after a recorded step, for another step than the one recorded there
    fails with both ids, before the new step's body runs."""
    app = make_engine()
    executions: list[int] = []
    renamed: list[int] = []

    @app.create_function("renaming", trigger=TriggerEvent("t/rename"))
    async def renaming(ctx: Context) -> Any:
        executions.append(1)
        await ctx.step.run("a", lambda: 1)
        if len(executions) == 1:
            await ctx.step.run("charge", lambda: 2)
        else:
            await ctx.step.run("charge-card", lambda: renamed.append(1))
        await ctx.step.sleep("s", "10ms")

    run = await _run_once(app, "t/rename")
    assert run.status is RunStatus.FAILED and run.error["type"] == "DeterminismError"
    assert "'charge'" in run.error["message"] and "'charge-card'" in run.error["message"]
    assert renamed == []


async def test_a_recorded_step_no_longer_asked_for_fails_the_run(make_engine: Any) -> None:
    """Removing a recorded step is caught where the branch asks for the next one."""
    app = make_engine()
    executions: list[int] = []

    @app.create_function("removing", trigger=TriggerEvent("t/remove"))
    async def removing(ctx: Context) -> Any:
        executions.append(1)
        await ctx.step.run("a", lambda: 1)
        if len(executions) == 1:
            await ctx.step.run("b", lambda: 2)
        await ctx.step.sleep("s", "10ms")
        return "done"

    run = await _run_once(app, "t/remove")
    assert run.status is RunStatus.FAILED and run.error["type"] == "DeterminismError"
    assert "'b'" in run.error["message"] and "'s'" in run.error["message"]


async def test_a_step_kind_changed_under_one_id_fails_the_run(make_engine: Any) -> None:
    app = make_engine()
    executions: list[int] = []

    @app.create_function("kinds", trigger=TriggerEvent("t/kinds"))
    async def kinds(ctx: Context) -> Any:
        executions.append(1)
        if len(executions) == 1:
            await ctx.step.run("x", lambda: 1)
        else:
            await ctx.step.sleep("x", "1ms")
        await ctx.step.sleep("s", "10ms")

    run = await _run_once(app, "t/kinds")
    assert run.status is RunStatus.FAILED and run.error["type"] == "DeterminismError"
    assert "'x'" in run.error["message"] and "sleep" in run.error["message"]


async def test_explicit_ids_that_look_like_counters_do_not_collide(make_engine: Any) -> None:
    """`fetch:1` given by the code, then `fetch` twice: each keeps its own record (#11)."""
    app = make_engine()
    calls: Counter[str] = Counter()

    def effect(name: str) -> str:
        calls[name] += 1
        return name

    @app.create_function("lookalike", trigger=TriggerEvent("t/lookalike"))
    async def lookalike(ctx: Context) -> Any:
        first = await ctx.step.run("fetch:1", effect, "explicit")
        second = await ctx.step.run("fetch", effect, "one")
        await ctx.step.sleep("s", "10ms")
        third = await ctx.step.run("fetch", effect, "two")
        await ctx.step.sleep("t", "10ms")
        return [first, second, third]

    run = await _run_once(app, "t/lookalike")
    assert run.status is RunStatus.COMPLETED, run.error
    assert run.output == ["explicit", "one", "two"]
    assert calls == {"explicit": 1, "one": 1, "two": 1}
    assert [s.step_id for s in run.steps] == ["fetch:1", "fetch", "s", "fetch:2", "t"]


async def test_one_id_in_parallel_branches_keeps_each_branch_its_record(
    make_engine: Any,
) -> None:
    """Counters of an id asked in two branches follow each branch, not the loop's order."""
    app = make_engine()
    calls: Counter[str] = Counter()

    def effect(name: str) -> str:
        calls[name] += 1
        return name

    @app.create_function("shared-id", trigger=TriggerEvent("t/shared"))
    async def shared_id(ctx: Context) -> Any:
        fast_fetched = asyncio.Event()

        async def prepare() -> str:
            await fast_fetched.wait()  # the first time, `fast` asks for its fetch first
            return effect("prepare")

        async def slow() -> str:
            await ctx.step.run("prepare", prepare)  # replayed at once: `slow` asks first then
            return str(await ctx.step.run("fetch", effect, "slow"))

        async def fast() -> str:
            fetched = await ctx.step.run("fetch", effect, "fast")
            fast_fetched.set()
            return str(fetched)

        both = await asyncio.gather(slow(), fast())
        await ctx.step.sleep("s", "10ms")
        return both

    run = await _run_once(app, "t/shared")
    assert run.status is RunStatus.COMPLETED, run.error
    assert run.output == ["slow", "fast"]
    assert calls == {"prepare": 1, "slow": 1, "fast": 1}


async def test_a_nested_step_fails_the_run_even_if_the_outer_step_catches_everything(
    make_engine: Any,
) -> None:
    """`except Exception` inside the outer step cannot swallow NestedStepError (#12)."""
    app = make_engine()

    @app.create_function("swallow", trigger=TriggerEvent("t/swallow"), retries=3)
    async def swallow(ctx: Context) -> Any:
        async def outer() -> str:
            try:
                await ctx.step.run("inner", lambda: 1)
            except Exception:
                return "swallowed"
            return "not reached"

        return await ctx.step.run("outer", outer)

    run = await _run_once(app, "t/swallow")
    assert run.status is RunStatus.FAILED and run.error["type"] == "NestedStepError"
    assert run.attempt == 0
    assert [s.status for s in run.steps if s.step_id == "outer"] != ["COMPLETED"]


@pytest.mark.parametrize("case", ["bad-expression", "determinism", "left-running"])
async def test_no_engine_task_is_left_with_an_unretrieved_exception(
    make_engine: Any, case: str
) -> None:
    """A run failing inside gather() leaves no "Task exception was never retrieved" (#13)."""
    app = make_engine()
    executions: list[int] = []
    unretrieved: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: unretrieved.append(context))

    contexts: list[Context] = []

    @app.create_function("gathered", trigger=TriggerEvent("t/gathered"))
    async def gathered(ctx: Context) -> Any:
        executions.append(1)
        contexts.append(ctx)
        if case == "bad-expression":
            await asyncio.gather(
                ctx.step.wait_for_event("w", event="t/x", if_exp="event.data.x ==="),
                ctx.step.run("slow", asyncio.sleep, 0.05),
            )
        elif case == "left-running":  # a branch the function starts and never awaits
            left.append(asyncio.create_task(branch()))
            await ctx.step.run("main", asyncio.sleep, 0.01)
            raise NonRetriableError("the function ends while its branch still runs")
        elif len(executions) == 1:
            await ctx.step.run("a", lambda: 1)
            await ctx.step.sleep("s", "5ms")
        else:
            await asyncio.gather(ctx.step.run("b", lambda: 1), ctx.step.run("c", lambda: 1))

    left: list[asyncio.Task[Any]] = []

    async def branch() -> None:
        ctx = contexts[-1]
        await ctx.step.run("slow", asyncio.sleep, 30)  # outlives the run unless cancelled
        await ctx.step.run("after", lambda: 1)  # its write would come after the run ended

    try:
        run = await _run_once(app, "t/gathered")
        gc.collect()  # an unretrieved task reports when it is collected
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert run.status is RunStatus.FAILED
    assert unretrieved == []
    assert all(task.done() for task in left)


async def test_a_step_that_ends_while_its_run_settles_is_recorded_once(make_engine: Any) -> None:
    """A branch that goes on after a step completed, while another branch's sleep releases the
    run, starts no write that the release could cut: the step is recorded and runs once."""
    app = make_engine()
    calls: Counter[str] = Counter()

    async def slow(tag: str) -> str:
        calls[tag] += 1
        await asyncio.sleep(0.02)  # completes after the sleep has asked to release the run
        return tag

    @app.create_function("settling", trigger=TriggerEvent("t/settling"))
    async def settling(ctx: Context) -> Any:
        async def steps() -> list[str]:
            return [await ctx.step.run("work", slow, f"{ctx.event.data['n']}-{i}") for i in (0, 1)]

        both = await asyncio.gather(ctx.step.sleep("nap", "1ms"), steps())
        return both[1]

    async with app.worker():
        ids = await app.send([Event(name="t/settling", data={"n": n}) for n in range(8)])
        runs = [await app.wait_for_run(await only_run_id(app, i)) for i in ids]
    assert [r.output for r in runs] == [[f"{n}-0", f"{n}-1"] for n in range(8)]
    assert set(calls.values()) == {1} and len(calls) == 16
