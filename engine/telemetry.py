"""OpenTelemetry: one trace per run, with a span per execution, step attempt, send and pause.

A run's own span context is minted when the run is created (``runs.trace_context``: a new span
in the sender's trace when the event was sent inside a span, in a new trace otherwise) and
stored, so that every execution of the run, on any worker and after any restart, is a child of
it. The worker that ends the run emits that span itself (from the run's creation to its end),
with a span for each of its sleeps, waits, invokes and retry backoffs, timed from the run's
history. Event data and step outputs are put in spans only if the app opts in: they may hold
secrets.
"""

from __future__ import annotations

import contextvars
import os
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ._version import __version__
from .serialization import dumps

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.export import MetricExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace.export import SpanExporter

    from .events import Event
    from .runs import PauseInfo, RunInfo

tracer = trace.get_tracer("engine", __version__)
PAYLOAD_LIMIT = 4096  # characters of JSON kept on a span attribute
_propagator = TraceContextTextMapPropagator()


def current_traceparent() -> str | None:
    """The W3C traceparent of the current span, to store with an event (``None`` outside one)."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent")


def spans_recorded() -> bool:
    """False when no tracer provider is configured (the API's proxy or no-op one): then no span
    can record, and the engine skips building them. Looked up at each span, so that an
    application configuring tracing later is served from then on."""
    # trace.get_tracer_provider() looks $OTEL_PYTHON_TRACER_PROVIDER up in os.environ each time
    # no provider is set (a KeyError caught: ~5 times per run, a few percent of a run's CPU).
    # The API keeps the provider set in trace._TRACER_PROVIDER: None means none was set, and no
    # environment variable names one either, nothing can record. Anything else (or an API
    # version without that attribute) takes the public way.
    if getattr(trace, "_TRACER_PROVIDER", _UNKNOWN) is None and not _PROVIDER_FROM_ENVIRONMENT:
        return False
    return not isinstance(trace.get_tracer_provider(), _NOTHING_RECORDS)


_NOTHING_RECORDS = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
_UNKNOWN = object()
_PROVIDER_FROM_ENVIRONMENT = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ


def _parent(traceparent: str | None) -> otel_context.Context:
    return _propagator.extract({"traceparent": traceparent} if traceparent else {})


def run_span(
    *,
    run_id: str,
    function_id: str,
    attempt: int,
    event: Event,
    traceparent: str | None,
    trace_payloads: bool,
) -> AbstractContextManager[trace.Span]:
    """The span of one execution of a run, a child of the run's own span (``traceparent``: the
    run's trace context; for a run created before runs had one, the sender's); the event's data
    goes on the span only if the app opted in (``trace_payloads``)."""
    parent = _parent(traceparent)
    if not spans_recorded():
        return _RunTraceContext(parent)
    return _run_span(
        parent,
        run_id=run_id,
        function_id=function_id,
        attempt=attempt,
        event=event,
        trace_payloads=trace_payloads,
    )


class _RunTraceContext(AbstractContextManager[trace.Span]):
    """An execution's span when nothing records: what the API's no-op tracer would do, without
    its machinery (~5% of a worker's CPU per run). The current span is the run's (non-recording)
    one, so that sends and invokes carry its traceparent, and log lines its ids."""

    __slots__ = ("_bound", "_parent", "_token")

    def __init__(self, parent: otel_context.Context) -> None:
        self._parent = parent
        self._token: contextvars.Token[otel_context.Context] | None = None
        self._bound: Mapping[str, contextvars.Token[Any]] = {}

    def __enter__(self) -> trace.Span:
        span = trace.get_current_span(self._parent)
        self._token = otel_context.attach(self._parent)
        self._bound = structlog.contextvars.bind_contextvars(**_trace_ids(span))
        return span

    def __exit__(self, *_exc: object) -> None:
        structlog.contextvars.reset_contextvars(**self._bound)
        if self._token is not None:
            otel_context.detach(self._token)


@contextmanager
def _run_span(
    parent: otel_context.Context,
    *,
    run_id: str,
    function_id: str,
    attempt: int,
    event: Event,
    trace_payloads: bool,
) -> Iterator[trace.Span]:
    attributes: dict[str, str | int] = {
        "engine.run_id": run_id,
        "engine.function_id": function_id,
        "engine.attempt": attempt,
        "engine.event.name": event.name,
    }
    if event.id is not None:
        attributes["engine.event.id"] = event.id
    if trace_payloads:
        attributes["engine.event"] = _cut(dumps(event.model_dump(mode="json")))
    with (
        tracer.start_as_current_span(
            f"execution {function_id}",
            context=parent,
            attributes=attributes,
            kind=trace.SpanKind.CONSUMER,
        ) as span,
        _bound_trace_ids(span),
    ):
        yield span


def step_span(
    *, run_id: str, function_id: str, step_key: str, attempt: int
) -> AbstractContextManager[trace.Span]:
    """The span of one attempt of a step, a child of its run's span."""
    if not spans_recorded():  # the no-op tracer's span would be the run's own: keep it current
        return _StepLogFields(step_key, attempt)
    return _step_span(run_id=run_id, function_id=function_id, step_key=step_key, attempt=attempt)


class _StepLogFields(AbstractContextManager[trace.Span]):
    """A step's span when nothing records: the step's id and attempt bound for its log lines,
    and no span of its own (a plain class, not a generator: it wraps every step)."""

    __slots__ = ("_attempt", "_step_key", "_tokens")

    def __init__(self, step_key: str, attempt: int) -> None:
        self._step_key, self._attempt = step_key, attempt
        self._tokens: Mapping[str, contextvars.Token[Any]] = {}

    def __enter__(self) -> trace.Span:
        self._tokens = structlog.contextvars.bind_contextvars(
            step_id=self._step_key, attempt=self._attempt
        )
        return trace.INVALID_SPAN  # records nothing, as the current (run's) span would

    def __exit__(self, *_exc: object) -> None:
        structlog.contextvars.reset_contextvars(**self._tokens)


@contextmanager
def _step_span(
    *, run_id: str, function_id: str, step_key: str, attempt: int
) -> Iterator[trace.Span]:
    attributes: dict[str, str | int] = {
        "engine.run_id": run_id,
        "engine.function_id": function_id,
        "engine.step_id": step_key,
        "engine.attempt": attempt,
    }
    with tracer.start_as_current_span(f"step {step_key}", attributes=attributes) as span:
        # One binding per step (it costs more than the rest of the span when nothing records):
        # the step's own span id only when it has one; a span that records nothing shares its
        # execution's ids, bound already.
        ids = _trace_ids(span) if span.is_recording() else {}
        with structlog.contextvars.bound_contextvars(step_id=step_key, attempt=attempt, **ids):
            yield span


def _trace_ids(span: trace.Span) -> dict[str, str]:
    ids = span.get_span_context()
    if not ids.is_valid:
        return {}
    return {"trace_id": format(ids.trace_id, "032x"), "span_id": format(ids.span_id, "016x")}


@contextmanager
def _bound_trace_ids(span: trace.Span) -> Iterator[None]:
    with structlog.contextvars.bound_contextvars(**_trace_ids(span)):
        yield


@contextmanager
def send_span(*, run_id: str, function_id: str, step_key: str, count: int) -> Iterator[trace.Span]:
    """The span of a ``send_event`` step: the round trip that stores its events."""
    attributes: dict[str, str | int] = {
        "engine.run_id": run_id,
        "engine.function_id": function_id,
        "engine.step_id": step_key,
        "engine.events.count": count,
    }
    with tracer.start_as_current_span(f"send {step_key}", attributes=attributes) as span:
        yield span


# -- the run's own span and its pauses, emitted when it ends -------------------------------------
_pinned_span: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "engine_pinned_span", default=None
)


