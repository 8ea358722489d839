"""The testing kit: run a function to its end in a test, and move durable time instead of waiting.

* :func:`run_function` runs one function in-process on a real (test) database, through the same
  path as production (routing, claims, checkpoints, replay), with steps mocked by id, waits
  resolved at once and sleeps, retry backoffs and timeouts completed through durable time.
* :func:`advance_clock` and :func:`clock_preserved` move durable time for whole-system tests.
* The pytest plugin (the module ``pytest_pg_durable_engine``) gives each test a fresh database.

Durable time is ``engine.now()``: the database's clock plus an offset kept in ``engine.clock``
(zero in production). Moving it forward makes sleeps, waits, timeouts, retry backoffs and cron
schedules come due at once, in every worker on the database. Never use it in production.
See docs/testing.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
import typing
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime, timedelta
from typing import Any

from .app import Engine
from .context import Context
from .durations import Duration, parse_duration
from .errors import EngineError
from .events import Event, plain_data
from .function import Function, Handler
from .pg_schema import DEFAULT_SCHEMA
from .runs import RunInfo, RunStatus
from .schemas import INVOKED, SCHEDULED
from .serialization import dumps
from .steps import Steps


async def advance_clock(
    app: Engine, by: Duration | None = None, *, to: datetime | None = None
) -> datetime:
    """Moves durable time forward ``by`` a duration, or ``to`` a time (never backwards).

    Returns the new durable time; the workers are woken to look for what came due. Leases
    move along (they measure real time), so runs executing meanwhile keep their worker.
    """
    delta = timedelta(0) if by is None else parse_duration(by, what="advance_clock")
    db = await app.database()
    now: datetime = await db.fetchval("advance_clock", delta, to)
    return now


@asynccontextmanager
async def clock_preserved(app: Engine) -> AsyncIterator[None]:
    """Puts durable time back where it was when the block ends (even if the block moved it
    forward with :func:`advance_clock` or failed): a demo leaves the database's clock as it
    found it. Anything that came due meanwhile stays done."""
    db = await app.database()
    offset: timedelta = await db.fetchval("clock_offset")
    try:
        yield
    finally:
        db = await app.database()
        await db.fetchval("restore_clock_offset", offset)


# -- the test's database -------------------------------------------------------------------------
_current: list[str] = []  # the database of the test running now (the plugin's fixture sets it)


@contextmanager
def test_database(url: str) -> Iterator[str]:
    """Makes ``url`` the database :func:`run_function` uses while the block runs (the pytest
    plugin's ``engine_database_url`` fixture does this for each test)."""
    _current.append(url)
    try:
        yield url
    finally:
        _current.remove(url)


test_database.__test__ = False  # type: ignore[attr-defined]  # not a test, despite its name


# -- run_function --------------------------------------------------------------------------------
# A run due in this year waits for nothing that time brings (an invoke without a timeout).
NEVER_YEAR = 9999
_COUNTER = re.compile(r"^(.*):\d+$")


async def run_function(
    fn: Function,
    event: Event[Any],
    *,
    steps: Mapping[str, Any] | None = None,
    events: Mapping[str, Event[Any] | None] | None = None,
    functions: Sequence[Function] = (),
    database_url: str | None = None,
    schema: str = DEFAULT_SCHEMA,
    timeout: float = 60.0,  # noqa: ASYNC109 - real seconds this call may take, not durable time
) -> RunInfo:
    """Runs ``fn`` for ``event`` to its end, in this process, on a test database; returns the run.

    The run goes through the engine as in production (the event is sent and routed, the run is
    claimed, its steps checkpointed, and it replays after each pause), with a worker of its own
    serving ``fn`` and ``functions`` (the functions it invokes). Nothing waits in real time:
    whenever no run of the app executes, durable time is moved to its next due time, so sleeps,
    retry backoffs, wait and invoke timeouts and flow-control delays complete at once.

    Args:
        fn: the function (as ``create_function`` returned it).
        event: an event that triggers ``fn``.
        steps: by step id, the value ``ctx.step.run`` (or ``ctx.step.invoke``) returns instead of
            running the step: it is recorded as the step's output (its JSON round trip, as in
            production). An exception instance is raised by each attempt instead (retries and
            backoffs happen as they would).
        events: by step id, what ``ctx.step.wait_for_event`` returns: an event resolves the wait
            at once (whatever its ``match`` and ``if_exp``: it is sent and delivered to that
            wait), ``None`` makes the wait time out.
        functions: other functions of the app the run invokes (run for real).
        database_url: the database; by default the test's (the ``engine_database_url``
            fixture). Its durable time moves forward: never give it a production database.
        schema: the engine's schema in that database, as the app's ``Engine(schema=...)``
            (the test databases hold ``engine``; create another one first with
            ``await Engine(..., schema=...).migrate()``).
        timeout: real seconds after which the call gives up (a run stuck in a loop).

    Raises:
        EngineError: no test database; ``event`` does not trigger ``fn``; or the run waits for
            something nothing will bring (a wait with no mock and no timeout...).
        TimeoutError: the run did not end within ``timeout`` seconds.
    """
    url = database_url or (_current[-1] if _current else None)
    if url is None:
        raise EngineError(
            "run_function needs a test database: ask for the engine_database_url fixture (or"
            " engine_app) in the test, or pass database_url="
        )
    direct = _started_directly(fn, event)
    if direct is None and not any(
        t.matches(event.model_dump(mode="json")) for t in fn.event_triggers
    ):
        raise EngineError(f"event {event.name!r} does not trigger function {fn.fn_id!r}")
    app = Engine(fn.app_id, url, retention=None, schema=schema)
    mocked = dataclasses.replace(fn, handler=_mocking(fn.handler, steps or {}, events or {}))
    for function in (mocked, *functions):
        app.functions[function.fn_id] = function
    try:
        async with app.worker(poll_interval="100ms"):
            if direct is None:
                [event_id] = await app.send(event)
                runs = await app.runs_for_event(event_id, at_least=1, timeout=timeout)
                [run] = [r for r in runs if r.function_id == fn.fn_id]
                run_id = run.run_id
            else:
                db = await app.database()
                run_id = await db.fetchval(
                    "start_run_directly",
                    fn.app_id,
                    fn.fn_id,
                    event.name,
                    dumps(direct),
                    dumps(fn.direct_admission({"name": event.name, "data": direct})),
                )
            return await _Driver(app, run_id, events or {}).finish(timeout)
    finally:
        await app.close()


def _started_directly(fn: Function, event: Event[Any]) -> dict[str, Any] | None:
    """The event data of a run of ``fn`` that ``event`` starts without routing, as a cron tick
    or a ``step.invoke`` would (no event routes to a cron-only or invoke-only function); None
    when ``event`` is an ordinary event.

    Raises:
        EngineError: a cron tick for a function with no cron trigger.
    """
    data: dict[str, Any] = plain_data(event.data)
    if event.name == INVOKED:
        return data
    if event.name != SCHEDULED:
        return None
    if not fn.crons:
        raise EngineError(f"function {fn.fn_id!r} has no cron trigger: no tick starts it")
    return {"cron": fn.crons[0].cron, **data}


def _mocking(
    handler: Handler, steps: Mapping[str, Any], events: Mapping[str, Event[Any] | None]
) -> Handler:
    """The handler with ``ctx.step`` replaced by one that mocks the given step ids."""

    async def mocked(ctx: Context[Any]) -> Any:
        ctx.step = _MockedSteps(ctx.step, steps, events)  # type: ignore[assignment]
        return await handler(ctx)

    return mocked


class _MockedSteps:
    """``ctx.step`` for :func:`run_function`: mocked ids go through the real step API with a
    stand-in callable (or wait), so that they are recorded, counted and replayed as in
    production; everything else is the real step API."""

    def __init__(
        self, real: Steps, steps: Mapping[str, Any], events: Mapping[str, Event[Any] | None]
    ) -> None:
        self._real = real
        self._steps = steps
        self._events = events

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    async def run(
        self,
        step_id: str,
        fn: Callable[..., Any],
        *args: Any,
        retries: int | None = None,
        **kw: Any,
    ) -> Any:
        if step_id in self._steps:
            return await self._real.run(
                step_id, _stand_in(self._steps[step_id], fn), retries=retries
            )
        return await self._real.run(step_id, fn, *args, retries=retries, **kw)

    async def invoke(self, step_id: str, **options: Any) -> Any:
        if step_id in self._steps:  # recorded as a run step: no child run is started
            return await self._real.run(step_id, _stand_in(self._steps[step_id], None))
        return await self._real.invoke(step_id, **options)

    async def wait_for_event(self, step_id: str, **options: Any) -> Any:
        if step_id not in self._events:
            return await self._real.wait_for_event(step_id, **options)
        given = self._events[step_id]
        options = {**options, "match": None}
        if given is None:  # nothing can match: the wait times out (the driver moves time)
            options.update(if_exp="false")
        else:  # the driver sends `given` once the run waits here, and it matches by name
            options.update(event=given.name, if_exp=None)
        return await self._real.wait_for_event(step_id, **options)


def _stand_in(value: Any, original: Callable[..., Any] | None) -> Callable[[], Any]:
    """A step callable returning ``value`` (raising it, if an exception), with the original's
    return annotation, so that a pydantic model comes back as it would from the real step."""

    async def stand_in() -> Any:
        if isinstance(value, BaseException):
            raise value
        return value

    stand_in.__annotations__ = {"return": _return_type(original)}
    return stand_in


def _return_type(fn: Callable[..., Any] | None) -> Any:
    if fn is None:
        return Any
    try:
        return typing.get_type_hints(fn).get("return", Any)
    except Exception:  # unresolvable annotations: plain JSON, as the real step does
        return Any


class _Driver:
    """Moves one run to its end: delivers the mocked events its waits expect, and moves durable
    time to the app's next due time whenever none of its runs executes."""

    def __init__(self, app: Engine, run_id: str, events: Mapping[str, Event[Any] | None]):
        self.app = app
        self.run_id = run_id
        self.events = events
        self.delivered: set[str] = set()
        self.fn_ids = list(app.functions)

    async def finish(self, timeout: float) -> RunInfo:  # noqa: ASYNC109 - real seconds
        deadline = time.monotonic() + timeout
        while True:
            run = await self.app.get_run(self.run_id)
            if run.status.terminal:
                return run
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"run {self.run_id} is still {run.status} after {timeout} s:"
                    f" {run.waiting_reason or 'executing'}"
                )
            if not await self._deliver(run) and not await self._move_time(run):
                await asyncio.sleep(0.01)

    async def _deliver(self, run: RunInfo) -> bool:
        """Sends the mocked event of each wait the run is blocked in; True if it sent one."""
        sent = False
        for step in run.steps:
            waiting = step.kind == "wait" and step.status == "WAITING"
            if not waiting or not self._undelivered(step.step_id):
                continue
            given = self._mocked_event(step.step_id)
            assert given is not None  # _undelivered says it has one
            self.delivered.add(step.step_id)
            await self.app.send(given)
            sent = True
        return sent

    def _undelivered(self, key: str) -> bool:
        """Whether the wait recorded as ``key`` has a mocked event not sent yet."""
        return key not in self.delivered and self._mocked_event(key) is not None

    def _mocked_event(self, key: str) -> Event[Any] | None:
        """The mocked event of the wait recorded as ``key`` (``id``, or ``id:n`` when repeated)."""
        if key in self.events:
            return self.events[key]
        counted = _COUNTER.match(key)
        return self.events.get(counted.group(1)) if counted else None

    async def _move_time(self, run: RunInfo) -> bool:
        """Moves durable time to the next due work when nothing executes; True if it did."""
        db = await self.app.database()
        row = await db.fetchrow("testing_due", self.app.app_id, self.fn_ids, self.run_id)
        assert row is not None
        due, now = row["next_due"], row["now"]
        if row["busy"] or row["routing"] or (due is not None and due <= now):
            return False  # a worker has work now
        status = RunStatus(row["run_status"])  # `run` was read before: it may have ended since
        if status.terminal:
            return False  # finish() returns it
        if status is RunStatus.RUNNING:
            return False  # between its claim and its first write
        if any(self._undelivered(key) for key in row["waits"]):
            return False  # it reached a mocked wait since `run` was read: deliver first
        if due is None or due.year >= NEVER_YEAR:
            raise EngineError(
                f"run {self.run_id} of {run.function_id!r} waits for something nothing will"
                f" bring: {run.waiting_reason} (mock it with steps= or events=, or give the"
                " wait a timeout)"
            )
        await advance_clock(self.app, to=due)
        return True
