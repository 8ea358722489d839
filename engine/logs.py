"""structlog setup for the command line: JSON lines when not on a terminal.

Every line has a stable event name (``run.started``, ``step.failed``...) and, where they apply,
``run_id``, ``function_id``, ``step_id``, ``attempt``, ``trace_id`` and ``span_id``, bound from
context by the engine. A library user keeps their own structlog configuration; this module only
runs for ``engine worker`` and ``engine dev``.
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(level: str = "info") -> None:
    """Configures structlog (and stdlib logging) for the engine's processes."""
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer()
        if sys.stderr.isatty()
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
