"""A declared function: its id, triggers, options and the coroutine that runs it."""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from .cancellation import Cancel, Timeouts, check_cancels
from .checkpointing import Checkpointing, check_checkpointing
from .context import Context
from .errors import ConfigurationError
from .flow import (
    Batch,
    Concurrency,
    Debounce,
    Priority,
    RateLimit,
    Singleton,
    Throttle,
    admission,
    check_concurrency,
    check_idempotency,
)
from .retries import check_retries
from .schemas import check_handler
from .triggers import Trigger, TriggerCron, TriggerEvent, normalize_triggers

Handler = Callable[[Context[Any]], Awaitable[Any]]  # Context[Model]: a typed function
_FN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


@dataclass(frozen=True)
class Function:
    """A durable function, as returned by ``Engine.create_function``.

    Calling it calls the handler directly (handy in unit tests of the function's own logic).
    """

    fn_id: str
    handler: Handler
    triggers: list[Trigger]
    retries: int
    app_id: str = ""
    cancel: tuple[Cancel, ...] = ()
    timeouts: Timeouts | None = None
    concurrency: tuple[Concurrency, ...] = ()
    rate_limit: RateLimit | None = None
    singleton: Singleton | None = None
    idempotency: str | None = None
    priority: Priority | None = None
    throttle: Throttle | None = None
    debounce: Debounce | None = None
    batch_events: Batch | None = None
    checkpointing: Checkpointing | None = None  # buffered checkpoints (engine.checkpointing)
    record_step_input: bool = True  # step.run arguments kept in the history (engine.step_input)

    async def __call__(self, ctx: Context[Any]) -> Any:
        return await self.handler(ctx)

    @property
    def event_triggers(self) -> list[TriggerEvent]:
        """The triggers that events fire (cron triggers fire on their own)."""
        return [t for t in self.triggers if isinstance(t, TriggerEvent)]

    @property
    def crons(self) -> list[TriggerCron]:
        """The cron triggers."""
        return [t for t in self.triggers if isinstance(t, TriggerCron)]

    def flow(self) -> dict[str, Any]:
        """The registry form of the flow control options (what a router needs to admit runs)."""
        flow: dict[str, Any] = {}
        if self.concurrency:
            flow["concurrency"] = [c.to_json() for c in self.concurrency]
        if self.rate_limit is not None:
            flow["rate_limit"] = self.rate_limit.to_json()
        if self.singleton is not None:
            flow["singleton"] = self.singleton.to_json()
        if self.idempotency is not None:
            flow["idempotency"] = self.idempotency
        if self.priority is not None:
            flow["priority"] = self.priority.to_json()
        if self.throttle is not None:
            flow["throttle"] = self.throttle.to_json()
        if self.debounce is not None:
            flow["debounce"] = self.debounce.to_json()
        if self.batch_events is not None:
            flow["batch_events"] = self.batch_events.to_json()
        return flow

    def direct_admission(self, event: dict[str, Any]) -> dict[str, Any]:
        """The flow control fields of a run started directly (an invoke, a cron tick) for
        ``event``: every option but debounce and batching, which gather routed events."""
        flow = {k: v for k, v in self.flow().items() if k not in ("debounce", "batch_events")}
        return admission(flow, self.app_id, self.fn_id, event)

    def registry_entry(self, now: datetime) -> dict[str, Any]:
        """The row of ``engine.functions`` describing this function; ``now`` is the database's."""
        config: dict[str, Any] = {"retries": self.retries}
        if self.timeouts is not None:
            config["timeouts"] = self.timeouts.to_json()
        if self.cancel:
            config["cancel"] = [c.to_json() for c in self.cancel]
        config.update(self.flow())
        if self.checkpointing is not None:
            config["checkpointing"] = self.checkpointing.to_json()
        if not self.record_step_input:
            config["record_step_input"] = False
        return {
            "function_id": self.fn_id,
            "triggers": [t.to_json() for t in self.triggers],
            "config": config,
            # Its plain triggers can be routed in SQL (engine.functions.routes_in_sql): said
            # here, where the flow control options are known, for routers of other apps.
            "routes_in_sql": not self.flow(),
            "crons": [
                {"cron": t.cron, "next_at": t.schedule.next_after(now).isoformat()}
                for t in self.crons
            ],
        }


