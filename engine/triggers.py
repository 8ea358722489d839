"""Triggers: what starts a function's runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .cron import CronSchedule
from .errors import ConfigurationError
from .expressions import Expression

MAX_TRIGGERS = 10


@dataclass(frozen=True)
class TriggerEvent:
    """Starts a run for each event named ``event`` for which ``expression`` (CEL) is true.

    Args:
        event: the event name, for example ``"order/created"``.
        expression: optional CEL over ``event``, e.g. ``"event.data.total > 100"``; compiled
            at registration, so an invalid one fails ``create_function``.
    """

    event: str
    expression: str | None = None
    compiled: Expression | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.event, str) or not self.event:
            raise ConfigurationError(
                f"TriggerEvent: event must be a non-empty name, got {self.event!r}"
            )
        if self.expression is not None:
            what = f"trigger {self.event!r} expression"
            object.__setattr__(self, "compiled", Expression(self.expression, what=what))

    def matches(self, event: dict[str, Any]) -> bool:
        """True when ``event`` (its JSON form) starts a run through this trigger."""
        if event["name"] != self.event:
            return False
        return self.compiled is None or self.compiled.matches({"event": event})

    def to_json(self) -> dict[str, Any]:
        """The registry form, from which any worker can evaluate this trigger."""
        return {"event": self.event, "expression": self.expression}


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
    return triggers
