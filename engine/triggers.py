"""Triggers: what starts a function's runs."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from .cron import CronSchedule
from .errors import ConfigurationError
from .expressions import Expression
from .schemas import check_schema

MAX_TRIGGERS = 10


@dataclass(frozen=True)
class TriggerEvent:
    """Starts a run for each event named ``event`` for which ``if_exp`` (CEL) is true.

    Args:
        event: the event name, for example ``"order/created"``.
        if_exp: optional CEL over ``event``, e.g. ``"event.data.total > 100"`` (the name waits
            and cancels use too, like the reference's ``if``); compiled at registration, so an
            invalid one fails ``create_function``.
        expression: deprecated alias of ``if_exp`` (warns ``DeprecationWarning``).
        schema: optional pydantic model of the event's ``data``: the function receives
            ``ctx.event.data`` as an instance of it (declare it ``Context[Model]``), and a run
            whose event does not validate fails at once with ``EventSchemaError`` (see
            docs/typed-events.md).
    """

    event: str
    if_exp: str | None = None
    expression: str | None = field(default=None, repr=False, compare=False)
    # Not part of equality: two triggers on one event differing only by schema are a conflict.
    schema: type[BaseModel] | None = field(default=None, compare=False)
    compiled: Expression | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.event, str) or not self.event:
            raise ConfigurationError(
                f"TriggerEvent: event must be a non-empty name, got {self.event!r}"
            )
        self._take_deprecated_alias()
        if self.schema is not None:
            check_schema(self.schema, f"TriggerEvent {self.event!r} schema")
        if self.if_exp is not None:
            what = f"trigger {self.event!r} if_exp"
            object.__setattr__(self, "compiled", Expression(self.if_exp, what=what))

    def _take_deprecated_alias(self) -> None:
        """``expression=`` still works, with a warning; ``.expression`` reads ``if_exp``."""
        if self.expression is not None:
            warnings.warn(
                "TriggerEvent(expression=...) is deprecated: use if_exp=... (the name waits "
                "and cancels use)",
                DeprecationWarning,
                stacklevel=4,  # _take_deprecated_alias, __post_init__, __init__, the caller
            )
            if self.if_exp is not None and self.if_exp != self.expression:
                raise ConfigurationError(
                    f"TriggerEvent {self.event!r}: pass if_exp= or expression=, not both"
                )
            object.__setattr__(self, "if_exp", self.expression)
        object.__setattr__(self, "expression", self.if_exp)

    def matches(self, event: dict[str, Any]) -> bool:
        """True when ``event`` (its JSON form) starts a run through this trigger."""
        if event["name"] != self.event:
            return False
        return self.compiled is None or self.compiled.matches({"event": event})

    def to_json(self) -> dict[str, Any]:
        """The registry form, from which any worker can evaluate this trigger."""
        return {"event": self.event, "expression": self.if_exp}


@dataclass(frozen=True)
class TriggerCron:
    """Starts a run at each time of a cron schedule.

    Args:
        cron: five fields, optionally prefixed by ``TZ=Area/City `` (UTC otherwise), for example
            ``"TZ=Europe/Paris 0 9 * * 1-5"``. Parsed at registration, so an invalid one fails
            ``create_function``. Each scheduled time starts exactly one run, whatever the number
            of workers; daylight-saving changes follow Debian cron (see :mod:`engine.cron`).
    """

    cron: str
    schedule: CronSchedule = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule", CronSchedule.parse(self.cron, what="TriggerCron"))

    def to_json(self) -> dict[str, Any]:
        """The registry form."""
        return {"cron": self.cron}


Trigger = TriggerEvent | TriggerCron


def normalize_triggers(trigger: Trigger | list[Trigger] | None, fn_id: str) -> list[Trigger]:
    """Checks the ``trigger=`` argument of ``create_function`` and returns it as a list."""
    triggers = [] if trigger is None else list(trigger) if isinstance(trigger, list) else [trigger]
    if len(triggers) > MAX_TRIGGERS:
        raise ConfigurationError(
            f"function {fn_id!r} has {len(triggers)} triggers; the limit is {MAX_TRIGGERS}"
        )
    for item in triggers:
        if not isinstance(item, TriggerEvent | TriggerCron):
            raise ConfigurationError(f"function {fn_id!r}: {item!r} is not a trigger")
    if len(set(triggers)) != len(triggers):
        raise ConfigurationError(f"function {fn_id!r} declares the same trigger twice")
    _check_one_schema_per_event(triggers, fn_id)
    return triggers


def _check_one_schema_per_event(triggers: list[Trigger], fn_id: str) -> None:
    """A run's event is typed by its name: every trigger on one name must declare the same
    schema (or none)."""
    schemas: dict[str, type[BaseModel] | None] = {}
    for trigger in triggers:
        if not isinstance(trigger, TriggerEvent):
            continue
        if schemas.setdefault(trigger.event, trigger.schema) is not trigger.schema:
            raise ConfigurationError(
                f"function {fn_id!r}: the triggers on event {trigger.event!r} declare different"
                " schemas; a run's event is typed by its name"
            )
