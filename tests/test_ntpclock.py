"""Tests for edged.io.ntp: reference clocks against a real NTP server on loopback.

The system clock is injected (`system_now`), so a skewed or stepped system
clock is simulated without touching globals; the NTP server is
`edged.sim.ntp.NtpServer` on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import ctypes
import threading
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from edged.core.model import Flag, TimeState
from edged.core.time.ntpfit import NtpSample
from edged.core.time.settings import (
    Direction,
    KernelSync,
    TimebaseConfig,
    TimeSource,
)
from edged.core.time.transitions import (
    TimeTransition,
    TransitionKind,
)
from edged.io.clock import Clock, sleep_until_reference
from edged.io.ntp import (
    STA_UNSYNC,
    TIME_ERROR,
    NtpReferenceClock,
    SystemReferenceClock,
    interpret_adjtimex,
    kernel_sync_status,
    parse_server,
)
from edged.sim.ntp import NtpServer

# Fast polling so each test settles in about a second.
FAST = TimebaseConfig(poll_s=0.2, holdover_after_s=0.6)


@pytest.fixture
async def ntp_server() -> AsyncIterator[tuple[NtpServer, str]]:
    server = NtpServer(offset_s=3.0)
    port = await server.start("127.0.0.1", 0)
    try:
        yield server, f"127.0.0.1:{port}"
    finally:
        await server.stop()


async def wait_for_state(
    clock: NtpReferenceClock | SystemReferenceClock, state: TimeState, timeout_s: float = 3.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while clock.time_state is not state:
        assert time.monotonic() < deadline, f"still {clock.time_state}, wanted {state}"
        await asyncio.sleep(0.02)


def drain(queue: asyncio.Queue[TimeTransition]) -> list[TimeTransition]:
    out: list[TimeTransition] = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out


async def cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# -- NTP ------------------------------------------------------------------------------


@pytest.mark.integration
async def test_converges_to_a_server_3s_ahead(ntp_server: tuple[NtpServer, str]) -> None:
    _, spec = ntp_server
    clock = NtpReferenceClock([spec], FAST, timeout_s=0.5, observe_interval_s=0.05)
    assert clock.time_state is TimeState.ASSUMED
    task = asyncio.create_task(clock.run())
    try:
        await wait_for_state(clock, TimeState.SYNCED)
        error_s = (clock.now() - datetime.now(UTC)).total_seconds() - 3.0
        assert abs(error_s) < 0.05
        transitions = drain(clock.transitions)
        adjusted = transitions[0]
        assert adjusted.kind is TransitionKind.TIME_ADJUSTED
        assert adjusted.stepped
        assert adjusted.direction is Direction.FORWARD
        assert adjusted.adjustment_s == pytest.approx(3.0, abs=0.05)
        assert adjusted.flags == {Flag.TIME_ADJUSTED, Flag.CLOCK_SET_FORWARD}
        status = clock.status()
        assert status.state is TimeState.SYNCED
        assert status.applied_offset_s == pytest.approx(3.0, abs=0.05)
        # Usable as the daemon's Clock: boundary waits run on reference time.
        as_clock: Clock = clock
        target = as_clock.now() + timedelta(milliseconds=100)
        lateness_ms = await sleep_until_reference(as_clock, target)
        assert 0 <= lateness_ms < 50
        assert as_clock.now() >= target
        assert status.last_confirmed_age_s is not None
        assert status.last_confirmed_age_s < 1.0
    finally:
        await cancel(task)


@pytest.mark.integration
async def test_skewed_injected_system_clock_is_corrected(
    ntp_server: tuple[NtpServer, str],
) -> None:
    server, spec = ntp_server
    server.offset_s = 0.0
    skew_s = [-7.0]

    def system_now() -> float:
        return time.time() + skew_s[0]

    clock = NtpReferenceClock(
        [spec], FAST, timeout_s=0.5, system_now=system_now, observe_interval_s=0.05
    )
    task = asyncio.create_task(clock.run())
    try:
        await wait_for_state(clock, TimeState.SYNCED)
        assert abs((clock.now() - datetime.now(UTC)).total_seconds()) < 0.05
        assert clock.status().applied_offset_s == pytest.approx(7.0, abs=0.05)
        drain(clock.transitions)
        # Someone steps the (injected) system clock by an hour: compensated.
        skew_s[0] += 3600.0
        assert abs((clock.now() - datetime.now(UTC)).total_seconds()) < 0.05
        (step,) = drain(clock.transitions)
        assert step.kind is TransitionKind.CLOCK_STEP
        assert step.system_step_s == pytest.approx(3600.0, abs=0.01)
        assert not step.stepped
        await asyncio.sleep(0.5)  # a few more polls agree with the compensated model
        assert abs((clock.now() - datetime.now(UTC)).total_seconds()) < 0.05
        assert clock.time_state is TimeState.SYNCED
    finally:
        await cancel(task)


@pytest.mark.integration
async def test_unreachable_server_stays_assumed(ntp_server: tuple[NtpServer, str]) -> None:
    server, spec = ntp_server
    server.unreachable = True
    clock = NtpReferenceClock([spec], FAST, timeout_s=0.2, observe_interval_s=0.05)
    task = asyncio.create_task(clock.run())
    try:
        await asyncio.sleep(1.0)
        assert clock.time_state is TimeState.ASSUMED
        status = clock.status()
        assert status.last_confirmed_age_s is None
        assert status.target_offset_s is None
        assert drain(clock.transitions) == []
        # The system clock is used as it is, but it is not trusted.
        assert abs((clock.now() - datetime.now(UTC)).total_seconds()) < 0.01
        assert server.dropped >= 2
    finally:
        await cancel(task)


@pytest.mark.integration
async def test_unsynchronised_server_is_not_trusted(ntp_server: tuple[NtpServer, str]) -> None:
    server, spec = ntp_server
    server.unsynced = True
    clock = NtpReferenceClock([spec], FAST, timeout_s=0.2)
    await clock.poll_once()
    assert clock.time_state is TimeState.ASSUMED
    assert server.answered == 1


@pytest.mark.integration
async def test_server_going_silent_is_holdover(ntp_server: tuple[NtpServer, str]) -> None:
    server, spec = ntp_server
    seen: list[TimeTransition] = []
    clock = NtpReferenceClock(
        [spec], FAST, timeout_s=0.2, observe_interval_s=0.05, on_transition=seen.append
    )
    task = asyncio.create_task(clock.run())
    try:
        await wait_for_state(clock, TimeState.SYNCED)
        server.unreachable = True
        await wait_for_state(clock, TimeState.HOLDOVER)
        holdover = seen[-1]
        assert holdover.kind is TransitionKind.STATE_CHANGED
        assert holdover.state is TimeState.HOLDOVER
        # Still on the model: 3 s ahead.
        error_s = (clock.now() - datetime.now(UTC)).total_seconds() - 3.0
        assert abs(error_s) < 0.05
        server.unreachable = False
        await wait_for_state(clock, TimeState.SYNCED)
    finally:
        await cancel(task)


async def test_queries_run_off_the_event_loop() -> None:
    """Both servers are queried at once, in worker threads, while the loop runs
    on: each blocking query waits at a barrier for the other (sequential
    queries would never meet there) and then for the loop to tick 15 times."""
    calls: list[str] = []
    problems: list[BaseException] = []
    both_in_flight = threading.Barrier(2, timeout=30)
    loop_ran = threading.Event()

    def slow_query(spec: str, timeout_s: float) -> NtpSample | None:
        calls.append(threading.current_thread().name)
        try:
            both_in_flight.wait()  # a blocking socket wait, concurrently with the other
            if not loop_ran.wait(30):
                raise AssertionError("the event loop did not run during the query")
        except BaseException as exc:  # the clock swallows query errors: keep them
            problems.append(exc)
        return None

    clock = NtpReferenceClock(["a.example", "b.example:1123"], FAST, query=slow_query)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            if ticks >= 15:
                loop_ran.set()
            await asyncio.sleep(0.01)

    tick_task = asyncio.create_task(ticker())
    await clock.poll_once()
    tick_task.cancel()
    assert problems == []  # both servers queried concurrently
    assert ticks >= 15  # the loop kept running meanwhile
    assert len(calls) == 2
    assert threading.main_thread().name not in calls


@pytest.mark.looptime
async def test_poll_schedule_holdover_and_recovery_on_virtual_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The poll and watch loops on virtual time, with every clock injected: polls
    every poll_s (2 s) on an absolute schedule; the server falls silent after
    the poll at 4 s, so confirmation is 9 s old (> holdover_after 8 s) at the
    watch's observation at 13 s, not before; it answers again from 15 s and the
    poll at 16 s re-syncs. The reference stays 3 s ahead throughout."""

    async def on_the_loop(func: Callable[..., Any], /, *args: Any) -> Any:
        return func(*args)

    # The fake query answers at once: run it on the loop, so virtual time can
    # never move while a query is in flight.
    monkeypatch.setattr(asyncio, "to_thread", on_the_loop)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    epoch_s = 1_795_000_000.0  # the (injected) system clock at t0
    answering = [True]
    asked: list[float] = []

    def query(spec: str, timeout_s: float) -> NtpSample | None:
        at = loop.time()
        asked.append(round(at - t0, 6))
        if not answering[0]:
            return None
        return NtpSample(server=spec, mono_s=at, offset_s=3.0, delay_s=0.002, stratum=2)

    states: list[tuple[float, TimeState]] = []
    changed = asyncio.Event()

    def on_transition(transition: TimeTransition) -> None:
        if transition.kind is TransitionKind.STATE_CHANGED:
            states.append((round(loop.time() - t0, 6), transition.state))
            changed.set()

    async def until_state(state: TimeState) -> None:
        while not states or states[-1][1] is not state:
            changed.clear()
            await changed.wait()

    def ahead_s() -> float:
        return clock.now().timestamp() - (epoch_s + loop.time() - t0)

    clock = NtpReferenceClock(
        ["ntp.test"],
        TimebaseConfig(poll_s=2.0, holdover_after_s=8.0),
        system_now=lambda: epoch_s + loop.time() - t0,
        monotonic=loop.time,
        observe_interval_s=1.0,
        query=query,
        on_transition=on_transition,
    )
    task = asyncio.create_task(clock.run())
    try:
        await until_state(TimeState.SYNCED)
        assert ahead_s() == pytest.approx(3.0, abs=1e-6)
        await asyncio.sleep(5.0 - (loop.time() - t0))
        answering[0] = False
        await until_state(TimeState.HOLDOVER)
        assert ahead_s() == pytest.approx(3.0, abs=1e-6)  # still on the model
        await asyncio.sleep(15.0 - (loop.time() - t0))
        answering[0] = True
        await until_state(TimeState.SYNCED)
    finally:
        await cancel(task)
    assert states == [(0.0, TimeState.SYNCED), (13.0, TimeState.HOLDOVER),
                      (16.0, TimeState.SYNCED)]  # fmt: skip
    assert asked == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0]


