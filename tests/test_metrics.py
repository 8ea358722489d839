"""OpenTelemetry metrics: the database gauges, taken once per interval for every worker."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from helpers import eventually
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from engine import Concurrency, Context, Event, TriggerEvent


def points_of(reader: InMemoryMetricReader, name: str, app_id: str) -> list[Any]:
    """The data points of metric ``name`` that belong to ``app_id``."""
    data = reader.get_metrics_data()
    return [
        point
        for resource in (data.resource_metrics if data else [])
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == name
        for point in metric.data.data_points
        if point.attributes.get("engine.app_id") == app_id
    ]


def value_of(
    reader: InMemoryMetricReader, name: str, app_id: str, attributes: dict[str, str]
) -> Any:
    """The value of the point of ``name`` for ``app_id`` with these attributes, or None."""
    for point in points_of(reader, name, app_id):
        if all(point.attributes.get(key) == value for key, value in attributes.items()):
            return point.value
    return None


async def test_gauges_show_paused_and_flow_waiting_runs(
    make_engine: Any, metric_reader: InMemoryMetricReader, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker exports, for its app, the sleeping runs and the runs held back by a
    concurrency limit, as the database holds them."""
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "100")
    app = make_engine("gauged")

    @app.create_function("napper", trigger=TriggerEvent("g/nap"))
    async def napper(ctx: Context) -> None:
        await ctx.step.sleep("nap", "1h")

    gate = asyncio.Event()

    @app.create_function("solo", trigger=TriggerEvent("g/solo"), concurrency=Concurrency(limit=1))
    async def solo(ctx: Context) -> None:
        await ctx.step.run("hold", gate.wait)  # holds the only permit while the gate is shut

    async with app.worker():
        await app.send([Event(name="g/nap") for _ in range(3)])
        await app.send([Event(name="g/solo") for _ in range(3)])

        async def three_sleeping() -> bool:
            paused = value_of(
                metric_reader,
                "engine.run.paused",
                "gauged",
                {"engine.function_id": "napper", "engine.run.status": "SLEEPING"},
            )
            return bool(paused == 3)

        async def two_held_back() -> bool:
            waiting = value_of(
                metric_reader,
                "engine.run.flow_waiting",
                "gauged",
                {"engine.function_id": "solo", "engine.flow.reason": "concurrency"},
            )
            return bool(waiting == 2)

        await eventually(three_sleeping, timeout=20)
        await eventually(two_held_back, timeout=20)
        gate.set()


async def test_one_snapshot_serves_every_caller_within_the_interval(sql: Any) -> None:
    """engine.gauges scans the runs once per interval: within it, callers get the snapshot
    already taken, even when runs changed meanwhile."""
    first = await sql.fetchval("SELECT engine.gauges(interval '1 hour')")
    await sql.execute(
        """
        INSERT INTO engine.events (id, name, data, ts, received_at)
        VALUES ('e1', 'x/y', '{}', now(), now());
        INSERT INTO engine.runs (app_id, function_id, status, event_seq, due_at, created_at,
                                 updated_at)
        SELECT 'a', 'f', 'QUEUED', seq, now() - interval '5 seconds', now(), now()
        FROM engine.events WHERE id = 'e1';
        """
    )
    assert await sql.fetchval("SELECT engine.gauges(interval '1 hour')") == first == "[]"
    fresh = await sql.fetchval("SELECT engine.gauges($1::interval)", timedelta(0))
    assert '"due": 1' in fresh and '"status": "QUEUED"' in fresh


async def test_runs_steps_and_slots_are_counted(
    make_engine: Any, metric_reader: InMemoryMetricReader
) -> None:
    """A run whose step fails once then succeeds counts one start with its latency, one
    COMPLETED end, a retrying and a completed step attempt; its slot is free again after."""
    app = make_engine("counted")
    failures = iter([True])

    def flaky() -> str:
        if next(failures, False):
            raise RuntimeError("first attempt fails")
        return "ok"

    @app.create_function("flaky", trigger=TriggerEvent("c/go"))
    async def flaky_fn(ctx: Context) -> str:
        return str(await ctx.step.run("call", flaky))

    async with app.worker():
        [event_id] = await app.send(Event(name="c/go"))
        [run] = await eventually(lambda: app.runs_for_event(event_id))
        await app.wait_for_run(run.run_id, timeout=20)

    [started] = points_of(metric_reader, "engine.run.started", "counted")
    assert started.value == 1 and started.attributes["engine.function_id"] == "flaky"
    [latency] = points_of(metric_reader, "engine.run.start_latency", "counted")
    assert latency.count == 1 and latency.sum >= 0
    [ended] = points_of(metric_reader, "engine.run.ended", "counted")
    assert ended.value == 1 and ended.attributes["engine.run.status"] == "COMPLETED"
    attempts = {
        p.attributes["engine.step.outcome"]: p.count
        for p in points_of(metric_reader, "engine.step.duration", "counted")
    }
    assert attempts == {"retrying": 1, "completed": 1}
    [busy] = points_of(metric_reader, "engine.worker.slots.busy", "counted")
    assert busy.value == 0