def build_function(
    fn_id: str,
    handler: Handler,
    trigger: Trigger | list[Trigger] | None,
    retries: int,
    *,
    app_id: str = "",
    cancel: Cancel | list[Cancel] | None = None,
    timeouts: Timeouts | None = None,
    concurrency: Concurrency | list[Concurrency] | None = None,
    rate_limit: RateLimit | None = None,
    singleton: Singleton | None = None,
    idempotency: str | None = None,
    priority: Priority | None = None,
    throttle: Throttle | None = None,
    debounce: Debounce | None = None,
    batch_events: Batch | None = None,
    checkpointing: Checkpointing | None = None,
    record_step_input: bool = True,
) -> Function:
    """Validates a declaration; raises :class:`ConfigurationError` with what is wrong."""
    if not isinstance(fn_id, str) or not _FN_ID.match(fn_id):
        raise ConfigurationError(
            f"function id {fn_id!r} must be 1-128 characters: letters, digits and . _ : / -"
        )
    if not inspect.iscoroutinefunction(handler):
        raise ConfigurationError(f"function {fn_id!r}: the handler must be an `async def`")
    batch = _typed(batch_events, Batch, "batch_events", fn_id)
    if batch is not None:
        _check_batch_combinations(
            fn_id, cancel=cancel, debounce=debounce, singleton=singleton, priority=priority
        )
    triggers = normalize_triggers(trigger, fn_id)
    check_handler(fn_id, handler, triggers)
    return Function(
        fn_id=fn_id,
        handler=handler,
        triggers=triggers,
        retries=check_retries(retries, f"function {fn_id!r}"),
        app_id=app_id,
        cancel=check_cancels(cancel, fn_id),
        timeouts=_check_timeouts(timeouts, fn_id),
        concurrency=check_concurrency(concurrency, fn_id),
        rate_limit=_typed(rate_limit, RateLimit, "rate_limit", fn_id),
        singleton=_typed(singleton, Singleton, "singleton", fn_id),
        idempotency=check_idempotency(idempotency, fn_id),
        priority=_typed(priority, Priority, "priority", fn_id),
        throttle=_typed(throttle, Throttle, "throttle", fn_id),
        debounce=_typed(debounce, Debounce, "debounce", fn_id),
        batch_events=batch,
        checkpointing=check_checkpointing(checkpointing, fn_id),
        record_step_input=_flag(record_step_input, "record_step_input", fn_id),
    )


def _check_batch_combinations(fn_id: str, **options: Any) -> None:
    """Batching cannot be combined with these (one run per several events has no single event
    to cancel on, debounce, deduplicate or prioritize by), as in the reference."""
    declared = sorted(name for name, value in options.items() if value)
    if declared:
        raise ConfigurationError(
            f"function {fn_id!r}: batch_events cannot be combined with {', '.join(declared)}"
        )


def _typed(value: Any, kind: type, option: str, fn_id: str) -> Any:
    if value is not None and not isinstance(value, kind):
        raise ConfigurationError(f"function {fn_id!r}: {option}= expects {kind.__name__}(...)")
    return value


def _flag(value: Any, option: str, fn_id: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationError(f"function {fn_id!r}: {option}= expects True or False")
    return value


def _check_timeouts(timeouts: Timeouts | None, fn_id: str) -> Timeouts | None:
    if timeouts is None:
        return None
    if not isinstance(timeouts, Timeouts):
        raise ConfigurationError(f"function {fn_id!r}: timeouts= expects Timeouts(...)")
    timeouts.to_json()  # parses both durations now, so a bad one fails at registration
    return timeouts


class FunctionInfo(BaseModel):
    """A function as the registry holds it (:meth:`~engine.Engine.list_functions`)."""

    model_config = ConfigDict(frozen=True)

    app_id: str
    function_id: str
    triggers: list[dict[str, Any]]
    """In their registry form: ``{"event", "expression"}`` or ``{"cron"}``."""
    config: dict[str, Any]
    """``retries``, ``timeouts``, ``cancel`` and the flow control options, in their registry
    form (``concurrency``, ``rate_limit``, ``throttle``, ``debounce``, ``batch_events``,
    ``singleton``, ``idempotency``, ``priority``)."""
    active: bool
    """False when no live worker served it for a while: new events do not start it."""
    workers: int
    """Live workers serving it."""
    runs: dict[str, int]
    """Its runs by status."""
