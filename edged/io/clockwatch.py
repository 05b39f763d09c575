"""Told by the kernel when the system clock is set, instead of polling for it.

A Linux `timerfd` on CLOCK_REALTIME, armed at an absolute time that never
comes with TFD_TIMER_CANCEL_ON_SET, becomes readable when the clock is set
(settimeofday, clock_settime, an adjtimex step, chrony's or ntpd's step): its
read() then fails with ECANCELED, and the timer must be armed again. Slewing
the clock does not wake it, and need not: on Linux the monotonic clock is
slewed with the system clock, so only steps separate the two (see
`edged.core.time.steps`). This is what systemd uses for its time-change events.

Python 3.11 has no os.timerfd_create (3.13 has), so the calls go through
ctypes. Where timerfd is missing (not Linux, a seccomp filter) `open_clock_set_watch`
returns None and the reference clock polls as before.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import functools
import os
import struct
from collections.abc import Callable
from typing import Protocol

import structlog

from edged.core.errors import EdgedError

log = structlog.get_logger("edged.io.clockwatch")

CLOCK_REALTIME = 0
CLOCK_MONOTONIC = 1
TFD_CLOEXEC = os.O_CLOEXEC
TFD_NONBLOCK = os.O_NONBLOCK
TFD_TIMER_ABSTIME = 1
TFD_TIMER_CANCEL_ON_SET = 2
# The far future for an absolute timer that must never expire (systemd uses
# TIME_T_MAX the same way); time_t is a C long on Linux's 64- and 32-bit ABIs.
NEVER_S = 2 ** (8 * ctypes.sizeof(ctypes.c_long) - 1) - 1
_EXPIRATIONS = struct.Struct("=Q")


class ClockWatchError(EdgedError):
    """timerfd is not available here."""


class ClockWasSet(EdgedError):
    """The clock the timer counts on was set (read() failed with ECANCELED)."""


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


@functools.cache
def _load_libc() -> ctypes.CDLL:
    # The process's own symbols, libc's among them: no `ldconfig -p` subprocess
    # (ctypes.util.find_library) on the way.
    return ctypes.CDLL(None, use_errno=True)


class TimerFd:
    """A timerfd (non-blocking, close-on-exec) on `clock_id`."""

    def __init__(self, clock_id: int, libc: Callable[[], ctypes.CDLL] = _load_libc) -> None:
        try:
            self._libc = libc()
            create = self._libc.timerfd_create
        except (OSError, AttributeError) as exc:
            raise ClockWatchError(f"timerfd not available: {exc}") from exc
        fd = int(create(clock_id, TFD_NONBLOCK | TFD_CLOEXEC))
        if fd < 0:
            err = ctypes.get_errno()
            raise ClockWatchError(f"timerfd_create: {os.strerror(err)}")
        self._fd: int | None = fd

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError("timerfd closed")
        return self._fd

    def _settime(self, flags: int, value_s: int, value_ns: int = 0) -> None:
        spec = _Itimerspec()
        spec.it_value.tv_sec = value_s
        spec.it_value.tv_nsec = value_ns
        if int(self._libc.timerfd_settime(self.fileno(), flags, ctypes.byref(spec), None)) < 0:
            err = ctypes.get_errno()
            raise ClockWatchError(f"timerfd_settime: {os.strerror(err)}")

    def arm_cancel_on_set(self) -> None:
        """Wake (ECANCELED) when the clock is set, never by expiry."""
        self._settime(TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET, NEVER_S)

    def arm_after(self, delay_s: float) -> None:
        """An ordinary relative one-shot timer (what the tests use to see reads work)."""
        whole = int(delay_s)
        # An it_value of zero would disarm the timer: at least a nanosecond.
        nanos = max(round((delay_s - whole) * 1e9), 0 if whole else 1)
        self._settime(0, whole, nanos)

    def read(self) -> int:
        """Expirations since the last read (0: nothing yet); ClockWasSet if the
        clock was set."""
        try:
            data = os.read(self.fileno(), _EXPIRATIONS.size)
        except BlockingIOError:
            return 0
        except OSError as exc:
            if exc.errno == errno.ECANCELED:
                raise ClockWasSet("the clock was set") from exc
            raise
        return int(_EXPIRATIONS.unpack(data)[0])

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class ClockSetSource(Protocol):
    """What ClockSetWatch needs of a TimerFd (tests inject a fake)."""

    def fileno(self) -> int: ...
    def arm_cancel_on_set(self) -> None: ...
    def read(self) -> int: ...
    def close(self) -> None: ...


class ClockSetWatch:
    """Calls `on_set` on the loop each time the clock is set."""

    def __init__(self, source: ClockSetSource, on_set: Callable[[], None]) -> None:
        self._source = source
        self._on_set = on_set
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._source.arm_cancel_on_set()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._source.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            self._source.read()
        except ClockWasSet:
            # Armed again first, so a second step right after this one is seen.
            self._source.arm_cancel_on_set()
            self._on_set()
        except OSError as exc:  # not expected of a timerfd: say so, keep watching
            log.warning("clock watch read failed", error=str(exc))

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._source.fileno())
            self._loop = None
        self._source.close()


def open_clock_set_watch(on_set: Callable[[], None]) -> ClockSetWatch | None:
    """A started watch on CLOCK_REALTIME, or None where timerfd is unavailable."""
    try:
        source = TimerFd(CLOCK_REALTIME)
    except ClockWatchError as exc:
        log.info("no timerfd: the clock is polled for steps", reason=str(exc))
        return None
    watch = ClockSetWatch(source, on_set)
    try:
        watch.start()
    except (ClockWatchError, OSError) as exc:
        source.close()
        log.info("no timerfd: the clock is polled for steps", reason=str(exc))
        return None
    return watch
