"""edged.io.clockwatch: the kernel's word that the clock was set, instead of a poll.

Stepping the machine's CLOCK_REALTIME is not acceptable in a test (CI runs as
root, on a shared machine): the real timerfd is exercised with a timer that
simply expires and with the cancel-on-set arming (which must register and stay
quiet), and the clock-set path with a fake source whose fd is a pipe.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from collections.abc import Callable

import pytest

from edged.core.model import TimeState
from edged.core.time.settings import KernelSync, TimebaseConfig, TimeSource
from edged.core.time.transitions import TimeTransition, TransitionKind
from edged.io.clockwatch import (
    CLOCK_MONOTONIC,
    CLOCK_REALTIME,
    ClockSetWatch,
    ClockWasSet,
    TimerFd,
    open_clock_set_watch,
)
from edged.io.ntp import (
    KERNEL_CHECK_SYNCED_S,
    NtpReferenceClock,
    SystemReferenceClock,
)


class FakeTimerFd:
    """A pipe that reads like a timerfd: b"S" is the clock set (ECANCELED)."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self.armed = 0
        self.closed = False

    def fileno(self) -> int:
        return self.read_fd

    def arm_cancel_on_set(self) -> None:
        self.armed += 1

    def read(self) -> int:
        data = os.read(self.read_fd, 1)
        if data == b"S":
            raise ClockWasSet("set")
        if data == b"E":
            raise OSError(errno.EIO, "I/O error")
        return 1

    def set_clock(self) -> None:
        os.write(self.write_fd, b"S")

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)
        self.closed = True


async def until(predicate: Callable[[], bool], timeout_s: float = 2.0) -> None:
    async with asyncio.timeout(timeout_s):
        # A callback from the loop sets what is checked: no event to wait on.
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


async def test_a_real_timerfd_reads_its_expirations_through_the_loop() -> None:
    timer = TimerFd(CLOCK_MONOTONIC)
    try:
        assert timer.read() == 0  # not armed: nothing to read, and no blocking
        loop = asyncio.get_running_loop()
        readable: asyncio.Future[None] = loop.create_future()

        def on_readable() -> None:
            if not readable.done():
                readable.set_result(None)

        loop.add_reader(timer.fileno(), on_readable)
        try:
            timer.arm_after(0.02)
            await asyncio.wait_for(readable, 2.0)
        finally:
            loop.remove_reader(timer.fileno())
        assert timer.read() == 1
        assert timer.read() == 0
    finally:
        timer.close()
    with pytest.raises(ValueError, match="closed"):
        timer.fileno()


async def test_the_real_clock_set_watch_registers_and_stays_quiet() -> None:
    seen: list[None] = []
    watch = open_clock_set_watch(lambda: seen.append(None))
    assert watch is not None  # Linux: timerfd with TFD_TIMER_CANCEL_ON_SET works
    try:
        await asyncio.sleep(0.1)  # nobody sets the clock: no wake-up, no callback
        assert seen == []
    finally:
        watch.close()
    # And the arming itself, outside the watch: armed, not expired, nothing to read.
    timer = TimerFd(CLOCK_REALTIME)
    try:
        timer.arm_cancel_on_set()
        assert timer.read() == 0
    finally:
        timer.close()


async def test_each_clock_set_calls_back_and_rearms() -> None:
    fake = FakeTimerFd()
    seen: list[float] = []
    watch = ClockSetWatch(fake, lambda: seen.append(time.monotonic()))
    watch.start()
    assert fake.armed == 1
    fake.set_clock()
    await until(lambda: len(seen) == 1)
    assert fake.armed == 2  # armed again before the callback
    os.write(fake.write_fd, b"E")  # a failed read is logged, not fatal
    fake.set_clock()
    await until(lambda: len(seen) == 2)
    watch.close()
    assert fake.closed


class SteppableClock:
    def __init__(self) -> None:
        self.offset_s = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset_s


async def test_a_step_is_observed_when_the_kernel_says_so_not_at_the_next_poll() -> None:
    system = SteppableClock()
    fake = FakeTimerFd()
    watches: list[ClockSetWatch] = []

    def open_watch(on_set: Callable[[], None]) -> ClockSetWatch:
        watch = ClockSetWatch(fake, on_set)
        watch.start()
        watches.append(watch)
        return watch

    seen: list[TimeTransition] = []
    clock = NtpReferenceClock(
        ["127.0.0.1:9"],
        TimebaseConfig(poll_s=3600.0),
        system_now=system,
        on_transition=seen.append,
        query=lambda _spec, _timeout: None,
        clock_watch=open_watch,
    )
    assert clock.watched_by_kernel
    task = asyncio.create_task(clock._watch())
    try:
        await until(lambda: len(watches) == 1)
        await asyncio.sleep(0.05)  # the first observation; the safety poll is 10 s away
        seen.clear()
        system.offset_s = 3600.0  # someone sets the clock an hour forward
        fake.set_clock()
        await until(lambda: bool(seen), 1.0)
        (step,) = seen
        assert step.kind is TransitionKind.CLOCK_STEP
        assert step.system_step_s == pytest.approx(3600.0, abs=0.01)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert fake.closed  # the watch is closed with its task


def test_an_injected_system_clock_is_polled_not_watched() -> None:
    clock = NtpReferenceClock(["127.0.0.1:9"], system_now=SteppableClock())
    assert not clock.watched_by_kernel
    real = NtpReferenceClock(["127.0.0.1:9"])
    assert real.watched_by_kernel


def test_the_kernel_status_is_asked_less_often_once_synced() -> None:
    status = [KernelSync.UNSYNCED]
    clock = SystemReferenceClock(
        TimebaseConfig(source=TimeSource.SYSTEM), kernel_status=lambda: status[0]
    )
    assert clock.watched_by_kernel
    assert clock.kernel_check_interval_s() == 0.5  # assumed time, waiting for sync
    status[0] = KernelSync.SYNCED
    clock.check_kernel()
    assert clock.time_state is TimeState.SYNCED
    assert clock.kernel_check_interval_s() == KERNEL_CHECK_SYNCED_S == 10.0
    polled = SystemReferenceClock(
        TimebaseConfig(source=TimeSource.SYSTEM),
        kernel_status=lambda: KernelSync.SYNCED,
        clock_watch=None,
    )
    assert polled.time_state is TimeState.SYNCED
    assert polled.kernel_check_interval_s() == 0.5  # no timerfd: as before
