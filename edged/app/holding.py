"""What the recorder holds in memory while the store refuses writes.

A full disk, a file system remounted read-only or an I/O error must not take
the daemon down: the boundary that failed to commit is kept here,
whole, later boundaries join it, and the lot is retried with backoff until
the store accepts writes again, then written in one transaction. Nothing is
published from memory: the outbox is still the one road to the broker, so a
record is never sent that a restart could lose or send under another seq.

Bounded: raw reads and fast-poll measurements (diagnostics, re-creatable
from the meters' own registers) are capped, oldest dropped first and counted;
interval records, channel states and events are the billing data and are
kept whole (a day of 1000 meters at 15 minutes is ~100 000 records, tens of
MB), and their count is in the gateway status.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

import structlog

from edged.core.backoff import Backoff
from edged.core.model import Measurement
from edged.io.store import StoreError


class Batch(Protocol):
    """What the recorder commits (edged.app.poller.Pending)."""

    reads: list[Any]
    intervals: list[Any]
    messages: list[Any]


B = TypeVar("B", bound=Batch)
log = structlog.get_logger("edged.app.holding")

# What a failing store raises: SQLite's errors (SQLITE_FULL, SQLITE_READONLY,
# SQLITE_IOERR ...), the OS's, and the store's own.
STORAGE_ERRORS = (sqlite3.Error, OSError, StoreError)
MAX_HELD_READS = 20_000
MAX_HELD_MEASUREMENTS = 20_000
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 30.0


def describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} ({exc.filename or 'store'})"
    return f"{type(exc).__name__}: {exc}"


class Holding(Generic[B]):
    def __init__(self, new_batch: Callable[[], B]) -> None:
        self._new_batch = new_batch
        self.error: str | None = None
        self.batch: B | None = None
        self.measurements: list[Measurement] = []
        self.dropped_reads = 0
        self.dropped_measurements = 0
        self.on_change: Callable[[str | None], None] | None = None
        # Public so a test can shorten it; the retries are what it checks.
        self.retry_backoff = Backoff(first_s=RETRY_FIRST_S, max_s=RETRY_MAX_S)
        self._retry_at = 0.0

    def retry_in_s(self) -> float | None:
        """Seconds until held data is due a retry; None when nothing is held."""
        if self.batch is None and not self.measurements:
            return None
        return max(0.0, self._retry_at - asyncio.get_running_loop().time())

    def take(self) -> B:
        """The held batch (to add new work to and commit), or a new one."""
        batch, self.batch = self.batch, None
        return batch if batch is not None else self._new_batch()

    def failed(self, batch: B, measurements: list[Measurement], exc: BaseException) -> None:
        self.batch = batch
        self.measurements = measurements
        if len(batch.reads) > MAX_HELD_READS:
            drop = len(batch.reads) - MAX_HELD_READS
            del batch.reads[:drop]
            self.dropped_reads += drop
        if len(measurements) > MAX_HELD_MEASUREMENTS:
            drop = len(measurements) - MAX_HELD_MEASUREMENTS
            del measurements[:drop]
            self.dropped_measurements += drop
        delay_s = self.retry_backoff.failed()
        self._retry_at = asyncio.get_running_loop().time() + delay_s
        text = describe(exc)
        first = self.error is None
        self.error = text
        if first:
            log.error("store write failed; holding data in memory and retrying",
                      error=text, retry_in_s=delay_s, **self.counts())  # fmt: skip
            if self.on_change is not None:
                self.on_change(text)
        else:
            log.warning("store still failing", error=text, retry_in_s=delay_s, **self.counts())

    def succeeded(self) -> None:
        self.retry_backoff.succeeded()
        if self.error is None:
            return
        log.info("store writable again; held data written", error_was=self.error)
        self.error = None
        if self.on_change is not None:
            self.on_change(None)

    def abandon(self) -> None:
        """Shutdown with the store still failing: say exactly what is lost."""
        if self.batch is not None or self.measurements:
            log.error("shutdown with the store failing: held data not written",
                      error=self.error, **self.counts())  # fmt: skip

    def counts(self) -> dict[str, Any]:
        batch = self.batch
        return {
            "held_intervals": len(batch.intervals) if batch else 0,
            "held_messages": len(batch.messages) if batch else 0,
            "held_reads": len(batch.reads) if batch else 0,
            "held_measurements": len(self.measurements),
            "dropped_reads": self.dropped_reads,
            "dropped_measurements": self.dropped_measurements,
        }
