"""``ctx.step``: memoized, retried, durable steps.

A step id used twice in one run gets a counter in its key (``fetch``, ``fetch:1``...). A completed
step is never executed again: its recorded output is returned on replay, matched by its id and its
place in its branch (see :mod:`engine.replay`).
"""

from __future__ import annotations

import inspect
import time
import typing
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, TypeVar, overload

from pydantic import BaseModel, ValidationError

from . import metrics, telemetry
from .durations import Duration, parse_duration
from .errors import (
    EngineError,
    InvalidEventError,
    NonRetriableError,
    RetryAfterError,
    RunFailure,
    SerializationError,
    StepError,
    error_payload,
    error_traceback,
)
from .events import Event, event_from_row, validate_outgoing
from .matching import EventMatcher
from .records import RunLabels, StepKind, StepPlan, StepRecord, StepStatus, Suspension, utc
from .retries import check_retries
from .runlocal import current_attempt, current_step
from .runs import RunStatus
from .schemas import check_schema, check_sent, mismatch, typed
from .serialization import loads, restore
from .step_input import encode_input

if TYPE_CHECKING:
    from .errors import NestedStepError
    from .function import Function
    from .threads import StepThreads

# The due time of a run that waits with no timeout (an invoke without one).
FOREVER = datetime(9999, 12, 31, tzinfo=UTC)

ModelT = TypeVar("ModelT", bound=BaseModel)


class StepHost(Protocol):
    """All that the step API uses of a run's execution (:class:`engine.execution.Execution`).

    Matching a request to the run's history (:meth:`plan`), the gate before a new step, the
    bookkeeping of executing steps and of waits, the lease-guarded writes of step records, and
    what spans, metrics and logs name the run by. Nothing else of the execution is touched here.
    """

    labels: RunLabels
    log: Any  # a structlog logger bound to the run
    threads: StepThreads  # the worker's pool for sync step callables

    @property
    def default_retries(self) -> int: ...
    @property
    def records_input(self) -> bool: ...
    @property
    def trigger(self) -> Event: ...
    @property
    def failed(self) -> bool: ...
    def check_failed(self) -> None: ...
    def fail(self, failure: RunFailure | NestedStepError) -> NoReturn: ...
    def plan(self, step_id: str, kind: StepKind) -> StepPlan: ...
    def patched(self, patch_id: str) -> bool: ...
    def db_now(self) -> datetime: ...
    def retry_delay(self, attempt: int) -> timedelta: ...
    async def gate(self, *, flush: bool = True, buffered: bool = False) -> None: ...
    def executing(self) -> AbstractContextManager[None]: ...
    def running_step(
        self, plan: StepPlan, attempt: int, *, final: bool, started_at: datetime
    ) -> AbstractAsyncContextManager[None]: ...
    def will_wait(self, suspension: Suspension) -> None: ...
    async def block(self) -> None: ...
    async def suspend(self, suspension: Suspension) -> None: ...
    def encode_output(self, value: Any, what: str) -> str: ...
    def defer(self, record: StepRecord, output_json: str) -> None: ...
    def remember(self, record: StepRecord) -> None: ...
    async def checkpoint(self, record: StepRecord, output_json: str | None = None) -> None: ...
    async def register_matchers(
        self, steps: list[StepRecord], matchers: list[dict[str, Any]]
    ) -> dict[str, dict[str, Any]]: ...
    async def invoke(
        self,
        record: StepRecord,
        target: Function,
        data: dict[str, Any],
        expires: datetime | None,
        on_timeout: dict[str, Any],
    ) -> StepRecord: ...
    async def send_events(self, record: StepRecord, events: list[dict[str, Any]]) -> list[str]: ...


