"""Boundary arithmetic: UTC, odd offsets, DST days, and properties."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from hypothesis import given
from hypothesis import strategies as st

from edged.core.schedule import (
    boundaries_between,
    is_boundary,
    next_boundary,
    nominal_start,
    previous_boundary,
)

AUCKLAND = ZoneInfo("Pacific/Auckland")
KATHMANDU = ZoneInfo("Asia/Kathmandu")  # +05:45


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def test_quarter_hours_in_utc() -> None:
    assert next_boundary(utc(2026, 11, 21, 0, 7, 12), 900, UTC) == utc(2026, 11, 21, 0, 15)
    # strictly after: a boundary is not its own next boundary
    assert next_boundary(utc(2026, 11, 21, 0, 15), 900, UTC) == utc(2026, 11, 21, 0, 30)
    assert previous_boundary(utc(2026, 11, 21, 0, 15), 900, UTC) == utc(2026, 11, 21, 0, 0)
    assert nominal_start(utc(2026, 11, 21, 0, 0), 900, UTC) == utc(2026, 11, 20, 23, 45)


def test_plus_0545_aligns_on_local_hours() -> None:
    t = utc(2026, 11, 21, 0, 7)  # 05:52 local
    assert next_boundary(t, 900, KATHMANDU) == utc(2026, 11, 21, 0, 15)  # 06:00 local
    hour = next_boundary(t, 3600, KATHMANDU)
    assert hour == utc(2026, 11, 21, 0, 15)
    assert hour.astimezone(KATHMANDU).strftime("%H:%M") == "06:00"
    day = next_boundary(t, 86400, KATHMANDU)
    assert day.astimezone(KATHMANDU).strftime("%Y-%m-%d %H:%M") == "2026-11-22 00:00"


def local_day_count(day: str, interval_s: int) -> int:
    start_local = datetime.fromisoformat(day).replace(tzinfo=AUCKLAND)
    end_local = datetime.combine(start_local.date() + timedelta(days=1), datetime.min.time(),
                                 AUCKLAND)  # fmt: skip
    start = start_local.astimezone(UTC)
    # boundaries b with start < b <= end: the intervals labelled by end within the day
    return len(list(boundaries_between(start, end_local.astimezone(UTC) + timedelta(seconds=1),
                                       interval_s, AUCKLAND)))  # fmt: skip


def test_dst_days_in_auckland_have_92_and_100_quarter_hours() -> None:
    assert local_day_count("2026-09-27", 900) == 92  # clocks forward
    assert local_day_count("2026-04-05", 900) == 100  # clocks back
    assert local_day_count("2026-06-01", 900) == 96
    assert local_day_count("2026-04-05", 3600) == 25


def test_daily_interval_follows_local_midnight_across_dst() -> None:
    before = utc(2026, 9, 26, 11, 0)  # 2026-09-26 23:00 NZST
    midnight = next_boundary(before, 86400, AUCKLAND)
    following = next_boundary(midnight, 86400, AUCKLAND)
    assert midnight.astimezone(AUCKLAND).hour == 0
    assert following.astimezone(AUCKLAND).hour == 0
    assert following - midnight == timedelta(hours=23)  # the short day


ZONES = st.sampled_from(["UTC", "Pacific/Auckland", "Asia/Kathmandu", "Australia/Lord_Howe",
                         "America/St_Johns", "Asia/Kolkata"])  # fmt: skip
INTERVALS = st.sampled_from([1, 5, 60, 300, 900, 1800, 3600, 7200, 21600, 86400])
INSTANTS = st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2035, 1, 1),
                        timezones=st.just(UTC))  # fmt: skip


@given(INSTANTS, INTERVALS, ZONES)
def test_next_and_previous_bracket_every_instant(t: datetime, interval_s: int, zone: str) -> None:
    z = ZoneInfo(zone)
    after, before = next_boundary(t, interval_s, z), previous_boundary(t, interval_s, z)
    assert before < t < after
    assert is_boundary(after, interval_s, z)
    assert is_boundary(before, interval_s, z)
    # nothing is skipped: the boundary before `after` is at or before t
    assert previous_boundary(after, interval_s, z) <= t <= next_boundary(before, interval_s, z)
    local = after.astimezone(z)
    since_midnight_s = local.hour * 3600 + local.minute * 60 + local.second
    assert since_midnight_s % interval_s == 0
    assert local.microsecond == 0
