"""What a run is and what it did, as management calls return it."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict

from .events import Event, event_from_row
from .serialization import loads, loads_or_none
from .step_input import StepInput


class RunStatus(StrEnum):
    """The states of a run.

    ``QUEUED`` waits to be claimed (new, or handed back by a stopping worker); ``RUNNING`` is
    leased to a worker; ``SLEEPING`` waits for a sleep to end; ``RETRYING`` waits for a retry
    backoff; ``WAITING`` waits for an event (``wait_for_event``) or a child run (``invoke``).
    ``COMPLETED``, ``FAILED``, ``CANCELLED`` and ``SKIPPED`` are terminal: a terminal run never
    changes again.
    """

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SLEEPING = "SLEEPING"
    RETRYING = "RETRYING"
    WAITING = "WAITING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    SKIPPED = "SKIPPED"

    @property
    def terminal(self) -> bool:
        """True for the states a run never leaves."""
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.SKIPPED}
)


def one_finished_status(statuses: Sequence[str] | None) -> bool:
    """True when a listing filters on exactly one finished status: its query then walks the
    index of finished runs by status (``ended_run_summaries``), not every run newest first."""
    return statuses is not None and len(statuses) == 1 and RunStatus(statuses[0]).terminal


class AttemptInfo(BaseModel):
    """One attempt of a ``run`` step: when it ran, on which worker, and how it ended."""

    model_config = ConfigDict(frozen=True)

    attempt: int
    """0-based: 0 is the first try, 1 the first retry."""
    outcome: str
    """``COMPLETED``; ``RETRYING`` (it failed and was retried); ``FAILED`` (it failed for
    good)."""
    started_at: datetime | None = None
    ended_at: datetime | None = None
    worker: str | None = None
    """The id of the worker (its lease owner) that ran it."""
    error: dict[str, Any] | None = None
    """``{"type", "message", "traceback"}`` for a failed attempt."""
    retry_at: datetime | None = None
    """When the next attempt was due (``RETRYING``)."""
    input: StepInput | None = None
    """The arguments its callable was given; None without arguments, or when the function
    does not record them (``record_step_input=False``)."""


class PauseInfo(BaseModel):
    """A time the run (or one of its branches) waited: a sleep, a wait for an event, an invoke
    of another function, or a retry backoff (of a step, or of the function's body when
    ``step_id`` is None)."""

    model_config = ConfigDict(frozen=True)

    kind: str
    """``sleep``, ``wait``, ``invoke`` or ``backoff``."""
    step_id: str | None
    began_at: datetime
    due_at: datetime | None = None
    """When it was due to end: a sleep's end, a wait's or an invoke's timeout, the retry time."""
    ended_at: datetime | None = None
    """None while it lasts."""
    ended_by: str | None = None
    """What ended it: ``time`` (a sleep or backoff that ran its course), ``event`` (the event
    a wait matched, ``event_id``), ``child`` (the invoked run ended, ``child_run_id``),
    ``timeout``, ``cancel``; None while it lasts."""
    event_id: str | None = None
    child_run_id: str | None = None


class ExecutionInfo(BaseModel):
    """One claim of the run by a worker: from the claim to the moment the worker let go."""

    model_config = ConfigDict(frozen=True)

    number: int
    """1 for the run's first execution, then 2, 3..."""
    worker: str
    claimed_at: datetime
    taken_over: bool = False
    """True when it was taken over from a worker whose lease had expired."""
    waited: str | None = None
    """For the first execution: why the run had waited to start (flow control...), if it had."""
    ended_at: datetime | None = None
    outcome: str | None = None
    """The run's status when the worker let go (``COMPLETED``, ``SLEEPING``...; ``QUEUED``:
    handed back; ``LOST``: its worker stopped heartbeating and another took the run over);
    None while it executes."""
    due_at: datetime | None = None
    """When the run was due again after it (a sleep's end, a retry, a timeout)."""
    reason: str | None = None
    """Why the run waited after it."""
    error: dict[str, Any] | None = None
    """The function body's error (with its ``traceback``) when the execution failed: the run
    was retried as a whole (``RETRYING``) or failed (``FAILED``)."""