class Steps:
    """The step API of a run (``ctx.step``)."""

    def __init__(
        self, execution: StepHost, *, schemas: dict[str, list[type[BaseModel]]] | None = None
    ) -> None:
        self._ex = execution
        self._schemas = schemas or {}  # what send_event checks events against, by name

    def _patched(self, patch_id: str) -> bool:
        """What ``ctx.patched`` asks the run (see :meth:`engine.Context.patched`)."""
        return self._ex.patched(patch_id)

    async def run(
        self,
        step_id: str,
        fn: Callable[..., Any],
        *args: Any,
        retries: int | None = None,
        **kwargs: Any,
    ) -> Any:
        """Runs ``fn(*args, **kwargs)`` once for this run and returns its JSON round trip.

        ``fn`` may be sync (it runs in a thread) or async. Errors are retried with a durable
        backoff, up to ``retries`` (default: the function's); then :class:`StepError` is raised
        here. ``retries`` is this method's own keyword: it is not passed to ``fn``.

        Raises:
            StepError: the step failed for good.
        """
        ex = self._ex
        plan = ex.plan(step_id, StepKind.RUN)
        allowed = ex.default_retries
        if retries is not None:
            try:
                allowed = check_retries(retries, f"step {plan.key!r}")
            except EngineError as exc:
                ex.fail(RunFailure(str(exc)))
        record = plan.record
        if record is not None and record.status == StepStatus.COMPLETED:
            return _restored(record.output, fn)
        if record is not None and record.status == StepStatus.FAILED:
            raise _step_error(plan.key, record.error)
        await ex.gate(buffered=True)
        attempt = record.attempts if record is not None else 0
        started_at = ex.db_now()
        given = encode_input(args, kwargs) if ex.records_input else None
        with ex.executing():
            final = attempt >= allowed
            async with ex.running_step(plan, attempt, final=final, started_at=started_at):
                outcome = await self._attempt(
                    plan,
                    attempt,
                    fn,
                    args,
                    kwargs,
                    allowed=allowed,
                    started_at=started_at,
                    given=given,
                )
            if outcome.wait is not None:  # registered before the run can settle
                ex.will_wait(outcome.wait)
        if outcome.wait is not None:
            await ex.block()
        if outcome.error is not None:
            raise outcome.error
        return _restored(outcome.value, fn)

    async def _attempt(
        self,
        plan: StepPlan,
        attempt: int,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        allowed: int,
        started_at: datetime,
        given: str | None,
    ) -> _Outcome:
        """Executes one attempt and records it (with ``given``, its input as JSON) before the
        function goes on."""
        ex = self._ex
        began = time.monotonic()
        labels = ex.labels
        with telemetry.step_span(
            run_id=labels.run_id, function_id=labels.function_id, step_key=plan.key, attempt=attempt
        ) as span:
            try:
                value = await _call_in_step(ex, fn, args, kwargs, key=plan.key, attempt=attempt)
                ex.check_failed()  # a nested step the step's code caught: not completed
                output = ex.encode_output(value, f"step {plan.key!r}")
            except Exception as error:
                if ex.failed:  # a limit or a nested step: the run fails as a whole
                    raise
                telemetry.record_error(span, error)
                outcome = await self._failed(plan, attempt, allowed, error, started_at, given=given)
                self._measure("failed" if outcome.error else "retrying", began)
                return outcome
            # Committed before the next step starts, or with the run's end (see Execution.defer).
            completed = plan.new(
                StepKind.RUN,
                StepStatus.COMPLETED,
                attempts=attempt + 1,
                started_at=started_at,
                ended_at=ex.db_now(),
                input_json=given,
            )
            ex.defer(completed, output)
            telemetry.payload(span, "engine.step.output", output, labels.trace_payloads)
            telemetry.mark(span, "completed")
        self._measure("completed", began)
        return _Outcome(value=loads(output))

    def _measure(self, outcome: str, began: float) -> None:
        labels = self._ex.labels
        metrics.step_attempted(labels.app_id, labels.function_id, outcome, time.monotonic() - began)

    async def _failed(
        self,
        plan: StepPlan,
        attempt: int,
        allowed: int,
        error: Exception,
        started_at: datetime,
        *,
        given: str | None,
    ) -> _Outcome:
        ex = self._ex
        final = isinstance(error, NonRetriableError | SerializationError) or attempt >= allowed
        now = ex.db_now()
        due = (
            error.due(now) if isinstance(error, RetryAfterError) else now + ex.retry_delay(attempt)
        )
        record = plan.new(
            StepKind.RUN,
            StepStatus.FAILED if final else StepStatus.RETRYING,
            attempts=attempt + 1,
            error=error_payload(error),
            started_at=started_at,
            ended_at=now,
            traceback=error_traceback(error),
            retry_at=None if final else due,
            input_json=given,
        )
        await ex.checkpoint(record)
        ex.log.warning(
            "step.failed",
            step_id=plan.key,
            attempt=attempt,
            final=final,
            error=str(error),
            error_type=type(error).__name__,
        )
        if final:
            return _Outcome(error=_step_error(plan.key, record.error))
        reason = (
            f"retrying step {plan.key!r} (attempt {attempt + 1}) after "
            f"{type(error).__name__}: {error}"
        )
        return _Outcome(wait=Suspension(due, RunStatus.RETRYING, reason))

    async def sleep(self, step_id: str, duration: Duration) -> None:
        """Pauses the run durably for ``duration`` (``"30s"``, ``timedelta``, seconds).

        The sleeping run holds no worker and no connection, and resumes on time even if every
        worker restarted meanwhile.
        """
        try:
            delay = parse_duration(duration, what=f"sleep {step_id!r}")
        except (EngineError, ValueError, TypeError) as exc:  # a programming error: no retry
            self._ex.fail(RunFailure(str(exc)))
        await self._sleep(step_id, lambda now: now + delay)

    async def sleep_until(self, step_id: str, when: datetime) -> None:
        """Pauses the run durably until ``when`` (aware); a time in the past returns at once."""
        try:
            wake_at = utc(when)
        except (EngineError, AttributeError, TypeError) as exc:  # a programming error: no retry
            self._ex.fail(RunFailure(f"sleep_until {step_id!r}: {exc}"))
        await self._sleep(step_id, lambda now: wake_at)

    async def _sleep(self, step_id: str, wake: Callable[[datetime], datetime]) -> None:
        ex = self._ex
        plan = ex.plan(step_id, StepKind.SLEEP)
        record = plan.record
        if record is not None and record.status == StepStatus.COMPLETED:
            return
        if record is None:
            await ex.gate(flush=False)  # earlier steps are committed with the suspension
            now = ex.db_now()
            wake_at = wake(now)
            record = plan.new(StepKind.SLEEP, StepStatus.SLEEPING, wake_at=wake_at, started_at=now)
            if wake_at <= now:  # a sleep into the past is over at once
                record.status = StepStatus.COMPLETED
                ex.defer(record, "null")
                return
            ex.remember(record)  # committed with the suspension
            pending = [record]
        else:  # recorded earlier, not yet due: wait again without recording it twice
            pending = []
        assert record.wake_at is not None
        reason = f"sleeping in step {plan.key!r} until {record.wake_at.isoformat()}"
        await ex.suspend(Suspension(record.wake_at, RunStatus.SLEEPING, reason, pending))

    @overload
    async def wait_for_event(
        self,
        step_id: str,
        *,
        event: str,
        timeout: Duration = ...,  # noqa: ASYNC109 - durable
        if_exp: str | None = ...,
        match: str | None = ...,
        schema: None = ...,
    ) -> Event | None: ...

    @overload
    async def wait_for_event(
        self,
        step_id: str,
        *,
        event: str,
        timeout: Duration = ...,  # noqa: ASYNC109 - durable
        if_exp: str | None = ...,
        match: str | None = ...,
        schema: type[ModelT],
    ) -> Event[ModelT] | None: ...

    async def wait_for_event(
        self,
        step_id: str,
        *,
        event: str,
        timeout: Duration = "24h",  # noqa: ASYNC109 - a durable timeout, the API the issue pins
        if_exp: str | None = None,
        match: str | None = None,
        schema: type[BaseModel] | None = None,
    ) -> Event[Any] | None:
        """Pauses the run until a matching event arrives; returns it, or ``None`` once
        ``timeout`` (default 24 hours) has passed.

        ``match="data.order_id"`` requires ``async.data.order_id == event.data.order_id``;
        ``if_exp`` is CEL in which ``event`` is the run's triggering event and ``async`` the
        candidate. Events that arrived after the run's triggering event, before this wait was
        reached, match too. An event resumes the wait exactly once; the waiting run holds no
        worker. With ``schema=Model``, the event comes back as an ``Event[Model]``.

        Raises:
            StepError: with ``schema``, the event that resolved the wait does not match it
                (type ``EventSchemaError``; the same on every replay).
        """
        if schema is not None:
            try:
                check_schema(schema, f"wait_for_event {step_id!r} schema")
            except EngineError as exc:  # a programming error: no retry
                self._ex.fail(RunFailure(str(exc)))
        key, received = await self._wait(
            step_id, event=event, timeout=timeout, if_exp=if_exp, match=match
        )
        if received is None or schema is None:
            return received
        try:
            return typed(received, schema)
        except ValidationError as exc:
            raise StepError(key, "EventSchemaError", mismatch(received.name, schema, exc)) from None

    async def _wait(
        self,
        step_id: str,
        *,
        event: str,
        timeout: Duration,  # noqa: ASYNC109 - durable
        if_exp: str | None,
        match: str | None,
    ) -> tuple[str, Event | None]:
        """The wait itself: the step's key and the event that resolved it (None: timed out)."""
        ex = self._ex
        plan = ex.plan(step_id, StepKind.WAIT)
        record = plan.record
        if record is None:
            what = f"wait_for_event {step_id!r}"
            try:
                matcher = EventMatcher(event, match, if_exp, what=what)
                delay = parse_duration(timeout, what=what)
            except (EngineError, ValueError) as exc:
                ex.fail(RunFailure(str(exc)))
            await ex.gate()
            now = ex.db_now()
            record = plan.new(
                StepKind.WAIT, StepStatus.WAITING, wake_at=now + delay, started_at=now
            )
            row = matcher.row(
                key=plan.key,
                kind="wait",
                trigger=ex.trigger.model_dump(mode="json"),
                expires_at=record.wake_at,
                on_timeout={"status": StepStatus.COMPLETED, "output": None},
            )
            with ex.executing():
                found = await ex.register_matchers([record], [row])
            if plan.key in found:
                return plan.key, event_from_row(found[plan.key])
        elif record.status == StepStatus.COMPLETED:
            return plan.key, None if record.output is None else event_from_row(record.output)
        await self._await(plan.key, record, f"waiting for event {event!r}")
        return plan.key, None  # not reached: the run is released while it waits

    async def invoke(
        self,
        step_id: str,
        *,
        function: Function,
        data: dict[str, Any] | None = None,
        timeout: Duration | None = None,  # noqa: ASYNC109 - durable, pinned by the issue
    ) -> Any:
        """Runs ``function`` as a child run with ``data`` as its event's data; returns its output.

        The child may be any function of any app registered in the database, whatever its
        triggers. The parent waits without holding a worker.

        Raises:
            StepError: the child failed (with its error's type and message), or ``timeout``
                passed first (type ``InvokeTimeoutError``).
        """
        ex = self._ex
        plan = ex.plan(step_id, StepKind.INVOKE)
        record = plan.record
        if record is None:
            what = f"invoke {step_id!r}"
            try:
                delay = None if timeout is None else parse_duration(timeout, what=what)
            except (EngineError, ValueError, TypeError) as exc:  # a programming error: no retry
                ex.fail(RunFailure(str(exc)))
            await ex.gate()
            now = ex.db_now()
            expires = None if delay is None else now + delay
            record = plan.new(StepKind.INVOKE, StepStatus.WAITING, wake_at=expires, started_at=now)
            message = f"invoking function {function.fn_id!r} timed out after {timeout}"
            on_timeout = {
                "status": StepStatus.FAILED,
                "error": {"type": "InvokeTimeoutError", "message": message},
            }
            with ex.executing():
                try:
                    record = await ex.invoke(
                        record, function, dict(data or {}), expires, on_timeout
                    )
                except EngineError as exc:  # no such function registered: retrying cannot help
                    ex.fail(RunFailure(f"{what}: {exc}"))
            if record.status == StepStatus.FAILED:  # the child's flow control skipped it
                raise _step_error(plan.key, record.error)
        elif record.status == StepStatus.COMPLETED:
            return record.output
        elif record.status == StepStatus.FAILED:
            raise _step_error(plan.key, record.error)
        await self._await(plan.key, record, f"waiting for function {function.fn_id!r}")
        return None  # not reached: the run is released while it waits

    async def send_event(
        self, step_id: str, events: Event[Any] | Sequence[Event[Any]]
    ) -> list[str]:
        """Sends one event or a list, once for this run; returns their ids.

        The events and the step's record are written in one transaction, so a replay never
        sends twice. Invalid events (past a limit, or not matching the app's schema for their
        name) fail the step (``StepError``) without sending anything.
        """
        ex = self._ex
        plan = ex.plan(step_id, StepKind.SEND)
        record = plan.record
        if record is not None and record.status == StepStatus.COMPLETED:
            return list(record.output)
        if record is not None and record.status == StepStatus.FAILED:
            raise _step_error(plan.key, record.error)
        await ex.gate()
        with ex.executing():
            try:
                payload = validate_outgoing(events)
                check_sent(payload, self._schemas)
            except InvalidEventError as exc:
                failed = plan.new(StepKind.SEND, StepStatus.FAILED, error=error_payload(exc))
                await ex.checkpoint(failed)
                raise _step_error(plan.key, failed.error) from exc
            labels = ex.labels
            with telemetry.send_span(
                run_id=labels.run_id,
                function_id=labels.function_id,
                step_key=plan.key,
                count=len(payload),
            ):
                started_at = ex.db_now()
                record = plan.new(StepKind.SEND, StepStatus.COMPLETED, started_at=started_at)
                return await ex.send_events(record, payload)

    async def _await(self, key: str, record: StepRecord, what: str) -> None:
        """Releases the run until a WAITING step is resolved (or its timeout passes)."""
        due = record.wake_at or FOREVER
        until = "" if record.wake_at is None else f" until {record.wake_at.isoformat()}"
        reason = f"{what} in step {key!r}{until}"
        await self._ex.suspend(Suspension(due, RunStatus.WAITING, reason, awaited=[key]))