@pytest.mark.integration
async def test_a_failing_query_does_not_end_the_round(
    ntp_server: tuple[NtpServer, str],
) -> None:
    _, spec = ntp_server
    clock = NtpReferenceClock([spec, "127.0.0.1:1"], FAST, timeout_s=0.3)
    transitions = await clock.poll_once()
    assert [t.kind for t in transitions] == [
        TransitionKind.TIME_ADJUSTED,
        TransitionKind.STATE_CHANGED,
    ]


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="empty"):
        NtpReferenceClock([])
    with pytest.raises(ValueError, match="invalid literal"):
        NtpReferenceClock(["host:port"])
    with pytest.raises(ValueError, match="source ntp"):
        NtpReferenceClock(["a"], TimebaseConfig(source=TimeSource.SYSTEM))
    with pytest.raises(ValueError, match="source system"):
        SystemReferenceClock(TimebaseConfig())


def test_a_failing_callback_does_not_break_now() -> None:
    def explode(transition: TimeTransition) -> None:
        raise RuntimeError("listener bug")

    step = [0.0]
    clock = SystemReferenceClock(
        system_now=lambda: time.time() + step[0],
        kernel_status=lambda: KernelSync.SYNCED,
        on_transition=explode,
    )
    clock.now()
    step[0] = 10.0
    before_s = time.time()
    assert abs(clock.now().timestamp() - before_s - 10.0) < 0.01
    assert [t.kind for t in drain(clock.transitions)] == [TransitionKind.CLOCK_STEP]


