"""Flow control declared on a function, enforced in PostgreSQL.

Concurrency limits are permits (``engine.concurrency_slots``): the claim takes one per slot under
the slot row's lock only while fewer than the limit are in use, and a run leaving ``RUNNING``
gives it back. Sleeping and waiting runs hold none. A run whose slot is full is parked (no worker
looks at it) until a permit of that slot is released.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, TypeVar

from .durations import Duration, parse_duration
from .errors import ConfigurationError, ExpressionError
from .expressions import Expression

T = TypeVar("T")
MAX_CONCURRENCY = 2
FLOW_OPTIONS = (
    "concurrency",
    "rate_limit",
    "singleton",
    "idempotency",
    "priority",
    "throttle",
    "debounce",
    "batch_events",
)
MAX_BATCH = 1000
MAX_PRIORITY = 600  # seconds, either way
SCOPES = ("fn", "app")


@dataclass(frozen=True)
class Concurrency:
    """At most ``limit`` runs executing at once, per value of ``key``.

    Args:
        limit: runs executing at the same moment, at most (sleeping and waiting runs do not
            count).
        key: CEL over ``event`` (``"event.data.user_id"``): one limit per value. ``None``: one
            limit for all runs.
        scope: ``"fn"`` (default): per function; ``"app"``: shared by every function of the app
            declaring the same key (a key is then required).
        ordering: ``"fifo"``: runs of a key start in the order they were created (a newer run
            does not take a freed slot while an older one waits for it). ``None``: any order.
    """

    limit: int
    key: str | None = None
    scope: str = "fn"
    ordering: str | None = None
    compiled: Expression | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1:
            raise ConfigurationError(f"Concurrency: limit must be an int >= 1, got {self.limit!r}")
        if self.scope not in SCOPES:
            raise ConfigurationError(
                f"Concurrency: scope must be 'fn' or 'app', got {self.scope!r}"
            )
        if self.scope == "app" and self.key is None:
            raise ConfigurationError("Concurrency(scope='app') needs a key")
        if self.ordering not in (None, "fifo"):
            raise ConfigurationError(
                f"Concurrency: ordering must be None or 'fifo', got {self.ordering!r}"
            )
        compiled = None
        if self.key is not None:
            compiled = Expression(self.key, what=f"Concurrency key {self.key!r}")
        object.__setattr__(self, "compiled", compiled)

    def to_json(self) -> dict[str, Any]:
        """The registry form, from which any worker computes a run's slots."""
        return {
            "limit": self.limit,
            "key": self.key,
            "scope": self.scope,
            "ordering": self.ordering,
        }


@dataclass(frozen=True)
class RateLimit:
    """At most ``limit`` runs per ``period`` per value of ``key``; the excess is SKIPPED.

    The window slides: no interval of length ``period`` ever holds more than ``limit`` starts.
    """

    limit: int
    period: Duration
    key: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1:
            raise ConfigurationError(f"RateLimit: limit must be an int >= 1, got {self.limit!r}")
        _positive(self.period, "RateLimit period")
        if self.key is not None:
            Expression(self.key, what=f"RateLimit key {self.key!r}")

    def to_json(self) -> dict[str, Any]:
        """The registry form."""
        period = _positive(self.period, "RateLimit period").total_seconds()
        return {"limit": self.limit, "period": period, "key": self.key}


@dataclass(frozen=True)
class Throttle:
    """At most ``limit`` run starts per ``period`` per value of ``key``, spread evenly (GCRA),
    with ``burst`` more allowed at once. Excess runs are delayed, never dropped."""

    limit: int
    period: Duration
    burst: int = 1
    key: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1:
            raise ConfigurationError(f"Throttle: limit must be an int >= 1, got {self.limit!r}")
        if isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 0:
            raise ConfigurationError(f"Throttle: burst must be an int >= 0, got {self.burst!r}")
        _positive(self.period, "Throttle period")
        if self.key is not None:
            Expression(self.key, what=f"Throttle key {self.key!r}")

    def to_json(self) -> dict[str, Any]:
        """The registry form: the GCRA emission interval (period / limit) and burst."""
        period = _positive(self.period, "Throttle period").total_seconds()
        return {"interval": period / self.limit, "burst": self.burst, "key": self.key}


