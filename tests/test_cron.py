"""Cron triggers: parsing, Debian's daylight-saving rules, one run per tick across workers."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from helpers import eventually, start_worker_process

from engine import ConfigurationError, Context, Engine, TriggerCron
from engine.cron import CronSchedule

PARIS = "TZ=Europe/Paris"


def fire_times(spec: str, start: datetime, count: int) -> list[str]:
    schedule = CronSchedule.parse(spec)
    times = []
    for _ in range(count):
        start = schedule.next_after(start)
        times.append(start.astimezone(schedule.zone).strftime("%m-%d %H:%M%z"))
    return times


def test_fixed_time_in_a_repeated_hour_fires_once() -> None:
    """Europe/Paris goes back at 03:00 on 2026-10-25: 02:30 happens twice, fires once."""
    fall = datetime(2026, 10, 24, 12, tzinfo=UTC)
    assert fire_times(f"{PARIS} 30 2 * * *", fall, 3) == [
        "10-25 02:30+0200",
        "10-26 02:30+0100",
        "10-27 02:30+0100",
    ]


def test_fixed_time_in_a_skipped_hour_fires_right_after_the_change() -> None:
    """Europe/Paris jumps from 02:00 to 03:00 on 2026-03-29: 02:30 runs at 03:00."""
    spring = datetime(2026, 3, 28, 12, tzinfo=UTC)
    assert fire_times(f"{PARIS} 30 2 * * *", spring, 2) == ["03-29 03:00+0200", "03-30 02:30+0200"]


def test_wildcard_jobs_follow_the_wall_clock() -> None:
    """Jobs with * in minute or hour run in both passes of a repeated hour, none in a gap."""
    fall = datetime(2026, 10, 25, 0, 0, tzinfo=UTC)  # 02:00 CEST
    assert fire_times(f"{PARIS} */30 * * * *", fall, 4) == [
        "10-25 02:30+0200",
        "10-25 02:00+0100",
        "10-25 02:30+0100",
        "10-25 03:00+0100",
    ]
    spring = datetime(2026, 3, 29, 0, 40, tzinfo=UTC)  # 01:40 CET
    assert fire_times("CRON_TZ=Europe/Paris */30 * * * *", spring, 2) == [
        "03-29 03:00+0200",
        "03-29 03:30+0200",
    ]


def test_utc_by_default_and_latest_missed_tick() -> None:
    schedule = CronSchedule.parse("0 9 * * 1-5")
    friday = datetime(2026, 11, 20, 9, tzinfo=UTC)
    assert schedule.next_after(friday) == datetime(2026, 11, 23, 9, tzinfo=UTC)
    start = datetime(2026, 11, 2, 9, tzinfo=UTC)
    assert schedule.latest_until(start, datetime(2026, 11, 21, 10, tzinfo=UTC)) == friday


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("61 * * * *", r"the minute field '61' is not valid \(allowed: 0-59\)"),
        ("0 24 * * *", r"the hour field '24' is not valid \(allowed: 0-23\)"),
        ("0 9 * * mon-fri,9", "the day-of-week field 'mon-fri,9' is not valid"),
        ("0 9 * *", "five fields"),
        ("* * * * * *", "five fields"),
        ("TZ=Mars/Olympus 0 9 * * *", "unknown time zone 'Mars/Olympus'"),
        ("0 0 30 2 *", "never fires"),
        ("", "expected a cron string"),
    ],
)
def test_invalid_cron_fails_at_registration(spec: str, message: str) -> None:
    app = Engine("cron-check", "postgresql://unused")
    with pytest.raises(ConfigurationError, match=message) as caught:
        app.create_function("job", trigger=TriggerCron(spec))(_noop)
    assert repr(spec) in str(caught.value) or not spec


async def _noop(ctx: Context) -> None:
    return None


async def test_each_tick_starts_one_run_with_three_workers(database_url: str, sql: Any) -> None:
    """Three worker processes race on every tick; missed ticks start one run, not one each."""
    workers = [start_worker_process("cron_app:app", database_url) for _ in range(3)]
    try:
        next_at = await eventually(
            lambda: sql.fetchval("SELECT next_at FROM engine.cron_schedules"), timeout=30
        )
        await _move_clock_to(sql, next_at + timedelta(seconds=1))
        await eventually(lambda: _completed(sql, 1), timeout=30)
        await asyncio.sleep(1.0)  # every worker has looked at the schedule by now
        assert await _runs(sql) == [next_at.isoformat()]

        # Five days with no tick fired: one run, for the latest missed time.
        await _move_clock_to(sql, next_at + timedelta(days=5, seconds=1))
        await eventually(lambda: _completed(sql, 2), timeout=30)
        await asyncio.sleep(1.0)
        latest = CronSchedule.parse("TZ=Europe/Paris 0 3 * * *").latest_until(
            next_at, next_at + timedelta(days=5, seconds=1)
        )
        assert await _runs(sql) == [next_at.isoformat(), latest.isoformat()]
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(timeout=30)


async def _move_clock_to(sql: Any, when: datetime) -> None:
    await sql.execute(
        "UPDATE engine.clock SET offset_by = $1::timestamptz - statement_timestamp()", when
    )


async def _completed(sql: Any, count: int) -> bool:
    done = await sql.fetchval("SELECT count(*) FROM engine.runs WHERE status = 'COMPLETED'")
    return bool(done >= count)


async def _runs(sql: Any) -> list[str]:
    rows = await sql.fetch(
        "SELECT e.data->>'scheduled_at' AS at, r.output FROM engine.runs r "
        "JOIN engine.events e ON e.seq = r.event_seq ORDER BY r.created_at"
    )
    for row in rows:
        assert row["output"] is not None
    return [datetime.fromisoformat(row["at"]).astimezone(UTC).isoformat() for row in rows]
