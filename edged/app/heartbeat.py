"""Heartbeats: where a long-lived loop is, so a watchdog can tell hung from idle.

A poller waiting 15 minutes for its next boundary is idle, not hung; one
whose boundary passed minutes ago without a read, or whose read has been in
flight for minutes, is hung (every Modbus transaction is bounded by its
timeout and a guard, so a healthy read cannot take that long). Each loop
says what it is waiting for or busy with; `Heartbeat.stall` judges it (pure:
the times are arguments).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

# A loop this far past what it was waiting for, or busy this long, is stalled.
# Far above any healthy read: a boundary read is a few transactions of at most
# `timeout` + 0.5 s each, queued behind the other devices on its line, and a
# dead unit is backed off after one timeout.
STALL_AFTER_S = 120.0


@dataclass(slots=True, kw_only=True)
class Heartbeat:
    name: str
    due_at: datetime | None = None  # waiting for this reference instant (a boundary)
    due_mono_s: float | None = None  # or for this monotonic instant (a fast-poll tick)
    busy_since_s: float | None = None  # monotonic (event loop time) start of the work in flight

    def waiting_for(self, at: datetime) -> None:
        self.due_at, self.due_mono_s, self.busy_since_s = at, None, None

    def waiting_until(self, mono_s: float) -> None:
        self.due_at, self.due_mono_s, self.busy_since_s = None, mono_s, None

    def busy(self, mono_s: float) -> None:
        self.due_at, self.due_mono_s, self.busy_since_s = None, None, mono_s

    def idle(self) -> None:
        """Nothing due (a queue consumer waiting for work)."""
        self.due_at, self.due_mono_s, self.busy_since_s = None, None, None

    def stall(self, now: datetime, mono_s: float, limit_s: float = STALL_AFTER_S) -> str | None:
        """Why this loop looks hung at `now` / `mono_s`, or None.

        Boundaries are compared on the reference clock, so a clock step that
        moves a boundary later does not look like a stall."""
        if self.busy_since_s is not None and mono_s - self.busy_since_s > limit_s:
            return f"{self.name}: busy for {mono_s - self.busy_since_s:.0f} s"
        if self.due_at is not None:
            late_s = (now - self.due_at).total_seconds()
            if late_s > limit_s:
                return f"{self.name}: {late_s:.0f} s past its boundary without reading"
        if self.due_mono_s is not None and mono_s - self.due_mono_s > limit_s:
            return f"{self.name}: {mono_s - self.due_mono_s:.0f} s past its next poll"
        return None
