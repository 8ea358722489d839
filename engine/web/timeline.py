"""A run's waterfall for the Run page: the bars of :func:`engine.render.timeline_spans` (the
command line's timeline) placed on a time axis in percent, each with the details a click shows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from ..render import Span, ended_by, error_text, timeline_spans, took
from ..runs import AttemptInfo, ExecutionInfo, PauseInfo, RunInfo, StepInfo
from ..step_input import MAX_INPUT_BYTES, StepInput

TICKS = 5


@dataclass(frozen=True)
class Bar:
    """One row of the waterfall."""

    index: int
    label: str
    kind: str
    """``queued``, ``execution``, ``attempt``, ``step``, ``sleep``, ``wait``, ``invoke``,
    ``backoff``."""
    tone: str
    """A colour name of the command line's palette (``green``, ``red``, ``blue``...)."""
    left: float
    """Where it starts, in percent of the axis."""
    width: float
    start: str
    """Its start as an offset from the run's creation (``+1.20s``)."""
    duration: str
    lasting: bool
    indent: bool
    fields: list[tuple[str, str]] = field(default_factory=list)
    """What a click shows: name and text, in order."""
    blocks: list[tuple[str, str]] = field(default_factory=list)
    """Longer texts (output, error, traceback) shown preformatted."""
    links: list[tuple[str, str]] = field(default_factory=list)
    """(text, path within the dashboard): the event that ended a wait, an invoked run."""


@dataclass(frozen=True)
class Waterfall:
    """The bars and the axis of a run's timeline."""

    bars: list[Bar]
    ticks: list[tuple[float, str]]
    total: str


def waterfall(run: RunInfo, now: datetime) -> Waterfall:
    """The run's timeline from its creation to its end (``now`` while it goes on)."""
    spans = timeline_spans(run, requeued=True)
    origin = run.created_at
    latest = max((s.end or s.start for s in spans), default=origin)
    end = max(run.ended_at or now, latest, origin + timedelta(milliseconds=1))
    total = (end - origin).total_seconds()
    axis = _Axis(origin, end, total)
    bars = [_bar(i, span, run, axis) for i, span in enumerate(spans)]
    ticks = [
        (100 * i / TICKS, "+" + took(timedelta(seconds=total * i / TICKS)))
        for i in range(TICKS + 1)
    ]
    return Waterfall(bars=bars, ticks=ticks, total=took(end - origin))


@dataclass(frozen=True)
class _Axis:
    origin: datetime
    end: datetime
    total: float
    """Seconds from origin to end."""


def _bar(index: int, span: Span, run: RunInfo, axis: _Axis) -> Bar:
    origin, total = axis.origin, axis.total
    stop = span.end or axis.end
    left = 100 * (span.start - origin).total_seconds() / total
    width = max(0.3, 100 * (stop - span.start).total_seconds() / total)
    common = [("trace id", run.trace_id or "-")]
    fields, blocks, links = _details(span, run)
    return Bar(
        index=index,
        label=span.label.strip(),
        kind=span.kind,
        tone=span.style,
        left=min(left, 99.7),
        width=min(width, 100 - min(left, 99.7)),
        start="+" + took(span.start - origin),
        duration=took(stop - span.start) + ("…" if span.end is None else ""),
        lasting=span.end is None,
        indent=span.label.startswith(" "),
        fields=[
            ("start", f"+{took(span.start - origin)}"),
            ("end", "-" if span.end is None else f"+{took(span.end - origin)}"),
            ("took", took(stop - span.start) + (" so far" if span.end is None else "")),
            *fields,
            *common,
        ],
        blocks=blocks,
        links=links,
    )


Details = tuple[list[tuple[str, str]], list[tuple[str, str]], list[tuple[str, str]]]


def _details(span: Span, run: RunInfo) -> Details:
    source = span.source
    if isinstance(source, AttemptInfo):
        return _attempt(source, span.step)
    if isinstance(source, ExecutionInfo):
        return _execution(source)
    if isinstance(source, PauseInfo):
        return _pause(source)
    if isinstance(source, StepInfo):
        return _step(source)
    waited = run.executions[0].waited if run.executions else None
    return ([("waited because", waited)] if waited else []), [], []


def _error_blocks(error: dict[str, Any] | None) -> list[tuple[str, str]]:
    if not error:
        return []
    blocks = [("error", error_text(error))]
    if error.get("traceback"):
        blocks.append(("traceback", str(error["traceback"])))
    return blocks


def _input_blocks(given: StepInput | None) -> list[tuple[str, str]]:
    """The input block of a ``run`` step's attempt: its arguments, or why they are missing."""
    if given is None:
        return []
    if given.omitted_bytes is not None:
        size, limit = given.omitted_bytes, MAX_INPUT_BYTES // 1024
        return [("input", f"(not recorded: {size:,} bytes of JSON, over the {limit} KiB limit)")]
    shown: dict[str, Any] = {"args": given.args}
    if given.kwargs:
        shown["kwargs"] = given.kwargs
    return [("input", _value(shown))]


def _value(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def _attempt(attempt: AttemptInfo, step: StepInfo | None) -> Details:
    fields = [
        ("step", step.step_id if step else "-"),
        ("attempt", f"#{attempt.attempt + 1} of {step.attempt_count if step else '?'}"),
        ("outcome", attempt.outcome),
        ("worker", attempt.worker or "-"),
    ]
    if attempt.retry_at is not None:
        fields.append(("retry due", attempt.retry_at.isoformat()))
    blocks = _input_blocks(attempt.input) + _error_blocks(attempt.error)
    if attempt.outcome == "COMPLETED" and step is not None:
        output = "(too large to load)" if step.output_omitted else _value(step.output)
        blocks.append(("output", output))
    return fields, blocks, []


def _execution(execution: ExecutionInfo) -> Details:
    fields = [
        ("worker", execution.worker),
        ("outcome", execution.outcome or "executing"),
        ("took over", "yes (an expired lease)" if execution.taken_over else "no"),
    ]
    if execution.waited:
        fields.append(("had waited", execution.waited))
    if execution.reason:
        fields.append(("then waited", execution.reason))
    if execution.due_at is not None:
        fields.append(("due again", execution.due_at.isoformat()))
    return fields, _error_blocks(execution.error), []


def _pause(pause: PauseInfo) -> Details:
    fields = [
        ("step", pause.step_id or "(the function)"),
        ("due", "-" if pause.due_at is None else pause.due_at.isoformat()),
        ("ended by", ended_by(pause)),
    ]
    links = []
    if pause.event_id:
        links.append((f"event {pause.event_id}", f"/events/{pause.event_id}"))
    if pause.child_run_id:
        links.append((f"run {pause.child_run_id}", f"/runs/{pause.child_run_id}"))
    return fields, [], links


def _step(step: StepInfo) -> Details:
    fields = [("step", step.step_id), ("kind", step.kind), ("status", step.status)]
    blocks = _input_blocks(step.input) + _error_blocks(step.error)
    if step.output is not None:
        blocks.append(("output", _value(step.output)))
    return fields, blocks, []
