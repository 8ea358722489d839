"""Spans per run and step in the sender's trace, OTLP export, and logs that do not repeat."""

from __future__ import annotations

import asyncio
import http.server
import logging
import subprocess
import sys
import threading
from typing import Any

import pytest
import structlog
from helpers import APPS, only_run_id, run_traced_worker
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from structlog.testing import capture_logs

from engine import Context, Event, TriggerEvent
from engine.logs import _ignore, engine_logger


async def test_run_and_step_spans_are_children_of_the_senders_trace(
    make_engine: Any, spans: Any
) -> None:
    app = make_engine()

    @app.create_function("traced", trigger=TriggerEvent("t/traced"))
    async def traced(ctx: Context) -> Any:
        await ctx.step.run("one", lambda: 1)
        await ctx.step.run("two", lambda: {"secret": "s3cr3t"})

    async with app.worker():
        with trace.get_tracer("test").start_as_current_span("http request") as parent:
            [event_id] = await app.send(Event(name="t/traced", data={"password": "hunter2"}))
        run_id = await only_run_id(app, event_id)
        await app.wait_for_run(run_id)

    finished = {s.name: s for s in spans.get_finished_spans()}
    run_span, execution = finished["run traced"], finished["execution traced"]
    one, two = finished["step one"], finished["step two"]
    trace_id = parent.get_span_context().trace_id
    in_trace = {s.context.trace_id for s in (run_span, execution, one, two)}
    assert in_trace == {trace_id}
    # sender -> the run's own span -> its execution -> its steps
    assert run_span.parent.span_id == parent.get_span_context().span_id
    assert execution.parent.span_id == run_span.context.span_id
    assert one.parent.span_id == execution.context.span_id
    assert one.attributes["engine.run_id"] == run_id
    assert one.attributes["engine.step_id"] == "one" and one.attributes["engine.attempt"] == 0
    assert one.attributes["engine.outcome"] == "completed"
    assert execution.attributes["engine.outcome"] == "COMPLETED"
    assert run_span.attributes["engine.outcome"] == "COMPLETED"
    assert run_span.start_time <= execution.start_time <= execution.end_time <= run_span.end_time
    run = await app.get_run(run_id)
    assert run.trace_id == format(trace_id, "032x")
    everything = repr([dict(s.attributes) for s in spans.get_finished_spans()])
    assert "hunter2" not in everything and "s3cr3t" not in everything


async def test_a_run_without_a_traced_sender_is_one_trace_across_executions(
    make_engine: Any, spans: Any
) -> None:
    """No span around the send: the run's trace is minted when the run is created, so both
    executions (before and after the sleep) and the sleep itself share it, under the run's
    own span, whose span id is the one stored with the run."""
    app = make_engine()

    @app.create_function("minted", trigger=TriggerEvent("t/minted"))
    async def minted(ctx: Context) -> Any:
        await ctx.step.run("before", lambda: 1)
        await ctx.step.sleep("nap", "50ms")
        await ctx.step.send_event("tell", Event(name="t/told"))
        return await ctx.step.run("after", lambda: 2)

    async with app.worker():
        [event_id] = await app.send(Event(name="t/minted"))
        run_id = await only_run_id(app, event_id)
        await app.wait_for_run(run_id)

    mine = [s for s in spans.get_finished_spans() if s.attributes.get("engine.run_id") == run_id]
    names = sorted(s.name for s in mine)
    assert names == [
        "execution minted",
        "execution minted",
        "run minted",
        "send tell",
        "sleep nap",
        "step after",
        "step before",
    ]
    [root] = [s for s in mine if s.name == "run minted"]
    assert root.parent is None
    assert {s.context.trace_id for s in mine} == {root.context.trace_id}
    run = await app.get_run(run_id)
    assert run.trace_id == format(root.context.trace_id, "032x")
    [sleep] = [s for s in mine if s.name == "sleep nap"]
    assert sleep.parent.span_id == root.context.span_id
    assert sleep.attributes["engine.outcome"] == "time"
    assert (sleep.end_time - sleep.start_time) / 1e9 >= 0.04  # its real duration, from history
    executions = [s for s in mine if s.name == "execution minted"]
    assert all(x.parent.span_id == root.context.span_id for x in executions)
    [send] = [s for s in mine if s.name == "send tell"]
    assert send.parent.span_id in {x.context.span_id for x in executions}


async def test_payloads_go_on_spans_only_when_the_app_opts_in(make_engine: Any, spans: Any) -> None:
    app = make_engine(trace_payloads=True)

    @app.create_function("open", trigger=TriggerEvent("t/open"))
    async def open_book(ctx: Context) -> Any:
        await ctx.step.run("small", lambda: {"secret": "s3cr3t"})
        await ctx.step.run("big", lambda: "x" * 10_000)
        return "done"

    async with app.worker():
        [event_id] = await app.send(Event(name="t/open", data={"password": "hunter2"}))
        await app.wait_for_run(await only_run_id(app, event_id))

    finished = {s.name: s for s in spans.get_finished_spans()}
    run_span, small, big = finished["execution open"], finished["step small"], finished["step big"]
    assert '"password":"hunter2"' in run_span.attributes["engine.event"]
    assert run_span.attributes["engine.output"] == '"done"'
    assert small.attributes["engine.step.output"] == '{"secret":"s3cr3t"}'
    cut = big.attributes["engine.step.output"]
    assert len(cut) < 4200 and cut.endswith("(10002 characters)")


