"""What `engine runs show` and the listings draw, on runs built by hand (#14): every attempt
with its worker and error, the pauses, a timeline scaled to the terminal, 80 columns."""

from __future__ import annotations

import io
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from rich.console import Console, RenderableType

from engine.events import Event
from engine.render import (
    age,
    flow_lines,
    run_view,
    runs_table,
    steps_table,
    timeline_spans,
    took,
)
from engine.runs import (
    AttemptInfo,
    ExecutionInfo,
    PauseInfo,
    RunInfo,
    RunStatus,
    StepInfo,
    summary_of,
)

T0 = datetime(2026, 12, 2, 6, 56, 51, 120000, tzinfo=UTC)
W1 = "3f2a91c0-1111-4222-8333-444455556666"
W2 = "9b7c11d2-1111-4222-8333-444455556666"
APPROVAL = "7d0e6a52-5f0b-4c8a-9d7e-0a1b2c3d4e5f"


def t(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def failed(attempt: int, start: float, message: str) -> AttemptInfo:
    error = {"type": "ConnectionError", "message": message, "traceback": "Traceback..."}
    return AttemptInfo(
        attempt=attempt,
        outcome="RETRYING",
        started_at=t(start),
        ended_at=t(start + 0.03),
        worker=W1,
        error=error,
    )


def story(**changes: Any) -> RunInfo:
    """A run whose step fetch-user failed twice then succeeded, then slept 10 s (nap), then
    waited 1.75 s for an approval event, then sent a welcome."""
    fetch = StepInfo(
        step_id="fetch-user",
        position=0,
        kind="run",
        status="COMPLETED",
        attempt_count=3,
        created_at=t(0.05),
        ended_at=t(0.35),
        attempts=[
            failed(0, 0.05, "upstream timed out after 30 ms"),
            failed(1, 0.10, "upstream refused"),
            AttemptInfo(
                attempt=2, outcome="COMPLETED", started_at=t(0.30), ended_at=t(0.35), worker=W1
            ),
        ],
    )
    steps = [
        fetch,
        StepInfo(
            step_id="nap",
            position=1,
            kind="sleep",
            status="COMPLETED",
            attempt_count=1,
            created_at=t(0.36),
            ended_at=t(10.36),
        ),
        StepInfo(
            step_id="approval",
            position=2,
            kind="wait",
            status="COMPLETED",
            attempt_count=1,
            created_at=t(10.45),
            ended_at=t(12.2),
        ),
        StepInfo(
            step_id="send-welcome",
            position=3,
            kind="run",
            status="COMPLETED",
            attempt_count=1,
            created_at=t(12.3),
            ended_at=t(12.33),
            attempts=[
                AttemptInfo(
                    attempt=0,
                    outcome="COMPLETED",
                    started_at=t(12.3),
                    ended_at=t(12.33),
                    worker=W2,
                )
            ],
        ),
    ]
    pauses = [
        PauseInfo(kind="backoff", step_id="fetch-user", began_at=t(0.08), due_at=t(0.10),
                  ended_at=t(0.10), ended_by="time"),
        PauseInfo(kind="backoff", step_id="fetch-user", began_at=t(0.13), due_at=t(0.30),
                  ended_at=t(0.30), ended_by="time"),
        PauseInfo(kind="sleep", step_id="nap", began_at=t(0.36), due_at=t(10.36),
                  ended_at=t(10.36), ended_by="time"),
        PauseInfo(kind="wait", step_id="approval", began_at=t(10.45), due_at=t(3610.45),
                  ended_at=t(12.2), ended_by="event", event_id=APPROVAL),
    ]  # fmt: skip
    executions = [
        ExecutionInfo(number=1, worker=W1, claimed_at=t(0.04), ended_at=t(0.36),
                      outcome="SLEEPING"),
        ExecutionInfo(number=2, worker=W2, claimed_at=t(10.40), ended_at=t(10.45),
                      outcome="WAITING"),
        ExecutionInfo(number=3, worker=W2, claimed_at=t(12.25), ended_at=t(12.34),
                      outcome="COMPLETED"),
    ]  # fmt: skip
    fields: dict[str, Any] = {
        "run_id": "0193a4f2-6b1c-7d3e-8f40-5a6b7c8d9e0f",
        "app_id": "shop",
        "function_id": "onboard-user",
        "status": RunStatus.COMPLETED,
        "attempt": 0,
        "waiting_reason": None,
        "output": {"receipt": "welcome mail sent"},
        "event": Event(name="user/signed-up", data={}, id="5c1d2e3f-0000-4000-8000-00000000001"),
        "steps": steps,
        "created_at": T0,
        "started_at": t(0.04),
        "ended_at": t(12.34),
        "executions": executions,
        "pauses": pauses,
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
    }
    return RunInfo(**{**fields, **changes})


def draw(renderable: RenderableType, width: int = 80) -> list[str]:
    """The lines a terminal of ``width`` columns shows (no colours)."""
    out = io.StringIO()
    Console(file=out, width=width, color_system=None, highlight=False).print(renderable)
    return [line.rstrip() for line in out.getvalue().splitlines()]


def section(lines: list[str], title: str) -> list[str]:
    start = lines.index(title) + 1
    end = next((i for i in range(start, len(lines)) if not lines[i]), len(lines))
    return lines[start:end]


def test_run_view_reads_in_80_columns_with_every_attempt_pause_and_the_header() -> None:
    lines = draw(run_view(story(), now=t(20)))
    assert max(map(len, lines)) <= 80
    text = "\n".join(lines)
    for expected in (
        "0193a4f2-6b1c-7d3e-8f40-5a6b7c8d9e0f",
        "onboard-user  (app shop)",
        "user/signed-up  5c1d2e3f-0000-4000-8000-00000000001",
        "2026-12-02 06:56:51.120 UTC",
        "(queued 40ms)",
        "(ran 12.3s)",
        '{"receipt": "welcome mail sent"}',
        "4bf92f3577b34da6a3ce929d0e0e4736",
    ):
        assert expected in text, expected
    assert "Steps (4)" in lines and "Pauses (4)" in lines and "Timeline" in lines


def test_steps_table_lists_each_attempt_with_outcome_start_duration_worker_and_error() -> None:
    rows = draw(steps_table(story()), width=120)
    fetch = next(i for i, row in enumerate(rows) if row.startswith("fetch-user"))
    assert rows[fetch].split() == ["fetch-user", "run", "COMPLETED", "3", "+50ms", "300ms"]
    assert rows[fetch + 1].split() == ["#1", "failed", "+50ms", "30ms", "3f2a91c0"]
    assert rows[fetch + 2].strip() == "ConnectionError: upstream timed out after 30 ms"
    assert rows[fetch + 3].split() == ["#2", "failed", "+100ms", "30ms", "3f2a91c0"]
    assert rows[fetch + 4].strip() == "ConnectionError: upstream refused"
    assert rows[fetch + 5].split() == ["#3", "completed", "+300ms", "50ms", "3f2a91c0"]
    nap = next(row for row in rows if row.startswith("nap"))
    assert nap.split() == ["nap", "sleep", "COMPLETED", "+360ms", "10.0s"]
    # A step done at its first attempt: the worker on its own row, no row for the attempt.
    assert rows[-1].split() == [
        "send-welcome",
        "run",
        "COMPLETED",
        "1",
        "+12.3s",
        "30ms",
        "9b7c11d2",
    ]


def test_pauses_say_what_ended_them() -> None:
    lines = draw(run_view(story(), now=t(20)), width=120)
    pauses = section(lines, "Pauses (4)")
    assert pauses[2].split() == [
        "backoff", "fetch-user", "+80ms", "+100ms", "+100ms", "20ms", "time",
    ]  # fmt: skip
    assert pauses[-1].split() == [
        "wait", "approval", "+10.4s", "+1h00m", "+12.2s", "1.75s", "event", APPROVAL,
    ]  # fmt: skip


def bars(lines: list[str]) -> dict[str, tuple[int, int]]:
    """Each timeline row's label with the columns its bar spans."""
    found = {}
    for line in section(lines, "Timeline")[1:]:
        match = re.search(r"[━█░·]+", line)
        assert match is not None, line
        found[line[: match.start()].strip() or line] = (match.start(), match.end())
    return found


def test_timeline_has_a_row_per_execution_attempt_and_pause_on_one_axis() -> None:
    """One row per execution, step attempt and pause, in time order; the bars share one time
    axis, so the 10 s sleep is the longest bar and the wait starts after it ends."""
    labels = [span.label.strip() for span in timeline_spans(story())]
    assert labels == [
        "queued", "execution 1", "fetch-user #1 ✗", "backoff fetch-user", "fetch-user #2 ✗",
        "backoff fetch-user", "fetch-user #3 ✓", "sleep nap", "execution 2", "wait approval",
        "execution 3", "send-welcome #1 ✓",
    ]  # fmt: skip
    lines = draw(run_view(story(), now=t(20)), width=100)
    drawn = bars(lines)
    assert max(map(len, lines)) <= 100
    length = {label: end - start for label, (start, end) in drawn.items()}
    assert max(length, key=length.__getitem__) == "sleep nap"
    assert drawn["wait approval"][0] >= drawn["sleep nap"][1] - 1
    assert drawn["send-welcome #1 ✓"][0] >= drawn["wait approval"][1] - 1
    axis = section(lines, "Timeline")[0]
    assert axis.split() == ["+0", "+12.3s"]
    assert axis.rstrip().endswith("+12.3s") and len(axis.rstrip()) <= 100 - 8


def test_timeline_is_scaled_to_the_terminal_width() -> None:
    narrow, wide = (
        bars(draw(run_view(story(), now=t(20)), 80)),
        bars(draw(run_view(story(), now=t(20)), 160)),
    )
    nap_narrow, nap_wide = narrow["sleep nap"], wide["sleep nap"]
    assert nap_wide[1] - nap_wide[0] > 2 * (nap_narrow[1] - nap_narrow[0]) - 2


def test_a_run_still_waiting_shows_what_lasts() -> None:
    """A wait still going: its pause says (lasting), its bar runs to now, with … after its
    duration so far; the header says how long the run has run so far."""
    run = story(
        status=RunStatus.WAITING,
        ended_at=None,
        output=None,
        steps=story().steps[:2],
        executions=story().executions[:2],
        pauses=[
            *story().pauses[:3],
            PauseInfo(kind="wait", step_id="approval", began_at=t(10.45), due_at=t(3610.45)),
        ],
    )
    lines = draw(run_view(run, now=t(30)), width=100)
    text = "\n".join(lines)
    assert "(ran 30.0s so far)" in text and "(lasting)" in text
    wait = next(line for line in section(lines, "Timeline") if "wait approval" in line)
    assert wait.endswith("19.6s…")
    assert section(lines, "Timeline")[0].split() == ["+0", "+30.0s"]


def test_user_text_is_never_read_as_markup() -> None:
    step = story().steps[0].model_copy(update={"step_id": "[red]charge[/red]"})
    lines = draw(steps_table(story(steps=[step])), width=120)
    assert any(line.startswith("[red]charge[/red]") for line in lines)


def test_a_run_recorded_without_history_still_draws_its_steps() -> None:
    """Steps without attempts (recorded before the history) are drawn from their own times;
    a run without any time at all has no timeline."""
    bare = [s.model_copy(update={"attempts": []}) for s in story().steps]
    run = story(steps=bare, executions=[], pauses=[])
    labels = [span.label.strip() for span in timeline_spans(run)]
    assert labels == ["queued", "run fetch-user", "sleep nap", "wait approval", "run send-welcome"]
    timeless = [s.model_copy(update={"created_at": None, "ended_at": None}) for s in bare]
    run = story(steps=timeless, executions=[], pauses=[], started_at=None)
    assert "Timeline" not in draw(run_view(run, now=t(20)))


def test_runs_table_keeps_ids_whole_in_80_columns() -> None:
    """Run ids stay whole on one line (to be copied); the function (with its app when
    several apps are listed) folds instead."""
    runs = [
        summary_of(story(function_id="onboard")),
        summary_of(story(app_id="billing", status=RunStatus.FAILED)),
    ]
    lines = draw(runs_table(runs, now=t(3600 * 5)))
    assert max(map(len, lines)) <= 80
    assert lines[2].split() == [
        "0193a4f2-6b1c-7d3e-8f40-5a6b7c8d9e0f", "shop/onboard", "COMPLETED", "5h", "12.3s",
    ]  # fmt: skip
    assert lines[3].split()[0] == "0193a4f2-6b1c-7d3e-8f40-5a6b7c8d9e0f"
    assert lines[3].split()[1:3] == ["billing/onboard", "FAILED"] and lines[4].strip() == "-user"


def test_durations_and_flow_control_read_shortly() -> None:
    assert [took(timedelta(seconds=s)) for s in (0.85, 1.25, 12.34, 125, 12000, 190000)] == [
        "850ms", "1.25s", "12.3s", "2m05s", "3h20m", "2d04h",
    ]  # fmt: skip
    assert [age(timedelta(seconds=s)) for s in (5, 300, 7200, 200000)] == ["5s", "5m", "2h", "2d"]
    config = {
        "retries": 4,
        "concurrency": [{"limit": 5, "key": "event.data.user", "scope": "fn", "ordering": None}],
        "rate_limit": {"limit": 10, "period": 60.0, "key": None},
        "debounce": {"period": 5.0, "timeout": None, "key": "event.data.id"},
    }
    assert flow_lines(config) == [
        "concurrency 5 per event.data.user",
        "rate limit 10/1m00s",
        "debounce 5.00s per event.data.id",
    ]


def test_executions_say_who_ran_the_run_how_it_ended_and_the_function_s_error() -> None:
    """One row per claim: worker, start, duration, outcome, and the body's error, a takeover
    or why the run had waited to start; a failed execution is marked on the timeline."""
    executions = [
        ExecutionInfo(number=1, worker=W1, claimed_at=t(0.04), ended_at=t(0.36),
                      outcome="RETRYING", waited="concurrency limit 1 reached",
                      error={"type": "RuntimeError", "message": "the body fails once"}),
        ExecutionInfo(number=2, worker=W2, claimed_at=t(40.0), ended_at=t(40.1),
                      outcome="COMPLETED", taken_over=True),
    ]  # fmt: skip
    run = story(executions=executions, ended_at=t(40.1))
    lines = draw(run_view(run, now=t(50)), width=120)
    rows = section(lines, "Executions (2)")[2:]
    assert rows[0].split()[:5] == ["1", "3f2a91c0", "+40ms", "320ms", "RETRYING"]
    assert rows[0].endswith("RuntimeError: the body fails once")
    assert rows[1].split() == [
        "2", "9b7c11d2", "+40.0s", "100ms", "COMPLETED", "took", "over", "an", "expired", "lease",
    ]  # fmt: skip
    assert "execution 1 ✗" in [span.label for span in timeline_spans(run)]


def test_the_dashboards_timeline_also_shows_the_waits_for_a_worker_between_executions() -> None:
    """With requeued=True, the time from a pause's end to the next claim is a queued bar of
    its own (the sleep ended at +10.36s, execution 2 claimed at +10.40s)."""
    spans = timeline_spans(story(), requeued=True)
    queued = [(s.start, s.end) for s in spans if s.kind == "queued"]
    assert queued == [(T0, t(0.04)), (t(10.36), t(10.40)), (t(12.2), t(12.25))]
    assert [s.label for s in timeline_spans(story())].count("queued") == 1  # the CLI's
