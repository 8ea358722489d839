"""How long a failed attempt waits before the next one."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timedelta

from .durations import Duration, parse_duration

MAX_RETRIES = 20


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: attempt ``n`` waits ``initial * factor**n``, capped at
    ``maximum``, then shortened by up to ``jitter`` (a fraction) so retries do not stampede.

    The wait is durable: the run is released with a due time and holds no worker meanwhile.
    """

    initial: Duration = "1s"
    factor: float = 2.0
    maximum: Duration = "1h"
    jitter: float = 0.2

    def delay(self, attempt: int) -> timedelta:
        """The wait after the failure of attempt ``attempt`` (0-based)."""
        initial = parse_duration(self.initial, what="backoff initial")
        maximum = parse_duration(self.maximum, what="backoff maximum")
        base = min(initial * (self.factor ** min(attempt, 64)), maximum)
        return base * (1 - random.uniform(0, self.jitter))


def check_retries(retries: int, what: str) -> int:
    """Validates a ``retries`` option (0 to 20 retries after the first attempt) of ``what``."""
    from .errors import ConfigurationError

    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= MAX_RETRIES:
        raise ConfigurationError(
            f"{what}: retries must be an int from 0 to {MAX_RETRIES}, got {retries!r}"
        )
    return retries
