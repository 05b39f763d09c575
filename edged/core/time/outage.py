"""Gateway outages: the span between the last liveness mark and a restart,
and the flags and events it gives (pure).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, tzinfo

from edged.core.schedule import boundaries_between, next_boundary
from edged.core.time.transitions import _utc

# -- gateway outage -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outage:
    """The gateway was down from `start` (last liveness mark) to `end` (restart).

    The mark is written every few seconds, so the true start is up to that
    resolution later; a boundary just after the mark may still have been read
    (the shell checks the store before marking it MISSING).
    """

    start: datetime
    end: datetime
    end_assumed: bool  # the clock was behind the mark: end is mark + AMT offset, a guess

    @property
    def duration_s(self) -> float:
        return (self.end - self.start).total_seconds()

    def missed_boundaries(self, interval_s: int, zone: tzinfo) -> tuple[datetime, ...]:
        """Boundaries nobody was up to read (MISSING), start < b < end."""
        return tuple(boundaries_between(self.start, self.end, interval_s, zone))

    def power_fail_intervals(self, interval_s: int, zone: tzinfo) -> tuple[datetime, ...]:
        """Ends (labels) of the intervals [b_prev, b) overlapping [start, end): POWER_FAIL."""
        labels: list[datetime] = []
        b = next_boundary(self.start, interval_s, zone)
        while True:
            labels.append(b)
            if b >= self.end:
                return tuple(labels)
            b = next_boundary(b, interval_s, zone)


def gateway_outage(
    last_mark: datetime | None, restart_system_time: datetime, *, amt_offset_s: float = 5.0
) -> Outage | None:
    """The outage between the last liveness mark and a restart.

    Pass the raw system clock at restart (not the reference, which in assumed
    time is already mark + 5 s). None on a first run (no mark).
    """
    if last_mark is None:
        return None
    if restart_system_time <= last_mark:
        return Outage(last_mark, _utc(last_mark.timestamp() + amt_offset_s), end_assumed=True)
    return Outage(last_mark, restart_system_time, end_assumed=False)
