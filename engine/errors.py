"""Every error the engine raises, in one place.

The hierarchy, with the stable code each error carries::

    EngineError (Exception)                    engine
    ├── ConfigurationError                     config      bad declaration, caught at registration
    │   └── ExpressionError                    expression  a CEL expression that does not compile
    ├── InvalidEventError                      event       an event the engine refuses to store
    ├── EventKeyError                          event_key   an event key that cannot be created,
    │   │                                                  found or revoked
    │   ├── UnknownEventKeyError               event_key_unknown  a send with no live key
    │   └── EventKeyScopeError                 event_key_scope    a name outside its prefixes
    ├── SchemaMissingError                     schema      the database has no engine schema
    ├── RunNotFoundError                       run_not_found
    ├── StepError                              step_failed  a step failed for good (raised in the
    │                                                       function at the step's call site)
    ├── NonRetriableError                      non_retriable  raised by user code: do not retry
    ├── RetryAfterError                        retry_after    raised by user code: retry at a time
    ├── SerializationError                     serialization  a value with no JSON form (fails
    │                                                         the step that returned it)
    └── RunFailure                             run_failed  the run cannot go on, retries or not
        ├── StepLimitError                     step_limit
        ├── OutputLimitError                   output_limit
        ├── StateLimitError                    state_limit
        ├── DeterminismError                   determinism
        └── EventSchemaError                   event_schema  the run's event does not match the
                                                             schema its function declares

Control-flow signals derive from ``BaseException``, so that a user's ``except Exception:`` cannot
swallow them::

    BaseException
    ├── NestedStepError                        nested_step  a step called inside a step: the run
    │                                                       fails at once, whatever is caught
    ├── asyncio.CancelledError                 a suspension (sleep, wait, retry backoff) or a
    │                                          cancel settles the run by cancelling its task
    ├── records.LeaseLost                      another worker has the run: stop, write nothing
    └── records.WriteCutOff                    a write died with its connection: hand the run back

A run failure or a nested step is also remembered by the execution when raised, so the run fails
even if the function's code catches it anyway (``except BaseException``).
"""

from __future__ import annotations

import traceback
from datetime import UTC, datetime, timedelta
from typing import Any


class EngineError(Exception):
    """Base class of every error the engine raises."""

    code = "engine"


class ConfigurationError(EngineError):
    """A function, trigger or option is declared wrongly; raised at registration."""

    code = "config"


class ExpressionError(ConfigurationError):
    """A CEL expression does not compile. The message shows where."""

    code = "expression"


class InvalidEventError(EngineError):
    """An event was refused (bad name, non-object data, too large...). Nothing was stored."""

    code = "event"


class EventKeyError(EngineError):
    """An event key could not be created (a bad or taken name, bad prefixes) or found."""

    code = "event_key"


class UnknownEventKeyError(EventKeyError):
    """A send with an event key that does not exist or was revoked. Nothing was stored."""

    code = "event_key_unknown"


class EventKeyScopeError(EventKeyError):
    """A send with an event key of an event whose name starts with none of the key's prefixes.
    Nothing was stored."""

    code = "event_key_scope"


class SchemaMissingError(EngineError):
    """The database has no ``engine`` schema: run ``engine migrate`` or apply ``schema.sql``."""

    code = "schema"


class RunNotFoundError(EngineError):
    """No run has the given id."""

    code = "run_not_found"


class StepError(EngineError):
    """A step failed for good: its attempts are spent or it raised :class:`NonRetriableError`.

    Raised inside the function where the step was called; user code may catch it and go on.
    If it is not caught, the run fails without further retries.

    Attributes:
        step_id: the id of the failed step.
        error_type: the class name of the original error.
        error_message: the original error's message.
    """

    code = "step_failed"

    def __init__(self, step_id: str, error_type: str, error_message: str) -> None:
        super().__init__(f"step {step_id!r} failed: {error_type}: {error_message}")
        self.step_id = step_id
        self.error_type = error_type
        self.error_message = error_message


