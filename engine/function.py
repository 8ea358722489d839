"""A declared function: its id, triggers, options and the coroutine that runs it."""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .context import Context
from .errors import ConfigurationError
from .retries import check_retries
from .triggers import Trigger, normalize_triggers

Handler = Callable[[Context], Awaitable[Any]]
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
    options: dict[str, Any] = field(default_factory=dict)

    async def __call__(self, ctx: Context) -> Any:
        return await self.handler(ctx)

    def registry_entry(self) -> dict[str, Any]:
        """The row of ``engine.functions`` describing this function."""
        return {
            "function_id": self.fn_id,
            "triggers": [t.to_json() for t in self.triggers],
            "config": {"retries": self.retries},
        }


def build_function(
    fn_id: str, handler: Handler, trigger: Trigger | list[Trigger] | None, retries: int
) -> Function:
    """Validates a declaration; raises :class:`ConfigurationError` with what is wrong."""
    if not isinstance(fn_id, str) or not _FN_ID.match(fn_id):
        raise ConfigurationError(
            f"function id {fn_id!r} must be 1-128 characters: letters, digits and . _ : / -"
        )
    if not inspect.iscoroutinefunction(handler):
        raise ConfigurationError(f"function {fn_id!r}: the handler must be an `async def`")
    return Function(
        fn_id=fn_id,
        handler=handler,
        triggers=normalize_triggers(trigger, fn_id),
        retries=check_retries(retries, fn_id),
    )
