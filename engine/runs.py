"""What a run is and what it did, as management calls return it."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict

from .events import Event, event_from_row
from .serialization import loads, loads_or_none


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


class StepInfo(BaseModel):
    """One recorded step of a run."""

    model_config = ConfigDict(frozen=True)

    step_id: str
    position: int
    kind: str
    status: str
    attempts: int
    output: Any = None
    error: dict[str, Any] | None = None
    wake_at: datetime | None = None
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
    started_at: datetime | None
    ended_at: datetime | None


def run_info_from_row(row: Any) -> RunInfo:
    """Builds a :class:`RunInfo` from a row of ``engine.run_details``."""
    steps = [
        StepInfo(
            step_id=s["key"],
            position=s["position"],
            kind=s["kind"],
            status=s["status"],
            attempts=s["attempts"],
            output=s["output"],
            error=s["error"],
            wake_at=s["wake_at"],
            output_omitted=s.get("omitted", False),
        )
        for s in loads(row["steps"])
    ]
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
        steps=steps,
        created_at=row["created_at"],
        started_at=row["started_at"],
        ended_at=row["ended_at"],
    )
