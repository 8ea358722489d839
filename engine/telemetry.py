"""OpenTelemetry: one span per run execution and one per step, in the trace that sent the event.

The sender's W3C ``traceparent`` is stored with the event and the run, so a run's spans join the
trace that caused it across processes and restarts. Event data and step outputs are never put in
spans: they may hold secrets.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ._version import __version__
from .serialization import dumps

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

    from .execution import Execution

tracer = trace.get_tracer("engine", __version__)
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
        "engine.event.name": ex.run.events[0].name,
    }
    if ex.run.events[0].id is not None:
        attributes["engine.event.id"] = ex.run.events[0].id
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


# The OTLP protocols the OpenTelemetry Python SDK exports with (``http/json`` it does not).
PROTOCOLS = ("http/protobuf", "grpc")
SHUTDOWN_TIMEOUT = 2.0  # seconds the exporter gets to flush at exit, reachable or not


class TelemetryConfigError(ValueError):
    """An ``OTEL_*`` variable holds a value the engine cannot use."""


def configure_from_environment() -> bool:
    """Exports spans over OTLP when an endpoint is configured, as the standard ``OTEL_*``
    variables say; returns whether it did. Called by ``engine worker`` and ``engine dev``.

    Honoured: ``OTEL_SDK_DISABLED``; ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``; ``OTEL_EXPORTER_OTLP_PROTOCOL`` or
    ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` (``http/protobuf``, the default, or ``grpc``); the
    headers, timeout, compression and certificate variables (read by the exporters themselves);
    ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` (the service name defaults to
    ``engine-worker``); the ``OTEL_BSP_*`` batching variables.

    Raises:
        TelemetryConfigError: an unknown protocol.
    """
    if _flag("OTEL_SDK_DISABLED"):
        return False
    if not (_env("OTEL_EXPORTER_OTLP_ENDPOINT") or _env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    exporter = _span_exporter(_protocol())
    # Our own bounded shutdown replaces the SDK's exit hook, which waits for the exporter's
    # retries (10 s and more) when the collector cannot be reached.
    provider = TracerProvider(resource=Resource.create(_default_resource()), shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return True


def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


def _flag(name: str) -> bool:
    return _env(name).lower() == "true"


def _protocol() -> str:
    protocol = _env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or _env("OTEL_EXPORTER_OTLP_PROTOCOL")
    protocol = protocol or "http/protobuf"
    if protocol not in PROTOCOLS:
        raise TelemetryConfigError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported: use "
            + " or ".join(PROTOCOLS)
        )
    return protocol


def _span_exporter(protocol: str) -> SpanExporter:
    """The OTLP span exporter for ``protocol``; it reads its endpoint, headers, timeout,
    compression and certificates from the ``OTEL_EXPORTER_OTLP[_TRACES]_*`` variables."""
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    return HttpExporter()


def _default_resource() -> dict[str, str]:
    """``service.name`` unless the environment names the service (the SDK merges it then)."""
    named = _env("OTEL_SERVICE_NAME") or "service.name=" in _env("OTEL_RESOURCE_ATTRIBUTES")
    return {} if named else {"service.name": "engine-worker"}


def shutdown(timeout: float = SHUTDOWN_TIMEOUT) -> None:
    """Flushes and stops the tracer provider set by :func:`configure_from_environment`, giving
    up after ``timeout`` seconds so that an unreachable collector never holds up an exit."""
    provider = trace.get_tracer_provider()
    stop = getattr(provider, "shutdown", None)
    if not callable(stop):
        return
    # The exporter retries with backoff inside shutdown; a daemon thread bounds the wait, and
    # whatever it has not sent by then is dropped with it.
    flusher = threading.Thread(target=stop, name="engine-otel-shutdown", daemon=True)
    flusher.start()
    flusher.join(timeout)
