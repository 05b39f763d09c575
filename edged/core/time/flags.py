"""Flags that time events put on intervals (pure).

A time transition (AMT ended, clock step) happens at an instant; a gateway
outage spans a window. Each flags the interval of every device whose span
contains it: `flags_for(since, until)` answers for the interval a poller is
about to close, `since` being the end of its previous interval (or its
baseline read) and `until` its boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from edged.core.model import Flag

# Windows older than this are forgotten (longer than any interval).
KEEP = timedelta(days=2)


@dataclass(frozen=True, slots=True)
class FlagWindow:
    start: datetime
    end: datetime
    flags: frozenset[Flag]


@dataclass(slots=True)
class TimeFlags:
    windows: list[FlagWindow] = field(default_factory=list)

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
