"""The daemon's liveness mark: where it is kept, how often, and the last one.

The mark (the reference time, persisted while edged runs) bounds an outage
after a power cut (POWER_FAIL) and catches a clock found behind it at start-up
(assumed meter time); docs/time.md. It is written every `LIVENESS_EVERY_S` to
a two-slot file beside the store (`edged.io.liveness`: one 4 KiB block per
mark, fdatasync'd), not to SQLite, whose commit per mark was most of an idle
gateway's writes. The store still gets the mark at a clean stop, with the
clean-shutdown mark, so `edged status`, an older edged after a downgrade and
the clean-stop check all find it there. If the file cannot be opened or
written the mark goes to the store as before: durability first.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime

import structlog

from edged.app.holding import STORAGE_ERRORS
from edged.core.model import iso_utc, parse_iso_utc
from edged.io.liveness import LivenessFile, MarkWriter, later_mark, liveness_path
from edged.io.store import Store

log = structlog.get_logger("edged.app.liveness")

LIVENESS_MARK = "liveness"
# How often the mark is persisted: an outage of the gateway is known to within
# this. 10 s, not the 2 s of earlier versions: one 4 KiB block a mark is
# 1.5 MB an hour, 2 s would be 7.4 MB (docs/time.md says why 10 s is enough
# for POWER_FAIL and AMT).
LIVENESS_EVERY_S = 10.0


class Liveness:
    """The mark file (or, failing it, the store) and the loop that keeps it."""

    def __init__(
        self,
        store: Store,
        now: Callable[[], datetime],
        every_s: float = LIVENESS_EVERY_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._now = now
        self._monotonic = monotonic
        self.every_s = every_s
        # (reference - monotonic, monotonic when taken), refreshed by the loop
        # on each tick; the writer thread turns it into the mark.
        self._snapshot: tuple[float, float] | None = None
        self._file: LivenessFile | None = None
        self._writer: MarkWriter | None = None
        self._file_error: str | None = None
        try:
            self._file = LivenessFile(liveness_path(store.path))
        except (OSError, ValueError) as exc:
            self._file_error = str(exc)
            log.warning("liveness file not usable; the mark goes to the store",
                        path=str(liveness_path(store.path)), error=str(exc))  # fmt: skip

    @property
    def in_file(self) -> bool:
        return self._file is not None

    async def last(self) -> datetime | None:
        """The last mark persisted by any run: the later of the file's and the store's."""
        stored = await self._store.get_mark(LIVENESS_MARK)
        try:
            stored_at = parse_iso_utc(stored) if stored else None
        except ValueError:
            stored_at = None
        return later_mark(self._file.last if self._file else None, stored_at)

    async def write(self, mark: datetime) -> None:
        """Persist one mark; off the loop (fdatasync may take milliseconds on flash)."""
        file = self._file
        if file is not None:
            try:
                await asyncio.to_thread(file.write, mark)
                return
            except (OSError, ValueError) as exc:
                if self._file_error != str(exc):
                    log.warning("liveness mark not written to its file; using the store",
                                error=str(exc))  # fmt: skip
                self._file_error = str(exc)
        await self._store.set_mark(LIVENESS_MARK, iso_utc(mark))

    async def run(self) -> None:
        """The loop's side: every `every_s`, on whole multiples of it on the
        loop's clock (the clock's safety poll, edged.io.ntp, ticks on the same
        instants: one wake-up for both), the reference clock's offset from the
        monotonic clock for the writer thread, which writes the mark half a
        period later on its own timer."""
        loop = asyncio.get_running_loop()
        self._refresh()
        if self._file is not None and self._writer is None:
            self._writer = MarkWriter(
                self._file, self.mark_now, every_s=self.every_s,
                phase_s=self.every_s / 2, monotonic=self._monotonic,
            )  # fmt: skip
        try:
            while True:
                try:
                    await self._tick()
                except STORAGE_ERRORS as exc:
                    # The recorder reports the failing store; the mark is retried.
                    log.debug("liveness mark not written", error=str(exc))
                await asyncio.sleep(self.every_s - loop.time() % self.every_s)
                self._refresh()
        finally:
            if self._writer is not None:
                self._writer.stop()
                self._writer = None

    def _refresh(self) -> None:
        now = self._now()
        mono_s = self._monotonic()
        self._snapshot = (now.timestamp() - mono_s, mono_s)

    def mark_now(self) -> datetime | None:
        """The mark, from any thread: the reference time from the loop's last
        snapshot, or None if the loop has not refreshed it for two periods
        (a stuck loop is not a live daemon: the marks stop, as they did when
        the loop wrote them)."""
        snapshot = self._snapshot  # one read of one attribute: atomic
        if snapshot is None:
            return None
        offset_s, taken_s = snapshot
        mono_s = self._monotonic()
        if mono_s - taken_s > 2 * self.every_s:
            return None
        return datetime.fromtimestamp(mono_s + offset_s, UTC)

    async def _tick(self) -> None:
        writer = self._writer
        if writer is None:
            await self._store.set_mark(LIVENESS_MARK, iso_utc(self._now()))
            return
        if (error := writer.take_error()) is not None:
            # A write failed: this mark goes to the store; the thread keeps
            # trying the file.
            if self._file_error != error:
                log.warning("liveness mark not written to its file; using the store",
                            error=error)  # fmt: skip
            self._file_error = error
            await self._store.set_mark(LIVENESS_MARK, iso_utc(self._now()))

    async def final(self, mark: datetime) -> None:
        """At a clean stop: the mark in the file and in the store (the store's
        beside the clean-shutdown mark, which the next start compares with)."""
        if self._file is not None:
            try:
                await asyncio.to_thread(self._file.write, mark)
            except (OSError, ValueError) as exc:
                log.warning("last liveness mark not written to its file", error=str(exc))
        await self._store.set_mark(LIVENESS_MARK, iso_utc(mark))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