async def test_ctx_logger_does_not_repeat_lines_on_replay(make_engine: Any) -> None:
    app = make_engine()

    @app.create_function("chatty", trigger=TriggerEvent("t/chatty"))
    async def chatty(ctx: Context) -> Any:
        ctx.logger.info("chatty.begin")
        await ctx.step.sleep("pause", "20ms")
        ctx.logger.info("chatty.middle")
        await ctx.step.sleep("pause-again", "20ms")
        ctx.logger.info("chatty.end")

    with capture_logs() as logs:
        async with app.worker():
            [event_id] = await app.send(Event(name="t/chatty"))
            run_id = await only_run_id(app, event_id)
            await app.wait_for_run(run_id)
    lines = [entry["event"] for entry in logs if entry["event"].startswith("chatty.")]
    assert lines == ["chatty.begin", "chatty.middle", "chatty.end"]
    started = [e for e in logs if e["event"] == "run.started"]
    assert len(started) == 3 and all(e["run_id"] == run_id for e in started)


async def _logged_lines(app: Any, name: str, prefix: str) -> list[str]:
    with capture_logs() as logs:
        async with app.worker():
            [event_id] = await app.send(Event(name=name))
            run = await app.wait_for_run(await only_run_id(app, event_id))
    assert run.status.value == "COMPLETED", run.error
    return [entry["event"] for entry in logs if entry["event"].startswith(prefix)]


async def test_ctx_logger_line_after_a_replayed_step_that_logged_is_emitted(
    make_engine: Any,
) -> None:
    """A line logged inside a step does not hide a later line outside steps (#12)."""
    app = make_engine()

    @app.create_function("inside-out", trigger=TriggerEvent("t/inside-out"))
    async def inside_out(ctx: Context) -> Any:
        await ctx.step.run("work", lambda: ctx.logger.info("io.inside"))
        await ctx.step.sleep("pause", "10ms")
        ctx.logger.info("io.after")

    assert await _logged_lines(app, "t/inside-out", "io.") == ["io.inside", "io.after"]


async def test_ctx_logger_inside_a_step_logs_each_attempt_outside_once(make_engine: Any) -> None:
    """Each attempt of a step logs its lines; lines outside steps appear once over the run."""
    app = make_engine()
    attempts: list[int] = []

    def flaky() -> str:
        ctx_logger.info("retry.try")
        attempts.append(1)
        if len(attempts) < 3:
            raise RuntimeError("again")
        return "ok"

    @app.create_function("retrying", trigger=TriggerEvent("t/retrying"))
    async def retrying(ctx: Context) -> Any:
        nonlocal ctx_logger
        ctx_logger = ctx.logger
        ctx.logger.info("retry.before")
        await ctx.step.run("flaky", flaky)
        ctx.logger.info("retry.after")

    ctx_logger: Any = None
    lines = await _logged_lines(app, "t/retrying", "retry.")
    assert lines == ["retry.before", "retry.try", "retry.try", "retry.try", "retry.after"]


async def test_ctx_logger_lines_of_parallel_branches_appear_once(make_engine: Any) -> None:
    """Branches that gather runs log their lines once, whatever order the replay runs them in."""
    app = make_engine()

    @app.create_function("branches", trigger=TriggerEvent("t/branches"))
    async def branches(ctx: Context) -> Any:
        async def branch(name: str) -> None:
            ctx.logger.info(f"b.{name}.start")
            await ctx.step.run(f"{name}-1", lambda: None)
            ctx.logger.info(f"b.{name}.middle")
            await ctx.step.run(f"{name}-2", lambda: None)

        await asyncio.gather(branch("x"), branch("y"))
        await ctx.step.sleep("pause", "10ms")
        ctx.logger.info("b.end")
        await ctx.step.sleep("pause-again", "10ms")

    lines = await _logged_lines(app, "t/branches", "b.")
    assert sorted(lines) == sorted(["b.x.start", "b.x.middle", "b.y.start", "b.y.middle", "b.end"])


async def test_ctx_logger_lines_after_the_last_step_of_each_branch_appear_once(
    make_engine: Any,
) -> None:
    """Two parallel branches each log after their last step, then the run sleeps: each line
    appears once (only the run's tail place used to be counted, so the other branch's line
    came again after the sleep) (#12)."""
    app = make_engine()

    @app.create_function("tails", trigger=TriggerEvent("t/tails"))
    async def tails(ctx: Context) -> Any:
        async def branch(name: str) -> None:
            await ctx.step.run(f"{name}-work", lambda: None)
            ctx.logger.info(f"tail.{name}.done")

        await asyncio.gather(branch("x"), branch("y"))
        await ctx.step.sleep("pause", "10ms")
        ctx.logger.info("tail.end")
        await ctx.step.sleep("pause-again", "10ms")

    lines = await _logged_lines(app, "t/tails", "tail.")
    assert sorted(lines) == ["tail.end", "tail.x.done", "tail.y.done"]


