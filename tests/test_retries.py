"""Errors and retries: per step, durable, and overridable by the errors user code raises."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
from helpers import eventually, move_clock, only_run_id
from structlog.testing import capture_logs

from engine import (
    Context,
    Event,
    NonRetriableError,
    RetryAfterError,
    RunStatus,
    StepError,
    TriggerEvent,
)


async def run_once(app: Any, name: str, data: dict[str, Any] | None = None) -> Any:
    async with app.worker():
        [event_id] = await app.send(Event(name=name, data=data or {}))
        return await app.wait_for_run(await only_run_id(app, event_id))


async def test_step_retries_with_its_own_counter_and_ctx_attempt(make_engine: Any) -> None:
    """Each step counts its own attempts; ctx.attempt is 0-based and per step."""
    app = make_engine()
    seen: list[tuple[str, int]] = []

    @app.create_function("flaky", trigger=TriggerEvent("t/flaky"), retries=3)
    async def flaky(ctx: Context) -> Any:
        def first() -> str:
            seen.append(("first", ctx.attempt))
            if ctx.attempt < 2:
                raise RuntimeError("not yet")
            return "ok"

        def second() -> str:
            seen.append(("second", ctx.attempt))
            if ctx.attempt < 1:
                raise RuntimeError("not yet")
            return "ok"

        return [await ctx.step.run("first", first), await ctx.step.run("second", second)]

    run = await run_once(app, "t/flaky")
    assert run.status is RunStatus.COMPLETED
    assert seen == [("first", 0), ("first", 1), ("first", 2), ("second", 0), ("second", 1)]
    assert [(s.step_id, s.attempt_count) for s in run.steps] == [("first", 3), ("second", 2)]


async def test_exhausted_retries_raise_step_error_that_user_may_replace(make_engine: Any) -> None:
    """After retries+1 attempts the call site gets StepError; a caught one can be replaced."""
    app = make_engine()
    attempts = []

    class PaymentDeclined(Exception):
        pass

    @app.create_function("declines", trigger=TriggerEvent("t/declines"), retries=2)
    async def declines(ctx: Context) -> Any:
        def charge() -> None:
            attempts.append(1)
            raise ValueError("card declined")

        try:
            await ctx.step.run("charge", charge)
        except StepError as error:
            assert error.step_id == "charge" and error.error_type == "ValueError"
            raise PaymentDeclined(f"gave up: {error.error_message}") from error

    run = await run_once(app, "t/declines")
    assert len(attempts) == 3
    assert run.status is RunStatus.FAILED
    assert run.error == {"type": "PaymentDeclined", "message": "gave up: card declined"}
    assert run.steps[0].status == "FAILED" and run.steps[0].attempt_count == 3


async def test_uncaught_step_error_fails_run_without_function_retries(make_engine: Any) -> None:
    app = make_engine()
    body_runs = []

    @app.create_function("uncaught", trigger=TriggerEvent("t/uncaught"), retries=1)
    async def uncaught(ctx: Context) -> Any:
        body_runs.append(1)
        await ctx.step.run("boom", lambda: 1 / 0)

    run = await run_once(app, "t/uncaught")
    assert run.status is RunStatus.FAILED
    assert run.error["type"] == "StepError" and run.attempt == 0
    assert run.steps[0].attempt_count == 2


async def test_non_retriable_error_fails_step_on_first_attempt(make_engine: Any) -> None:
    app = make_engine()
    calls = []

    @app.create_function("fatal", trigger=TriggerEvent("t/fatal"), retries=4)
    async def fatal(ctx: Context) -> Any:
        def lookup() -> None:
            calls.append(1)
            raise NonRetriableError("user not found")

        await ctx.step.run("lookup", lookup)

    run = await run_once(app, "t/fatal")
    assert calls == [1]
    assert run.status is RunStatus.FAILED
    assert run.steps[0].error == {
        "type": "NonRetriableError",
        "message": "user not found",
        "code": "non_retriable",
    }


@pytest.mark.parametrize("kind", ["timedelta", "seconds", "datetime"])
async def test_retry_after_sets_the_next_attempt_time(make_engine: Any, kind: str) -> None:
    """RetryAfterError wins over the backoff: with an hour of backoff, the retry is still fast."""
    from engine import Backoff

    app = make_engine(backoff=Backoff(initial="1h", maximum="1h", jitter=0))
    calls = []

    @app.create_function("limited", trigger=TriggerEvent("t/limited"))
    async def limited(ctx: Context) -> Any:
        def call_api() -> str:
            calls.append(datetime.now(UTC))
            if len(calls) == 1:
                after: Any = {
                    "timedelta": timedelta(milliseconds=200),
                    "seconds": 0.2,
                    "datetime": datetime.now(UTC) + timedelta(milliseconds=200),
                }[kind]
                raise RetryAfterError("429 from the API", after)
            return "ok"

        return await ctx.step.run("call-api", call_api)

    run = await run_once(app, "t/limited")
    assert run.status is RunStatus.COMPLETED and run.output == "ok"
    assert calls[1] - calls[0] >= timedelta(milliseconds=150)
    assert run.steps[0].attempt_count == 2


async def test_error_outside_steps_retries_the_function(make_engine: Any) -> None:
    """A body error retries the whole function; steps that completed are not redone."""
    app = make_engine()
    step_calls, body_calls = [], []

    @app.create_function("body", trigger=TriggerEvent("t/body"), retries=2)
    async def body(ctx: Context) -> Any:
        body_calls.append(ctx.attempt)
        value = await ctx.step.run("once", lambda: step_calls.append(1) or 7)
        if len(body_calls) < 3:
            raise RuntimeError("flaky body")
        return value

    run = await run_once(app, "t/body")
    assert run.status is RunStatus.COMPLETED and run.output == 7
    assert body_calls == [0, 1, 2] and step_calls == [1]
    assert run.attempt == 2


async def test_function_retries_run_out(make_engine: Any) -> None:
    app = make_engine()

    @app.create_function("always", trigger=TriggerEvent("t/always"), retries=1)
    async def always(ctx: Context) -> Any:
        raise KeyError("missing")

    run = await run_once(app, "t/always")
    assert run.status is RunStatus.FAILED and run.attempt == 1
    assert run.error["type"] == "KeyError"


async def test_waiting_for_a_retry_is_visible(make_engine: Any) -> None:
    """A run waiting for its backoff says so, and holds no worker."""
    from engine import Backoff

    app = make_engine(backoff=Backoff(initial="1h", maximum="1h", jitter=0))

    @app.create_function("slow-retry", trigger=TriggerEvent("t/slow"))
    async def slow_retry(ctx: Context) -> Any:
        await ctx.step.run("fails", lambda: 1 / 0)

    async with app.worker() as worker:
        [event_id] = await app.send(Event(name="t/slow"))
        run_id = await only_run_id(app, event_id)

        async def retrying() -> Any:
            run = await app.get_run(run_id)
            return run if run.status is RunStatus.RETRYING else None

        from helpers import eventually

        run = await eventually(retrying)
        assert "retrying step 'fails'" in run.waiting_reason
        assert worker.executions == {}


async def test_a_step_may_override_the_function_retries(make_engine: Any) -> None:
    """retries= on ctx.step.run is the step's own policy; it is not passed to the callable."""
    app = make_engine()
    attempts: Counter[str] = Counter()

    def flaky(name: str) -> str:
        attempts[name] += 1
        raise RuntimeError(f"{name} failed")

    @app.create_function("override", trigger=TriggerEvent("o/go"), retries=5)
    async def override(ctx: Context) -> Any:
        outcomes = []
        for name, retries in (("once", 0), ("thrice", 2)):
            try:
                await ctx.step.run(name, flaky, name, retries=retries)
            except StepError as error:
                outcomes.append(error.error_message)
        return outcomes

    async with app.worker():
        [event_id] = await app.send(Event(name="o/go"))
        run = await app.wait_for_run(await only_run_id(app, event_id))
    assert run.output == ["once failed", "thrice failed"]
    assert attempts == {"once": 1, "thrice": 3}


