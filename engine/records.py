"""The records an execution works with: a claimed run, its steps, a suspension, the limits.

Also the names of step kinds and statuses and of the verdicts of lease-guarded writes (their
values are those stored in ``engine.steps`` and returned by the SQL functions), and the two
control-flow signals that stop an execution (:class:`LeaseLost`, :class:`WriteCutOff`; see
:mod:`engine.errors` for where they sit in the hierarchy).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any
from uuid import UUID

from .errors import ConfigurationError, EngineError
from .events import Event, event_from_row
from .runs import RunStatus
from .serialization import dumps_plain, loads

if TYPE_CHECKING:
    from .function import Function


class StepKind(StrEnum):
    """What a step does (``engine.steps.kind``)."""

    RUN = "run"
    SLEEP = "sleep"
    WAIT = "wait"
    INVOKE = "invoke"
    SEND = "send"
    PATCH = "patch"  # a marker of ctx.patched: the run took a patch's new path (engine.replay)


class StepStatus(StrEnum):
    """Where a step stands (``engine.steps.status``); ``COMPLETED`` and ``FAILED`` are final.
    ``CANCELLED``: an open step of a run that ended (a cancel, say)."""

    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    RETRYING = "RETRYING"
    SLEEPING = "SLEEPING"
    WAITING = "WAITING"
    CANCELLED = "CANCELLED"


class WriteVerdict(StrEnum):
    """What a write under the lease returns (``engine.checkpoint_step`` and friends)."""

    OK = "ok"
    CANCEL = "cancel"  # written, and a cancel of the run was requested (or won, at its end)
    LOST = "lost"  # the lease is no longer ours: nothing was written
    DUPLICATE = "duplicate"  # the step is already final: another execution recorded it


MAX_STATE_CEILING = 128 * 1024 * 1024  # a claim builds a run's steps into one jsonb (256 MiB max)


@dataclass(frozen=True)
class RunLabels:
    """What spans, metrics and logs name a run by, and whether its payloads go on spans."""

    run_id: str
    app_id: str
    function_id: str
    trace_payloads: bool  # event data and outputs on spans (opt-in)


@dataclass(frozen=True)
class Limits:
    """Per-run limits; going over fails the run with an error that names the limit.

    ``max_state_bytes`` bounds a run's whole state: its event, every step's output (and error)
    and the function's output, as JSON.
    """

    max_steps: int = 1000
    max_output_bytes: int = 4 * 1024 * 1024
    max_state_bytes: int = 32 * 1024 * 1024

    def __post_init__(self) -> None:
        if not 0 < self.max_state_bytes <= MAX_STATE_CEILING:
            raise ConfigurationError(
                f"max_state_bytes must be between 1 and {MAX_STATE_CEILING} (a run's history is "
                f"loaded as one database value), got {self.max_state_bytes}"
            )


@dataclass
class StepRecord:
    """A step as recorded in ``engine.steps``."""

    key: str
    position: int
    kind: StepKind
    status: StepStatus
    attempts: int = 1
    output: Any = None
    error: dict[str, Any] | None = None
    wake_at: datetime | None = None
    step_id: str | None = None  # the id the code gave (None: recorded before schema 9)
    follows: str | None = None  # its place in its branch (see engine.replay)
    # For the history only (engine.step_attempts), never read back by replay: when the attempt
    # started and ended (the worker's estimate of engine.now()), a failed attempt's traceback
    # and, when it is retried, the time of the retry.
    started_at: datetime | None = None
    ended_at: datetime | None = None
    traceback: str | None = None
    retry_at: datetime | None = None
    input_json: str | None = None  # a `run` step's arguments, encoded (engine.step_input)

    def to_json(self, output_json: str | None = None) -> str:
        """The JSON argument of ``engine.checkpoint_step``; ``output_json`` is pre-encoded."""
        head = dumps_plain(
            {
                "key": self.key,
                "position": self.position,
                "kind": self.kind,
                "status": self.status,
                "attempts": self.attempts,
                "error": self.error,
                "wake_at": _iso(self.wake_at),
                "id": self.step_id,
                "follows": self.follows,
                "started_at": _iso(self.started_at),
                "ended_at": _iso(self.ended_at),
                "traceback": self.traceback,
                "retry_at": _iso(self.retry_at),
            }
        )
        given = "" if self.input_json is None else f',"input":{self.input_json}'
        return f'{head[:-1]}{given},"output":{output_json or "null"}}}'

    def completed_args(self, output_json: str | None) -> tuple[Any, ...] | None:
        """The step's part of the arguments of ``engine.checkpoint_completed`` (the typed form
        of a checkpoint of this record alone), or None when the record is not a completed step
        with nothing but an output and an input (that function records no more)."""
        if self.status != StepStatus.COMPLETED or self.error is not None:
            return None
        if self.wake_at is not None or self.traceback is not None or self.retry_at is not None:
            return None
        return (
            self.key,
            self.position,
            str(self.kind),
            self.attempts,
            output_json or "null",
            self.step_id,
            self.follows,
            self.started_at,
            self.ended_at,
            self.input_json,
        )


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


@dataclass
class ClaimedRun:
    """A run leased to this worker, with everything needed to replay it."""

    run_id: UUID
    function: Function
    lease_token: int
    attempt: int
    log_lines: int  # lines ctx.logger emitted at the run's tail (runs before log_places)
    cancel_requested: bool
    traceparent: str | None
    claimed_at: datetime
    events: list[Event]
    steps: dict[str, StepRecord] = field(default_factory=dict)
    state_bytes: int = 0  # its event and recorded steps, as JSON (see Limits.max_state_bytes)
    taken_over: bool = False  # from a worker whose lease expired (see Execution.running_step)
    trace_context: str | None = None  # the run's own span (W3C), parent of every execution
    log_places: dict[str, int] | None = None  # lines ctx.logger emitted at each place

    @classmethod
    def from_row(cls, row: Any, function: Function) -> ClaimedRun:
        """Builds it from a row of ``engine.claim_runs``."""
        steps = [_step_from_json(s) for s in loads(row["steps"])]
        events_json = row["events"] or row["event"]  # a batch's events, else the one event
        decoded = loads(events_json)
        return cls(
            run_id=row["id"],
            function=function,
            lease_token=row["lease_token"],
            attempt=row["attempt"],
            log_lines=row["log_lines"],
            cancel_requested=row["cancel_requested"],
            traceparent=row["traceparent"],
            claimed_at=row["claimed_at"],
            events=[event_from_row(e) for e in (decoded if row["events"] else [decoded])],
            steps={s.key: s for s in steps},
            state_bytes=row["state_bytes"] + len(events_json),
            taken_over=row["taken_over"],
            trace_context=row["trace_context"],
            log_places=loads(row["log_places"]) if row["log_places"] else None,
        )


def _step_from_json(item: dict[str, Any]) -> StepRecord:
    wake = item.get("wake_at")
    return StepRecord(
        key=item["key"],
        position=item["position"],
        kind=StepKind(item["kind"]),
        status=StepStatus(item["status"]),
        attempts=item["attempts"],
        output=item["output"],
        error=item["error"],
        wake_at=None if wake is None else datetime.fromisoformat(wake),
        step_id=item.get("id"),
        follows=item.get("follows"),
    )


@dataclass
class Suspension:
    """Why and until when a run waits; ``steps`` are recorded when the run is released."""

    due: datetime
    status: RunStatus
    reason: str
    steps: list[StepRecord] = field(default_factory=list)
    awaited: list[str] = field(default_factory=list)  # waits and invokes blocking the run


class LeaseLost(BaseException):
    """The run's lease is gone (another worker has it): stop, and write nothing more."""


class WriteCutOff(BaseException):
    """A write of the run died with its connection (a restart, a partition): its outcome is
    unknown, so the execution stops there and hands the run back as soon as the database
    answers. Not an ``Exception``: the function's code must not catch it as its own failure."""


@dataclass
class StepPlan:
    """Where a step request falls in the run: its key, position and earlier record."""

    key: str
    position: int
    record: StepRecord | None
    step_id: str = ""
    follows: str | None = None

    def new(self, kind: StepKind, status: StepStatus, **fields: Any) -> StepRecord:
        """A record of this step (to commit)."""
        return StepRecord(
            self.key,
            self.position,
            kind,
            status,
            step_id=self.step_id,
            follows=self.follows,
            **fields,
        )


def utc(value: datetime) -> datetime:
    """Checks that a datetime is aware and returns it in UTC."""
    if value.tzinfo is None:
        raise EngineError("datetimes must be timezone-aware")
    return value.astimezone(UTC)
