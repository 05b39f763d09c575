"""The liveness mark in a small preallocated file, overwritten in place.

The daemon persists its reference time every few seconds so that, after a
power cut, the outage is known (POWER_FAIL) and a clock found behind the mark
is caught (assumed meter time; docs/time.md). Through SQLite each mark was a
commit: WAL frames, the WAL index and, at checkpoints, the database page
again, about 18 kB a mark, which on an eMMC or SD card is the bulk of a
gateway's idle writes. Here a mark is one 4 KiB block written with
`os.pwrite` and made durable with `os.fdatasync` (the file's size never
changes, so fdatasync has no metadata to write).

The file holds two 4 KiB slots written alternately; each carries a magic, a
sequence number, the mark and a CRC-32 of all that. A write torn by a power
cut leaves a slot whose CRC does not match: it is ignored, and the other slot
(the previous mark, one period older) is used. Both slots bad or no file (an
older edged wrote its marks to the store only): the caller falls back to the
store's mark.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from edged.core.model import iso_utc, parse_iso_utc

BLOCK_BYTES = 4096
SLOTS = 2
MAGIC = b"EDGEDLV1"
# magic, sequence, length of the mark's text; then the text; the CRC-32 of
# everything before it follows the text.
_HEADER = struct.Struct("<8sQH")
_CRC = struct.Struct("<I")
MAX_MARK_BYTES = BLOCK_BYTES - _HEADER.size - _CRC.size


def liveness_path(store_path: Path) -> Path:
    """The mark file beside the store (`edged.db` -> `edged.db-liveness`)."""
    return store_path.with_name(store_path.name + "-liveness")


def encode_slot(sequence: int, mark: datetime) -> bytes:
    """One slot: header, mark, CRC, zero padding to the block size."""
    text = iso_utc(mark).encode()
    if len(text) > MAX_MARK_BYTES:
        raise ValueError("liveness mark too long for its block")
    body = _HEADER.pack(MAGIC, sequence, len(text)) + text
    block = body + _CRC.pack(zlib.crc32(body))
    return block.ljust(BLOCK_BYTES, b"\0")


@dataclass(frozen=True, slots=True)
class SlotMark:
    sequence: int
    mark: datetime


def decode_slot(block: bytes) -> SlotMark | None:
    """The slot's mark, or None if it is empty, torn or not ours."""
    if len(block) < _HEADER.size + _CRC.size:
        return None
    magic, sequence, length = _HEADER.unpack_from(block)
    if magic != MAGIC or length > MAX_MARK_BYTES:
        return None
    end = _HEADER.size + length
    (crc,) = _CRC.unpack_from(block, end)
    if zlib.crc32(block[:end]) != crc:
        return None
    try:
        return SlotMark(sequence, parse_iso_utc(block[_HEADER.size : end].decode()))
    except ValueError:
        return None


def latest(blocks: list[bytes]) -> SlotMark | None:
    """The valid slot with the highest sequence number."""
    marks = [m for m in map(decode_slot, blocks) if m is not None]
    return max(marks, key=lambda m: m.sequence, default=None)


def read_mark(path: Path) -> datetime | None:
    """The last mark in the file; None if there is no file or no valid slot."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    blocks = [data[i * BLOCK_BYTES : (i + 1) * BLOCK_BYTES] for i in range(SLOTS)]
    found = latest(blocks)
    return None if found is None else found.mark


class LivenessFile:
    """The open mark file. `write` blocks (pwrite + fdatasync): call it off the loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            data = os.pread(fd, BLOCK_BYTES * SLOTS, 0)
            if len(data) < BLOCK_BYTES * SLOTS:
                # Preallocated once (a fresh file, or one cut short): every
                # later write overwrites a block in place, and the size never
                # changes again.
                os.ftruncate(fd, BLOCK_BYTES * SLOTS)
                os.fsync(fd)
                data = data.ljust(BLOCK_BYTES * SLOTS, b"\0")
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd
        # A write cancelled on the loop runs on in its thread: the next one
        # (the clean-shutdown mark) waits for it rather than racing for a slot.
        self._lock = threading.Lock()
        blocks = [data[i * BLOCK_BYTES : (i + 1) * BLOCK_BYTES] for i in range(SLOTS)]
        found = latest(blocks)
        self._sequence = found.sequence if found is not None else 0
        self.last: datetime | None = found.mark if found is not None else None

    def write(self, mark: datetime) -> None:
        """Persist `mark` in the slot not holding the latest one."""
        with self._lock:
            if self._fd is None:
                raise ValueError("liveness file closed")
            sequence = self._sequence + 1
            os.pwrite(self._fd, encode_slot(sequence, mark), (sequence % SLOTS) * BLOCK_BYTES)
            os.fdatasync(self._fd)
            self._sequence = sequence
            self.last = mark

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = None


class MarkWriter:
    """A thread of its own that writes a mark every `every_s`, on its own timer.

    Nothing passes between it and the event loop but a value it reads: a mark
    handed to `asyncio.to_thread` cost the loop a second wake-up for the
    result, and a thread woken by the loop while the loop still held the GIL
    switched again to wait for it (four or five context switches a mark, half
    of an idle daemon's). `mark()` says what to write, or None to skip (the
    app's says None when its loop has stopped ticking: a hung daemon is not
    alive). The timer runs `phase_s` after whole multiples of `every_s` on
    `monotonic`, off the loop's own ticks. A failed write is kept in `error`.
    """

    def __init__(
        self,
        file: LivenessFile,
        mark: Callable[[], datetime | None],
        *,
        every_s: float,
        phase_s: float = 0.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._file = file
        self._mark = mark
        self._every_s = every_s
        self._phase_s = phase_s
        self._monotonic = monotonic
        self._stop = threading.Event()
        self.error: str | None = None
        self.written = 0
        self._thread = threading.Thread(target=self._run, name="edged-liveness", daemon=True)
        self._thread.start()

    def take_error(self) -> str | None:
        error, self.error = self.error, None
        return error

    def _run(self) -> None:
        while True:
            mark = self._mark()
            if mark is not None:
                try:
                    self._file.write(mark)
                    self.written += 1
                except (OSError, ValueError) as exc:
                    self.error = str(exc)
            now_s = self._monotonic()
            wait_s = self._every_s - (now_s - self._phase_s) % self._every_s
            if self._stop.wait(wait_s):
                return

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)


def later_mark(*marks: datetime | None) -> datetime | None:
    """The latest of the marks found (file, store): after an upgrade only the
    store has one; after a downgrade and upgrade again the store's is newer."""
    found = [m for m in marks if m is not None]
    return max(found) if found else None
