"""What the command line shows people: tables of runs, events and functions, and a run's
story (its steps with their attempts, its pauses and a timeline drawn on one time axis).

Everything here builds ``rich`` renderables from the models the :class:`~engine.Engine` returns
and reads nothing else, so it is tested on runs built by hand. User text (step ids, error
messages, event names) always goes into :class:`~rich.text.Text`, never through rich's markup.
Times are shown in UTC; within a run, as offsets from its creation (``+1.20s``), the axis of
its timeline.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.table import Table
from rich.text import Text

from .events import StoredEvent
from .function import FunctionInfo
from .runs import AttemptInfo, ExecutionInfo, PauseInfo, RunInfo, RunSummary, StepInfo

STATUS_STYLES = {
    "QUEUED": "white",
    "RUNNING": "cyan",
    "SLEEPING": "blue",
    "RETRYING": "yellow",
    "WAITING": "magenta",
    "COMPLETED": "green",
    "FAILED": "red",
    "CANCELLED": "yellow",
    "SKIPPED": "dim",
}
_ATTEMPT_OUTCOMES = {"COMPLETED": "completed", "RETRYING": "failed", "FAILED": "failed"}
_MAX_VALUE = 240  # characters of an output or error shown in a header (--json has it all)


# -- small pieces ----------------------------------------------------------------------------------
def table(*headers: str) -> Table:
    """A table in the house style: a rule under the header, no frame, two spaces between
    columns (it reads in 80 columns and when piped)."""
    grid = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    for header in headers:
        grid.add_column(header)
    return grid


def status_text(status: str) -> Text:
    """A run's or step's status, coloured."""
    return Text(status, style=STATUS_STYLES.get(status, ""))


def took(span: timedelta) -> str:
    """A duration, short: ``850ms``, ``1.25s``, ``12.3s``, ``2m05s``, ``3h20m``, ``2d04h``."""
    seconds = span.total_seconds()
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 10:
        return f"{seconds:.2f}s"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def age(span: timedelta) -> str:
    """How long ago, coarse: ``12s``, ``5m``, ``3h``, ``2d``."""
    seconds = max(0, int(span.total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def between(start: datetime | None, end: datetime | None) -> str:
    """The duration from ``start`` to ``end``, or ``-`` when one is unknown."""
    return "-" if start is None or end is None else took(end - start)


def offset(moment: datetime | None, origin: datetime) -> str:
    """``moment`` as an offset from ``origin`` (``+1.20s``), or ``-``."""
    return "-" if moment is None else f"+{took(moment - origin)}"


def clock(moment: datetime | None, *, precise: bool = False) -> str:
    """A UTC time: ``2026-12-02 06:56:51`` (``.120`` more with ``precise``), or ``-``."""
    if moment is None:
        return "-"
    utc = moment.astimezone(UTC)
    text = utc.strftime("%Y-%m-%d %H:%M:%S")
    return f"{text}.{utc.microsecond // 1000:03d}" if precise else text


def error_text(error: dict[str, Any] | None) -> str:
    """``Type: message`` of a recorded error."""
    if not error:
        return ""
    kind, message = error.get("type"), error.get("message")
    return f"{kind}: {message}" if kind and message else str(message or kind or error)


def short(text: str, limit: int = _MAX_VALUE) -> str:
    """``text`` cut at ``limit`` characters."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def worker_name(worker: str | None) -> str:
    """A worker's id as shown: its first 8 characters (a UUID's first group)."""
    return "-" if not worker else worker[:8]


# -- listings --------------------------------------------------------------------------------------
def runs_table(runs: list[RunSummary], now: datetime, *, with_event: bool = False) -> Table:
    """One row per run: id, function (with its app when several apps are listed), status, age,
    how long it took (so far), and with ``with_event`` the event's name (wide terminals)."""
    several_apps = len({run.app_id for run in runs}) > 1
    headers = ["RUN", "FUNCTION", "STATUS", "AGE", "TOOK"] + (["EVENT"] if with_event else [])
    grid = table(*headers)
    for index in (0, 2, 3, 4):
        grid.columns[index].no_wrap = True
    grid.columns[3].justify = grid.columns[4].justify = "right"
    for run in runs:
        name = f"{run.app_id}/{run.function_id}" if several_apps else run.function_id
        cells = [
            Text(run.run_id),
            Text(name, overflow="fold"),
            status_text(run.status),
            Text(age(now - run.created_at)),
            Text(between(run.started_at, run.ended_at or (None if run.status.terminal else now))),
        ]
        grid.add_row(*cells, *([Text(run.event_name, overflow="fold")] if with_event else []))
    return grid


