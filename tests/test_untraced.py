"""Without a tracer provider, the engine builds no spans (a fast path), yet a run still carries
its trace context: its sends and its log lines name the run's trace, as with the API's no-op
tracer. The test session configures an SDK provider, so the fast path is forced here. And a log
line below the configured level costs no logger."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
import structlog
from helpers import only_run_id
from structlog.contextvars import get_contextvars

from engine import Context, Event, TriggerEvent, telemetry
from engine.logs import configure_logging, engine_logger


@pytest.fixture
def untraced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(telemetry, "spans_recorded", lambda: False)


async def test_an_untraced_run_keeps_its_trace_context(
    make_engine: Any, database_url: str, untraced: None
) -> None:
    app = make_engine()
    bound: dict[str, dict[str, Any]] = {}  # what log lines would carry, inside and outside

    @app.create_function("untraced", trigger=TriggerEvent("t/untraced"))
    async def untraced_fn(ctx: Context) -> Any:
        await ctx.step.run("work", lambda: bound.setdefault("inside", get_contextvars()))
        bound.setdefault("outside", get_contextvars())
        await ctx.step.send_event("send", Event(name="t/child"))

    async with app.worker():
        [event_id] = await app.send(Event(name="t/untraced"))
        run_id = await only_run_id(app, event_id)
        run = await app.wait_for_run(run_id)
    assert run.status.value == "COMPLETED", run.error
    assert run.trace_id is not None
    inside, outside = bound["inside"], bound["outside"]
    assert inside["step_id"] == "work" and inside["attempt"] == 0
    assert inside["trace_id"] == outside["trace_id"] == run.trace_id
    assert inside["run_id"] == outside["run_id"] == run_id
    assert "step_id" not in outside  # the step's binding ended with it
    conn = await asyncpg.connect(database_url)
    try:
        sent = await conn.fetchval("SELECT traceparent FROM engine.events WHERE name = 't/child'")
    finally:
        await conn.close()
    assert sent is not None and sent.split("-")[1] == run.trace_id


async def test_an_untraced_failed_step_is_retried_with_its_attempt_bound(
    make_engine: Any, untraced: None
) -> None:
    app = make_engine()
    attempts: list[int] = []

    bound: list[dict[str, Any]] = []

    @app.create_function("flaky", trigger=TriggerEvent("t/flaky"), retries=1)
    async def flaky(ctx: Context) -> Any:
        async def once() -> str:
            attempts.append(ctx.attempt)
            bound.append(get_contextvars())
            if len(attempts) == 1:
                raise RuntimeError("first attempt fails")
            return "ok"

        return await ctx.step.run("once", once)

    async with app.worker():
        [event_id] = await app.send(Event(name="t/flaky"))
        run = await app.wait_for_run(await only_run_id(app, event_id))
    assert run.status.value == "COMPLETED", run.error
    assert [b["attempt"] for b in bound] == attempts == [0, 1]
    assert all(b["step_id"] == "once" and b["trace_id"] == run.trace_id for b in bound)


def test_a_line_below_the_configured_level_binds_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """At the worker's default level (info), the engine's debug lines (one per run start and
    end) cost no logger: nothing is bound or rendered for them; lines at the level still are."""
    saved = structlog.get_config()
    configure_logging("info")
    try:
        made: list[str] = []
        real = structlog.get_logger

        def counting(*args: Any) -> Any:
            made.append(args[0] if args else "")
            return real(*args)

        monkeypatch.setattr(structlog, "get_logger", counting)
        log = engine_logger().bind(run_id="r1")
        log.debug("quiet.line", attempt=0)
        assert made == []
        log.info("loud.line", attempt=0)
        assert made == ["engine"]
    finally:
        structlog.configure(**saved)
    assert "loud.line" in capsys.readouterr().err