async def test_ctx_logger_lines_after_parallel_branch_ends_are_never_lost(
    make_engine: Any,
) -> None:
    """Branches that end with a line after their last step, one of them a sleep: every line is
    emitted (at least once; the run's tail exactly once), whatever order the replay runs them."""
    app = make_engine()

    @app.create_function("tails", trigger=TriggerEvent("t/tails"))
    async def tails(ctx: Context) -> Any:
        async def then_log(step: Any, name: str) -> None:
            await step
            ctx.logger.info(f"tail.{name}")

        await asyncio.gather(
            then_log(ctx.step.run("first", lambda: 1), "first"),
            then_log(ctx.step.sleep("nap", "5ms"), "nap"),
            then_log(ctx.step.run("last", lambda: 2), "last"),
        )

    lines = await _logged_lines(app, "t/tails", "tail.")
    assert set(lines) == {"tail.first", "tail.nap", "tail.last"}
    assert lines.count("tail.nap") == 1


class _Collector(http.server.BaseHTTPRequestHandler):
    received: list[ExportTraceServiceRequest] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        self.received.append(request)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


async def test_worker_exports_spans_to_an_otlp_endpoint(
    database_url: str, make_engine: Any
) -> None:
    """`engine worker` sends spans to the collector named by OTEL_EXPORTER_OTLP_ENDPOINT."""
    server = http.server.HTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{server.server_port}"}
        await run_traced_worker(database_url, make_engine, endpoint)
    finally:
        server.shutdown()
        server.server_close()
    names = {
        span.name
        for request in _Collector.received
        for rs in request.resource_spans
        for ss in rs.scope_spans
        for span in ss.spans
    }
    assert {"run traced", "step only"} <= names


def test_library_prints_nothing_unless_the_application_configures_logging(
    database_url: str,
) -> None:
    """Embedded in an application, the engine leaves logging to it: silent by default, and
    through the stdlib logger ``engine`` once the application configures logging."""
    script = [sys.executable, str(APPS / "embedded_app.py"), database_url]
    quiet = subprocess.run(
        [*script, "quiet"], check=False, capture_output=True, text=True, timeout=60
    )
    assert quiet.returncode == 0, quiet.stderr
    assert (quiet.stdout, quiet.stderr) == ("", "")
    configured = subprocess.run(
        [*script, "stdlib"], check=False, capture_output=True, text=True, timeout=60
    )
    assert configured.returncode == 0, configured.stderr
    assert configured.stdout == ""
    assert "INFO:engine:event='hello.logged'" in configured.stderr
    assert "run_id=" in configured.stderr


def test_a_line_below_the_stdlib_level_is_dropped_before_any_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without structlog configured, a line below the level of the stdlib logger ``engine`` is
    dropped before its context is bound (the engine logs a few lines a run); at or above the
    level, it goes through as before."""
    monkeypatch.setattr(structlog, "is_configured", lambda: False)
    stdlib = logging.getLogger("engine")
    level = stdlib.level
    try:
        stdlib.setLevel(logging.WARNING)
        log = engine_logger().bind(run_id="r")
        assert log.info is _ignore and log.debug is _ignore
        assert log.warning is not _ignore
        stdlib.setLevel(logging.DEBUG)
        assert log.debug is not _ignore
    finally:
        stdlib.setLevel(level)


async def test_a_failed_attempt_records_its_exception_on_its_span(
    make_engine: Any, spans: Any
) -> None:
    """A step attempt that raised has an error status with the message and the exception as an
    event; the retry is a sibling span with the next attempt number."""
    app = make_engine()
    failures = iter([True])

    def flaky() -> str:
        if next(failures, False):
            raise ValueError("the API said no")
        return "ok"

    @app.create_function("retried", trigger=TriggerEvent("t/retried"))
    async def retried(ctx: Context) -> Any:
        return await ctx.step.run("call", flaky)

    async with app.worker():
        [event_id] = await app.send(Event(name="t/retried"))
        run_id = await only_run_id(app, event_id)
        await app.wait_for_run(run_id)

    attempts = sorted(
        (s for s in spans.get_finished_spans() if s.name == "step call"),
        key=lambda s: s.attributes["engine.attempt"],
    )
    assert [s.attributes["engine.attempt"] for s in attempts] == [0, 1]
    failed, succeeded = attempts
    assert failed.status.status_code == trace.StatusCode.ERROR
    assert failed.status.description == "ValueError: the API said no"
    [exception] = [e for e in failed.events if e.name == "exception"]
    assert exception.attributes["exception.type"] == "ValueError"
    assert succeeded.status.status_code != trace.StatusCode.ERROR
