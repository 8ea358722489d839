"""The ``Engine``: where functions are declared, events sent and runs managed."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

from pydantic import BaseModel

from .cancellation import Cancel, Timeouts
from .checkpointing import Checkpointing
from .cursors import event_cursor, parse_event_cursor, parse_run_cursor, run_cursor
from .db import STATEMENT_CACHE_SIZE, Connection, Database
from .durations import Duration, parse_duration
from .errors import EngineError, RunNotFoundError
from .events import Event, EventPage, StoredEvent, stored_event_from_row, validate_outgoing
from .expressions import Expression
from .flow import Batch, Concurrency, Debounce, Priority, RateLimit, Singleton, Throttle
from .function import Function, FunctionInfo, Handler, build_function
from .pg_schema import DEFAULT_SCHEMA, check_schema_name
from .records import Limits
from .replay_check import ReplayReport, check_replay
from .retention import DEFAULT_RETENTION, PRUNE_EVERY, retention_option
from .retries import Backoff
from .runs import (
    RunInfo,
    RunPage,
    RunStatus,
    one_finished_status,
    run_info_from_row,
    run_summary_from_row,
)
from .schemas import check_registry, check_sent, sent_schemas
from .serialization import dumps, dumps_plain, loads
from .telemetry import current_traceparent
from .triggers import Trigger, TriggerEvent
from .worker import Worker


class Engine:
    """An app: a set of durable functions sharing one PostgreSQL database.

    No connect call is needed: the engine connects on first use; ``await app.close()``
    releases its connections.

    Args:
        app_id: the app's name; functions and runs belong to it.
        database_url: a PostgreSQL URL; defaults to ``$DATABASE_URL``.
        max_steps: steps a run may ask for (default 1,000).
        max_output_bytes: JSON bytes a step or a run may return (default 4 MiB).
        max_state_bytes: JSON bytes a run may hold in all: its event, every step's output and
            its own output (default 32 MiB, at most 128 MiB).
        backoff: the wait between failed attempts (durable).
        pool_size: connections this process opens at most. A busy worker keeps up to three
            of them between the back-to-back writes of its runs (checkpoints, ends,
            suspensions: one each), and gives them back when idle for 0.2 s or when the pool
            has no other free connection.
        command_timeout: seconds after which a query is abandoned (a half-open connection would
            otherwise hang it forever); the work it belonged to is retried.
        trace_payloads: put the triggering event's data, step outputs and the run's output
            (JSON, cut at 4 KiB) on spans. Off by default: they may hold secrets, and spans
            often travel to a third party.
        retention: how long finished runs (with their steps and history), routed events and
            spent bookkeeping are kept (on the durable clock) before this app's workers delete
            them (``"30d"``, a ``timedelta`` or seconds; default 30 days); ``None`` turns
            automatic pruning off. It applies to the whole database (see
            ``engine.retention``).
        event_schemas: pydantic models of events' ``data`` by event name: :meth:`send` and
            ``send_event`` steps refuse an event that does not match (see
            docs/typed-events.md).
        read_database_url: a PostgreSQL URL for the methods that only read (a streaming
            replica, or a role with ``default_transaction_read_only``): :meth:`list_runs`,
            :meth:`get_run`, :meth:`list_run_summaries`, :meth:`list_events`,
            :meth:`get_event`, :meth:`list_functions` and :meth:`runs_for_event`. Default: the
            primary. What must see its own writes (:meth:`wait_for_run`, and everything that
            writes) stays on ``database_url``; a replica's reads may lag behind it (see
            docs/scaling.md).
        listen_database_url: where the worker's LISTEN connection goes (default:
            ``database_url``): the server itself when ``database_url`` is a pooler in
            transaction mode, which cannot LISTEN (see ops/pgbouncer.md).
        statement_cache_size: asyncpg's prepared statements cached per connection (default
            100); 0 through PgBouncer before 1.21, or without its ``max_prepared_statements``.
        schema: the PostgreSQL schema of the engine's tables and functions (default
            ``engine``): apps given different schemas share a database and nothing else (not
            their events, runs, workers or wake-ups), each migrated with ``engine migrate
            --schema NAME``. A lowercase identifier (letters, digits, ``_``; at most 56
            characters). See docs/scaling.md.
        record_step_input: keep each ``step.run`` step's arguments (its input, as JSON, up to
            64 KiB) in the run's history, shown by the dashboard and :meth:`get_run` (default
            True). False for an app whose step arguments hold secrets; a function can decide
            for itself (``create_function(record_step_input=...)``).

    Raises:
        ConfigurationError: an option is invalid (a retention of zero or less, a schema name
            that is not a plain lowercase identifier).
    """

    def __init__(
        self,
        app_id: str,
        database_url: str | None = None,
        *,
        max_steps: int = 1000,
        max_output_bytes: int = 4 * 1024 * 1024,
        max_state_bytes: int = 32 * 1024 * 1024,
        backoff: Backoff | None = None,
        pool_size: int = 10,
        command_timeout: float = 60.0,
        trace_payloads: bool = False,
        retention: Duration | None = DEFAULT_RETENTION,
        event_schemas: dict[str, type[BaseModel]] | None = None,
        read_database_url: str | None = None,
        listen_database_url: str | None = None,
        statement_cache_size: int = STATEMENT_CACHE_SIZE,
        schema: str = DEFAULT_SCHEMA,
        record_step_input: bool = True,
    ) -> None:
        self.app_id = app_id
        self.schema = check_schema_name(schema)
        self.event_schemas = check_registry(event_schemas)
        self.retention = retention_option(retention)
        self.database_url = database_url or os.environ.get("DATABASE_URL")
        self.read_database_url = read_database_url
        self.listen_database_url = listen_database_url
        self._statement_cache_size = statement_cache_size
        self.functions: dict[str, Function] = {}
        self.limits = Limits(
            max_steps=max_steps,
            max_output_bytes=max_output_bytes,
            max_state_bytes=max_state_bytes,
        )
        self.trace_payloads = trace_payloads
        self.record_step_input = record_step_input
        self.backoff = backoff or Backoff()
        self._pool_size = pool_size
        self._command_timeout = command_timeout
        self._db: Database | None = None
        self._read_db: Database | None = None
        # A worker of this Engine running in this process: app.send routes through it (see
        # Worker.send_and_start).
        self._sends_worker: Worker | None = None
        self._open_lock = asyncio.Lock()
        self._registered = False

    # -- declaring -------------------------------------------------------------------------------
    def create_function(
        self,
        fn_id: str,
        trigger: Trigger | list[Trigger] | None = None,
        *,
        retries: int = 4,
        cancel: Cancel | list[Cancel] | None = None,
        timeouts: Timeouts | None = None,
        on_failure: Handler | None = None,
        concurrency: Concurrency | list[Concurrency] | None = None,
        rate_limit: RateLimit | None = None,
        singleton: Singleton | None = None,
        idempotency: str | None = None,
        priority: Priority | None = None,
        throttle: Throttle | None = None,
        debounce: Debounce | None = None,
        batch_events: Batch | None = None,
        checkpointing: Checkpointing | None = None,
        record_step_input: bool | None = None,
    ) -> Callable[[Handler], Function]:
        """Declares a durable function.

        Args:
            fn_id: a stable id (never change it while runs are in flight).
            trigger: a :class:`TriggerEvent` or :class:`TriggerCron`, or a list of up to 10;
                ``None`` for a function that is only invoked (``ctx.step.invoke``).
            retries: retries per step after the first attempt (0-20, default 4).
            cancel: up to 5 :class:`Cancel` events that cancel a run.
            timeouts: :class:`Timeouts` that cancel a run that starts or finishes too late.
            on_failure: ``async def handler(ctx)`` run (as function ``<fn_id>-failure``) when a
                run fails for good; ``ctx.event`` is the ``engine/function.failed`` event.
            concurrency: up to 2 :class:`Concurrency` limits on runs executing at once.
            rate_limit: a :class:`RateLimit`; runs over it are SKIPPED.
            singleton: a :class:`Singleton`: one active run per key (skip or cancel the other).
            idempotency: CEL over ``event``: one run per value per 24 hours, later ones SKIPPED.
            priority: a :class:`Priority`: claimed ahead of (or behind) older queued runs.
            throttle: a :class:`Throttle`: starts spread over time; excess runs are delayed.
            debounce: a :class:`Debounce`: one run per quiet period, with the last event.
            batch_events: a :class:`Batch`: one run for up to ``max_size`` events.
            checkpointing: a :class:`Checkpointing`: completed steps are committed together
                (fewer commits; a crash runs the uncommitted ones again).
            record_step_input: keep its ``step.run`` steps' arguments in the run's history
                (default: the Engine's ``record_step_input``); False when they hold secrets.

        Raises:
            ConfigurationError: an invalid id, option or expression; the message says which.
        """

        def register(handler: Handler) -> Function:
            function = build_function(
                fn_id,
                handler,
                trigger,
                retries,
                app_id=self.app_id,
                cancel=cancel,
                timeouts=timeouts,
                concurrency=concurrency,
                rate_limit=rate_limit,
                singleton=singleton,
                idempotency=idempotency,
                priority=priority,
                throttle=throttle,
                debounce=debounce,
                batch_events=batch_events,
                checkpointing=checkpointing,
                record_step_input=(
                    self.record_step_input if record_step_input is None else record_step_input
                ),
            )
            failure = None if on_failure is None else self._failure_handler(fn_id, on_failure)
            for declared in (function, failure):
                if declared is not None and declared.fn_id in self.functions:
                    raise EngineError(
                        f"function {declared.fn_id!r} is declared twice in app {self.app_id!r}"
                    )
            self.functions[fn_id] = function
            if failure is not None:
                self.functions[failure.fn_id] = failure
            self._registered = False
            return function

        return register

    def _failure_handler(self, fn_id: str, handler: Handler) -> Function:
        """The function that runs ``on_failure``: triggered by this function's failures."""
        condition = (
            f"event.data.app_id == {json.dumps(self.app_id)} && "
            f"event.data.function_id == {json.dumps(fn_id)}"
        )
        trigger = TriggerEvent("engine/function.failed", condition)
        return build_function(
            f"{fn_id}-failure",
            handler,
            trigger,
            0,
            app_id=self.app_id,
            record_step_input=self.record_step_input,
        )

    def sent_schemas(self) -> dict[str, list[type[BaseModel]]]:
        """The schemas the events this app sends are checked against, by event name (its
        ``event_schemas``)."""
        return sent_schemas(self.event_schemas)

    # -- connecting ------------------------------------------------------------------------------
    async def database(self) -> Database:
        """The open database, connecting and registering this app's functions on first use.

        Registering adds or updates this app's functions and never removes one: functions that
        no worker serves any more go inactive by themselves (see :class:`~engine.Worker`).
        """
        async with self._open_lock:
            if self._db is None:
                if not self.database_url:
                    raise EngineError("no database: pass database_url= or set $DATABASE_URL")
                self._db = await self._connect(self.database_url, self.listen_database_url)
            if not self._registered and not self.functions:
                # Nothing to register (a dashboard's or a command's Engine): no write, so that
                # an Engine may connect as a role that only reads (engine_reader).
                self._registered = True
            if not self._registered:
                now: datetime = await self._db.fetchval("now")
                entries = dumps([f.registry_entry(now) for f in self.functions.values()])
                await self._db.fetchval("register_functions", self.app_id, entries)
                self._registered = True
            return self._db

    async def read_database(self) -> Database:
        """The database the read-only methods use: ``read_database_url``'s, connected on first
        use (it registers nothing: a replica takes no write), else the primary's
        (:meth:`database`)."""
        if self.read_database_url is None:
            return await self.database()
        async with self._open_lock:
            if self._read_db is None:
                # A standby cannot LISTEN: a reader's listener (the dashboard's) goes to the
                # primary, or to where the primary's LISTEN goes.
                listen = self.listen_database_url or self.database_url
                self._read_db = await self._connect(self.read_database_url, listen)
            return self._read_db

    async def _connect(self, url: str, listen_url: str | None) -> Database:
        db = Database(
            url,
            max_size=self._pool_size,
            command_timeout=self._command_timeout,
            listen_url=listen_url,
            statement_cache_size=self._statement_cache_size,
            schema=self.schema,
        )
        await db.open()
        try:
            await db.fetchval("schema_version")  # a clear error if the schema is missing
        except BaseException:
            await db.close()
            raise
        return db

    async def migrate(self) -> bool:
        """Creates this engine's schema in the database, or upgrades it, as ``engine migrate
        --schema`` does (idempotent: an unchanged schema is left alone, without a lock);
        True if it applied the schema. It needs a role that may create the schema's objects.

        Raises:
            EngineError: no database (no ``database_url`` and no ``$DATABASE_URL``).
        """
        if not self.database_url:
            raise EngineError("no database: pass database_url= or set $DATABASE_URL")
        return await Database(self.database_url, schema=self.schema).apply_schema()

    @property
    def open_database(self) -> Database:
        """The database once opened (workers use it after :meth:`database`)."""
        if self._db is None:
            raise EngineError("the engine is not connected yet")
        return self._db

    async def close(self) -> None:
        """Releases the engine's connections."""
        db, self._db = self._db, None
        read_db, self._read_db = self._read_db, None
        self._registered = False
        for opened in (db, read_db):
            if opened is not None:
                await opened.close()

    # -- events ----------------------------------------------------------------------------------
    async def send(
        self, events: Event[Any] | Sequence[Event[Any]], *, connection: Connection | None = None
    ) -> list[str]:
        """Sends one event or a list; returns their ids.

        With ``connection=``, the events are written through the caller's own asyncpg
        connection, inside its transaction: they exist only if that transaction commits.

        Raises:
            InvalidEventError: an event was refused (past a limit, or not matching the schema
                of its name); nothing of this call was stored.
        """
        payloads = validate_outgoing(events)
        check_sent(payloads, self.sent_schemas())
        worker = self._sends_worker
        if connection is None and worker is not None and worker.takes_sends():
            # A worker of this app runs here: its runs start in the send's own transaction.
            return await worker.send_and_start(payloads, current_traceparent())
        db = await self.database()
        rows = await db.fetch(
            "send_events", dumps_plain(payloads), current_traceparent(), False, conn=connection
        )
        return [row["id"] for row in rows]

    def serve_sends(self, worker: Worker) -> None:
        """Internal: ``worker`` (running in this process) routes this Engine's sends."""
        self._sends_worker = worker

    def stop_serving_sends(self, worker: Worker) -> None:
        """Internal: ``worker`` stops; sends are stored and left to the routers again."""
        if self._sends_worker is worker:
            self._sends_worker = None

    async def list_events(
        self,
        name: str | None = None,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> EventPage:
        """Stored events of every app, newest first: of one ``name``, received in ``[since,
        until)``, a page of ``limit`` (1-1000) at a time; pass the page's ``cursor`` back for
        the next one.

        Raises:
            ValueError: ``limit`` out of range, or ``cursor`` is not one of this listing.
        """
        before = None if cursor is None else parse_event_cursor(cursor)
        rows = await (await self.read_database()).fetch(
            "event_page", name, since, until, before, None, _page_size(limit) + 1
        )
        events = [stored_event_from_row(row) for row in rows[:limit]]
        more = len(rows) > limit
        return EventPage(events=events, cursor=event_cursor(events[-1].seq) if more else None)

    async def get_event(self, event_id: str) -> StoredEvent | None:
        """The stored event with this id (the newest, if the id was reused after its 24 hours),
        or None."""
        rows = await (await self.read_database()).fetch(
            "event_page", None, None, None, None, event_id, 1
        )
        return stored_event_from_row(rows[0]) if rows else None

    # -- the registry ----------------------------------------------------------------------------
    async def list_functions(self, *, all_apps: bool = False) -> list[FunctionInfo]:
        """The registered functions of this app (of every app with ``all_apps=True``): their
        triggers, configuration, whether they are active, their live workers and runs by
        status.

        With ``read_database_url`` this reads the replica, and registers nothing: this
        Engine's own functions show once a worker has registered them."""
        db = await self.read_database()
        rows = await db.fetch("function_list", None if all_apps else self.app_id)
        return [
            FunctionInfo(
                app_id=row["app_id"],
                function_id=row["function_id"],
                triggers=loads(row["triggers"]),
                config=loads(row["config"]),
                active=row["active"],
                workers=row["workers"],
                runs=loads(row["runs"]),
            )
            for row in rows
        ]

    # -- runs ------------------------------------------------------------------------------------
    async def get_run(self, run_id: str | UUID) -> RunInfo:
        """A run with its status, output, error, timestamps and steps.

        With ``read_database_url`` this reads the replica: a run just created (or just moved)
        on the primary may not be there yet (or still look as before).
        """
        return await _fetch_run(await self.read_database(), run_id)

    async def list_runs(
        self,
        fn_id: str | None = None,
        status: RunStatus | str | None = None,
        limit: int = 50,
        *,
        all_apps: bool = False,
    ) -> list[RunInfo]:
        """Runs newest first, optionally of one function and/or one status.

        Only the runs of this Engine's ``app_id`` unless ``all_apps=True`` (then every app's on
        the database; ``fn_id`` then matches that function id in any app).
        """
        db = await self.read_database()
        status_value = None if status is None else RunStatus(status).value
        app_id = None if all_apps else self.app_id
        rows = await db.fetch("list_runs", app_id, fn_id, status_value, limit)
        return [run_info_from_row(row) for row in rows]

    async def list_run_summaries(
        self,
        fn_id: str | None = None,
        status: RunStatus | str | Sequence[RunStatus | str] | None = None,
        *,
        event_name: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 50,
        cursor: str | None = None,
        all_apps: bool = False,
    ) -> RunPage:
        """Runs newest first, without their steps, a page of ``limit`` (1-1000) at a time:
        optionally of one function, in one or more statuses, started by events named
        ``event_name``, created in ``[since, until)``. Pass the page's ``cursor`` back for the
        next one. Only this app's runs unless ``all_apps=True``.

        Raises:
            ValueError: a status that does not exist, ``limit`` out of range, or ``cursor`` is
                not one of this listing.
        """
        statuses = None if status is None else _statuses(status)
        after = (None, None) if cursor is None else parse_run_cursor(cursor)
        query = "ended_run_summaries" if one_finished_status(statuses) else "run_summaries"
        rows = await (await self.read_database()).fetch(
            query,
            None if all_apps else self.app_id,
            fn_id,
            statuses,
            event_name,
            since,
            until,
            *after,
            _page_size(limit) + 1,
        )
        runs = [run_summary_from_row(row) for row in rows[:limit]]
        last = runs[-1] if len(rows) > limit else None
        return RunPage(
            runs=runs, cursor=None if last is None else run_cursor(last.created_at, last.run_id)
        )

    async def runs_for_event(
        self,
        event_id: str,
        *,
        at_least: int = 0,
        timeout: Duration = 30,  # noqa: ASYNC109 - `timeout=` as in wait_for_run
    ) -> list[RunInfo]:
        """The runs an event started; with ``at_least``, waits until that many exist (routing
        an event takes milliseconds once a worker runs; on a replica, plus its lag).

        Raises:
            TimeoutError: fewer than ``at_least`` runs after ``timeout``.
        """
        deadline = time.monotonic() + parse_duration(timeout, what="timeout").total_seconds()
        db = await self.read_database()
        pause = 0.005
        while True:
            rows = await db.fetch("runs_for_event", event_id)
            if len(rows) >= at_least:
                return [run_info_from_row(row) for row in rows]
            if time.monotonic() >= deadline:
                raise TimeoutError(f"event {event_id} started {len(rows)} run(s) after {timeout}")
            await asyncio.sleep(pause)
            pause = min(pause * 1.5, 0.25)

    async def wait_for_run(
        self,
        run_id: str | UUID,
        timeout: Duration = 30,  # noqa: ASYNC109 - `timeout=` is the public API the issue pins
    ) -> RunInfo:
        """Waits until the run reaches a terminal status and returns it.

        It reads the primary (never ``read_database_url``): it is called right after a send,
        and what it returns must be the run as it ended, not a replica's older copy.

        Raises:
            TimeoutError: the run is still going after ``timeout``.
        """
        deadline = time.monotonic() + parse_duration(timeout, what="timeout").total_seconds()
        db = await self.database()
        pause = 0.01
        while True:
            status = await db.fetchval("run_status", _uuid(run_id))
            if status is None:
                raise RunNotFoundError(f"no run {run_id}")
            if RunStatus(status).terminal:
                return await _fetch_run(db, run_id)
            if time.monotonic() >= deadline:
                raise TimeoutError(f"run {run_id} is still {status} after {timeout}")
            await asyncio.sleep(pause)
            pause = min(pause * 1.5, 0.25)

    async def cancel_run(self, run_id: str | UUID) -> RunStatus:
        """Cancels a run between steps: a step already executing finishes, no further one starts.

        Returns the run's status after the call (``RUNNING`` until its worker ends it).
        """
        db = await self.database()
        status = await db.fetchval("cancel_run", _uuid(run_id))
        if status is None:
            raise RunNotFoundError(f"no run {run_id}")
        return RunStatus(status)

    async def cancel_runs(
        self,
        fn_id: str,
        *,
        started_after: datetime | None = None,
        started_before: datetime | None = None,
        if_exp: str | None = None,
    ) -> int:
        """Cancels every run of ``fn_id`` not yet over, created in the given range and (with
        ``if_exp``, CEL over ``event``) whose event matches. Returns how many were cancelled.

        Runs suspended or queued end ``CANCELLED`` at once; executing ones between steps.
        """
        check = None if if_exp is None else Expression(if_exp, what="cancel_runs if_exp")
        db = await self.database()
        rows = await db.fetch("cancellable_runs", self.app_id, fn_id, started_after, started_before)
        chosen = [
            row["id"]
            for row in rows
            if check is None or check.matches({"event": loads(row["event"])})
        ]
        if not chosen:
            return 0
        count: int = await db.fetchval("cancel_runs", chosen, "cancelled by cancel_runs")
        return count

    async def check_replay(
        self,
        *,
        since: Duration | None = None,
        function: str | None = None,
        timeout: Duration = "10s",  # noqa: ASYNC109 - a bound per run, not on the call
    ) -> ReplayReport:
        """Replays the recorded history of this app's runs in flight against the functions as
        declared now, and reports those that would fail with a
        :class:`~engine.DeterminismError` (see docs/versioning.md). No step body runs and
        nothing is written: a CI job can gate a deploy on ``report.ok``.

        Args:
            since: also the runs that ended within this long (``"7d"``); default: only runs
                in flight.
            function: only this function's runs.
            timeout: the longest one run's replay may take (its code outside steps runs).

        Raises:
            EngineError: ``function`` is not declared in this app.
        """
        functions = dict(self.functions)
        if function is not None:
            if function not in functions:
                raise EngineError(f"function {function!r} is not declared in app {self.app_id!r}")
            functions = {function: functions[function]}
        db = await self.database()
        ended_after = None
        if since is not None:
            window = parse_duration(since, what="since")
            ended_after = await db.fetchval("now") - window
        bound = parse_duration(timeout, what="timeout").total_seconds()
        return await check_replay(
            db, self.app_id, functions, self.limits, since=ended_after, patience=bound
        )

    async def rerun(self, run_id: str | UUID, from_step: str | None = None) -> str:
        """Starts the run's function again with the same event; returns the new run's id.

        With ``from_step`` (a step id as recorded, e.g. ``"charge"`` or ``"fetch:1"``), the
        steps recorded before it keep their outputs and execution resumes from it.
        """
        db = await self.database()
        new_id = await db.fetchval("rerun", _uuid(run_id), from_step)
        if new_id is None:
            raise RunNotFoundError(f"no run {run_id}")
        return str(new_id)

    # -- working ---------------------------------------------------------------------------------
    @asynccontextmanager
    async def worker(
        self,
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
    ) -> AsyncIterator[Worker]:
        """Runs a worker in the background while the block runs; stops it gracefully after.

        The options are :class:`~engine.Worker`'s. The block starts once the worker is
        connected and has registered the app's functions.

        Raises:
            SchemaMissingError, OSError, asyncpg.PostgresError: the worker cannot start (no
                schema, the database refuses connections...): raised at once, not at the end.
        """
        worker = Worker(
            self,
            concurrency=concurrency,
            lease=lease,
            poll_interval=poll_interval,
            grace=grace,
            listen_check=listen_check,
            inactive_after=inactive_after,
            threads=threads,
            prune_every=prune_every,
            alive_file=alive_file,
        )
        task = asyncio.create_task(worker.run(), name=f"worker {self.app_id}")
        # A worker that cannot start (no database, no schema) says why here, at once.
        started = asyncio.create_task(worker.started())
        await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        if task.done():
            await task
        try:
            yield worker
        finally:
            worker.stop()
            await task

    def __repr__(self) -> str:
        schema = "" if self.schema == DEFAULT_SCHEMA else f", schema={self.schema!r}"
        return f"Engine(app_id={self.app_id!r}{schema}, functions={sorted(self.functions)})"


MAX_PAGE = 1000


def _page_size(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be 1 to {MAX_PAGE}, got {limit!r}")
    return limit


def _statuses(status: RunStatus | str | Sequence[RunStatus | str]) -> list[str]:
    chosen = [status] if isinstance(status, str) else list(status)
    try:
        return [RunStatus(s).value for s in chosen]
    except ValueError:
        known = ", ".join(RunStatus)
        raise ValueError(f"unknown run status in {chosen}: the statuses are {known}") from None


async def _fetch_run(db: Database, run_id: str | UUID) -> RunInfo:
    row = await db.fetchrow("get_run", _uuid(run_id))
    if row is None:
        raise RunNotFoundError(f"no run {run_id}")
    return run_info_from_row(row)


def _uuid(run_id: str | UUID) -> UUID:
    try:
        return run_id if isinstance(run_id, UUID) else UUID(str(run_id))
    except ValueError:
        raise RunNotFoundError(f"no run {run_id!r}: run ids are UUIDs") from None