@dataclass(frozen=True)
class Debounce:
    """One run per quiet ``period``: each new event of a key restarts the period, and the run
    starts with the *last* event. ``timeout`` caps the delay from the first event."""

    period: Duration
    key: str | None = None
    timeout: Duration | None = None

    def __post_init__(self) -> None:
        _positive(self.period, "Debounce period")
        if self.timeout is not None:
            _positive(self.timeout, "Debounce timeout")
        if self.key is not None:
            Expression(self.key, what=f"Debounce key {self.key!r}")

    def to_json(self) -> dict[str, Any]:
        """The registry form (seconds)."""
        timeout = None
        if self.timeout is not None:
            timeout = _positive(self.timeout, "Debounce timeout").total_seconds()
        period = _positive(self.period, "Debounce period").total_seconds()
        return {"period": period, "timeout": timeout, "key": self.key}


@dataclass(frozen=True)
class Batch:
    """One run receives up to ``max_size`` events of a key (``ctx.events``; ``ctx.event`` is the
    first), when the batch is full or ``timeout`` after its first event."""

    max_size: int
    timeout: Duration
    key: str | None = None

    def __post_init__(self) -> None:
        if (
            isinstance(self.max_size, bool)
            or not isinstance(self.max_size, int)
            or not 1 <= self.max_size <= MAX_BATCH
        ):
            raise ConfigurationError(
                f"Batch: max_size must be an int from 1 to {MAX_BATCH}, got {self.max_size!r}"
            )
        _positive(self.timeout, "Batch timeout")
        if self.key is not None:
            Expression(self.key, what=f"Batch key {self.key!r}")

    def to_json(self) -> dict[str, Any]:
        """The registry form (seconds)."""
        timeout = _positive(self.timeout, "Batch timeout").total_seconds()
        return {"max_size": self.max_size, "timeout": timeout, "key": self.key}


@dataclass(frozen=True)
class Singleton:
    """At most one active run (sleeping and waiting included) per value of ``key``.

    ``mode="skip"``: a new run is SKIPPED while one is active; ``mode="cancel"``: the active one
    is CANCELLED and the new one runs.
    """

    key: str | None = None
    mode: str = "skip"

    def __post_init__(self) -> None:
        if self.mode not in ("skip", "cancel"):
            raise ConfigurationError(
                f"Singleton: mode must be 'skip' or 'cancel', got {self.mode!r}"
            )
        if self.key is not None:
            Expression(self.key, what=f"Singleton key {self.key!r}")

    def to_json(self) -> dict[str, Any]:
        """The registry form."""
        return {"key": self.key, "mode": self.mode}


@dataclass(frozen=True)
class Priority:
    """``run``: CEL over ``event`` giving an int of seconds (-600..600). A run with priority N is
    claimed ahead of runs queued up to N seconds before it; a negative N delays it."""

    run: str

    def __post_init__(self) -> None:
        Expression(self.run, what=f"Priority run {self.run!r}")

    def to_json(self) -> str:
        """The registry form: the expression."""
        return self.run


def priority_of(source: str, event: dict[str, Any]) -> int:
    """A run's priority in seconds, clamped to +-600; 0 when the expression is not a number."""
    try:
        value = _compiled(source).evaluate({"event": event})
    except ExpressionError:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    return max(-MAX_PRIORITY, min(MAX_PRIORITY, int(value)))


def _positive(value: Duration, what: str) -> Any:
    try:
        delay = parse_duration(value, what=what)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    if delay.total_seconds() <= 0:
        raise ConfigurationError(f"{what} must be positive, got {value!r}")
    return delay


def check_idempotency(expression: str | None, fn_id: str) -> str | None:
    """Validates ``idempotency=`` (CEL over ``event``: at most one run per value per 24 h)."""
    if expression is not None:
        Expression(expression, what=f"function {fn_id!r} idempotency {expression!r}")
    return expression


