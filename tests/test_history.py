"""A run's history: every attempt of every step, every execution, every pause (get_run)."""

from __future__ import annotations

import asyncio
from typing import Any

from helpers import eventually, only_run_id

from engine import Backoff, Concurrency, Context, Event, RunInfo, RunStatus, TriggerEvent


def _step(run: RunInfo, step_id: str) -> Any:
    [step] = [s for s in run.steps if s.step_id == step_id]
    return step


async def test_get_run_keeps_every_attempt_execution_and_pause(make_engine: Any) -> None:
    """A step that succeeds on its third attempt still shows the first two errors (with their
    tracebacks, times and worker); the sleep, the wait (resumed by an event), the invoke (ended
    by its child) and the backoffs are pauses with their times and what ended them; each
    execution is kept with its worker and outcome, the body's failed attempt with its error."""
    app = make_engine(backoff=Backoff(initial="50ms", jitter=0))
    body_tries: list[int] = []

    @app.create_function("child", trigger=TriggerEvent("t/never"))
    async def child(ctx: Context) -> Any:
        return "from the child"

    @app.create_function("busy", trigger=TriggerEvent("t/busy"), retries=2)
    async def busy(ctx: Context) -> Any:
        def flaky() -> str:
            if ctx.attempt < 2:
                raise ValueError(f"try {ctx.attempt} fails")
            return "ok"

        await ctx.step.run("flaky", flaky)
        await ctx.step.sleep("nap", "60ms")
        reply = await ctx.step.wait_for_event("reply", event="t/reply", timeout="1m")
        result = await ctx.step.invoke("call", function=child, data={})
        body_tries.append(ctx.attempt)
        if len(body_tries) == 1:
            raise RuntimeError("the body fails once")
        return [reply is not None, result]

    async with app.worker() as worker:
        [event_id] = await app.send(Event(name="t/busy"))
        run_id = await only_run_id(app, event_id)

        async def waiting() -> bool:
            return (await app.get_run(run_id)).status is RunStatus.WAITING

        await eventually(waiting, timeout=20)
        [reply_id] = await app.send(Event(name="t/reply"))
        run = await app.wait_for_run(run_id, timeout=30)

    assert run.status is RunStatus.COMPLETED, run.error
    worker_id = str(worker.owner)
    _check_attempts(run, worker_id)
    _check_pauses(run, reply_id, (await app.list_runs("child"))[0].run_id)
    _check_executions(run, worker_id)


def _check_attempts(run: RunInfo, worker_id: str) -> None:
    flaky_step = _step(run, "flaky")
    assert flaky_step.attempt_count == 3
    attempts = flaky_step.attempts
    assert [a.attempt for a in attempts] == [0, 1, 2]
    assert [a.outcome for a in attempts] == ["RETRYING", "RETRYING", "COMPLETED"]
    assert attempts[0].error is not None and attempts[0].error["message"] == "try 0 fails"
    assert attempts[1].error is not None and attempts[1].error["type"] == "ValueError"
    assert 'raise ValueError(f"try {ctx.attempt} fails")' in attempts[0].error["traceback"]
    assert attempts[2].error is None
    for attempt in attempts:
        assert attempt.worker == worker_id
        assert attempt.started_at is not None and attempt.ended_at is not None
        assert attempt.started_at <= attempt.ended_at
    assert attempts[0].retry_at is not None and attempts[0].ended_at <= attempts[0].retry_at
    assert attempts[0].ended_at <= attempts[1].started_at  # in order, after the backoff


def _check_pauses(run: RunInfo, reply_id: str, child_id: str) -> None:
    pauses = {(p.kind, p.step_id): p for p in run.pauses}
    backoffs = [p for p in run.pauses if p.kind == "backoff"]
    # two of the step, one of the body
    assert [p.step_id for p in backoffs] == ["flaky", "flaky", None]
    assert all(p.ended_by == "time" and p.due_at is not None for p in backoffs)
    nap = pauses[("sleep", "nap")]
    assert nap.ended_by == "time" and nap.due_at is not None and nap.ended_at is not None
    assert (nap.due_at - nap.began_at).total_seconds() >= 0.06
    reply = pauses[("wait", "reply")]
    assert reply.ended_by == "event" and reply.event_id == reply_id
    call = pauses[("invoke", "call")]
    assert call.ended_by == "child" and call.child_run_id == child_id
    began = [p.began_at for p in run.pauses]
    assert began == sorted(began)


