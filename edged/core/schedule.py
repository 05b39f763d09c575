"""Interval boundary arithmetic in a time zone (pure).

A boundary is an instant whose local wall-clock time is a whole multiple of
the interval counted from local midnight. Because the interval divides a day
and the Unix epoch starts at a midnight, that is the same as

    (utc_epoch_seconds + utc_offset_seconds) mod interval_s == 0

evaluated with the offset in force at that instant. Local times skipped by a
DST change are never boundaries and repeated local times are boundaries twice,
so a Pacific/Auckland day has 92, 96 or 100 quarter hours, and +05:30/+05:45
zones align on their own local hours.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, tzinfo

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = 1_000_000
_ONE_US = timedelta(microseconds=1)


def _to_us(t: datetime) -> int:
    return (t - EPOCH) // _ONE_US


def _from_us(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=us)


def _offset_us(us: int, zone: tzinfo) -> int:
    offset = _from_us(us).astimezone(zone).utcoffset()
    return 0 if offset is None else offset // _ONE_US


def _transition_after(lo_us: int, hi_us: int, zone: tzinfo) -> int:
    """First microsecond in (lo, hi] whose offset differs from lo's (one must exist)."""
    lo_offset = _offset_us(lo_us, zone)
    while hi_us - lo_us > 1:
        mid = (lo_us + hi_us) // 2
        if _offset_us(mid, zone) == lo_offset:
            lo_us = mid
        else:
            hi_us = mid
    return hi_us


def next_boundary(after: datetime, interval_s: int, zone: tzinfo) -> datetime:
    """The first boundary strictly after `after`."""
    period_us = interval_s * _US
    t_us = _to_us(after)
    offset = _offset_us(t_us, zone)
    candidate = ((t_us + offset) // period_us + 1) * period_us - offset
    if _offset_us(candidate, zone) == offset:
        return _from_us(candidate)
    # The offset changes before the candidate: continue on the new grid.
    change = _transition_after(t_us, candidate, zone)
    new_offset = _offset_us(change, zone)
    first_on_new_grid = -((-(change + new_offset)) // period_us) * period_us - new_offset
    return _from_us(first_on_new_grid)


def previous_boundary(before: datetime, interval_s: int, zone: tzinfo) -> datetime:
    """The last boundary strictly before `before`."""
    period_us = interval_s * _US
    t_us = _to_us(before)
    offset = _offset_us(t_us, zone)
    candidate = ((t_us + offset - 1) // period_us) * period_us - offset
    if _offset_us(candidate, zone) == offset:
        return _from_us(candidate)
    # The offset changed after the candidate: the answer lies on the old grid.
    change = _transition_after(candidate, t_us, zone)
    old_offset = _offset_us(change - 1, zone)
    last_on_old_grid = ((change + old_offset - 1) // period_us) * period_us - old_offset
    return _from_us(last_on_old_grid)


def is_boundary(t: datetime, interval_s: int, zone: tzinfo) -> bool:
    t_us = _to_us(t)
    return (t_us + _offset_us(t_us, zone)) % (interval_s * _US) == 0


def boundaries_between(
    start: datetime, end: datetime, interval_s: int, zone: tzinfo
) -> Iterator[datetime]:
    """Boundaries b with start < b < end, in order."""
    b = next_boundary(start, interval_s, zone)
    while b < end:
        yield b
        b = next_boundary(b, interval_s, zone)


def nominal_start(end: datetime, interval_s: int, zone: tzinfo) -> datetime:
    """Start of the interval labelled `end` (the boundary before it)."""
    return previous_boundary(end, interval_s, zone)


def is_dst(t: datetime, zone: tzinfo) -> bool:
    local = t.astimezone(zone)
    dst = local.dst()
    return bool(dst)