class StepInfo(BaseModel):
    """One recorded step of a run."""

    model_config = ConfigDict(frozen=True)

    step_id: str
    position: int
    kind: str
    status: str
    attempt_count: int
    """How many attempts ran (``len(attempts)``, except for steps recorded before attempts
    were kept)."""
    attempts: list[AttemptInfo] = []
    """Every attempt of a ``run`` step, oldest first."""
    output: Any = None
    error: dict[str, Any] | None = None
    input: StepInput | None = None
    """A ``run`` step's input: the arguments its callable was given (its last attempt's);
    None without arguments, or when the function does not record them
    (``record_step_input=False``)."""
    wake_at: datetime | None = None
    created_at: datetime | None = None
    ended_at: datetime | None = None
    output_omitted: bool = False
    """True when the run's steps were too large to load together (a run recorded before
    ``max_state_bytes`` bounded them): ``output`` and ``error`` are then left out."""


class RunInfo(BaseModel):
    """A run with its status, result and steps."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    app_id: str
    function_id: str
    status: RunStatus
    attempt: int
    waiting_reason: str | None
    output: Any = None
    error: dict[str, Any] | None = None
    event: Event
    steps: list[StepInfo]
    created_at: datetime
    """When the run was created (queued)."""
    started_at: datetime | None
    """Its first start."""
    ended_at: datetime | None
    executions: list[ExecutionInfo] = []
    """Every claim of the run by a worker, in order."""
    pauses: list[PauseInfo] = []
    """Every sleep, wait, invoke and retry backoff, in the order they began."""
    trace_id: str | None = None
    """The OpenTelemetry trace all of the run's spans belong to (32 hex digits)."""


def run_info_from_row(row: Any) -> RunInfo:
    """Builds a :class:`RunInfo` from a row of ``engine.run_details``."""
    return RunInfo(
        run_id=str(row["id"]),
        app_id=row["app_id"],
        function_id=row["function_id"],
        status=RunStatus(row["status"]),
        attempt=row["attempt"],
        waiting_reason=row["waiting_reason"],
        output=loads_or_none(row["output"]),
        error=loads_or_none(row["error"]),
        event=event_from_row(loads(row["event"])),
        steps=[_step_info(s) for s in loads(row["steps"])],
        created_at=row["created_at"],
        started_at=row["started_at"],
        ended_at=row["ended_at"],
        executions=[ExecutionInfo.model_validate(x) for x in loads(row["executions"])],
        pauses=[PauseInfo.model_validate(p) for p in loads(row["pauses"])],
        trace_id=row["trace_id"],
    )


def _step_info(step: dict[str, Any]) -> StepInfo:
    return StepInfo(
        step_id=step["key"],
        position=step["position"],
        kind=step["kind"],
        status=step["status"],
        attempt_count=step["attempts"],
        attempts=[AttemptInfo.model_validate(a) for a in step.get("attempt_list") or []],
        output=step["output"],
        error=step["error"],
        input=step.get("input"),
        wake_at=step["wake_at"],
        created_at=step.get("created_at"),
        ended_at=step.get("ended_at"),
        output_omitted=step.get("omitted", False),
    )


class RunSummary(BaseModel):
    """A run as a listing shows it: what it is and where it stands, without its steps (see
    :meth:`~engine.Engine.get_run` for those)."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    app_id: str
    function_id: str
    status: RunStatus
    waiting_reason: str | None
    event_name: str
    event_id: str
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None


class RunPage(BaseModel):
    """A page of runs, newest first."""

    model_config = ConfigDict(frozen=True)

    runs: list[RunSummary]
    cursor: str | None
    """Pass it back as ``cursor=`` for the next (older) page; None on the last page."""


def run_summary_from_row(row: Any) -> RunSummary:
    """Builds a :class:`RunSummary` from a row of the ``run_summaries`` query."""
    return RunSummary(
        run_id=str(row["id"]),
        app_id=row["app_id"],
        function_id=row["function_id"],
        status=RunStatus(row["status"]),
        waiting_reason=row["waiting_reason"],
        event_name=row["event_name"],
        event_id=row["event_id"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        ended_at=row["ended_at"],
    )


def summary_of(run: RunInfo) -> RunSummary:
    """The summary of a run already loaded in full."""
    return RunSummary(
        run_id=run.run_id,
        app_id=run.app_id,
        function_id=run.function_id,
        status=run.status,
        waiting_reason=run.waiting_reason,
        event_name=run.event.name,
        event_id=run.event.id or "",
        created_at=run.created_at,
        started_at=run.started_at,
        ended_at=run.ended_at,
    )
