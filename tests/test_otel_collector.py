"""Spans reach a real OpenTelemetry collector, over OTLP/HTTP and OTLP/gRPC.

The collector is rotel (a Rust OTLP collector shipped in a wheel): it receives on loopback and
prints every span it receives ("debug log", detailed) on its standard output, which the tests
parse. The in-process receiver of test_observability.py covers what needs no collector.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from helpers import eventually, run_traced_worker


@dataclass
class CollectedSpan:
    """One span as the collector printed it."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, str]


_FIELD = re.compile(r"^\s+(Trace ID|Parent ID|ID|Name)\s+:\s?(.*)$")
_ATTRIBUTE = re.compile(r"^\s+-> ([\w.]+): \w+\((.*)\)$")


def parse_spans(text: str) -> list[CollectedSpan]:
    """The spans in the collector's detailed debug output."""
    spans: list[CollectedSpan] = []
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("Span #"):
            fields = {}
            spans.append(CollectedSpan("", "", "", "", {}))
            continue
        if not spans:
            continue
        field = _FIELD.match(line)
        attribute = _ATTRIBUTE.match(line)
        span = spans[-1]
        if field:
            fields[field.group(1)] = field.group(2).strip()
            span.name = fields.get("Name", "")
            span.trace_id = fields.get("Trace ID", "")
            span.span_id = fields.get("ID", "")
            span.parent_id = fields.get("Parent ID", "")
        elif attribute and span.span_id:
            span.attributes[attribute.group(1)] = attribute.group(2)
    return spans


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Collector:
    """A running collector: where it listens, and what it printed."""

    grpc: str
    http: str
    output: Path

    def spans(self) -> list[CollectedSpan]:
        return parse_spans(self.output.read_text(errors="replace"))


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Collector]:
    """A real OTLP collector on loopback (gRPC and HTTP), exporting nowhere but its output."""
    binary = resources.files("rotel").joinpath("rotel-agent")
    grpc, http = f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"
    output = tmp_path / "collector.txt"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [
                str(binary),
                "start",
                "--exporter",
                "blackhole",
                "--debug-log",
                "traces",
                "--debug-log-verbosity",
                "detailed",
                "--otlp-grpc-endpoint",
                grpc,
                "--otlp-http-endpoint",
                http,
                "--pid-file",
                str(tmp_path / "rotel.pid"),
                "--log-file",
                str(tmp_path / "rotel.log"),
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_listening(http)
        yield Collector(grpc=grpc, http=http, output=output)
    finally:
        process.terminate()
        process.wait(timeout=10)


def _wait_listening(address: str, timeout: float = 10.0) -> None:
    host, port = address.split(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
async def test_a_run_is_one_trace_in_a_real_collector(
    collector: Collector, database_url: str, make_engine: Any, protocol: str
) -> None:
    """Over either OTLP protocol, a run with a retried step, a sleep and a wait (no traced
    sender) reaches the collector as one trace: the run's own span at the root, each execution
    its child, each step attempt a child of its execution (the failed one with its exception),
    and the backoff, the sleep and the wait children of the run, each with its outcome."""
    endpoint = collector.grpc if protocol == "grpc" else collector.http
    run_id, _ = await run_traced_worker(
        database_url,
        make_engine,
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{endpoint}",
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_SERVICE_NAME": "traced-service",
        },
    )

    def received() -> list[CollectedSpan]:
        return [s for s in collector.spans() if s.attributes.get("engine.run_id")]

    async def all_received() -> bool:
        names = {s.name for s in received()}
        return {"run traced", "sleep nap", "wait reply", "step only"} <= names

    await eventually(all_received, timeout=10)
    spans = received()
    by_name: dict[str, list[CollectedSpan]] = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)
    [root] = by_name["run traced"]
    assert {s.trace_id for s in spans} == {root.trace_id}, "one trace per run"
    assert root.parent_id == "" and root.attributes["engine.run_id"] == run_id
    assert root.attributes["engine.event.name"] == "traced/go"
    assert root.attributes["engine.outcome"] == "COMPLETED"
    executions = by_name["execution traced"]
    assert len(executions) >= 3  # resumed after the backoff, the sleep and the wait
    assert all(x.parent_id == root.span_id for x in executions)
    execution_ids = {x.span_id for x in executions}
    flaky = sorted(by_name["step flaky"], key=lambda s: s.attributes["engine.attempt"])
    assert [s.attributes["engine.attempt"] for s in flaky] == ["0", "1"]
    assert all(s.parent_id in execution_ids for s in flaky + by_name["step only"])
    assert flaky[0].parent_id != flaky[1].parent_id  # the retry ran in a later execution
    assert flaky[0].attributes["engine.outcome"] == "error"
    for kind, outcome in (
        ("backoff flaky", "time"),
        ("sleep nap", "time"),
        ("wait reply", "timeout"),
    ):
        [pause] = by_name[kind]
        assert pause.parent_id == root.span_id and pause.attributes["engine.outcome"] == outcome
    output = collector.output.read_text()
    assert "service.name: Str(traced-service)" in output
    assert "exception.message: Str(the first try fails)" in output


async def test_otel_sdk_disabled_exports_nothing(
    collector: Collector, database_url: str, make_engine: Any
) -> None:
    """OTEL_SDK_DISABLED=true turns the export off even with an endpoint set."""
    await run_traced_worker(
        database_url,
        make_engine,
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{collector.http}",
            "OTEL_SDK_DISABLED": "true",
        },
    )
    assert collector.spans() == []


async def test_an_unreachable_collector_does_not_hold_up_the_exit(
    database_url: str, make_engine: Any
) -> None:
    """A worker whose collector does not answer still exits promptly on SIGTERM: the flush at
    shutdown is bounded (the exporter's own retries last 8-10 s)."""
    closed = f"127.0.0.1:{_free_port()}"  # nothing listens there
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{closed}", "OTEL_BSP_SCHEDULE_DELAY": "60000"}
    # The bound is the engine's shutdown timeout (2 s) plus the worker's own stop; the SDK's
    # exit hook took 8-10 s here.
    _, code = await run_traced_worker(database_url, make_engine, env, exit_within=6)
    assert code == 0
