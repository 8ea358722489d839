"""Matching events to the runs that wait for them (``wait_for_event``) or cancel on them.

A run's *matcher* names an event, optionally with ``match="data.order_id"`` (the candidate's
field equals the triggering event's) and an ``if_exp`` CEL expression in which ``event`` is the
run's triggering event and ``async`` the candidate. ``match`` is evaluated in SQL, ``if_exp`` in
the worker; see ``engine.matchers`` in schema.sql for how events and matchers meet exactly once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any

from .errors import ConfigurationError, ExpressionError
from .expressions import Expression

_PATH = re.compile(r"^data(\.[A-Za-z_][A-Za-z0-9_-]*)+$")


@dataclass(frozen=True)
class EventMatcher:
    """What a wait or a cancel listens for; built (and checked) when it is declared.

    Raises:
        ConfigurationError: a bad event name, ``match`` path or expression, saying which.
    """

    event: str
    match: str | None = None
    if_exp: str | None = None
    what: str = field(default="matcher", compare=False)
    expression: Expression | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.event, str) or not self.event:
            raise ConfigurationError(f"{self.what}: event must be a non-empty name")
        if self.match is not None and not (isinstance(self.match, str) and _PATH.match(self.match)):
            raise ConfigurationError(
                f"{self.what}: match={self.match!r} must be a field path such as "
                "'data.order_id' (compared between the triggering and the awaited event)"
            )
        compiled = None if self.if_exp is None else compile_expression(self.if_exp, self.what)
        object.__setattr__(self, "expression", compiled)

    def row(
        self,
        *,
        key: str,
        kind: str,
        trigger: dict[str, Any],
        expires_at: datetime | None,
        on_timeout: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The ``engine.register_matchers`` entry of this matcher for one run."""
        path = None if self.match is None else self.match.split(".")[1:]
        return {
            "key": key,
            "kind": kind,
            "event_name": self.event,
            "match_path": path,
            "match_value": None if path is None else _lookup(trigger.get("data"), path),
            "expression": self.if_exp,
            "expires_at": None if expires_at is None else expires_at.isoformat(),
            "on_timeout": on_timeout,
        }


def _lookup(data: Any, path: list[str]) -> Any:
    """The value at ``path`` in ``data``, or ``None`` (JSON null) where it is missing."""
    for part in path:
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


@lru_cache(maxsize=4096)
def _compiled(source: str) -> Expression:
    return Expression(source, what="matcher expression")


def compile_expression(source: str, what: str) -> Expression:
    """Compiles a matcher's ``if_exp`` once; an error names ``what`` and the expression."""
    if not isinstance(source, str):
        raise ExpressionError(f"{what}: expected a CEL expression, got {source!r}")
    try:
        return _compiled(source)
    except ExpressionError as exc:
        raise ExpressionError(f"{what}: {exc}") from None


def accepts(source: str | None, trigger: dict[str, Any] | None, candidate: dict[str, Any]) -> bool:
    """True when a candidate event passes a matcher's expression (``None``: no expression)."""
    if source is None:
        return True
    return _compiled(source).matches({"event": trigger or {}, "async": candidate})
