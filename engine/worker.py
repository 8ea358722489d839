"""The worker: one explicit loop that routes events and claims runs, with named side tasks.

Side tasks run in an ``asyncio.TaskGroup``: the listener (NOTIFY wake-ups), the heartbeat
(lease renewal, cancel and lost-lease detection) and, unless the Engine's retention is None,
the pruner (``engine.retention``). If one dies, the worker stops loudly.

The loop wakes on a notification, on a freed slot, on the local timer armed for the earliest due
time it knows (a sleep or a backoff coming due), and at least every ``poll_interval`` (the safety
net: NOTIFY is a hint, never relied upon).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID, uuid4

from pydantic import BaseModel

from . import event_loop, metrics
from .checkpointing import commits_synchronously
from .context import Context
from .durations import Duration, parse_duration
from .events import event_from_row
from .execution import Execution
from .group_commit import GroupCommit
from .listener import Listener
from .logs import engine_logger
from .presence import Presence
from .records import ClaimedRun
from .retention import PRUNE_EVERY, Pruner
from .router import EVENT_BATCH, RoutedRun, Router
from .runs import RunStatus
from .schemas import SCHEDULED, typed_events
from .serialization import dumps, dumps_plain, loads
from .steps import Steps
from .threads import StepThreads

if TYPE_CHECKING:
    from .app import Engine
    from .db import Database, Record

log = engine_logger()

HAND_BACK_BOUND = 3.0  # seconds a stopping worker waits for its runs' hand-backs after grace


class Worker:
    """Executes the runs of one app's functions.

    Args:
        engine: the app whose functions this worker runs.
        concurrency: runs executing at once in this worker, at most.
        lease: how long a claimed run stays ours without a heartbeat; a dead worker's runs are
            taken over this long after its last heartbeat.
        poll_interval: the longest the worker sleeps without looking for work.
        grace: on stop, how long executing steps get to finish before their runs are released.
        listen_check: how often the LISTEN connection is probed with a timed query. A connection
            that died silently (a partition, a dead NAT entry) is replaced within this interval
            plus the probe's timeout (at most 5 s); the poll finds the work meanwhile.
        inactive_after: how long this worker's functions stay routed after its last heartbeat
            (it beats three times per period); default three leases. A function that no live
            worker serves for that long goes inactive: new events no longer start runs of it.
        threads: sync step callables executing at once, at most (default: ``concurrency``), in
            the worker's own pool of threads (see ``engine.threads``).
        prune_every: how often the worker prunes history older than the Engine's ``retention``
            (the first pass comes shortly after start; one worker of a database prunes at a
            time; see ``engine.retention``). No pruning when the retention is ``None``.
        alive_file: a file rewritten (with this worker's id) at each heartbeat that reached
            the database, every third of ``inactive_after``: a liveness probe checks its age
            (ops/k8s).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        concurrency: int = 10,
        lease: Duration = "30s",
        poll_interval: Duration = "1s",
        grace: Duration = "10s",
        listen_check: Duration = "10s",
        inactive_after: Duration | None = None,
        threads: int | None = None,
        prune_every: Duration = PRUNE_EVERY,
        alive_file: str | Path | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.threads = StepThreads(concurrency if threads is None else threads)
        self.engine = engine
        self.owner: UUID = uuid4()
        self.concurrency = concurrency
        self.lease = parse_duration(lease, what="lease")
        self.poll_interval = parse_duration(poll_interval, what="poll_interval").total_seconds()
        self.grace = parse_duration(grace, what="grace").total_seconds()
        self.listen_check = parse_duration(listen_check, what="listen_check").total_seconds()
        if self.listen_check <= 0:
            raise ValueError("listen_check must be positive")
        if self.lease < timedelta(milliseconds=300):
            raise ValueError("lease must be at least 300ms")
        self.executions: dict[UUID, Execution] = {}
        ttl = self.lease * 3 if inactive_after is None else parse_duration(inactive_after)
        alive = None if alive_file is None else Path(alive_file)
        self._presence = Presence(engine.app_id, self.owner, list(engine.functions), ttl, alive)
        self.pruner = (
            None
            if engine.retention is None
            else Pruner(self.owner, engine.retention, every=prune_every)
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        # Notifications only (see _notified): a flood of them, from any role that may NOTIFY,
        # must not make the worker spin. Consecutive notification-driven ticks that found
        # nothing space the next one out, doubling from 1 ms up to 100 ms; a tick that finds
        # work resets it, so an event after a real idle period is routed at once.
        self._notified_only = False
        self._empty_wakes = 0
        self._last_tick = 0.0
        self.ticks = 0  # ticks run so far (observability, tests)
        self._stopping = asyncio.Event()
        self._started = asyncio.Event()
        self._timer_at = float("inf")  # monotonic time of the earliest known due work
        self._router: Router | None = None
        # The group committers: durable ones, and relaxed ones for the functions declared with
        # Checkpointing(synchronous_commit=False) (keyed by commits_synchronously).
        self._group_commits: dict[bool, GroupCommit] = {}
        self._fn_ids = list(engine.functions)
        # The schemas send_event steps check against; like the functions, fixed at start.
        self._make_context = partial(_make_context, schemas=engine.sent_schemas())
        self._crons = {
            (f.fn_id, t.cron): t.schedule for f in engine.functions.values() for t in f.crons
        }
        self._cron_check_at = 0.0  # monotonic time at which a cron schedule may be due
        # A tick or an execution failed: some run may be leased to us that we do not execute.
        self._may_have_orphans = False
        self._slots_were_short = True  # the last tick used every free slot (see _tick_after_end)
        # Slots held for runs that sends in this process are routing (see send_and_start).
        self._reserved = 0
        self._loop_running: asyncio.AbstractEventLoop | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    async def run(self) -> None:
        """Runs until :meth:`stop` is called; then stops gracefully.

        A worker that cannot start (no database, no schema) raises at once; one that loses the
        database later keeps trying, and says so in its log (``worker.tick_failed``).
        """
        try:
            await self._run()
        finally:
            self._stopping.set()  # whoever waits in stopped() learns that the worker ended
            self.threads.close()

    async def started(self) -> None:
        """Waits until the worker is connected and registered (or raises why it cannot be)."""
        await self._started.wait()

    async def _run(self) -> None:
        db = await self.engine.database()
        await self._presence.beat(db)  # before routing: other workers route to us at once
        self._router = Router(db, self.engine.app_id, self.engine.functions)
        self._group_commits = {
            True: GroupCommit(db),
            False: GroupCommit(db, synchronous_commit=False),
        }
        await self._router.load_registry()
        self._loop_running = asyncio.get_running_loop()
        self.engine.serve_sends(self)
        self._started.set()
        log.info(
            "worker.started",
            owner=str(self.owner),
            app_id=self.engine.app_id,
            functions=self._fn_ids,
            concurrency=self.concurrency,
            event_loop=event_loop.name(self._loop_running),
        )
        try:
            async with asyncio.TaskGroup() as group:
                side = [
                    group.create_task(self._listener(db).run(), name="listener"),
                    group.create_task(self._heartbeat(), name="heartbeat"),
                    group.create_task(self._presence.run(db), name="presence"),
                ]
                if metrics.enabled():
                    side.append(group.create_task(self._sample_gauges(), name="gauges"))
                if self.pruner is not None:
                    side.append(group.create_task(self.pruner.run(db), name="pruner"))
                await self._loop()
                await self._drain()
                for task in side:
                    task.cancel()
        finally:
            self.engine.stop_serving_sends(self)
            for group_commit in self._group_commits.values():
                await group_commit.close()  # their connections go back to the pool
        await self._presence.leave(db)
        log.info("worker.stopped", owner=str(self.owner))

    def _listener(self, db: Database) -> Listener:
        probe_timeout = min(self.listen_check, 5.0)
        return Listener(
            db, self._notified, health_interval=self.listen_check, health_timeout=probe_timeout
        )

    def stop(self) -> None:
        """Asks the worker to stop: no new claims; executing steps finish within ``grace``."""
        self._stopping.set()
        self.wake()

    async def stopped(self) -> None:
        """Waits until :meth:`stop` has been called, or the worker ended by itself."""
        await self._stopping.wait()

    # -- sends in this process -------------------------------------------------------------
    def takes_sends(self) -> bool:
        """Whether a send made now, in this event loop, may route its events here."""
        return not self._stopping.is_set() and self._loop_running is asyncio.get_running_loop()

    async def send_and_start(
        self, payload: list[dict[str, Any]], traceparent: str | None
    ) -> list[str]:
        """Sends events (``app.send``) and starts at once the runs they create here.

        The events are stored and routed in one transaction (``engine.send_and_route``): the
        runs this worker has room for come back leased to it and start without a NOTIFY, a
        wake-up and a routing transaction between the send and their first step. The others
        are routed and claimed as usual. Returns the event ids.
        """
        assert self._router is not None
        names = [event["name"] for event in payload]
        wanted = self._router.most_runs_here(names)
        capacity = min(max(self._free_slots(), 0), wanted)
        self._reserved += capacity
        try:
            ids, mine = await self._router.send_and_route(
                dumps_plain(payload),
                names,
                traceparent=traceparent,
                owner=self.owner,
                lease=self.lease,
                capacity=capacity,
            )
        except BaseException:
            # The transaction may have committed unheard: its runs would be leased to us and
            # executed by nobody until we release them.
            self._may_have_orphans = True
            self.wake()
            raise
        finally:
            self._reserved -= capacity
        if len(mine) < capacity and self._slots_were_short:
            # A tick found no free slot while this send held some: those it did not use are
            # free now, and no run end will say so.
            self.wake()
        if self._stopping.is_set():
            # The worker began stopping during the round trip: its drain no longer waits for
            # new executions. The runs keep their lease until it expires, then any worker
            # takes them over, as it does the runs of a worker that died.
            return ids
        for routed_run in mine:
            await self._start_readable(partial(self._routed, routed_run), routed_run.row)
        return ids

    def _free_slots(self) -> int:
        return self.concurrency - len(self.executions) - self._reserved

    def wake(self) -> None:
        """Makes the loop look for work now."""
        self._notified_only = False
        self._wake.set()

    def _notified(self) -> None:
        """A NOTIFY arrived: a hint that work may be due (see ``_pace_notified``)."""
        if not self._wake.is_set():
            self._notified_only = True
        self._wake.set()

    # -- the loop --------------------------------------------------------------------------------
    async def _loop(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                progressed, more = await self._tick()
                failures = 0
            except Exception as exc:
                # The database is restarting or unreachable: look again soon (0.1 s, doubling
                # up to the poll interval) rather than a whole poll interval after it is back.
                # A claim or a routing may have committed without our hearing of it.
                self._may_have_orphans = True
                failures = min(failures + 1, 16)  # 2**16 * 0.05 s is past any poll interval
                retry_in = min(0.05 * 2**failures, self.poll_interval)
                log.warning(
                    "worker.tick_failed",
                    error=str(exc) or repr(exc),
                    error_type=type(exc).__name__,
                    retry_in=retry_in,
                )
                await self._sleep_until_woken(retry_in)
                continue
            if progressed:
                self._empty_wakes = 0
            if more:
                continue
            # Nothing left that this tick could see: wait for a NOTIFY, a freed slot, the timer
            # (armed by the tick) or the poll. A tick that found work used to be followed by
            # another at once, which found nothing: three round trips per event.
            await self._sleep_until_woken()
            if not progressed:
                await self._pace_notified()

    async def _pace_notified(self) -> None:
        """After a wake by notifications alone, following ticks that found nothing, waits out
        a gap that doubles with each such tick (1 ms up to 100 ms), so however many
        notifications arrive, an idle worker ticks a bounded number of times per second."""
        if not self._notified_only:
            self._empty_wakes = 0
            return
        gap = min(0.001 * 2**self._empty_wakes, 0.1)
        self._empty_wakes = min(self._empty_wakes + 1, 16)
        deadline = self._last_tick + gap
        while self._notified_only and (remaining := deadline - time.monotonic()) > 0:
            self._wake.clear()  # more notifications: the tick to come covers them too
            try:
                async with asyncio.timeout(remaining):
                    await self._wake.wait()
            except TimeoutError:
                break
        # Any other wake (a freed slot, stop) ended the wait; the tick to come covers them all.
        self._wake.clear()
        self._notified_only = False

    async def _tick(self) -> tuple[bool, bool]:
        """Routes due events and claims due runs up to the free slots. Returns whether it found
        work, and whether more may be waiting at once: a full batch of events routed.

        Events are routed even when every slot is busy, so that their runs exist (visible,
        claimable by other workers, subject to their timeouts) as soon as possible.

        With a slot left free, the timer is armed for what comes due next. With every slot
        busy, it is not: the next run to end wakes the loop (``_tick_after_end``), and the
        timer would only point at the runs due now that there is no room for. Armed for them,
        it fired at once, and the loop spun on two round trips (a routing and engine.next_due
        that found the same thing) for as long as the slots stayed full: 800 to 1,450 such
        ticks for 3,000 runs. What else the timer covers while the slots stay full (a
        scheduled event, a cron tick, an expired lease) waits for that run end or the poll.
        """
        self.ticks += 1
        self._last_tick = time.monotonic()
        if self._may_have_orphans:
            await self._release_orphans()
        fired = await self._fire_crons() if self._crons else 0
        free = max(self._free_slots(), 0)
        assert self._router is not None
        routed, mine = await self._router.route(self.owner, self.lease, free)
        for routed_run in mine:
            await self._start_readable(partial(self._routed, routed_run), routed_run.row)
        if mine:
            await _let_started_runs_begin()
        free -= len(mine)
        claimed, due = await self._claim(free) if free > 0 else (0, None)
        # Every slot was taken: work may be left for the next slot a run frees.
        self._slots_were_short = free <= 0 or claimed >= free
        progressed = routed > 0 or claimed > 0 or fired > 0
        more = routed >= EVENT_BATCH
        if not more and not self._slots_were_short and due is not None:
            self._note_next_due(due)  # the claim's round trip brought it
        return progressed, more

    async def _release_orphans(self) -> None:
        """Queues again the runs leased to this worker that it does not execute (see
        ``engine.release_orphans``): between ticks, every such run is one it lost track of."""
        db = await self.engine.database()
        released = await db.fetchval(
            "release_orphans", self.engine.app_id, self.owner, list(self.executions)
        )
        self._may_have_orphans = False
        if released:
            log.warning("worker.orphans_released", runs=released)

    async def _fire_crons(self) -> int:
        """Starts the runs of this app's due cron ticks: one per schedule, for its latest
        missed time (ticks missed while no worker ran are not started one by one)."""
        if time.monotonic() < self._cron_check_at:
            return 0
        db = await self.engine.database()
        until_next = await db.fetchval("next_cron", self.engine.app_id, self._fn_ids)
        if until_next is None or until_next.total_seconds() > 0:
            # Looked at again at the next tick time, and at least every poll (durable time may
            # jump: a test moving the clock, or a corrected system clock).
            wait = self.poll_interval if until_next is None else until_next.total_seconds()
            self._cron_check_at = time.monotonic() + min(wait, self.poll_interval)
            return 0
        fired = 0
        async with db.transaction() as conn:
            now: datetime = await db.fetchval("now", conn=conn)
            for row in await db.fetch("due_crons", self.engine.app_id, conn=conn):
                schedule = self._crons.get((row["function_id"], row["cron"]))
                if schedule is None:  # registered by another version of the app: not ours
                    continue
                tick = schedule.latest_until(row["next_at"], now)
                function = self.engine.functions[row["function_id"]]
                event = {"name": SCHEDULED, "data": {"cron": row["cron"]}}
                run_id = await db.fetchval(
                    "fire_cron",
                    self.engine.app_id,
                    row["function_id"],
                    row["cron"],
                    tick,
                    schedule.next_after(now),
                    dumps(function.direct_admission(event)),
                    conn=conn,
                )
                fired += run_id is not None
        return fired

    async def _claim(self, limit: int) -> tuple[int, Record]:
        """Claims due runs up to ``limit`` and starts them; returns how many, and the row that
        says when the next work comes due after this claim (see ``_note_next_due``)."""
        db = await self.engine.database()
        *rows, due = await db.fetch(
            "claim_runs_then_next_due",
            self.engine.app_id,
            self._fn_ids,
            self.owner,
            self.lease,
            limit,
            self.engine.limits.max_state_bytes,
        )
        for row in rows:
            function = self.engine.functions[row["function_id"]]
            if row["taken_over"]:
                metrics.lease_takeovers.add(1, metrics.labels(function.app_id, function.fn_id))
            await self._start_readable(partial(ClaimedRun.from_row, row, function), row)
        return len(rows), due

    async def _start_readable(self, read: Callable[[], ClaimedRun], row: Record) -> None:
        """Starts a run leased to us, unless its event or recorded steps cannot be read in
        Python (data nested too deep, a number or a date Python refuses, stored before the
        limits of engine.check_event): then that run alone fails, with the reason, under its
        lease. Handed back instead, it would be claimed and fail again forever, and so would
        the runs claimed with it."""
        try:
            run = read()
        except Exception as exc:
            error = {
                "type": type(exc).__name__,
                "message": f"the run cannot start: its event or recorded steps cannot be read"
                f" in Python: {type(exc).__name__}: {exc}"[:2000],
            }
            log.error("run.unreadable", run_id=str(row["id"]), **error)
            db = await self.engine.database()
            await db.fetchval(
                "finish_run",
                row["id"],
                self.owner,
                row["lease_token"],
                RunStatus.FAILED.value,
                None,
                dumps(error),
                0,
                "[]",
            )
            return
        self._start(run)

    def _routed(self, routed: RoutedRun) -> ClaimedRun:
        row = routed.row
        event = routed.decoded_event()
        # Its state so far, the event, counted as a claim counts it: the JSON text as read (a
        # run routed in Python holds the event decoded already).
        state = len(routed.event) if isinstance(routed.event, str) else len(dumps(event))
        return ClaimedRun(
            run_id=row["id"],
            function=self.engine.functions[row["function_id"]],
            lease_token=row["lease_token"],
            attempt=0,
            log_lines=0,
            cancel_requested=False,
            traceparent=routed.traceparent,
            claimed_at=row["created_at"],
            events=[event_from_row(event)],
            state_bytes=state,
            trace_context=row["trace_context"],
        )

    def _note_next_due(self, row: Record) -> None:
        """Arms the timer for the earliest due work a row of ``engine.next_due`` gives."""
        if row["next_due"] is not None:
            self._note_due((row["next_due"] - row["now"]).total_seconds())

    def _note_due(self, seconds_from_now: float) -> None:
        self._timer_at = min(self._timer_at, time.monotonic() + max(seconds_from_now, 0.0))

    async def _sleep_until_woken(self, longest: float | None = None) -> None:
        longest = self.poll_interval if longest is None else longest
        timeout = min(longest, max(self._timer_at - time.monotonic(), 0.0))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()
        self._wake.clear()
        if self._timer_at <= time.monotonic():
            self._timer_at = float("inf")

    # -- executions ------------------------------------------------------------------------------
    def _start(self, run: ClaimedRun) -> None:
        ex = Execution(
            run,
            db=self.engine.open_database,
            group_commit=self._group_commits[commits_synchronously(run.function.checkpointing)],
            owner=self.owner,
            limits=self.engine.limits,
            backoff=self.engine.backoff,
            threads=self.threads,
            trace_payloads=self.engine.trace_payloads,
        )
        self.executions[run.run_id] = ex
        metrics.slots_busy.add(1, {"engine.app_id": self.engine.app_id})
        task = asyncio.create_task(self._execute(ex), name=f"run {run.run_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute(self, ex: Execution) -> None:
        try:
            await ex.execute(self._make_context)
        except Exception:
            # Never let one run take the worker down. The run may still be leased to us: the
            # next tick queues it again (else its lease would expire first).
            self._may_have_orphans = True
            log.exception("run.execution_error", run_id=str(ex.run.run_id))
        finally:
            metrics.slots_busy.add(-1, {"engine.app_id": self.engine.app_id})
            if self.executions.get(ex.run.run_id) is ex:  # never a newer execution's entry
                del self.executions[ex.run.run_id]
            if not ex.let_go:
                # It ended without ending, suspending or losing the run (a hand-back that gave
                # up, a forced stop): the run is still leased to us, and no claim takes it
                # back from its owner. The next tick queues it again.
                self._may_have_orphans = True
            if ex.next_due is not None:
                self._note_due((ex.next_due - ex.db_now()).total_seconds())
            if self._tick_after_end(ex):
                self.wake()

    def _tick_after_end(self, ex: Execution) -> bool:
        """Whether a run's end calls for a tick now. It frees a slot, which matters when the
        last tick left work for want of slots; a run of a function with flow control releases
        permits that may unpark other runs (no NOTIFY says so); a run released with a due time
        moves the timer; one left leased to us must be released. Otherwise nothing became
        claimable that a NOTIFY or the poll will not announce, and three round trips (routing,
        claim, timer) would find nothing: on the way of the next event's routing."""
        return (
            self._slots_were_short
            or self._may_have_orphans
            or ex.next_due is not None
            or bool(ex.run.function.flow())
            or self._stopping.is_set()
        )

    async def _heartbeat(self) -> None:
        interval = self.lease.total_seconds() / 3
        while True:
            due = time.monotonic() + interval
            await asyncio.sleep(interval)
            late = time.monotonic() - due
            if late > interval / 2:
                self._report_blocked_loop(late, since=due - interval)
            if not self.executions:
                continue
            try:
                await self._renew_leases()
            except Exception as exc:
                log.warning("worker.heartbeat_failed", error=str(exc) or repr(exc))

    def _report_blocked_loop(self, late: float, since: float) -> None:
        """The heartbeat fired ``late`` seconds late: the event loop was blocked (a CPU-bound
        or blocking call in an async step, a long garbage collection). Past the lease, the
        worker's runs may have been taken over, and the steps executing were charged a failed
        attempt. Says which steps were executing: the likely culprits."""
        steps = [
            {"function_id": ex.fn_id, "run_id": str(run_id), "step_id": key}
            for run_id, ex in self.executions.items()
            for key in ex.steps_since(since)
        ]
        log.warning(
            "worker.loop_blocked",
            late_by=round(late, 3),
            lease=self.lease.total_seconds(),
            lease_may_be_lost=late >= self.lease.total_seconds() * 2 / 3,
            steps=steps,
        )

    async def _renew_leases(self) -> None:
        db = await self.engine.database()
        held = dict(self.executions)
        executing = {str(run_id): ex.executing_report() for run_id, ex in held.items()}
        rows = await db.fetch("heartbeat", self.owner, self.lease, list(held), dumps(executing))
        renewed = {row["id"]: row for row in rows}
        for run_id, ex in held.items():
            if self.executions.get(run_id) is not ex:
                # The execution this beat was about ended while it was in flight, and the run
                # may have been claimed again since (a short sleep, a wait that timed out): the
                # database saw it between two claims, unleased, which says nothing about the
                # new execution's lease.
                continue
            row = renewed.get(run_id)
            if row is None:
                ex.lost = True
            elif row["timed_out"]:
                self._enforce_deadline(ex)
            elif row["cancel_requested"]:
                ex.note_cancel()

    async def _sample_gauges(self) -> None:
        """Keeps this app's database gauges fresh for the metrics exporter: one snapshot per
        export interval, shared by every worker of the database (see ``engine.gauges``)."""
        interval = metrics.export_interval()
        try:
            while True:
                try:
                    db = await self.engine.database()
                    # A little younger than the interval: the snapshot another worker took
                    # just before counts, so one scan serves them all.
                    max_age = timedelta(seconds=interval * 0.9)
                    rows = loads(await db.fetchval("gauges", max_age))
                    metrics.keep_snapshot(self.engine.app_id, rows, self.engine.schema)
                except Exception as exc:
                    log.warning("worker.gauges_failed", error=str(exc) or repr(exc))
                await asyncio.sleep(interval)
        finally:
            metrics.forget(self.engine.app_id, self.engine.schema)

    def _enforce_deadline(self, ex: Execution) -> None:
        """The run's finish timeout passed while it executes: it starts no new step; a step
        still executing gets ``grace`` to finish and be recorded, then it is abandoned and the
        run ends CANCELLED (a hung sync step cannot hold a run past its timeout)."""
        seen = ex.note_deadline()
        if time.monotonic() - seen >= self.grace:
            ex.log.warning("run.timed_out_while_executing", grace=self.grace)
            ex.time_out()

    async def _drain(self) -> None:
        """Lets executing steps finish within the grace period, then releases what is left:
        steps still executing are abandoned (a hung sync step's thread with them), and the
        hand-backs get ``HAND_BACK_BOUND`` seconds; what has not ended then is cancelled (its
        lease expires and another worker takes the run over). So a stop always ends within
        the grace period plus a few seconds."""
        for ex in list(self.executions.values()):
            ex.note_stop()
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=self.grace)
        for ex in list(self.executions.values()):
            await ex.force_stop()
        if pending:
            _, pending = await asyncio.wait(pending, timeout=HAND_BACK_BOUND)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)
            log.warning("worker.abandoned_runs", runs=len(pending))


async def _let_started_runs_begin() -> None:
    """Lets the runs a tick just started reach their first step before its next round trip (the
    claim): the step's callable then runs while the claim is in flight, not after the claim's
    Python (about 0.3 ms of the time from an event to its first step). A run needs two turns of
    the event loop for that: its execution's task starts the function's task."""
    for _ in range(2):
        await asyncio.sleep(0)


def _make_context(ex: Execution, schemas: dict[str, list[type[BaseModel]]]) -> Context[Any]:
    """The function's argument. A run whose event does not match its function's schema fails
    here, before any step (``EventSchemaError``, raised in the run's task)."""
    events = typed_events(ex.run.function, ex.run.events)
    return Context(
        event=events[0],
        events=events,
        run_id=str(ex.run.run_id),
        step=Steps(ex, schemas=schemas),
        logger=ex.run_logger,
        run_attempt=ex.run.attempt,
    )
