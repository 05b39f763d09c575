"""What a poller decides about the time of a boundary read (pure).

Between two boundary reads of a device the poller remembers when the previous
one was taken, in reference time (for gateway outages, which are known only
in reference time) and in monotonic time (for time events, which belong to
the record open when they happen, in the order they happened). At each read
it

* labels the read with the boundary the reference clock is in when the
  request goes out: normally the boundary it aimed at, but after a forward
  step of the reference the one the clock jumped to (a read taken at 00:05.5
  after a 5 s step is not the 00:00 read: 00:00..00:04 are MISSING and the
  read closes 00:05);
* collects the flags of the time events since the previous read and the
  outage windows the record overlaps;
* hands the engine the monotonic time of the read (`Read.mono_s`), so the
  engine measures the real elapsed time of every record.

The poller (edged.app.poller) and the deterministic simulation
(tests/test_time_simulation.py) share this code.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, tzinfo

from edged.core.model import Flag
from edged.core.schedule import is_boundary, previous_boundary
from edged.core.time.flags import TimeFlags


def boundary_at_or_before(t: datetime, interval_s: int, zone: tzinfo) -> datetime:
    return t if is_boundary(t, interval_s, zone) else previous_boundary(t, interval_s, zone)


def label_read(aimed: datetime, read_at: datetime, interval_s: int, zone: tzinfo) -> datetime:
    """The boundary a read aimed at `aimed` and sent at `read_at` belongs to."""
    return max(aimed, boundary_at_or_before(read_at, interval_s, zone))


@dataclass(frozen=True, slots=True)
class ReadTime:
    """The time facts of one boundary read."""

    boundary: datetime
    flags: frozenset[Flag]
    outages: tuple[tuple[datetime, datetime], ...]


@dataclass(slots=True, kw_only=True)
class ReadTiming:
    """A poller's memory of its previous read (see the module docstring)."""

    interval_s: int
    zone: tzinfo
    since: datetime | None  # reference time of the previous read (or a counter's time)
    mono_since: float | None  # monotonic time of the previous read (or the poller's start)

    def baseline(self, read_at: datetime, mono_s: float) -> None:
        """A start-up read: time events before it belong to the first record."""
        if self.since is None:
            self.since = read_at

    def boundary_read(
        self,
        aimed: datetime,
        read_at: datetime,
        mono_s: float,
        time_flags: TimeFlags,
        woke_at: datetime | None = None,
    ) -> ReadTime:
        """`woke_at`: the reference time when the poller woke for the read
        (before any wait for a shared bus), which labels it; default read_at."""
        label_at = read_at if woke_at is None else woke_at
        boundary = label_read(aimed, label_at, self.interval_s, self.zone)
        flags = time_flags.flags_for(self.since, read_at) | time_flags.events_between(
            self.mono_since, mono_s
        )
        outages = time_flags.windows_between(self.since, read_at)
        self.since = read_at
        self.mono_since = mono_s
        return ReadTime(boundary, flags, outages)