def events_table(events: list[StoredEvent], now: datetime) -> Table:
    """One row per event: id, name, age, state, the runs it started."""
    grid = table("EVENT", "NAME", "AGE", "STATE", "RUNS")
    grid.columns[0].overflow = grid.columns[1].overflow = "fold"
    # Generated ids (UUIDs) stay whole on one line, to be copied; long ids of one's own fold.
    grid.columns[0].no_wrap = all(len(event.id) <= 36 for event in events)
    for index in (2, 3, 4):
        grid.columns[index].no_wrap = True
    grid.columns[2].justify = grid.columns[4].justify = "right"
    for event in events:
        grid.add_row(
            Text(event.id),
            Text(event.name),
            Text(age(now - event.received_at)),
            Text(event.status, style="red" if event.status == "dead-lettered" else ""),
            Text(str(event.runs)),
        )
    return grid


def event_view(event: StoredEvent, runs: list[RunSummary], now: datetime) -> Group:
    """An event: its fields, its data and the runs it started."""
    header = _fields(
        [
            ("event", Text(event.id)),
            ("name", Text(event.name)),
            ("ts", Text(clock(event.ts, precise=True) + " UTC")),
            ("received", Text(clock(event.received_at, precise=True) + " UTC")),
            ("state", Text(event.status)),
            ("version", Text(event.v or "")),
            ("error", Text(error_text(event.error), style="red")),
        ]
    )
    data = Text(json.dumps(event.data, indent=2, ensure_ascii=False))
    started: RenderableType = runs_table(runs, now) if runs else Text("It started no run.")
    return Group(header, _title("Data"), data, _title(f"Runs ({len(runs)})"), started)


def functions_table(functions: Iterable[FunctionInfo]) -> Table:
    """One row per registered function: triggers, flow control, state, workers, runs."""
    grid = table("FUNCTION", "STATE", "WORKERS", "TRIGGERS", "FLOW CONTROL", "RUNS")
    grid.columns[2].justify = "right"
    for function in functions:
        triggers = "\n".join(trigger_text(t) for t in function.triggers) or "-"
        runs = "\n".join(f"{status}={n}" for status, n in sorted(function.runs.items())) or "-"
        grid.add_row(
            Text(f"{function.app_id}/{function.function_id}", overflow="fold"),
            Text("active", style="green") if function.active else Text("inactive", style="dim"),
            Text(str(function.workers)),
            Text(triggers),
            Text("\n".join(flow_lines(function.config)) or "-"),
            Text(runs),
        )
    return grid


def trigger_text(trigger: dict[str, Any]) -> str:
    """A trigger as declared: ``order/created if event.data.total > 100``, ``cron 0 * * * *``."""
    if "cron" in trigger:
        return f"cron {trigger['cron']}"
    condition = trigger.get("expression")
    return str(trigger.get("event")) + (f" if {condition}" if condition else "")


def _keyed(text: str, key: str | None) -> str:
    return f"{text} per {key}" if key else text


def flow_lines(config: dict[str, Any]) -> list[str]:
    """A function's flow control, one option a line (from its registry form)."""
    lines = [
        _keyed(
            f"concurrency {c['limit']}" + (" (app)" if c.get("scope") == "app" else ""),
            c.get("key"),
        )
        for c in config.get("concurrency", [])
    ]
    if rate := config.get("rate_limit"):
        lines.append(_keyed(f"rate limit {rate['limit']}/{took(_s(rate['period']))}", rate["key"]))
    if throttle := config.get("throttle"):
        per = took(_s(throttle["interval"]))
        lines.append(_keyed(f"throttle 1/{per} burst {throttle['burst']}", throttle["key"]))
    if debounce := config.get("debounce"):
        lines.append(_keyed(f"debounce {took(_s(debounce['period']))}", debounce["key"]))
    if batch := config.get("batch_events"):
        size, wait = batch["max_size"], took(_s(batch["timeout"]))
        lines.append(_keyed(f"batch {size} or {wait}", batch["key"]))
    if singleton := config.get("singleton"):
        lines.append(_keyed(f"singleton ({singleton['mode']})", singleton["key"]))
    if idempotency := config.get("idempotency"):
        lines.append(f"idempotency {idempotency}")
    if priority := config.get("priority"):
        lines.append(f"priority {priority}")
    return lines


