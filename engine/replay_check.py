"""Replaying recorded histories against the current code, to find the runs a deploy would break.

``engine check-replay`` and :meth:`engine.Engine.check_replay` load each run in flight (and,
with ``since``, each run that ended within it), and replay its function as a worker would:
recorded steps return their recorded outputs, in the same matching by id and place
(:mod:`engine.replay`). No step body runs and nothing is written: a request for a step the run
has not completed yet (the run's frontier: a new step, a sleep not over, a wait, a retry) blocks
that branch there, as the real execution would run it. What replay proves, it reports: a
:class:`~engine.DeterminismError` of a branch (another step asked for where a step is
recorded, a recorded id asked for as another kind), or, for a function that returns, a
recorded step it never asked for.

Code outside steps runs, as it does on every replay (it must be deterministic and free of side
effects already); ``ctx.logger`` is silent. A function that awaits something else than steps
outside them (a plain ``asyncio.sleep``) is replayed until the event loop has nothing left to
run; what lies past such an await is not checked.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime
from typing import Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict

from .context import Context
from .db import Database
from .errors import DeterminismError
from .execution import Execution
from .function import Function
from .group_commit import GroupCommit
from .records import ClaimedRun, Limits, StepKind, StepPlan, StepRecord, Suspension
from .replay import start_branch
from .retries import Backoff
from .runlocal import RunLogger
from .schemas import typed_events
from .steps import Steps
from .threads import StepThreads

PAGE = 100  # runs loaded per query
QUIET_TURNS = 50  # event loop turns with no step asked for: the replay has gone as far as it can


class ReplayProblem(BaseModel):
    """A run that the current code would fail with a :class:`~engine.DeterminismError`."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    function_id: str
    status: str
    """The run's status now (a run in flight, or one that ended within ``since``)."""
    recorded_step: str | None
    """The key of the step the run recorded where the code diverged."""
    asked_step: str | None
    """The step id the current code asks for there (None: it returned without asking)."""
    message: str
    """The DeterminismError's message, as the run would fail with it."""


class ReplayReport(BaseModel):
    """What :meth:`engine.Engine.check_replay` found."""

    model_config = ConfigDict(frozen=True)

    checked: int
    """Runs replayed."""
    problems: list[ReplayProblem]
    """The runs that would fail, in run id order."""

    @property
    def ok(self) -> bool:
        """True when no run would fail."""
        return not self.problems


class _Silent:
    """A logger that says nothing (``ctx.logger`` and the engine's lines, while probing)."""

    def __getattr__(self, name: str) -> Any:
        return self._nothing

    def _nothing(self, *args: Any, **kwargs: Any) -> None:
        return None

    def bind(self, **kwargs: Any) -> _Silent:
        return self


class ReplayProbe(Execution):
    """An execution that only replays: every write and every wait is the run's frontier."""

    def __init__(self, run: ClaimedRun, *, db: Database, limits: Limits) -> None:
        super().__init__(
            run,
            db=db,
            group_commit=GroupCommit(db),  # never used: nothing is written
            owner=UUID(int=0),
            limits=limits,
            backoff=Backoff(),
            threads=StepThreads(1, name="engine-replay-check"),  # lazy: never started
        )
        self.log = _Silent()
        self.run_logger = RunLogger(_Silent(), {}, lambda place: True)
        self.asked = 0  # step requests and patch points, to see when replay stops moving

    def plan(self, step_id: str, kind: StepKind) -> StepPlan:
        self.asked += 1
        return super().plan(step_id, kind)

    def patched(self, patch_id: str) -> bool:
        self.asked += 1
        return super().patched(patch_id)

    def defer(self, record: StepRecord, output_json: str) -> None:
        self.remember(record)  # a patch marker of a run's first time: not written

    async def gate(self, *, flush: bool = True, buffered: bool = False) -> None:
        self.check_failed()
        await self.block()

    async def block(self) -> None:
        await asyncio.get_running_loop().create_future()  # the frontier: cancelled at the end

    async def suspend(self, suspension: Suspension) -> None:
        await self.block()

    def will_wait(self, suspension: Suspension) -> None:
        return None

    def executing(self) -> AbstractContextManager[None]:
        return nullcontext()

    async def probe(self, patience: float) -> DeterminismError | None:
        """Replays the run's function; the divergence replay proves, if any."""
        task = asyncio.create_task(self._replay())
        deadline = time.monotonic() + patience
        quiet = 0
        while not task.done() and self.fatal is None and quiet < QUIET_TURNS:
            before = self.asked
            await asyncio.sleep(0)
            quiet = quiet + 1 if self.asked == before else 0
            if time.monotonic() > deadline:
                break
        try:
            if task.done() and self.fatal is None and task.exception() is None:
                self.history.check_complete()
        except DeterminismError as diverged:
            return diverged
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            self._branches.add(task)
            await self._end_branches()
        return self.fatal if isinstance(self.fatal, DeterminismError) else None

    async def _replay(self) -> Any:
        start_branch()
        events = typed_events(self.run.function, self.run.events)  # as engine.worker does
        ctx: Context[Any] = Context(
            event=events[0],
            events=events,
            run_id=str(self.run.run_id),
            step=Steps(self),
            logger=self.run_logger,
            run_attempt=self.run.attempt,
        )
        return await self.run.function.handler(ctx)


async def check_replay(
    db: Database,
    app_id: str,
    functions: dict[str, Function],
    limits: Limits,
    *,
    since: datetime | None,
    patience: float,
) -> ReplayReport:
    """Replays the runs of ``functions`` in flight, and those ended since ``since``."""
    checked, problems = 0, []
    after = UUID(int=0)
    while True:
        rows = await db.fetch("replay_histories", app_id, list(functions), since, after, PAGE)
        for row in rows:
            checked += 1
            problem = await _check_run(row, functions[row["function_id"]], db, limits, patience)
            if problem is not None:
                problems.append(problem)
        if len(rows) < PAGE:
            return ReplayReport(checked=checked, problems=problems)
        after = rows[-1]["id"]


async def _check_run(
    row: Any, function: Function, db: Database, limits: Limits, patience: float
) -> ReplayProblem | None:
    probe = ReplayProbe(ClaimedRun.from_row(row, function), db=db, limits=limits)
    diverged = await probe.probe(patience)
    if diverged is None:
        return None
    return ReplayProblem(
        run_id=str(row["id"]),
        function_id=function.fn_id,
        status=row["status"],
        recorded_step=diverged.recorded,
        asked_step=diverged.asked,
        message=str(diverged),
    )
