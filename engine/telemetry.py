"""OpenTelemetry: one span per run execution and one per step, in the trace that sent the event.

The sender's W3C ``traceparent`` is stored with the event and the run, so a run's spans join the
trace that caused it across processes and restarts. Event data and step outputs are never put in
spans: they may hold secrets.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .serialization import dumps

if TYPE_CHECKING:
    from .execution import Execution

tracer = trace.get_tracer("engine")
PAYLOAD_LIMIT = 4096  # characters of JSON kept on a span attribute
_propagator = TraceContextTextMapPropagator()


def current_traceparent() -> str | None:
    """The W3C traceparent of the current span, to store with an event (``None`` outside one)."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent")


def _parent(traceparent: str | None) -> otel_context.Context:
    return _propagator.extract({"traceparent": traceparent} if traceparent else {})


@contextmanager
def run_span(ex: Execution) -> Iterator[trace.Span]:
    """The span of one execution of a run, a child of the trace that sent its event."""
    attributes: dict[str, str | int] = {
        "engine.run_id": str(ex.run.run_id),
        "engine.function_id": ex.fn_id,
        "engine.attempt": ex.run.attempt,
    }
    if ex.trace_payloads:
        attributes["engine.event"] = _cut(dumps(ex.run.events[0].model_dump(mode="json")))
    with (
        tracer.start_as_current_span(
            f"run {ex.fn_id}",
            context=_parent(ex.run.traceparent),
            attributes=attributes,
            kind=trace.SpanKind.CONSUMER,
        ) as span,
        _bound_trace_ids(span),
    ):
        yield span


@contextmanager
def step_span(ex: Execution, step_key: str, attempt: int) -> Iterator[trace.Span]:
    """The span of one attempt of a step, a child of its run's span."""
    attributes: dict[str, str | int] = {
        "engine.run_id": str(ex.run.run_id),
        "engine.function_id": ex.fn_id,
        "engine.step_id": step_key,
        "engine.attempt": attempt,
    }
    with (
        tracer.start_as_current_span(f"step {step_key}", attributes=attributes) as span,
        _bound_trace_ids(span),
        structlog.contextvars.bound_contextvars(step_id=step_key, attempt=attempt),
    ):
        yield span


@contextmanager
def _bound_trace_ids(span: trace.Span) -> Iterator[None]:
    ids = span.get_span_context()
    if not ids.is_valid:
        yield
        return
    with structlog.contextvars.bound_contextvars(
        trace_id=format(ids.trace_id, "032x"), span_id=format(ids.span_id, "016x")
    ):
        yield


def payload(span: trace.Span, name: str, json_text: str, opted_in: bool) -> None:
    """Puts a step's or a run's output on its span, if the app opted in (see the module)."""
    if opted_in:
        span.set_attribute(name, _cut(json_text))


def _cut(json_text: str) -> str:
    if len(json_text) <= PAYLOAD_LIMIT:
        return json_text
    return f"{json_text[:PAYLOAD_LIMIT]}... ({len(json_text)} characters)"


def mark(span: trace.Span, outcome: str) -> None:
    """Records how a run or step ended on its span."""
    span.set_attribute("engine.outcome", outcome)
    if outcome in ("FAILED", "error", "lease_lost"):
        span.set_status(trace.Status(trace.StatusCode.ERROR, outcome))


def configure_from_environment() -> None:
    """Exports spans over OTLP/HTTP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the traces one) is
    set, honouring the other standard ``OTEL_*`` variables. Called by ``engine worker``/``dev``.
    """
    if not (
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    ):
        return
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(
        resource=Resource.create(
            {"service.name": os.environ.get("OTEL_SERVICE_NAME", "engine-worker")}
        )
    )
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)


def shutdown() -> None:
    """Flushes and stops the tracer provider set by :func:`configure_from_environment`."""
    provider = trace.get_tracer_provider()
    stop = getattr(provider, "shutdown", None)
    if callable(stop):
        stop()