def admission(
    flow: dict[str, Any], app_id: str, fn_id: str, event: dict[str, Any]
) -> dict[str, Any]:
    """The fields a run's flow control adds to its creation (see ``engine.admit``), from the
    registry form of its function's options and its triggering event."""
    if not flow:  # most functions: nothing to compute for each routed event
        return {"concurrency": None}
    base = f"{app_id}/{fn_id}"
    fields: dict[str, Any] = {
        "concurrency": concurrency_slots(flow.get("concurrency") or [], app_id, fn_id, event)
    }
    if flow.get("idempotency"):
        fields["idempotency_key"] = f"{base}|{_key_value(flow['idempotency'], event)}"
    rate = flow.get("rate_limit")
    if rate:
        fields["rate_key"] = _scoped(base, rate.get("key"), event)
        fields["rate_limit"] = rate["limit"]
        fields["rate_period"] = rate["period"]
    throttle = flow.get("throttle")
    if throttle:
        fields["throttle"] = {
            "key": _scoped(base, throttle.get("key"), event),
            "interval": throttle["interval"],
            "burst": throttle["burst"],
        }
    debounce = flow.get("debounce")
    if debounce:
        fields["debounce_key"] = _scoped(base, debounce.get("key"), event)
        fields["debounce_period"] = debounce["period"]
        fields["debounce_timeout"] = debounce.get("timeout")
    batch = flow.get("batch_events")
    if batch:
        fields["batch_key"] = _scoped(base, batch.get("key"), event)
        fields["batch_max"] = batch["max_size"]
        fields["batch_timeout"] = batch["timeout"]
    if flow.get("priority"):
        fields["priority"] = priority_of(flow["priority"], event)
    singleton = flow.get("singleton")
    if singleton:
        fields["singleton_key"] = _scoped(base, singleton.get("key"), event)
        fields["singleton_mode"] = singleton["mode"]
    return fields


def _scoped(base: str, key: str | None, event: dict[str, Any]) -> str:
    return base if not key else f"{base}|{_key_value(key, event)}"


def one_or_many(value: Any, kind: type[T], *, option: str, limit: int, fn_id: str) -> tuple[T, ...]:
    """Validates an option that takes one ``kind`` or a list of up to ``limit`` of them."""
    items = [] if value is None else [value] if isinstance(value, kind) else list(value)
    if len(items) > limit:
        raise ConfigurationError(
            f"function {fn_id!r} declares {len(items)} {option}; the limit is {limit}"
        )
    for item in items:
        if not isinstance(item, kind):
            raise ConfigurationError(
                f"function {fn_id!r}: {option}= expects {kind.__name__}(...), got {item!r}"
            )
    return tuple(items)


def check_concurrency(
    value: Concurrency | list[Concurrency] | None, fn_id: str
) -> tuple[Concurrency, ...]:
    """Validates the ``concurrency=`` option of ``create_function``."""
    return one_or_many(value, Concurrency, option="concurrency", limit=MAX_CONCURRENCY, fn_id=fn_id)


def concurrency_slots(
    specs: list[dict[str, Any]], app_id: str, fn_id: str, event: dict[str, Any]
) -> list[dict[str, Any]] | None:
    """The permits a run needs (``[{slot, cap}]``, sorted), from the registry form of its
    function's limits and its triggering event; ``None`` when it has none."""
    if not specs:
        return None
    slots = []
    for spec in specs:
        scope = f"fn:{app_id}/{fn_id}" if spec["scope"] == "fn" else f"app:{app_id}"
        if spec.get("key"):
            scope += "|" + _key_value(spec["key"], event)
        slots.append(
            {"slot": scope, "cap": int(spec["limit"]), "fifo": spec.get("ordering") == "fifo"}
        )
    # A fixed order across runs: two claims never take the same two slots in opposite orders.
    return sorted(slots, key=lambda s: s["slot"])


def _key_value(source: str, event: dict[str, Any]) -> str:
    try:
        value = _compiled(source).evaluate({"event": event})
    except ExpressionError:
        value = None  # a key that cannot be evaluated groups with the runs that have none
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


@lru_cache(maxsize=1024)
def _compiled(source: str) -> Expression:
    return Expression(source, what="concurrency key")