class _PinnedIds:
    """An id generator that hands out the (trace id, span id) pinned in the current context
    (the run's span, minted by the database), and delegates otherwise. Installed on the
    engine's own SDK tracer only: the application's tracers are never touched."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:  # the rest of the generator's interface
        return getattr(self._inner, name)

    def generate_span_id(self) -> int:
        pinned = _pinned_span.get()
        return pinned[1] if pinned else int(self._inner.generate_span_id())

    def generate_trace_id(self) -> int:
        pinned = _pinned_span.get()
        return pinned[0] if pinned else int(self._inner.generate_trace_id())


_history_tracers: dict[int, Any] = {}  # id of the SDK tracer provider -> our pinned tracer


def _history_tracer() -> Any | None:
    """The engine's tracer with pinned ids, when the application's tracer provider is the
    OpenTelemetry SDK's (only it lets a span be emitted with a span id chosen beforehand);
    None otherwise (no provider, or another implementation: then nothing is emitted)."""
    try:
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:  # pragma: no cover - the SDK is a dependency
        return None
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        return None
    pinned: Any = _history_tracers.get(id(provider))
    if pinned is None:
        pinned = provider.get_tracer("engine", __version__)  # the SDK's Tracer: id_generator
        pinned.id_generator = _PinnedIds(pinned.id_generator)
        _history_tracers.clear()  # a provider replaced (tests) is never used again
        _history_tracers[id(provider)] = pinned
    return pinned


def wants_run_history() -> bool:
    """Whether :func:`emit_run` would emit anything (so the caller may skip loading the run)."""
    return _history_tracer() is not None


def emit_run(run: RunInfo, trace_context: str | None, sender: str | None) -> None:
    """Emits a run's own span (id ``trace_context``, a child of the ``sender``'s span if any),
    from its creation to its end, and a child span for each pause in its history."""
    pinned_tracer = _history_tracer()
    ids = _propagator.extract({"traceparent": trace_context} if trace_context else {})
    own = trace.get_current_span(ids).get_span_context()
    if pinned_tracer is None or not own.is_valid or run.ended_at is None:
        return
    attributes: dict[str, str | int] = {
        "engine.run_id": run.run_id,
        "engine.function_id": run.function_id,
        "engine.event.name": run.event.name,
        "engine.outcome": run.status.value,
        "engine.executions": len(run.executions),
    }
    if run.event.id is not None:
        attributes["engine.event.id"] = run.event.id
    token = _pinned_span.set((own.trace_id, own.span_id))
    try:
        span = pinned_tracer.start_span(
            f"run {run.function_id}",
            context=_parent(sender),
            kind=trace.SpanKind.CONSUMER,
            attributes=attributes,
            start_time=_nanos(run.created_at),
        )
    finally:
        _pinned_span.reset(token)
    if run.status.value == "FAILED":
        message = (run.error or {}).get("message", "failed")
        span.set_status(trace.Status(trace.StatusCode.ERROR, str(message)))
    # Real time may be past the durable end: the last execution's span ends after its write.
    span.end(end_time=max(_nanos(run.ended_at), time.time_ns()))
    for pause in run.pauses:
        _emit_pause(pause, run, ids)


def _emit_pause(pause: PauseInfo, run: RunInfo, parent: otel_context.Context) -> None:
    ended = pause.ended_at or run.ended_at
    attributes: dict[str, str] = {
        "engine.run_id": run.run_id,
        "engine.function_id": run.function_id,
        "engine.outcome": pause.ended_by or "unfinished",
    }
    if pause.step_id is not None:
        attributes["engine.step_id"] = pause.step_id
    if pause.due_at is not None:
        attributes["engine.due_at"] = pause.due_at.isoformat()
    if pause.event_id is not None:
        attributes["engine.event.id"] = pause.event_id
    if pause.child_run_id is not None:
        attributes["engine.child_run_id"] = pause.child_run_id
    span = tracer.start_span(
        f"{pause.kind} {pause.step_id or run.function_id}",
        context=parent,
        attributes=attributes,
        start_time=_nanos(pause.began_at),
    )
    span.end(end_time=_nanos(ended or pause.began_at))


def _nanos(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000_000)


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


def record_error(span: trace.Span, error: BaseException) -> None:
    """Records a failed attempt on its span: the exception as an event, the status as an error
    with the message, and the outcome."""
    span.record_exception(error)
    span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    span.set_attribute("engine.outcome", "error")


def configure_from_environment() -> bool:
    """Exports spans and metrics over OTLP when an endpoint is configured, as the standard
    ``OTEL_*`` variables say; returns whether anything is exported. Called by ``engine worker``
    and ``engine dev``.

    Honoured: ``OTEL_SDK_DISABLED``; ``OTEL_EXPORTER_OTLP_ENDPOINT`` or the per-signal
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``..._METRICS_ENDPOINT``;
    ``OTEL_EXPORTER_OTLP_PROTOCOL`` or its per-signal forms (``http/protobuf``, the default, or
    ``grpc``); ``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER`` set to ``none`` turn a signal
    off; the headers, timeout, compression and certificate variables (read by the exporters);
    ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` (the service name defaults to
    ``engine-worker``); ``OTEL_BSP_*`` and ``OTEL_METRIC_EXPORT_INTERVAL``.

    Raises:
        TelemetryConfigError: an unknown protocol.
    """
    if _flag("OTEL_SDK_DISABLED"):
        return False
    traces = _configure_traces() if _signal_on("TRACES") else False
    metrics_on = _configure_metrics() if _signal_on("METRICS") else False
    return traces or metrics_on


def _signal_on(signal: str) -> bool:
    """An endpoint is configured for the signal, and its exporter is not ``none``."""
    if _env(f"OTEL_{signal}_EXPORTER").lower() == "none":
        return False
    return bool(
        _env("OTEL_EXPORTER_OTLP_ENDPOINT") or _env(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")
    )


def _configure_traces() -> bool:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    exporter = _span_exporter(_protocol("TRACES"))
    # Our own bounded shutdown replaces the SDK's exit hook, which waits for the exporter's
    # retries (8-10 s) when the collector cannot be reached.
    provider = TracerProvider(resource=_resource(), shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return True


def _configure_metrics() -> bool:
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    reader = PeriodicExportingMetricReader(_metric_exporter(_protocol("METRICS")))
    provider = MeterProvider(resource=_resource(), metric_readers=[reader], shutdown_on_exit=False)
    metrics.set_meter_provider(provider)
    return True


def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


def _flag(name: str) -> bool:
    return _env(name).lower() == "true"


def _protocol(signal: str) -> str:
    protocol = _env(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL") or _env("OTEL_EXPORTER_OTLP_PROTOCOL")
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


def _metric_exporter(protocol: str) -> MetricExporter:
    """The OTLP metric exporter for ``protocol`` (it reads the ``..._METRICS_*`` variables)."""
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcExporter,
        )

        return GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HttpExporter,
    )

    return HttpExporter()


def _resource() -> Resource:
    """The SDK's resource (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``), with
    ``service.name`` defaulting to ``engine-worker``."""
    from opentelemetry.sdk.resources import Resource

    named = _env("OTEL_SERVICE_NAME") or "service.name=" in _env("OTEL_RESOURCE_ATTRIBUTES")
    return Resource.create({} if named else {"service.name": "engine-worker"})


def shutdown(timeout: float = SHUTDOWN_TIMEOUT) -> None:
    """Flushes and stops the providers set by :func:`configure_from_environment`, giving up
    after ``timeout`` seconds so that an unreachable collector never holds up an exit."""
    from opentelemetry import metrics

    stops = [
        stop
        for provider in (trace.get_tracer_provider(), metrics.get_meter_provider())
        if callable(stop := getattr(provider, "shutdown", None))
    ]
    if not stops:
        return
    # The exporters retry with backoff inside shutdown; a daemon thread bounds the wait, and
    # whatever they have not sent by then is dropped with it.
    flusher = threading.Thread(
        target=lambda: [stop() for stop in stops], name="engine-otel-shutdown", daemon=True
    )
    flusher.start()
    flusher.join(timeout)
