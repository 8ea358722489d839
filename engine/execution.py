"""Executing one claimed run: replay its recorded steps, run the new ones, and end or suspend it.

A claimed run executes in-process. Each step's result is committed (one round trip) before the
function goes on; the run is not re-claimed between steps. The run is released only when it must
wait: a sleep, a retry backoff, a cancel, or a worker that is stopping.

Parallel steps (``asyncio.gather``) run together. When a step needs the run to wait, it registers
a :class:`Suspension` and blocks; once no step is executing any more, the run *settles*: the
function's task is cancelled (a ``BaseException`` that ``except Exception`` does not swallow) and
one call releases the run with the earliest due time.

Every write is fenced by the lease. A write the database refuses because the lease moved stops
the execution (:class:`LeaseLost`): another worker has the run. A write that dies with its
connection stops it too (:class:`WriteCutOff`): its outcome is unknown, so the run is handed back
as soon as the database answers, and replay sorts out what was committed. Neither is ever taken
for the function's own failure.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from datetime import datetime, timedelta
from functools import partial
from typing import Any, NoReturn
from uuid import UUID

import structlog
from opentelemetry import trace

from . import metrics, telemetry
from .context import Context
from .db import Database, is_infrastructure_error
from .errors import (
    DeterminismError,
    NestedStepError,
    NonRetriableError,
    OutputLimitError,
    RetryAfterError,
    RunFailure,
    SerializationError,
    StaleLeaseError,
    StateLimitError,
    StepError,
    StepLimitError,
    error_payload,
    error_traceback,
)
from .events import Event
from .function import Function
from .group_commit import GroupCommit
from .matching import accepts
from .records import (
    ClaimedRun,
    LeaseLost,
    Limits,
    RunLabels,
    StepKind,
    StepPlan,
    StepRecord,
    StepStatus,
    Suspension,
    WriteCutOff,
    WriteVerdict,
)
from .replay import History, Recorded, start_branch
from .retries import Backoff
from .runlocal import RunLogger, current_step, structlog_logger
from .runs import RunStatus, run_info_from_row
from .schemas import INVOKED
from .serialization import NotSerializable, dumps, dumps_plain, loads, stored_size, text_problem
from .threads import StepThreads

HAND_BACK_PATIENCE = 300.0  # seconds a worker keeps trying to hand back a cut-off run
HANDED_BACK = "handed back after a write was cut off"

Unsaved = tuple[StepRecord, str | None]  # a completed step's record, and its output as JSON


def _encoded(records: list[Unsaved]) -> list[str]:
    """The records as the JSON items of a write (``engine.record_step``'s argument)."""
    return [record.to_json(output) for record, output in records]


def _recorded(step: StepRecord) -> Recorded:
    return Recorded(step.key, step.kind, step.position, step.step_id, step.follows)


class Execution:
    """One execution of a claimed run, from replay to its end or suspension."""

    def __init__(
        self,
        run: ClaimedRun,
        *,
        db: Database,
        group_commit: GroupCommit,
        owner: UUID,
        limits: Limits,
        backoff: Backoff,
        threads: StepThreads,
        trace_payloads: bool = False,
    ) -> None:
        self.run = run
        self.threads = threads  # the worker's pool for sync step callables
        self.trace_payloads = trace_payloads  # event data and outputs on spans (opt-in)
        self.db = db
        self.group_commit = group_commit
        self.owner = owner
        self.limits = limits
        self.backoff = backoff
        self.fn_id = run.function.fn_id
        self.labels = RunLabels(str(run.run_id), run.function.app_id, self.fn_id, trace_payloads)
        self.cancel_requested = run.cancel_requested
        self.deadline_seen: float | None = None  # when a heartbeat saw the finish timeout pass
        self.stopping = False
        self.lost = False
        self.let_go = False  # the run is no longer leased to us: ended, suspended or lost
        self.cut_off: str | None = None  # why a write died: stop, then hand the run back
        self.fatal: RunFailure | NestedStepError | None = None
        self.in_flight = 0
        # The steps executing user code, as the heartbeat reports them (see engine.heartbeat):
        # key -> {key, position, id, follows, attempt, final}.
        self.steps_executing: dict[str, dict[str, Any]] = {}
        self._executing_changes = 0  # orders the reports of steps_executing (executing_report)
        self.steps_ended: list[tuple[float, str]] = []  # the last few: (monotonic time, key)
        self.suspensions: list[Suspension] = []
        self.next_due: datetime | None = None  # set when the run is released with a due time
        self.ended = False  # this execution ended the run
        self._halted = False
        self._settled = asyncio.Event()
        # Completed steps' records (with their outputs as JSON) not yet committed (see defer).
        self._unsaved: list[Unsaved] = []
        # Buffered checkpoints (engine.checkpointing): without the option, the records are
        # committed before the next step starts (a buffer of one, no timer).
        self.checkpointing = run.function.checkpointing
        self._buffer = 1 if self.checkpointing is None else self.checkpointing.buffered_steps
        self._flush_lock = asyncio.Lock()  # commits of records go out in the order deferred
        self._flush_timer: asyncio.TimerHandle | None = None  # max_interval of the oldest
        self._timed_flush: asyncio.Task[None] | None = None
        self.history = History({key: _recorded(s) for key, s in run.steps.items()})
        self._branches: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()  # asked for steps
        self._clock_origin = time.monotonic()
        self.log = structlog_logger().bind(run_id=str(run.run_id), function_id=self.fn_id)
        logged = run.log_places
        if logged is None:  # counted by an older worker: only at the run's tail
            logged = {self.history.tail_place(): run.log_lines}
        self.run_logger = RunLogger(self.log, logged, self.history.replayed_line)

    # -- time ------------------------------------------------------------------------------------
    def db_now(self) -> datetime:
        """The database's clock (``engine.now()``), estimated from the claim time."""
        return self.run.claimed_at + timedelta(seconds=time.monotonic() - self._clock_origin)

    # -- what engine.steps uses (engine.steps.StepHost) -------------------------------------------
    @property
    def default_retries(self) -> int:
        """The retries of a step that does not set its own: the function's."""
        return self.run.function.retries

    @property
    def records_input(self) -> bool:
        """Whether a ``run`` step's arguments go with its record (``record_step_input``)."""
        return self.run.function.record_step_input

    @property
    def trigger(self) -> Event:
        """The run's (first) triggering event."""
        return self.run.events[0]

    @property
    def failed(self) -> bool:
        """True once the run has failed for good (see :meth:`fail`)."""
        return self.fatal is not None

    def check_failed(self) -> None:
        """Raises the run's failure if it has failed for good (a step's code may have caught it)."""
        if self.fatal is not None:
            raise self.fatal

    def retry_delay(self, attempt: int) -> timedelta:
        """The backoff before retrying a step after its ``attempt`` (0-based) failed."""
        return self.backoff.delay(attempt)

    def plan(self, step_id: str, kind: StepKind) -> StepPlan:
        """Matches a step request to the run's history by its id and its place in its branch
        (see :mod:`engine.replay`), never by the order the event loop schedules branches in."""
        if not isinstance(step_id, str) or not step_id:
            self.fail(RunFailure(f"step ids must be non-empty strings, got {step_id!r}"))
        problem = text_problem(step_id)
        if problem is not None:  # it would fail every write of the run, forever
            self.fail(RunFailure(f"step id {step_id!r} cannot be stored: {problem}"))
        outer = current_step.get()
        if outer is not None:
            self.fail(NestedStepError(f"step {step_id!r} was called inside step {outer!r}"))
        task = asyncio.current_task()
        if task is not None:
            self._branches.add(task)
        try:
            match = self.history.ask(step_id, kind, task)
        except DeterminismError as exc:
            self.fail(exc)
        if not match.recorded and self.history.count() > self.limits.max_steps:
            self.fail(
                StepLimitError(
                    f"the run asked for more than {self.limits.max_steps} steps (limit max_steps)"
                )
            )
        record = self.run.steps.get(match.key) if match.recorded else None
        return StepPlan(match.key, match.position, record, step_id, match.place)

    def patched(self, patch_id: str) -> bool:
        """``ctx.patched``: whether this point of the run takes the new code's path (see
        :mod:`engine.replay`). The run's first time here records a marker, committed with the
        next write (before or with any step after it): replay decides the same way."""
        if not isinstance(patch_id, str) or not patch_id:
            self.fail(RunFailure(f"patch ids must be non-empty strings, got {patch_id!r}"))
        problem = text_problem(patch_id)
        if problem is not None:
            self.fail(RunFailure(f"patch id {patch_id!r} cannot be stored: {problem}"))
        outer = current_step.get()
        if outer is not None:  # a step's code runs again on retry: it has no place of its own
            self.fail(RunFailure(f"ctx.patched({patch_id!r}) was called inside step {outer!r}"))
        taken, marker = self.history.patched(patch_id)
        if marker is not None:
            now = self.db_now()
            plan = StepPlan(marker.key, marker.position, None, patch_id, marker.place)
            record = plan.new(
                StepKind.PATCH, StepStatus.COMPLETED, output=True, started_at=now, ended_at=now
            )
            self.defer(record, "true")
        return taken

    def fail(self, failure: RunFailure | NestedStepError) -> NoReturn:
        """Marks the run as failed for good (first failure wins) and raises it."""
        if self.fatal is None:
            self.fatal = failure
        raise failure

    async def gate(self, *, flush: bool = True, buffered: bool = False) -> None:
        """Called before a new step starts: the steps completed so far are committed first, and
        no step starts once a cancel, a stop or the loss of the lease is known. A step with no
        side effect of its own (a sleep) passes ``flush=False``: the pending records are
        committed with the suspension, in the same round trip. A ``run`` step passes
        ``buffered=True``: a function with :class:`~engine.Checkpointing` commits them only once
        its buffer is full (or its ``max_interval`` passed); other steps leave the process or
        wait, so the buffer is always committed before them."""
        self.check_failed()
        if self.lost:  # the records cannot be written any more: start nothing new
            self._halted = True
            await self.block()
        if buffered and len(self._unsaved) < self._buffer:
            flush = False
        elif buffered and self._buffer > 1 and len(self._unsaved) < 2 * self._buffer:
            # A full buffer is committed beside the steps that follow, one such commit at a
            # time: buffering hides the commit's wait as well as its cost. The steps completed
            # meanwhile go with the next commit, and a second full buffer waits for the first:
            # at most 2 x buffered_steps - 1 steps are uncommitted (docs/checkpointing.md).
            if self._timed_flush is None or self._timed_flush.done():
                self._timed_flush = asyncio.create_task(self._flush_on_time())
                # Its round trip starts now, not when a step first waits: steps that never
                # yield (CPU only) would otherwise reach the second full buffer first.
                await asyncio.sleep(0)
            flush = False
        if flush and not self._settled.is_set():
            # Counted as executing: a stop or a suspension settling the run meanwhile must not
            # cancel this write half way (the records it carries would be lost with it).
            with self.executing():
                await self.flush()
        if self._settled.is_set():  # being released: the pending records go with that write
            await self.block()
        if self.cancel_requested or self.stopping:
            self._halted = True
            await self.block()

    async def suspend(self, suspension: Suspension) -> None:
        """Registers why the run must wait and blocks until the run is released."""
        self.will_wait(suspension)
        await self.block()

    def will_wait(self, suspension: Suspension) -> None:
        """Registers why the run must wait, from a step still counted as executing (the run
        cannot settle before its suspension is known); :meth:`block` then waits."""
        self.suspensions.append(suspension)

    async def block(self) -> None:
        """Waits for the run to settle; the function's task is cancelled then."""
        self.maybe_settle()
        await asyncio.get_running_loop().create_future()  # cancelled when the run settles

    def maybe_settle(self) -> None:
        """Settles the run when it must wait and no step is executing any more."""
        stopped = self._halted or self.lost or self.cut_off is not None
        if self.in_flight == 0 and (self.suspensions or stopped):
            self._settled.set()

    def executing(self) -> AbstractContextManager[None]:
        """Marks a step as executing: the run does not settle until the block ends."""
        return _Executing(self)

    def running_step(
        self, plan: StepPlan, attempt: int, *, final: bool, started_at: datetime
    ) -> AbstractAsyncContextManager[None]:
        """Marks a step as executing user code: heartbeats report it, so that a takeover of the
        run (its lease expired meanwhile) counts it as a failed attempt (``final``: the last
        one allowed). In a run that was itself taken over, it is recorded before the step
        starts (one round trip): a step that blocks the event loop at once is counted too.
        ``started_at``: when the attempt started (the same moment its record carries)."""
        return _RunningStep(self, plan, attempt, final, started_at)

    def _step_began(self, plan: StepPlan, attempt: int, final: bool, started_at: datetime) -> None:
        # Kept as given; the heartbeat renders the report (executing_report), not every step.
        self.steps_executing[plan.key] = {
            "key": plan.key,
            "position": plan.position,
            "id": plan.step_id,
            "follows": plan.follows,
            "attempt": attempt,
            "final": final,
            "started_at": started_at,
        }
        self._executing_changes += 1

    def _step_ended(self, key: str) -> None:
        del self.steps_executing[key]
        self._executing_changes += 1
        # A step that blocked the loop has ended by the time the late heartbeat runs.
        self.steps_ended = [*self.steps_ended[-7:], (time.monotonic(), key)]

    def steps_since(self, since: float) -> list[str]:
        """The steps executing now or ended after ``since`` (monotonic time)."""
        ended = [key for at, key in self.steps_ended if at >= since]
        return list(dict.fromkeys([*ended, *self.steps_executing]))

    def executing_report(self) -> dict[str, Any]:
        """The steps executing user code now, with this execution's lease token and how many
        times that set changed: the database keeps the newest report of the current execution
        (a heartbeat's, taken before its round trip, or one of an older execution of the run,
        never overwrites a step noted meanwhile; see engine.newer_report)."""
        return {
            "token": self.run.lease_token,
            "v": self._executing_changes,
            "steps": [
                {**step, "started_at": step["started_at"].isoformat()}
                for step in self.steps_executing.values()
            ],
        }

    async def _note_executing(self) -> None:
        executing = dumps(self.executing_report())
        await self._leased_call("note_executing", executing, "while noting the steps it executes")

    async def _leased_call(self, query: str, argument: str, doing: str) -> None:
        """Calls a lease-guarded function of this run (run id, owner, token, one JSON argument)
        and acts on its verdict (see :meth:`_accept`)."""
        with self._fenced():
            result = await self.db.fetchval(
                query, self.run.run_id, self.owner, self.run.lease_token, argument
            )
        self._accept(WriteVerdict(result), doing)

    def note_cancel(self) -> None:
        """A cancel was requested (seen by a checkpoint or a heartbeat)."""
        self.cancel_requested = True

    def note_deadline(self) -> float:
        """The run's finish timeout has passed (seen by a heartbeat): no new step starts, and
        the run ends CANCELLED once the executing steps are recorded (or abandoned, see
        :meth:`time_out`). Returns the monotonic time the deadline was first seen."""
        self.note_cancel()
        if self.deadline_seen is None:
            self.deadline_seen = time.monotonic()
        return self.deadline_seen

    def time_out(self) -> None:
        """The executing steps outlived the grace a finish timeout gives them: the run ends
        CANCELLED now; they are abandoned (a sync step's thread with them) and nothing they do
        later is recorded."""
        self.note_cancel()
        self._halted = True
        self._settled.set()

    def note_stop(self) -> None:
        """The worker is stopping: finish the executing steps, start no new one."""
        self.stopping = True
        if self.in_flight == 0 and not self._settled.is_set():
            self._halted = True
            self.maybe_settle()

    def defer(self, record: StepRecord, output_json: str) -> None:
        """Keeps a completed step's record to commit before anything else happens in the run:
        before the next step starts (:meth:`gate`), or with the run's end or suspension, in the
        same round trip. Only replayable code runs in between."""
        self._remember(record)
        self._unsaved.append((record, output_json))
        if self.checkpointing is not None and self._flush_timer is None:
            self._arm_flush_timer()

    async def flush(self, *extra: str) -> None:
        """Commits the deferred step records (one round trip for all of them), and ``extra``
        records after them (a failed attempt's), in the order they were deferred: a write
        that carries a later record carries every earlier one."""
        async with self._flush_lock:
            if not self._unsaved and not extra:
                return
            if self._flush_timer is not None:  # it was for these records
                self._flush_timer.cancel()
                self._flush_timer = None
            with self._fenced(), self._taking_unsaved() as records:
                result = await self.group_commit.checkpoint.call(
                    lambda: self._write(steps=_encoded(records) + list(extra)),
                    str(self.run.run_id),
                    alone=None if extra else self._completed_alone(records),
                )
            self._accept(WriteVerdict(result), "while recording completed steps")

    def _completed_alone(self, records: list[Unsaved]) -> tuple[Any, ...] | None:
        """The arguments of ``engine.checkpoint_completed`` when ``records`` is one completed
        step (the usual checkpoint): the typed form of this write, for when it goes alone."""
        if len(records) != 1:
            return None
        step = records[0][0].completed_args(records[0][1])
        if step is None:
            return None
        return (self.run.run_id, self.owner, self.run.lease_token, *step)

    def _arm_flush_timer(self) -> None:
        """Commits the buffer ``max_interval`` after a record entered it, even while a step
        still executes (a long step must not hold the results before it uncommitted)."""
        assert self.checkpointing is not None
        delay = self.checkpointing.interval.total_seconds()
        self._flush_timer = asyncio.get_running_loop().call_later(delay, self._interval_passed)

    def _interval_passed(self) -> None:
        self._flush_timer = None
        if self._settled.is_set() or self.let_go or not self._unsaved:
            return  # the run's release or end commits the buffer (or the lease is gone)
        if self._timed_flush is not None and not self._timed_flush.done():
            self._arm_flush_timer()  # one timed commit at a time: look again later
            return
        self._timed_flush = asyncio.create_task(self._flush_on_time())

    async def _flush_on_time(self) -> None:
        """A commit of the buffer beside the executing steps (its ``max_interval`` passed, or it
        is full: see :meth:`gate`). It counts as executing:
        the run does not settle while it is in flight. A refusal or a cut-off stops the
        execution as any write does (the flags are set by :meth:`_fenced` and :meth:`_accept`)."""
        try:
            with self.executing():
                await self.flush()
        except (LeaseLost, WriteCutOff):
            self.maybe_settle()
        except Exception as exc:  # put back: the next write of the run carries the records
            self.log.warning("run.timed_checkpoint_failed", error=f"{type(exc).__name__}: {exc}")

    async def _stop_flush_timer(self) -> None:
        """At the execution's end: no timed commit outlives it."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self._timed_flush is not None:
            await asyncio.gather(self._timed_flush, return_exceptions=True)

    def _log_counts(self) -> dict[str, Any]:
        """What the run records of ctx.logger's lines (see RunLogger): the count at each place
        no recorded step follows yet, and (for workers of earlier versions) at its tail."""
        places = self.run_logger.logged(self.history.followed_places())
        return {"log_places": places, "log_lines": places.get(self.history.tail_place(), 0)}

    def _write(
        self, *, steps: list[str], output: str = "null", error: str = "null", **fields: Any
    ) -> str:
        """One item of a batched write for this run (JSON text: step records, outputs and
        errors are pre-encoded JSON and spliced in as they are)."""
        head = dumps_plain(
            {
                "run": str(self.run.run_id),
                "owner": str(self.owner),
                "token": self.run.lease_token,
                **fields,
            }
        )
        raw = f'"steps":[{",".join(steps)}],"output":{output},"error":{error}'
        return f"{head[:-1]},{raw}}}"

    def _accept(self, verdict: WriteVerdict, doing: str) -> None:
        """Acts on the verdict of a write under the lease: ``lost`` or ``duplicate`` (another
        execution holds the run) stops this one; ``cancel`` marks the cancel request."""
        if verdict in (WriteVerdict.LOST, WriteVerdict.DUPLICATE):
            self.lost = True
            raise LeaseLost(f"run {self.run.run_id}: {verdict} {doing}")
        if verdict is WriteVerdict.CANCEL:
            self.note_cancel()

    def _fenced(self) -> AbstractContextManager[None]:
        """Wraps every database call of the execution: the refusal of a write under a stale
        lease becomes :class:`LeaseLost`, a call that met an infrastructure error (see
        :func:`~engine.db.is_infrastructure_error`) :class:`WriteCutOff`; both stop the
        execution, and neither is ever the function's failure."""
        return _Fenced(self)

    def _taking_unsaved(self) -> AbstractContextManager[list[Unsaved]]:
        """The deferred step records, for a write that commits them. If the write does not
        return (refused, cut off, or any error the function's code may catch), they are put
        back: a write that did not commit leaves the execution's state as it was, so the
        records go with the next write (a hand-back records them too)."""
        return _TakingUnsaved(self)

    async def checkpoint(self, record: StepRecord, output_json: str | None = None) -> None:
        """Commits a step record under the lease before the function goes on, after the
        completed steps still in memory (a failed attempt is followed by a backoff or by the
        step's error at its call site: the buffer is committed before either)."""
        await self.flush(record.to_json(output_json))
        self._remember(record)

    async def register_matchers(
        self, steps: list[StepRecord], matchers: list[dict[str, Any]]
    ) -> dict[str, dict[str, Any]]:
        """Records WAITING steps with their matchers and looks back for events since the
        trigger; returns the events that already resolved a matcher, by matcher key."""
        args = (
            self.run.run_id,
            self.owner,
            self.run.lease_token,
            "[" + ",".join(s.to_json() for s in steps) + "]",
            dumps(matchers),
        )
        with self._fenced():
            if not any(m["expression"] for m in matchers):
                rows = await self.db.fetch("register_matchers", *args)
                found = {row["key"]: loads(row["event"]) for row in rows if row["resolved"]}
            else:
                async with self.db.transaction() as conn:
                    rows = await self.db.fetch("register_matchers", *args, conn=conn)
                    found = await self._resolve_candidates(matchers, rows, conn)
        for step in steps:
            self._remember(step)
        return found

    async def _resolve_candidates(
        self, matchers: list[dict[str, Any]], rows: list[Any], conn: Any
    ) -> dict[str, dict[str, Any]]:
        """Evaluates the expressions of the looked-back candidates; resolves the first match."""
        resolved = {row["key"]: loads(row["event"]) for row in rows if row["resolved"]}
        trigger = self.run.events[0].model_dump(mode="json")
        expressions = {m["key"]: m["expression"] for m in matchers}
        for row in rows:
            key = row["key"]
            if row["resolved"] or key in resolved:
                continue
            event = loads(row["event"])
            if accepts(expressions[key], trigger, event):
                match = [
                    {"run_id": str(self.run.run_id), "key": key, "event_seq": row["event_seq"]}
                ]
                if await self.db.fetchval("resolve_matches", dumps(match), conn=conn):
                    resolved[key] = event
        return resolved

    async def invoke(
        self,
        record: StepRecord,
        target: Function,
        data: dict[str, Any],
        expires: datetime | None,
        on_timeout: dict[str, Any],
    ) -> StepRecord:
        """Starts ``target`` as a child run and records ``record`` (WAITING) for its result.

        Returns the step as recorded: FAILED if the child's flow control skipped it.
        """
        event = {"name": INVOKED, "data": data}
        with self._fenced():
            row = await self.db.fetchrow(
                "invoke",
                self.run.run_id,
                self.owner,
                self.run.lease_token,
                record.to_json(),
                target.app_id,
                target.fn_id,
                dumps(data),
                expires,
                dumps(on_timeout),
                telemetry.current_traceparent(),
                dumps(target.direct_admission(event)),
            )
        assert row is not None
        if row["skipped"] is not None:
            message = f"function {target.fn_id} skipped the invoked run: {row['skipped']}"
            record.status = StepStatus.FAILED
            record.error = {"type": "InvokeSkippedError", "message": message}
        self._remember(record)
        return record

    async def send_events(self, record: StepRecord, events: list[dict[str, Any]]) -> list[str]:
        """Sends events and records the step with their ids, in one transaction."""
        with self._fenced():
            row = await self.db.fetchrow(
                "send_step",
                self.run.run_id,
                self.owner,
                self.run.lease_token,
                record.to_json(),
                dumps_plain(events),
                telemetry.current_traceparent(),
            )
        assert row is not None
        self._accept(WriteVerdict(row["result"]), f"while sending events in {record.key!r}")
        ids: list[str] = loads(row["ids"])
        record.output = ids
        self._remember(record)
        return ids

    def remember(self, record: StepRecord) -> None:
        """Notes a step recorded by this execution (or committed with its suspension)."""
        self._remember(record)

    def _remember(self, record: StepRecord) -> None:
        self.run.steps[record.key] = record
        self.history.remember(_recorded(record))

    def encode_output(self, value: Any, what: str) -> str:
        """JSON for a step's or the run's output, within ``max_output_bytes``."""
        try:
            text = dumps(value)
            size = stored_size(text)
        except NotSerializable as exc:
            raise SerializationError(
                f"{what} returned a value that cannot be stored: {exc}"
            ) from exc
        if size > self.limits.max_output_bytes:
            self.fail(
                OutputLimitError(
                    f"{what} returned {size} bytes of JSON; the limit is "
                    f"{self.limits.max_output_bytes} (max_output_bytes)"
                )
            )
        self._add_state(size, what)
        return text

    def _add_state(self, size: int, what: str) -> None:
        """Counts an output into the run's state; over ``max_state_bytes`` fails the run."""
        self.run.state_bytes += size
        if self.run.state_bytes > self.limits.max_state_bytes:
            self.fail(
                StateLimitError(
                    f"{what} returned {size} bytes of JSON, bringing the run's state to "
                    f"{self.run.state_bytes} bytes; the limit on a run's state is "
                    f"{self.limits.max_state_bytes} (max_state_bytes)"
                )
            )

    # -- the driver ------------------------------------------------------------------------------
    async def execute(self, make_context: Callable[[Execution], Context]) -> None:
        """Runs the function until it ends or must wait, and records the outcome."""
        with (
            structlog.contextvars.bound_contextvars(
                run_id=str(self.run.run_id), function_id=self.fn_id
            ),
            telemetry.run_span(
                run_id=str(self.run.run_id),
                function_id=self.fn_id,
                attempt=self.run.attempt,
                event=self.run.events[0],
                traceparent=self.run.trace_context or self.run.traceparent,
                trace_payloads=self.trace_payloads,
            ) as span,
        ):
            try:
                try:
                    await self._drive(make_context, span)
                finally:
                    await self._stop_flush_timer()
            except LeaseLost as lost:
                self.let_go = True
                self.log.warning("run.lease_lost", reason=str(lost))
                telemetry.mark(span, "lease_lost")
            except WriteCutOff as cut:
                self.log.warning("run.write_cut_off", error=str(cut))
                telemetry.mark(span, "write_cut_off")
                await self._hand_back(span)
        if self.ended:  # after the execution's span has ended: the run's span covers it
            await self._trace_run()

    async def _hand_back(self, span: trace.Span) -> None:
        """Releases the run (QUEUED, due now) once the database answers again, so that it goes
        on at once, here or in another worker, instead of when its lease expires. The release
        is fenced like any write: if the cut-off write had in fact ended or suspended the run,
        or another worker took it over, it changes nothing (and the lease decides after all if
        the database stays away longer than the worker's patience)."""
        wait, deadline = 0.05, time.monotonic() + HAND_BACK_PATIENCE
        self.cut_off = None
        while True:
            due = self.db_now()
            try:
                await self._suspend(Suspension(due, RunStatus.QUEUED, HANDED_BACK, []), span)
                return
            except LeaseLost:
                self.let_go = True
                self.log.info("run.hand_back_refused", reason="the run ended or moved meanwhile")
                return
            except WriteCutOff:
                if self.stopping or time.monotonic() > deadline:
                    return  # the lease will expire, and another worker will take the run over
            await asyncio.sleep(wait)
            wait = min(wait * 2, 1.0)

    async def _drive(self, make_context: Callable[[Execution], Context], span: trace.Span) -> None:
        if self._first_start() and self.run.function.cancel:
            await self._arm_cancels()
        if self.cancel_requested:
            await self._finish(RunStatus.CANCELLED, span)
            return
        if self._first_start():
            self._count_first_start()
        # Per-run lines are at debug: at info, two synchronous lines a run cost a worker ~7% of
        # its CPU (bench/README.md, "Ratios to the floor"). Failures log at warning or error.
        self.log.debug("run.started", attempt=self.run.attempt)
        task = asyncio.create_task(self._call(make_context))
        settled = asyncio.create_task(self._settled.wait())
        try:
            await asyncio.wait({task, settled}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            settled.cancel()
        try:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await self._after_settling(span)
            else:
                await self._after_return(task, span)
        finally:
            await self._end_branches()

    async def _end_branches(self) -> None:
        """Cancels the branches the function left running (tasks it started and did not await)
        and collects their outcome, so that none outlives the execution or leaves an exception
        unretrieved."""
        left = [branch for branch in self._branches if not branch.done()]
        for branch in left:
            branch.cancel()
        if left:
            await asyncio.gather(*left, return_exceptions=True)
        self._branches.clear()

    def _count_first_start(self) -> None:
        """Metrics of a run's first start: how long after its event was due it began."""
        due = self.run.events[0].ts or self.run.claimed_at
        latency = (self.db_now() - due).total_seconds()
        metrics.run_first_started(self.run.function.app_id, self.fn_id, latency)

    def _first_start(self) -> bool:
        return not self.run.steps and self.run.attempt == 0 and not self.cancel_requested

    async def _arm_cancels(self) -> None:
        """Registers the function's cancel events for this run (with a look back to its
        trigger, so that a cancel sent before the run started counts)."""
        trigger = self.run.events[0]
        trigger_json = trigger.model_dump(mode="json")
        since = trigger.ts or self.run.claimed_at
        matchers = [
            cancel.matcher.row(
                key=f"cancel:{index}",
                kind="cancel",
                trigger=trigger_json,
                expires_at=None if cancel.window is None else since + cancel.window,
            )
            for index, cancel in enumerate(self.run.function.cancel)
        ]
        if await self.register_matchers([], matchers):
            self.note_cancel()

    async def _call(self, make_context: Callable[[Execution], Context]) -> Any:
        start_branch()
        return await self.run.function.handler(make_context(self))

    async def force_stop(self) -> None:
        """Settles at once (the stop grace period is over): steps still running are abandoned."""
        self.stopping = True
        self._halted = True
        self._settled.set()

    def _raise_if_stopped(self) -> None:
        """After the function's task: a lost lease or a cut-off write decides, whatever the
        function's code made of it."""
        if self.lost:
            raise LeaseLost(f"run {self.run.run_id}")
        if self.cut_off is not None:
            raise WriteCutOff(self.cut_off)

    async def _after_settling(self, span: trace.Span) -> None:
        self._raise_if_stopped()
        if self.fatal is not None:
            await self._fail(self.fatal, span)
        elif self.cancel_requested:
            await self._finish(RunStatus.CANCELLED, span)
        elif self.stopping:
            due = self.db_now()
            sleeps = [s for p in self.suspensions for s in p.steps]
            await self._suspend(
                Suspension(due, RunStatus.QUEUED, "handed back by a stopping worker", sleeps), span
            )
        else:
            await self._suspend(_merge(self.suspensions), span)

    async def _after_return(self, task: asyncio.Task[Any], span: trace.Span) -> None:
        error = task.exception()  # retrieved whatever happens next: never left unretrieved
        self._raise_if_stopped()
        if self.fatal is not None:
            await self._fail(self.fatal, span)
            return
        if error is None:
            await self._complete(task.result(), span)
        elif isinstance(
            error, StepError | NonRetriableError | RunFailure | SerializationError
        ) or not isinstance(error, Exception):
            await self._fail(error, span)
        elif self.run.attempt < self.run.function.retries:
            await self._retry_function(error, span)
        else:
            await self._fail(error, span)

    async def _complete(self, value: Any, span: trace.Span) -> None:
        try:
            self.history.check_complete()
        except DeterminismError as diverged:
            await self._fail(diverged, span)
            return
        try:
            output = self.encode_output(value, f"function {self.fn_id!r}")
        except (RunFailure, SerializationError) as failure:
            await self._fail(failure, span)
            return
        telemetry.payload(span, "engine.output", output, self.trace_payloads)
        await self._finish(RunStatus.COMPLETED, span, output=output)

    async def _retry_function(self, error: BaseException, span: trace.Span) -> None:
        now = self.db_now()
        due = (
            error.due(now)
            if isinstance(error, RetryAfterError)
            else now + self.backoff.delay(self.run.attempt)
        )
        self.log.warning(
            "run.attempt_failed",
            attempt=self.run.attempt,
            error=str(error),
            retry_in=max((due - now).total_seconds(), 0.0),
        )
        self.run.attempt += 1
        reason = (
            f"retrying the function (attempt {self.run.attempt}) after "
            f"{type(error).__name__}: {error}"
        )
        body_error = {**error_payload(error), "traceback": error_traceback(error)}
        await self._suspend(Suspension(due, RunStatus.RETRYING, reason), span, body_error)

    async def _fail(self, error: BaseException, span: trace.Span) -> None:
        self.log.error("run.failed", error=str(error), error_type=type(error).__name__)
        await self._finish(
            RunStatus.FAILED,
            span,
            error=dumps(error_payload(error)),
            traceback=error_traceback(error),
        )

    async def _finish(
        self,
        status: RunStatus,
        span: trace.Span,
        *,
        output: str | None = None,
        error: str | None = None,
        traceback: str | None = None,
    ) -> None:
        async with self._flush_lock:  # after a timed commit still in flight
            verdict = await self._finish_write(status, output, error, traceback)
        if verdict is WriteVerdict.LOST:
            raise LeaseLost(f"run {self.run.run_id}: lost before it could end {status.value}")
        self.let_go = True
        # A cancel requested while the function ran wins (engine.finish_run): its output is gone.
        outcome = RunStatus.CANCELLED if verdict is WriteVerdict.CANCEL else status
        metrics.run_ended(self.run.function.app_id, self.fn_id, outcome.value)
        self.log.debug("run.finished", status=outcome.value)
        telemetry.mark(span, outcome.value)
        self.ended = True

    async def _finish_write(
        self, status: RunStatus, output: str | None, error: str | None, traceback: str | None
    ) -> WriteVerdict:
        with self._fenced(), self._taking_unsaved() as records:
            steps, counts = _encoded(records), self._log_counts()
            item = partial(
                self._write,
                steps=steps,
                status=status.value,
                **counts,
                output=output or "null",
                error=error or "null",
                traceback=traceback,
            )  # built only if the end goes in a batch
            # The same end in engine.finish_run's arguments, for when it goes alone.
            alone = (
                self.run.run_id,
                self.owner,
                self.run.lease_token,
                status.value,
                None if output in (None, "null") else output,
                None if error in (None, "null") else error,
                counts["log_lines"],
                f"[{','.join(steps)}]",
                traceback,
                dumps_plain(counts["log_places"]),
            )
            verdict = await self.group_commit.finish.call(item, str(self.run.run_id), alone)
            return WriteVerdict(verdict)

    async def _trace_run(self) -> None:
        """Emits the ended run's own span and its pauses' spans, timed from its history (see
        :mod:`engine.telemetry`): one read, only when spans are exported. Never fails the run."""
        if self.run.trace_context is None or not telemetry.wants_run_history():
            return
        try:
            row = await self.db.fetchrow("get_run", self.run.run_id)
            if row is not None:
                info = run_info_from_row(row)
                telemetry.emit_run(info, self.run.trace_context, self.run.traceparent)
        except Exception as exc:  # tracing is best effort: the run has ended either way
            self.log.warning("run.trace_failed", error=f"{type(exc).__name__}: {exc}")

    async def _suspend(
        self,
        suspension: Suspension,
        span: trace.Span,
        body_error: dict[str, Any] | None = None,
    ) -> None:
        async with self._flush_lock:  # after a timed commit still in flight
            verdict = await self._suspend_write(suspension, body_error)
        if verdict is WriteVerdict.LOST:
            raise LeaseLost(f"run {self.run.run_id}: lost before it could be suspended")
        self.let_go = True
        outcome = RunStatus.CANCELLED if verdict is WriteVerdict.CANCEL else suspension.status
        self.log.debug(
            "run.suspended",
            status=outcome.value,
            due=suspension.due.isoformat(),
            reason=suspension.reason,
        )
        telemetry.mark(span, outcome.value)
        self.next_due = suspension.due

    async def _suspend_write(
        self, suspension: Suspension, body_error: dict[str, Any] | None
    ) -> WriteVerdict:
        with self._fenced(), self._taking_unsaved() as records:
            item = self._write(
                steps=_encoded(records) + [s.to_json() for s in suspension.steps],
                status=suspension.status.value,
                due=suspension.due.isoformat(),
                reason=suspension.reason,
                attempt=self.run.attempt,
                **self._log_counts(),
                awaited=suspension.awaited,
                body_error=body_error,
            )
            return WriteVerdict(await self.group_commit.suspend.call(item, str(self.run.run_id)))


def _merge(suspensions: list[Suspension]) -> Suspension:
    """One release for several waiting steps: wake at the earliest; record every sleep."""
    first = min(suspensions, key=lambda s: s.due)
    reasons = "; ".join(s.reason for s in sorted(suspensions, key=lambda s: s.due))
    steps = [step for s in suspensions for step in s.steps]
    awaited = [key for s in suspensions for key in s.awaited]
    return Suspension(first.due, first.status, reasons, steps, awaited)


class _Fenced(AbstractContextManager[None]):
    """The block of :meth:`Execution._fenced` (a plain class: it wraps every checkpoint)."""

    __slots__ = ("_ex",)

    def __init__(self, ex: Execution) -> None:
        self._ex = ex

    def __enter__(self) -> None:
        return None

    def __exit__(self, _type: object, exc: BaseException | None, _tb: object) -> None:
        if isinstance(exc, StaleLeaseError):
            self._ex.lost = True
            raise LeaseLost(str(exc)) from None
        if isinstance(exc, Exception) and is_infrastructure_error(exc):
            self._ex.cut_off = f"{type(exc).__name__}: {exc}"
            self._ex.maybe_settle()
            raise WriteCutOff(self._ex.cut_off) from exc


class _TakingUnsaved(AbstractContextManager[list[Unsaved]]):
    """The block of :meth:`Execution._taking_unsaved` (a plain class: it wraps every
    checkpoint)."""

    __slots__ = ("_ex", "_records")

    def __init__(self, ex: Execution) -> None:
        self._ex = ex
        self._records: list[Unsaved] = []

    def __enter__(self) -> list[Unsaved]:
        self._records, self._ex._unsaved = self._ex._unsaved, []
        return self._records

    def __exit__(self, _type: object, exc: BaseException | None, _tb: object) -> None:
        if exc is not None:
            self._ex._unsaved = self._records + self._ex._unsaved


class _Executing(AbstractContextManager[None]):
    """The block of :meth:`Execution.executing` (a plain class: it wraps every step)."""

    __slots__ = ("_ex",)

    def __init__(self, ex: Execution) -> None:
        self._ex = ex

    def __enter__(self) -> None:
        self._ex.in_flight += 1

    def __exit__(self, *_exc: object) -> None:
        self._ex.in_flight -= 1
        self._ex.maybe_settle()


class _RunningStep(AbstractAsyncContextManager[None]):
    """The block of :meth:`Execution.running_step` (a plain class: it wraps every step)."""

    __slots__ = ("_attempt", "_ex", "_final", "_plan", "_started_at")

    def __init__(
        self, ex: Execution, plan: StepPlan, attempt: int, final: bool, started_at: datetime
    ) -> None:
        self._ex, self._plan, self._attempt = ex, plan, attempt
        self._final, self._started_at = final, started_at

    async def __aenter__(self) -> None:
        ex = self._ex
        ex._step_began(self._plan, self._attempt, self._final, self._started_at)
        if ex.run.taken_over:
            try:
                await ex._note_executing()
            except BaseException:
                ex._step_ended(self._plan.key)
                raise

    async def __aexit__(self, *_exc: object) -> None:
        self._ex._step_ended(self._plan.key)
