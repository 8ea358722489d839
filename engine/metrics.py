"""OpenTelemetry metrics: what runs and workers do, and what the database holds.

Instruments follow OpenTelemetry's naming conventions (lowercase, dot-separated namespaces;
UCUM units: ``s`` for durations, ``{run}`` for counts of runs). Attributes: ``engine.app_id``,
``engine.function_id``, and where it applies ``engine.run.status``, ``engine.step.outcome`` or
``engine.flow.reason``.

Counters and histograms are recorded where things happen (an execution, a step attempt, a
claim). The gauges of what the database holds (backlog, its oldest due run, runs waiting on flow
control, paused runs) come from one snapshot query shared by every worker of the database
(``engine.gauges``): each worker asks for it once per export interval, and only one of them per
interval scans the unfinished runs. A worker reports the gauges of its own app. The gauges of an
app in a schema other than ``engine`` (``Engine(schema=...)``) also carry ``engine.schema``, so
that two apps of the same id in two schemas are told apart.

Without a configured ``MeterProvider`` every instrument is a no-op and no snapshot is taken.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from ._version import __version__
from .pg_schema import DEFAULT_SCHEMA

meter = metrics.get_meter("engine", __version__)

runs_started = meter.create_counter(
    "engine.run.started", unit="{run}", description="Executions of runs started (claims)"
)
runs_ended = meter.create_counter(
    "engine.run.ended", unit="{run}", description="Runs that reached a terminal status"
)
step_duration = meter.create_histogram(
    "engine.step.duration", unit="s", description="Duration of step attempts, by outcome"
)
start_latency = meter.create_histogram(
    "engine.run.start_latency",
    unit="s",
    description="From the triggering event's arrival to the start of the run's first execution",
)
lease_takeovers = meter.create_counter(
    "engine.lease.takeovers",
    unit="{run}",
    description="Runs taken over from a worker whose lease expired",
)
slots_busy = meter.create_up_down_counter(
    "engine.worker.slots.busy", unit="{run}", description="Runs executing in this worker"
)


def labels(app_id: str, function_id: str, **extra: str) -> dict[str, str]:
    """The attributes every engine metric carries, plus ``extra``."""
    return {"engine.app_id": app_id, "engine.function_id": function_id, **extra}


def run_first_started(app_id: str, function_id: str, latency: float) -> None:
    """A run started for the first time, ``latency`` seconds after its event was due."""
    attributes = labels(app_id, function_id)
    runs_started.add(1, attributes)
    start_latency.record(max(latency, 0.0), attributes)


def run_ended(app_id: str, function_id: str, status: str) -> None:
    """An execution ended its run with ``status``."""
    runs_ended.add(1, labels(app_id, function_id, **{"engine.run.status": status}))


def step_attempted(app_id: str, function_id: str, outcome: str, seconds: float) -> None:
    """A step attempt ended with ``outcome`` (``completed``, ``retrying`` or ``failed``)."""
    step_duration.record(seconds, labels(app_id, function_id, **{"engine.step.outcome": outcome}))


# The latest snapshot of engine.gauges, per (schema, app) whose worker asked for it.
_snapshots: dict[tuple[str, str], list[dict[str, Any]]] = {}

DEFAULT_INTERVAL = 60.0  # seconds; OTEL_METRIC_EXPORT_INTERVAL (milliseconds) overrides it


def enabled() -> bool:
    """True when an SDK ``MeterProvider`` is configured (else instruments are no-ops)."""
    from opentelemetry.sdk.metrics import MeterProvider

    return isinstance(metrics.get_meter_provider(), MeterProvider)


def export_interval() -> float:
    """Seconds between exports, as ``OTEL_METRIC_EXPORT_INTERVAL`` (milliseconds) says."""
    raw = os.environ.get("OTEL_METRIC_EXPORT_INTERVAL", "").strip()
    try:
        return max(float(raw) / 1000, 0.1) if raw else DEFAULT_INTERVAL
    except ValueError:
        return DEFAULT_INTERVAL


def keep_snapshot(app_id: str, rows: list[dict[str, Any]], schema: str = DEFAULT_SCHEMA) -> None:
    """Keeps the rows of ``engine.gauges`` (of ``schema``) that concern ``app_id`` for the next
    export."""
    kept = [{**row, "schema": schema} for row in rows if row["app_id"] == app_id]
    _snapshots[(schema, app_id)] = kept


def forget(app_id: str, schema: str = DEFAULT_SCHEMA) -> None:
    """Stops reporting gauges for ``app_id`` in ``schema`` (its worker stopped)."""
    _snapshots.pop((schema, app_id), None)


def _group(row: dict[str, Any], extra: str = "") -> tuple[str, ...]:
    """What a gauge row is reported under: its app, function, schema and ``extra``."""
    return (row["app_id"], row["function_id"], row["schema"], extra)


def _sum_by(key: str, value: str, only: Any = None) -> dict[tuple[str, ...], float]:
    """Sums ``value`` over the snapshot rows, grouped by app, function and ``key``."""
    totals: dict[tuple[str, ...], float] = {}
    for rows in _snapshots.values():
        for row in rows:
            if only is not None and not only(row):
                continue
            group = _group(row, str(row.get(key) or ""))
            totals[group] = totals.get(group, 0) + float(row[value] or 0)
    return totals


def _observe(totals: dict[tuple[str, ...], float], attribute: str | None) -> list[Observation]:
    observations = []
    for (app_id, function_id, schema, extra), value in totals.items():
        labels = {"engine.app_id": app_id, "engine.function_id": function_id}
        if schema != DEFAULT_SCHEMA:
            labels["engine.schema"] = schema
        if attribute is not None:
            labels[attribute] = extra
        observations.append(Observation(value, labels))
    return observations


def _backlog(options: CallbackOptions) -> Iterable[Observation]:
    return _observe(_sum_by("", "due"), None)


def _backlog_age(options: CallbackOptions) -> Iterable[Observation]:
    oldest: dict[tuple[str, ...], float] = {}
    for rows in _snapshots.values():
        for row in rows:
            age = row.get("oldest_due_age")
            if age is not None:
                group = _group(row)
                oldest[group] = max(oldest.get(group, 0.0), float(age))
    return _observe(oldest, None)


def _flow_waiting(options: CallbackOptions) -> Iterable[Observation]:
    return _observe(_sum_by("flow", "runs", lambda r: r.get("flow")), "engine.flow.reason")


def _paused(options: CallbackOptions) -> Iterable[Observation]:
    paused = ("SLEEPING", "WAITING", "RETRYING")
    return _observe(_sum_by("status", "runs", lambda r: r["status"] in paused), "engine.run.status")


meter.create_observable_gauge(
    "engine.run.backlog",
    [_backlog],
    unit="{run}",
    description="Runs due and not claimed by any worker",
)
meter.create_observable_gauge(
    "engine.run.backlog.age",
    [_backlog_age],
    unit="s",
    description="How long the oldest due, unclaimed run has been due",
)
meter.create_observable_gauge(
    "engine.run.flow_waiting",
    [_flow_waiting],
    unit="{run}",
    description="Runs not started because of flow control, by reason",
)
meter.create_observable_gauge(
    "engine.run.paused",
    [_paused],
    unit="{run}",
    description="Sleeping, waiting and retrying runs (they hold no worker)",
)