class NonRetriableError(EngineError):
    """Raise it from a step (or a function) to fail at once, whatever retries are left."""

    code = "non_retriable"


class RetryAfterError(EngineError):
    """Raise it from a step to retry at a given time instead of after the default backoff.

    Args:
        message: why the attempt failed.
        retry_after: a delay (``timedelta`` or seconds) or an aware ``datetime``.
    """

    code = "retry_after"

    def __init__(self, message: str, retry_after: timedelta | float | datetime) -> None:
        super().__init__(message)
        if isinstance(retry_after, datetime):
            if retry_after.tzinfo is None:
                raise ValueError("retry_after datetime must be timezone-aware")
            self.retry_at: datetime | None = retry_after
            self.delay: timedelta | None = None
        elif isinstance(retry_after, timedelta):
            self.retry_at, self.delay = None, retry_after
        else:
            self.retry_at, self.delay = None, timedelta(seconds=float(retry_after))

    def due(self, now: datetime) -> datetime:
        """When the next attempt may start, given the current (database) time."""
        if self.retry_at is not None:
            return self.retry_at.astimezone(UTC)
        assert self.delay is not None
        return now + self.delay


class RunFailure(EngineError):
    """The run cannot continue and fails at once, without retries."""

    code = "run_failed"


class StepLimitError(RunFailure):
    """The run asked for more steps than ``max_steps`` allows."""

    code = "step_limit"


class OutputLimitError(RunFailure):
    """A step's output (or the run's) is larger than ``max_output_bytes``."""

    code = "output_limit"


class StateLimitError(RunFailure):
    """The run's state (its event, step outputs and output) is larger than ``max_state_bytes``."""

    code = "state_limit"


class DeterminismError(RunFailure):
    """Replay proved that the function changed while the run was in flight (a branch asked,
    after a recorded step, for another step than the one recorded there; or the function
    returned without asking for a recorded step). See docs/concepts.md."""

    code = "determinism"

    def __init__(
        self, message: str, *, recorded: str | None = None, asked: str | None = None
    ) -> None:
        super().__init__(message)
        self.recorded = recorded  # the recorded step's key where the code diverged
        self.asked = asked  # the step id the code asked for there (None: it asked for none)


class EventSchemaError(RunFailure):
    """The run's event does not match the schema its function's trigger declares (an event
    sent by SQL, over HTTP or by an app without the schema): the run fails at its start with
    pydantic's message, before any step, and is not retried (the event cannot change). See
    docs/typed-events.md."""

    code = "event_schema"


class NestedStepError(BaseException):
    """A step was called inside another step: the run fails at once.

    A control-flow signal, not an ``Exception``: the outer step's ``except Exception`` cannot
    swallow it and record the outer step as completed.
    """

    code = "nested_step"


class SerializationError(EngineError):
    """A value could not be stored as JSON."""

    code = "serialization"


def error_payload(exc: BaseException) -> dict[str, Any]:
    """The JSON form in which an error is recorded on a step or a run."""
    payload: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    code = getattr(exc, "code", None)
    if isinstance(code, str):
        payload["code"] = code
    return payload


MAX_TRACEBACK_CHARS = 16 * 1024


def error_traceback(exc: BaseException) -> str:
    """The formatted traceback of an error, for the run's history (its last 16 KiB: the frames
    nearest the error are the ones that explain it)."""
    text = "".join(traceback.format_exception(exc))
    if len(text) > MAX_TRACEBACK_CHARS:
        text = "...\n" + text[-MAX_TRACEBACK_CHARS:]
    return text


class StaleLeaseError(EngineError):
    """Internal: a worker wrote under a lease it no longer holds; the write was refused."""

    code = "stale_lease"


# SQLSTATE codes raised by schema.sql, mapped to the error they mean.
SQLSTATE_ERRORS: dict[str, type[EngineError]] = {
    "EN001": InvalidEventError,
    "EN002": StaleLeaseError,
    "EN003": EngineError,
    "EN004": UnknownEventKeyError,
    "EN005": EventKeyScopeError,
    "EN006": EventKeyError,
}