async def _call_in_step(
    ex: StepHost,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    key: str,
    attempt: int,
) -> Any:
    step_token = current_step.set(key)
    attempt_token = current_attempt.set(attempt)
    try:
        if inspect.iscoroutinefunction(fn):
            return await fn(*args, **kwargs)
        # Sync callables run in a thread of the worker's own pool (engine.threads), so that they
        # block neither the loop nor other runs, and a hung one can be abandoned.
        result = await ex.threads.run(fn, *args, **kwargs)
        if inspect.isawaitable(result):
            return await result
        return result
    finally:
        current_step.reset(step_token)
        current_attempt.reset(attempt_token)


def _restored(value: Any, fn: Callable[..., Any]) -> Any:
    """The step's output as the caller gets it: a model only when ``fn`` declares one."""
    if not isinstance(value, dict):  # only a JSON object can become a model: skip the lookup
        return value
    return restore(value, _return_type(fn))


def _return_type(fn: Callable[..., Any]) -> Any:
    try:
        return typing.get_type_hints(fn).get("return")
    except Exception:  # unresolvable annotations: fall back to plain JSON
        return None


def _step_error(key: str, error: dict[str, Any] | None) -> StepError:
    error = error or {}
    return StepError(key, str(error.get("type", "Error")), str(error.get("message", "")))


@dataclass
class _Outcome:
    """What one attempt of a step leaves for its call site: a value, an error, or a wait."""

    value: Any = None
    error: StepError | None = None
    wait: Suspension | None = None