def _check_executions(run: RunInfo, worker_id: str) -> None:
    executions = run.executions
    assert [x.number for x in executions] == list(range(1, len(executions) + 1))
    assert all(x.worker == worker_id and not x.taken_over for x in executions)
    assert executions[-1].outcome == "COMPLETED"
    outcomes = [x.outcome for x in executions]
    assert outcomes.count("RETRYING") == 3  # the step twice, the body once
    assert "SLEEPING" in outcomes and outcomes.count("WAITING") >= 2
    [body_failure] = [x for x in executions if x.error is not None]
    assert body_failure.error is not None
    assert body_failure.error["message"] == "the body fails once"
    assert "RuntimeError" in body_failure.error["traceback"]
    assert body_failure.outcome == "RETRYING" and body_failure.due_at is not None
    claimed = [x.claimed_at for x in executions]
    assert claimed == sorted(claimed)


async def test_a_failed_step_and_run_keep_their_errors_and_tracebacks(make_engine: Any) -> None:
    """A step that fails for good keeps every attempt's error; the failed run's last execution
    keeps the error that failed it, with its traceback."""
    app = make_engine(backoff=Backoff(initial="10ms", jitter=0))

    @app.create_function("doomed", trigger=TriggerEvent("t/doomed"), retries=1)
    async def doomed(ctx: Context) -> Any:
        def boom() -> None:
            raise KeyError(f"attempt {ctx.attempt}")

        await ctx.step.run("boom", boom)

    async with app.worker():
        [event_id] = await app.send(Event(name="t/doomed"))
        run = await app.wait_for_run(await only_run_id(app, event_id), timeout=20)

    assert run.status is RunStatus.FAILED
    boom = _step(run, "boom")
    assert [(a.attempt, a.outcome) for a in boom.attempts] == [(0, "RETRYING"), (1, "FAILED")]
    assert [a.error["message"] for a in boom.attempts if a.error] == ["'attempt 0'", "'attempt 1'"]
    assert boom.attempts[1].retry_at is None
    last = run.executions[-1]
    assert last.outcome == "FAILED"
    assert last.error is not None and last.error["type"] == "StepError"
    assert "Traceback" in last.error["traceback"]


async def test_a_cancelled_sleep_is_a_pause_ended_by_the_cancel(make_engine: Any) -> None:
    """A run cancelled while it sleeps: its sleep ends with the run, by 'cancel'."""
    app = make_engine()

    @app.create_function("sleepy", trigger=TriggerEvent("t/sleepy"))
    async def sleepy(ctx: Context) -> Any:
        await ctx.step.sleep("long", "1h")

    async with app.worker():
        [event_id] = await app.send(Event(name="t/sleepy"))
        run_id = await only_run_id(app, event_id)

        async def sleeping() -> bool:
            return (await app.get_run(run_id)).status is RunStatus.SLEEPING

        await eventually(sleeping, timeout=20)
        await app.cancel_run(run_id)
    run = await app.get_run(run_id)
    [nap] = run.pauses
    assert nap.kind == "sleep" and nap.ended_by == "cancel" and nap.ended_at == run.ended_at
    assert [x.outcome for x in run.executions] == ["SLEEPING"]


async def test_the_first_execution_says_why_the_run_waited_to_start(make_engine: Any) -> None:
    """A run held back by flow control keeps the reason it waited with its first execution
    (its waiting_reason is cleared when it starts)."""
    app = make_engine()
    gate, entered = asyncio.Event(), asyncio.Event()

    @app.create_function("solo", concurrency=Concurrency(limit=1), trigger=TriggerEvent("s/go"))
    async def solo(ctx: Context) -> Any:
        async def hold() -> None:
            entered.set()
            await gate.wait()

        await ctx.step.run("hold", hold)

    async with app.worker():
        [first] = await app.send(Event(name="s/go"))
        first_id = await only_run_id(app, first)
        await asyncio.wait_for(entered.wait(), 10)
        [second] = await app.send(Event(name="s/go"))
        second_id = await only_run_id(app, second)

        async def held_back() -> bool:
            reason = (await app.get_run(second_id)).waiting_reason or ""
            return reason.startswith("concurrency limit reached")

        await eventually(held_back)
        gate.set()
        run = await app.wait_for_run(second_id)
        first_run = await app.wait_for_run(first_id)
    assert run.status is RunStatus.COMPLETED and run.waiting_reason is None
    assert (run.executions[0].waited or "").startswith("concurrency limit reached")
    assert first_run.executions[0].waited is None