async def test_retry_after_error_outside_steps_sets_the_function_retry(
    make_engine: Any, sql: Any
) -> None:
    """RetryAfterError raised outside any step decides when the function retries (#12)."""
    app = make_engine()
    attempts: list[int] = []

    @app.create_function("later", trigger=TriggerEvent("t/later"), retries=2)
    async def later(ctx: Context) -> Any:
        attempts.append(ctx.attempt)
        if len(attempts) == 1:
            raise RetryAfterError("quota exhausted", timedelta(hours=1))
        return "done"

    async with app.worker():
        [event_id] = await app.send(Event(name="t/later"))
        run_id = await only_run_id(app, event_id)

        async def retrying() -> Any:
            return await sql.fetchval(
                "SELECT due_at - engine.now() FROM engine.runs WHERE id = $1 AND status = "
                "'RETRYING'",
                UUID(run_id),
            )

        wait = await eventually(retrying)
        assert wait > timedelta(minutes=55)
        await move_clock(sql, timedelta(hours=1))
        run = await app.wait_for_run(run_id)
    assert run.status is RunStatus.COMPLETED and attempts == [0, 1]


async def test_an_invalid_sleep_duration_fails_the_run_at_once(make_engine: Any) -> None:
    """A step argument the step method refuses is a programming error: no retries (#13)."""
    app = make_engine()
    attempts: list[int] = []

    @app.create_function("bad-nap", trigger=TriggerEvent("t/bad-nap"), retries=4)
    async def bad_nap(ctx: Context) -> Any:
        attempts.append(1)
        await ctx.step.sleep("nap", "2 secs")

    run = await run_once(app, "t/bad-nap")
    assert run.status is RunStatus.FAILED and attempts == [1]
    assert "2 secs" in run.error["message"] and "'nap'" in run.error["message"]


async def test_a_naive_sleep_until_fails_the_run_at_once(make_engine: Any) -> None:
    app = make_engine()

    @app.create_function("naive", trigger=TriggerEvent("t/naive"), retries=4)
    async def naive(ctx: Context) -> Any:
        await ctx.step.sleep_until("wake", datetime(2030, 1, 1))

    run = await run_once(app, "t/naive")
    assert run.status is RunStatus.FAILED and run.attempt == 0
    assert "timezone-aware" in run.error["message"]


async def test_retry_numbering_is_zero_based_everywhere(make_engine: Any) -> None:
    """step.failed, the waiting reason and ctx.attempt all count attempts from 0 (#13)."""
    app = make_engine()
    seen: list[int] = []

    @app.create_function("numbered", trigger=TriggerEvent("t/numbered"))
    async def numbered(ctx: Context) -> Any:
        def charge() -> str:
            seen.append(ctx.attempt)
            if ctx.attempt == 0:
                raise RuntimeError("declined")
            return "ok"

        return await ctx.step.run("charge", charge)

    with capture_logs() as logs:
        run = await run_once(app, "t/numbered")
    assert run.status is RunStatus.COMPLETED and seen == [0, 1]
    [failed] = [e for e in logs if e["event"] == "step.failed"]
    [suspended] = [e for e in logs if e["event"] == "run.suspended"]
    assert failed["attempt"] == 0
    assert "retrying step 'charge' (attempt 1)" in suspended["reason"]
