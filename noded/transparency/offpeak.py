"""Off-peak advice (pure): the hour-of-week load profile, quiet hours, and the timetable slot in force.

Hours are absolute UTC hours (`int(epoch // 3600)`), as the traffic buckets store them; the profile is
indexed by UTC hour of the week, Monday 00:00 = 0.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from noded.core.config import ScheduleConfig, parse_days, parse_hours

HOURS_PER_WEEK = 168


def hour_of_week(abs_hour: int) -> int:
    """UTC hour of the week (Monday 00:00 = 0) of an absolute hour. 1970-01-01 was a Thursday."""
    return (abs_hour + 3 * 24) % HOURS_PER_WEEK


def load_profile(hour_bytes: Mapping[int, int], first_hour: int, now_hour: int) -> list[float]:
    """Mean bytes per hour for each hour of the week over [first_hour, now_hour).

    Hours without a bucket count as zero load: a quiet hour leaves no row, and must still count.
    """
    sums = [0.0] * HOURS_PER_WEEK
    seen = [0] * HOURS_PER_WEEK
    for h in range(first_hour, now_hour):
        seen[hour_of_week(h)] += 1
    for h, b in hour_bytes.items():
        if first_hour <= h < now_hour:
            sums[hour_of_week(h)] += b
    return [s / n if n else 0.0 for s, n in zip(sums, seen, strict=True)]


def quiet_hours(profile: list[float], now: float, count: int) -> list[int]:
    """The `count` hours of the coming day (next 24 full hours) with the lowest expected load.

    Returns absolute hours in time order; ties go to the earlier hour. No history: no advice.
    """
    if len(profile) != HOURS_PER_WEEK:
        raise ValueError(f"profile must have {HOURS_PER_WEEK} entries, got {len(profile)}")
    if not any(profile):
        return []
    start = int(now // 3600) + 1
    coming = [start + i for i in range(24)]
    ranked = sorted(coming, key=lambda h: (profile[hour_of_week(h)], h))
    return sorted(ranked[: max(0, min(count, 24))])


@dataclass(frozen=True, slots=True)
class Limits:
    down: int | None  # bytes per second; None = unlimited
    up: int | None
    slot: int | None  # index of the matching [[schedule.slots]] entry, None = the defaults
    timezone: str


def limits_in_force(schedule: ScheduleConfig, now: float) -> Limits:
    """The bandwidth limits of the timetable at `now`: the first slot that matches, else the defaults."""
    local = dt.datetime.fromtimestamp(now, ZoneInfo(schedule.timezone))
    for i, slot in enumerate(schedule.slots):
        if local.weekday() in parse_days(slot.days) and local.hour in parse_hours(slot.hours):
            return Limits(slot.down, slot.up, i, schedule.timezone)
    return Limits(schedule.default_down, schedule.default_up, None, schedule.timezone)
