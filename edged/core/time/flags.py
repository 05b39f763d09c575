"""Flags that time events put on intervals (pure).

A time transition (AMT ended, clock step) happens at an instant; a gateway
outage spans a window.

An instant belongs to the record that is open when it happens, in the order
things happened: `add_event(mono_s, flags)` files it under the monotonic time
at which it happened and `events_between(since_mono, until_mono)` answers for
the record a poller is about to close (its previous read, its read now).
Looking it up by reference time would be wrong exactly when it matters: a
step moves the reference, so a backward step accepted just after a boundary
would fall before the record it happened in.

A gateway outage is known only in reference time (from the last liveness
mark to the restart; the monotonic clock restarts with the machine):
`flags_for(since, until)` and `windows_between` answer for those windows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from edged.core.model import Flag

# Windows older than this are forgotten (longer than any interval).
KEEP = timedelta(days=2)
KEEP_S = KEEP.total_seconds()


@dataclass(frozen=True, slots=True)
class FlagWindow:
    start: datetime
    end: datetime
    flags: frozenset[Flag]


@dataclass(frozen=True, slots=True)
class FlagEvent:
    mono_s: float  # monotonic time at which it happened
    flags: frozenset[Flag]


@dataclass(slots=True)
class TimeFlags:
    windows: list[FlagWindow] = field(default_factory=list)
    events: list[FlagEvent] = field(default_factory=list)

    def add_event(self, mono_s: float, flags: frozenset[Flag]) -> None:
        """An instant's flags, for the record open at monotonic time mono_s."""
        if flags:
            self.events.append(FlagEvent(mono_s, flags))
            newest = max(e.mono_s for e in self.events)
            self.events = [e for e in self.events if newest - e.mono_s < KEEP_S]

    def events_between(self, since_mono: float | None, until_mono: float) -> frozenset[Flag]:
        """Flags of the instants with since_mono < mono_s <= until_mono."""
        found: set[Flag] = set()
        for event in self.events:
            if (since_mono is None or event.mono_s > since_mono) and event.mono_s <= until_mono:
                found |= event.flags
        return frozenset(found)

    def windows_between(
        self, since: datetime | None, until: datetime
    ) -> tuple[tuple[datetime, datetime], ...]:
        """(start, end) of every window overlapping (since, until]."""
        return tuple(
            (w.start, w.end)
            for w in self.windows
            if w.start <= until and (since is None or w.end > since)
        )

    def add(self, start: datetime, end: datetime, flags: frozenset[Flag]) -> None:
        if flags:
            self.windows.append(FlagWindow(start, end, flags))
            newest = max(w.end for w in self.windows)
            self.windows = [w for w in self.windows if newest - w.end < KEEP]

    def flags_for(self, since: datetime | None, until: datetime) -> frozenset[Flag]:
        """Flags of every window that overlaps the interval (since, until]."""
        found: set[Flag] = set()
        for window in self.windows:
            if window.start <= until and (since is None or window.end > since):
                found |= window.flags
        return frozenset(found)
