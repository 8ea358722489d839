"""What a function receives: ``ctx.event``, ``ctx.step``, ``ctx.logger``..."""

from __future__ import annotations

from typing import TYPE_CHECKING, Generic

from .events import DataT, Event
from .runlocal import RunLogger, current_attempt

if TYPE_CHECKING:
    from .steps import Steps


class Context(Generic[DataT]):
    """The argument of every function.

    ``Context[OrderCreated]`` types ``ctx.event.data`` for a function whose trigger declares
    ``schema=OrderCreated`` (see docs/typed-events.md); a bare ``Context`` has dict data.

    Attributes:
        event: the event that triggered the run (its ``v``: the version its sender gave).
        events: all events of the run (one, unless the function batches events).
        run_id: the run's id.
        step: the step API (``await ctx.step.run(...)``, ``sleep``, ``sleep_until``).
        logger: a logger that does not repeat lines when the run replays.
    """

    def __init__(
        self,
        *,
        event: Event[DataT],
        events: list[Event[DataT]],
        run_id: str,
        step: Steps,
        logger: RunLogger,
        run_attempt: int,
    ) -> None:
        self.event = event
        self.events = events
        self.run_id = run_id
        self.step = step
        self.logger = logger
        self._run_attempt = run_attempt

    @property
    def attempt(self) -> int:
        """The 0-based attempt of the step executing now (of the function body outside steps)."""
        attempt = current_attempt.get()
        return self._run_attempt if attempt is None else attempt

    def patched(self, patch_id: str) -> bool:
        """Whether the run takes the new code's path at this point of a code change.

        ``True`` for a run that reaches this point for the first time with this code (the
        decision is recorded, so that replay decides the same way); ``False`` for a run whose
        history shows it went past this point with the code before the change (it recorded
        a step right after it). Call it in the function's own code, not inside a step::

            if ctx.patched("send-receipt"):
                await ctx.step.run("receipt", send_receipt)

        Each point decides for itself: ``v2 = ctx.patched("v2")`` at the top of the function
        takes one decision for the whole run. See docs/versioning.md (the three deploys).
        """
        return self.step._patched(patch_id)

    def __repr__(self) -> str:
        return f"Context(run_id={self.run_id!r}, event={self.event.name!r})"
