"""engine: durable functions for asyncio, with PostgreSQL as the only moving part.

Events trigger functions; a function is a list of memoized steps; each step retries on its own;
sleeps and waits pause durably; cron, invoke and cancellation are declared on the function.
See README.md for a tour.
"""

from ._version import __version__ as __version__
from .app import Engine
from .cancellation import Cancel, Timeouts
from .checkpointing import Checkpointing
from .context import Context
from .errors import (
    ConfigurationError,
    DeterminismError,
    EngineError,
    EventSchemaError,
    ExpressionError,
    InvalidEventError,
    NestedStepError,
    NonRetriableError,
    OutputLimitError,
    RetryAfterError,
    RunFailure,
    RunNotFoundError,
    SchemaMissingError,
    SerializationError,
    StateLimitError,
    StepError,
    StepLimitError,
)
from .events import Event
from .flow import Batch, Concurrency, Debounce, Priority, RateLimit, Singleton, Throttle
from .function import Function
from .retries import Backoff
from .runs import RunInfo, RunStatus, StepInfo
from .triggers import TriggerCron, TriggerEvent
from .worker import Worker

__all__ = [
    "Backoff",
    "Batch",
    "Cancel",
    "Checkpointing",
    "Concurrency",
    "ConfigurationError",
    "Context",
    "Debounce",
    "DeterminismError",
    "Engine",
    "EngineError",
    "Event",
    "EventSchemaError",
    "ExpressionError",
    "Function",
    "InvalidEventError",
    "NestedStepError",
    "NonRetriableError",
    "OutputLimitError",
    "Priority",
    "RateLimit",
    "RetryAfterError",
    "RunFailure",
    "RunInfo",
    "RunNotFoundError",
    "RunStatus",
    "SchemaMissingError",
    "SerializationError",
    "Singleton",
    "StateLimitError",
    "StepError",
    "StepInfo",
    "StepLimitError",
    "Throttle",
    "Timeouts",
    "TriggerCron",
    "TriggerEvent",
    "Worker",
]
