"""Cron schedules: parsing, and fire times that follow Debian cron across daylight-saving changes.

A schedule is five fields (``minute hour day-of-month month day-of-week``), optionally prefixed
by ``TZ=Area/City `` or ``CRON_TZ=Area/City `` (UTC otherwise). Fire times are wall-clock times
in that zone. When the clocks change, Debian's rules apply:

* a job at a fixed time (no ``*`` in its minute or hour field) whose time occurs twice (the
  clocks go back) fires once, at the first occurrence; one whose time does not exist (the clocks
  go forward) fires once, right after the change;
* a job with a wildcard in its minute or hour field follows the wall clock: it fires in both
  passes of a repeated hour and not at all in a skipped one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from .errors import ConfigurationError

_PREFIX = re.compile(r"^(?:CRON_)?TZ=(?P<zone>\S+)\s+(?P<expression>.+)$")
# A fold or a gap is never longer than this; scanning this far past a candidate is enough.
_MAX_SHIFT = timedelta(hours=3)
# How far back a worker looks for missed ticks before firing the latest one.
_CATCH_UP_WINDOW = timedelta(days=2)


@dataclass(frozen=True)
class CronSchedule:
    """A parsed cron string; :meth:`parse` validates it."""

    spec: str
    expression: str
    zone: ZoneInfo = field(compare=False)
    fixed_time: bool = field(compare=False)

    @classmethod
    def parse(cls, spec: str, *, what: str = "cron") -> CronSchedule:
        """Parses ``spec``; raises :class:`ConfigurationError` saying what is wrong."""
        if not isinstance(spec, str) or not spec.strip():
            raise ConfigurationError(f"{what}: expected a cron string, got {spec!r}")
        text = spec.strip()
        zone_name = "UTC"
        prefixed = _PREFIX.match(text)
        if prefixed:
            zone_name, text = prefixed["zone"], prefixed["expression"].strip()
        try:
            zone = ZoneInfo(zone_name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigurationError(
                f"{what} {spec!r}: unknown time zone {zone_name!r} (use an IANA name such as "
                "Europe/Paris)"
            ) from None
        fields = text.split()
        if len(fields) != 5:
            raise ConfigurationError(
                f"{what} {spec!r}: expected five fields (minute hour day-of-month month "
                f"day-of-week), optionally after TZ=Area/City; {text!r} has {len(fields)}"
            )
        if not croniter.is_valid(text):
            raise ConfigurationError(f"{what} {spec!r}: {_invalid_field(fields)}")
        schedule = cls(spec, text, zone, "*" not in fields[0] and "*" not in fields[1])
        try:
            schedule.next_after(datetime.now(UTC))
        except Exception as exc:  # croniter gives up on dates that never come (Feb 30)
            raise ConfigurationError(f"{what} {spec!r}: never fires ({exc})") from None
        return schedule

    def next_after(self, instant: datetime) -> datetime:
        """The first fire time strictly after ``instant`` (aware), in UTC."""
        local = instant.astimezone(self.zone).replace(tzinfo=None)
        # Start a little early: in a repeated hour, earlier wall times can come after `instant`.
        times = croniter(self.expression, local - _MAX_SHIFT)
        best: datetime | None = None
        while True:
            wall: datetime = times.get_next(datetime)
            for candidate in self._instants(wall):
                if candidate > instant and (best is None or candidate < best):
                    best = candidate
            if best is not None and wall > _wall(best, self.zone) + _MAX_SHIFT:
                return best

    def latest_until(self, start: datetime, now: datetime) -> datetime:
        """The last fire time in ``[start, now]``, ``start`` being one: the tick to catch up."""
        tick = start
        if now - start > _CATCH_UP_WINDOW:
            recent = self.next_after(now - _CATCH_UP_WINDOW)
            if recent <= now:
                tick = recent
        while (following := self.next_after(tick)) <= now:
            tick = following
        return tick

    def _instants(self, wall: datetime) -> list[datetime]:
        """The instants at which a wall-clock time fires: none, one, or two (a repeated hour)."""
        first = wall.replace(tzinfo=self.zone, fold=0).astimezone(UTC)
        second = wall.replace(tzinfo=self.zone, fold=1).astimezone(UTC)
        if first == second:
            return [first]
        if _wall(first, self.zone) == wall:  # the time occurs twice
            return [first] if self.fixed_time else [first, second]
        # The time does not exist: a fixed-time job fires when the clocks have moved forward.
        return [_transition(second, first, self.zone)] if self.fixed_time else []

    def __str__(self) -> str:
        return self.spec


# Each field's name and range, for the message that says which one is wrong.
_FIELDS = (
    ("minute", "0-59"),
    ("hour", "0-23"),
    ("day-of-month", "1-31"),
    ("month", "1-12 or jan-dec"),
    ("day-of-week", "0-7 or sun-sat"),
)


def _invalid_field(fields: list[str]) -> str:
    """Names the first field that is invalid on its own (the others as ``*``)."""
    for index, (name, allowed) in enumerate(_FIELDS):
        alone = " ".join(fields[index] if i == index else "*" for i in range(5))
        if not croniter.is_valid(alone):
            return f"the {name} field {fields[index]!r} is not valid (allowed: {allowed})"
    return f"{' '.join(fields)!r} is not a valid schedule"


def _wall(instant: datetime, zone: ZoneInfo) -> datetime:
    return instant.astimezone(zone).replace(tzinfo=None)


def _transition(before: datetime, after: datetime, zone: ZoneInfo) -> datetime:
    """The instant the zone's offset changes, between ``before`` and ``after`` (bisection)."""
    offset = before.astimezone(zone).utcoffset()
    while after - before > timedelta(microseconds=1):
        middle = before + (after - before) / 2
        if middle.astimezone(zone).utcoffset() == offset:
            before = middle
        else:
            after = middle
    return after  # before < transition <= after, and they are 1 µs apart: it is `after`