def _s(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


# -- a run -----------------------------------------------------------------------------------------
def run_view(run: RunInfo, now: datetime) -> Group:
    """``engine runs show``: the run's header, steps, pauses and timeline (``now`` ends the
    bars of what still lasts)."""
    parts: list[RenderableType] = [run_header(run, now)]
    parts += [_title(f"Steps ({len(run.steps)})"), steps_table(run) if run.steps else _none()]
    if run.pauses:
        parts += [_title(f"Pauses ({len(run.pauses)})"), pauses_table(run)]
    if run.executions:
        parts += [_title(f"Executions ({len(run.executions)})"), executions_table(run)]
    spans = timeline_spans(run)
    if spans:
        parts += [_title("Timeline"), Timeline(spans, run.created_at, run.ended_at or now)]
    return Group(*parts)


def run_header(run: RunInfo, now: datetime) -> Table:
    """Who, what and when: status, function, event, times, output or error, waiting reason."""
    end = run.ended_at or now
    started = clock(run.started_at, precise=True)
    if run.started_at is not None:
        started += f"  (queued {between(run.created_at, run.started_at)})"
    ended = "-" if run.ended_at is None else clock(run.ended_at, precise=True)
    if run.started_at is not None:
        ended += f"  (ran {took(end - run.started_at)}{'' if run.ended_at else ' so far'})"
    rows = [
        ("run", Text(run.run_id)),
        ("status", status_text(run.status)),
        ("function", Text(f"{run.function_id}  (app {run.app_id})")),
        ("event", Text(f"{run.event.name}  {run.event.id or ''}")),
        ("created", Text(clock(run.created_at, precise=True) + " UTC")),
        ("started", Text(started)),
        ("ended", Text(ended)),
        ("waiting", Text(run.waiting_reason or "")),
        ("output", Text(_output(run))),
        ("error", Text(short(error_text(run.error)), style="red")),
        ("trace", Text(run.trace_id or "")),
    ]
    return _fields(rows)


def _output(run: RunInfo) -> str:
    if run.status != "COMPLETED":
        return ""
    return short(json.dumps(run.output, ensure_ascii=False, default=str))


def _fields(rows: list[tuple[str, Text]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    for name, value in rows:
        if value.plain:
            grid.add_row(name, value)
    return grid


def _title(text: str) -> Text:
    return Text(f"\n{text}", style="bold")


def _none() -> Text:
    return Text("none", style="dim")


def steps_table(run: RunInfo) -> Table:
    """One row per step (id, kind, status, attempts, start, duration), and under a ``run``
    step that took more than one attempt, or failed, one row per attempt (number, outcome,
    start, duration, worker, error)."""
    grid = table("STEP", "KIND", "STATUS", "TRIES", "START", "TOOK", "WORKER / ERROR")
    for index in (1, 2, 3, 4, 5):
        grid.columns[index].no_wrap = True
    for index in (3, 4, 5):
        grid.columns[index].justify = "right"
    grid.columns[0].overflow = "fold"
    grid.columns[6].overflow = "fold"
    for step in run.steps:
        grid.add_row(*_step_cells(step, run.created_at))
        if not _first_try(step):
            for attempt in step.attempts:
                grid.add_row(*_attempt_cells(attempt, run.created_at))
    return grid


def _first_try(step: StepInfo) -> bool:
    """A step done by its first attempt: its row says all (the worker in its last column)."""
    return len(step.attempts) == 1 and step.attempts[0].error is None


def _step_cells(step: StepInfo, origin: datetime) -> list[Text]:
    if _first_try(step):
        detail = Text(worker_name(step.attempts[0].worker), style="dim")
    else:
        failed = step.status == "FAILED"
        detail = Text(short(error_text(step.error)) if failed else "", style="red")
    return [
        Text(step.step_id),
        Text(step.kind),
        status_text(step.status),
        Text(str(step.attempt_count) if step.kind == "run" else ""),
        Text(offset(_step_start(step), origin)),
        Text(between(_step_start(step), step.ended_at)),
        detail,
    ]


def _step_start(step: StepInfo) -> datetime | None:
    """When a step began: its first attempt's start (a ``run`` step is recorded when its first
    attempt ends), else when it was recorded."""
    starts = [a.started_at for a in step.attempts if a.started_at is not None]
    return min(starts, default=step.created_at)


def _attempt_cells(attempt: AttemptInfo, origin: datetime) -> list[Text]:
    outcome = _ATTEMPT_OUTCOMES.get(attempt.outcome, attempt.outcome.lower())
    detail = Text(worker_name(attempt.worker), style="dim")
    if attempt.error:
        detail.append("\n" + short(error_text(attempt.error)), style="red")
    style = "green" if attempt.outcome == "COMPLETED" else "red"
    return [
        Text(f"  #{attempt.attempt + 1}", style="dim"),
        Text(""),
        Text(outcome, style=style),
        Text(""),
        Text(offset(attempt.started_at, origin)),
        Text(between(attempt.started_at, attempt.ended_at)),
        detail,
    ]


def pauses_table(run: RunInfo) -> Table:
    """One row per pause: kind, step, when it began, was due and ended, and what ended it."""
    grid = table("PAUSE", "STEP", "BEGAN", "DUE", "ENDED", "TOOK", "ENDED BY")
    for index in (0, 2, 3, 4, 5):
        grid.columns[index].no_wrap = True
    for index in (2, 3, 4, 5):
        grid.columns[index].justify = "right"
    grid.columns[1].overflow = "fold"
    grid.columns[6].overflow = "fold"
    for pause in run.pauses:
        grid.add_row(
            Text(pause.kind),
            Text(pause.step_id or "(function)"),
            Text(offset(pause.began_at, run.created_at)),
            Text(offset(pause.due_at, run.created_at)),
            Text(offset(pause.ended_at, run.created_at)),
            Text(between(pause.began_at, pause.ended_at)),
            Text(ended_by(pause)),
        )
    return grid


def executions_table(run: RunInfo) -> Table:
    """One row per claim of the run: worker, when, how long, how it ended, and the function's
    error, a takeover or why the run had waited to start (what followed is in the pauses)."""
    grid = table("#", "WORKER", "CLAIMED", "TOOK", "OUTCOME", "NOTE")
    for index in (0, 1, 2, 3, 4):
        grid.columns[index].no_wrap = True
    for index in (0, 2, 3):
        grid.columns[index].justify = "right"
    grid.columns[5].overflow = "fold"
    for execution in run.executions:
        grid.add_row(
            Text(str(execution.number)),
            Text(worker_name(execution.worker), style="dim"),
            Text(offset(execution.claimed_at, run.created_at)),
            Text(between(execution.claimed_at, execution.ended_at)),
            status_text(execution.outcome or "-"),
            _execution_note(execution),
        )
    return grid


def _execution_note(execution: ExecutionInfo) -> Text:
    if execution.error:
        return Text(short(error_text(execution.error)), style="red")
    notes = ["took over an expired lease"] if execution.taken_over else []
    notes += [f"had waited: {execution.waited}"] if execution.waited else []
    return Text(short("; ".join(notes)))


def ended_by(pause: PauseInfo) -> str:
    """What ended a pause, with the event's or the child run's id; ``(lasting)`` while it
    lasts."""
    if pause.ended_by is None:
        return "(lasting)"
    if pause.ended_by == "event" and pause.event_id:
        return f"event {pause.event_id}"
    if pause.ended_by == "child" and pause.child_run_id:
        return f"child run {pause.child_run_id}"
    return pause.ended_by


# -- the timeline ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Span:
    """One bar of a timeline: a label, its time range (``end`` None: still lasting), and how
    it is drawn."""

    label: str
    start: datetime
    end: datetime | None
    glyph: str
    style: str
    kind: str = ""
    """What it shows: ``queued``, ``execution``, ``attempt``, ``step`` or a pause's kind
    (``sleep``, ``wait``, ``invoke``, ``backoff``)."""
    source: ExecutionInfo | StepInfo | PauseInfo | AttemptInfo | None = None
    """The record it was drawn from (the dashboard shows its details)."""
    step: StepInfo | None = None
    """The step of an attempt."""


_EXECUTION, _WORK, _PAUSE, _QUEUED = "━", "█", "░", "·"
_PAUSE_STYLES = {"sleep": "blue", "backoff": "yellow", "wait": "magenta", "invoke": "magenta"}


def timeline_spans(run: RunInfo, *, requeued: bool = False) -> list[Span]:
    """The bars of a run's timeline in time order: the time it was queued, each execution,
    each step attempt, and each pause (or, for a step recorded without them, the step).

    With ``requeued``, also the time it waited for a worker again between two executions: from
    when it was due (a pause ended, a retry came due, it was handed back) to its next claim.
    """
    spans: list[Span] = []
    first = run.executions[0].claimed_at if run.executions else run.started_at
    if first is not None and first > run.created_at:
        spans.append(Span("queued", run.created_at, first, _QUEUED, "dim", "queued"))
    if requeued:
        spans += _requeued(run)
    for execution in run.executions:
        label = f"execution {execution.number}" + (" (takeover)" if execution.taken_over else "")
        label += " ✗" if execution.error else ""
        spans.append(
            Span(
                label,
                execution.claimed_at,
                execution.ended_at,
                _EXECUTION,
                "cyan",
                "execution",
                execution,
            )
        )
    paused = {pause.step_id for pause in run.pauses}
    for step in run.steps:
        spans += _step_spans(step, paused)
    for pause in run.pauses:
        label = f"  {pause.kind} {pause.step_id or '(function)'}"
        style = _PAUSE_STYLES.get(pause.kind, "blue")
        spans.append(Span(label, pause.began_at, pause.ended_at, _PAUSE, style, pause.kind, pause))
    order = {_QUEUED: 0, _EXECUTION: 1, _WORK: 2, _PAUSE: 3}
    return sorted(spans, key=lambda span: (span.start, order[span.glyph]))


_HANDED_BACK = {"QUEUED", "SLEEPING", "RETRYING", "WAITING"}


def _requeued(run: RunInfo) -> list[Span]:
    """Between two executions, the time from when the run was due again to its claim."""
    spans = []
    for before, after in zip(run.executions, run.executions[1:], strict=False):
        if before.ended_at is None or before.outcome not in _HANDED_BACK:
            continue  # a takeover: the wait was for the lost worker's lease to expire
        ends = [
            p.ended_at
            for p in run.pauses
            if p.ended_at is not None and before.ended_at <= p.ended_at <= after.claimed_at
        ]
        due = max([before.ended_at, *ends])
        if before.due_at is not None and due < before.due_at <= after.claimed_at:
            due = before.due_at
        if due < after.claimed_at:
            spans.append(Span("queued", due, after.claimed_at, _QUEUED, "dim", "queued"))
    return spans


def _step_spans(step: StepInfo, paused: set[str | None]) -> list[Span]:
    if step.attempts:
        return [
            Span(
                f"  {step.step_id} #{a.attempt + 1}" + (" ✓" if a.outcome == "COMPLETED" else " ✗"),
                a.started_at,
                a.ended_at,
                _WORK,
                "green" if a.outcome == "COMPLETED" else "red",
                "attempt",
                a,
                step,
            )
            for a in step.attempts
            if a.started_at is not None
        ]
    if step.created_at is None or step.step_id in paused:
        return []
    glyph = _WORK if step.kind in ("run", "send") else _PAUSE
    style = STATUS_STYLES.get(step.status, "") if glyph == _WORK else "blue"
    label = f"  {step.kind} {step.step_id}"
    return [Span(label, step.created_at, step.ended_at, glyph, style, "step", step, step)]


class Timeline:
    """Bars on one time axis from ``origin`` to ``end``, scaled to the width rich gives it."""

    LABEL_MAX = 28
    DURATION_WIDTH = 8

    def __init__(self, spans: list[Span], origin: datetime, end: datetime) -> None:
        self.spans = spans
        self.origin = origin
        latest = max((s.end or s.start for s in spans), default=end)
        self.end = max(end, latest, origin + timedelta(milliseconds=1))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        label_width = min(
            self.LABEL_MAX, max(len(s.label) for s in self.spans), options.max_width // 3
        )
        bar_width = max(10, options.max_width - label_width - self.DURATION_WIDTH - 2)
        total = self.end - self.origin
        yield self._axis(label_width, bar_width, total)
        for span in self.spans:
            yield self._row(span, label_width, bar_width)

    def _axis(self, label_width: int, bar_width: int, total: timedelta) -> Text:
        right = f"+{took(total)}"
        line = Text(" " * (label_width + 1) + "+0", style="dim")
        line.append(" " * max(1, bar_width - 2 - len(right)) + right)
        return line

    def _column(self, moment: datetime, bar_width: int) -> float:
        return (moment - self.origin) / (self.end - self.origin) * bar_width

    def _row(self, span: Span, label_width: int, bar_width: int) -> Text:
        end = span.end or self.end
        first = min(bar_width - 1, max(0, math.floor(self._column(span.start, bar_width))))
        last = min(bar_width, max(first + 1, round(self._column(end, bar_width))))
        label = (
            span.label if len(span.label) <= label_width else span.label[: label_width - 1] + "…"
        )
        row = Text(label.ljust(label_width) + " ")
        row.append(" " * first)
        row.append(span.glyph * (last - first), style=span.style)
        row.append(" " * (bar_width - last))
        lasting = "" if span.end is not None else "…"
        row.append(f"{took(end - span.start)}{lasting}".rjust(self.DURATION_WIDTH + 1))
        return row