def test_parse_server() -> None:
    assert parse_server("pool.ntp.org") == ("pool.ntp.org", 123)
    assert parse_server("10.0.0.1:1123") == ("10.0.0.1", 1123)
    assert parse_server("[2001:db8::1]:124") == ("2001:db8::1", 124)
    assert parse_server("[2001:db8::1]") == ("2001:db8::1", 123)
    assert parse_server("2001:db8::1") == ("2001:db8::1", 123)


# -- source system ----------------------------------------------------------------------


async def test_system_clock_amt_then_clock_set() -> None:
    mark = datetime(2026, 11, 21, 0, 14, 58, tzinfo=UTC)
    base_s = datetime(2000, 1, 1, tzinfo=UTC).timestamp()  # dead RTC battery
    mono_0 = time.monotonic()
    set_by_s = [0.0]
    kernel = [KernelSync.UNSYNCED]

    def system_now() -> float:
        return base_s + (time.monotonic() - mono_0) + set_by_s[0]

    clock = SystemReferenceClock(
        last_mark=mark,
        system_now=system_now,
        kernel_status=lambda: kernel[0],
        observe_interval_s=0.02,
    )
    (entered,) = drain(clock.transitions)
    assert entered.kind is TransitionKind.AMT_ENTERED
    assert entered.to_event().kind == "amt_entered"
    assert clock.time_state is TimeState.ASSUMED
    assumed = clock.now() - (mark + timedelta(seconds=5))
    assert timedelta(0) <= assumed < timedelta(milliseconds=50)

    task = asyncio.create_task(clock.run())
    try:
        await asyncio.sleep(0.1)
        assert drain(clock.transitions) == []
        # chrony steps the clock to true time and reports sync.
        true_now = datetime(2026, 11, 21, 0, 20, tzinfo=UTC).timestamp()
        set_by_s[0] = true_now - system_now()
        kernel[0] = KernelSync.SYNCED
        await wait_for_state(clock, TimeState.SYNCED)
        transitions = drain(clock.transitions)
        adjusted = transitions[0]
        assert adjusted.kind is TransitionKind.TIME_ADJUSTED
        assert adjusted.direction is Direction.FORWARD
        assert adjusted.adjustment_s == pytest.approx(true_now - mark.timestamp() - 5, abs=0.5)
        assert abs(clock.now().timestamp() - system_now()) < 1e-3
        kernel[0] = KernelSync.UNSYNCED
        await wait_for_state(clock, TimeState.HOLDOVER)
    finally:
        await cancel(task)


# -- kernel status ------------------------------------------------------------------------


def test_interpret_adjtimex() -> None:
    assert interpret_adjtimex(0, 0) is KernelSync.SYNCED
    assert interpret_adjtimex(1, 0x2001) is KernelSync.SYNCED  # leap insert pending
    assert interpret_adjtimex(TIME_ERROR, 0) is KernelSync.UNSYNCED
    assert interpret_adjtimex(0, STA_UNSYNC) is KernelSync.UNSYNCED
    assert interpret_adjtimex(-1, 0) is KernelSync.UNKNOWN


@pytest.mark.integration
def test_kernel_sync_status_never_raises() -> None:
    assert kernel_sync_status() in set(KernelSync)

    def broken() -> ctypes.CDLL:
        raise OSError("no libc here")

    assert kernel_sync_status(broken) is KernelSync.UNKNOWN

    class NoAdjtimex:
        def __getattr__(self, name: str) -> Callable[..., int]:
            raise AttributeError(name)

    assert kernel_sync_status(lambda: NoAdjtimex()) is KernelSync.UNKNOWN  # type: ignore[arg-type,return-value]
