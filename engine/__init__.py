"""engine: durable functions for asyncio, with PostgreSQL as the only moving part.

Events trigger functions; a function is a list of memoized steps; each step retries on its own;
sleeps pause durably. See README.md for a tour.
"""

from .app import Engine
from .context import Context
from .errors import (
    ConfigurationError,
    DeterminismError,
    EngineError,
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
    StepError,
    StepLimitError,
)
from .events import Event
from .function import Function
from .retries import Backoff
from .runs import RunInfo, RunStatus, StepInfo
from .triggers import TriggerEvent
from .worker import Worker

__all__ = [
    "Backoff",
    "ConfigurationError",
    "Context",
    "DeterminismError",
    "Engine",
    "EngineError",
    "Event",
    "ExpressionError",
    "Function",
    "InvalidEventError",
    "NestedStepError",
    "NonRetriableError",
    "OutputLimitError",
    "RetryAfterError",
    "RunFailure",
    "RunInfo",
    "RunNotFoundError",
    "RunStatus",
    "SchemaMissingError",
    "SerializationError",
    "StepError",
    "StepInfo",
    "StepLimitError",
    "TriggerEvent",
    "Worker",
]
