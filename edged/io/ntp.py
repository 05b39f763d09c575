"""Reference clocks for the shell: NTP (`time.source: ntp`) and kernel (`system`).

Both implement `edged.io.clock.Clock` over the pure `edged.core.time.timebase.Timebase`:
they read the system and monotonic clocks (injectable, so tests can skew or
step the system clock without touching globals), feed the readings, NTP poll
rounds and the kernel's sync status to the timebase, and hand its transitions
on through an asyncio queue and an optional callback.

edged never sets the system clock; it only corrects its own reference.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import functools
import socket
import time
from collections.abc import Callable, Sequence
from datetime import datetime

import ntplib
import structlog

from edged.core.model import TimeState
from edged.core.time.ntpfit import NtpSample
from edged.core.time.settings import (
    KernelSync,
    TimebaseConfig,
    TimeSource,
)
from edged.core.time.timebase import Timebase
from edged.core.time.transitions import (
    TimebaseStatus,
    TimeTransition,
)
from edged.io.bootid import kernel_boot_id
from edged.io.clockwatch import ClockSetWatch, open_clock_set_watch

log = structlog.get_logger("edged.io.ntp")

NTP_PORT = 123
NTP_VERSION = 4
# Reading the system clock between two monotonic readings: if the pair is
# further apart than this (preempted in between) the reading is retried, so a
# scheduling hiccup is not mistaken for a clock step.
READ_BRACKET_S = 0.001
READ_ATTEMPTS = 3
TRANSITION_QUEUE_SIZE = 256
# With the kernel telling us when the clock is set (edged.io.clockwatch), the
# clocks are still observed this often: holdover is timed on observations
# (every reading a poller takes observes too, so no record misses it; this
# bounds how late a holdover transition is published between boundaries).
SAFETY_OBSERVE_S = 10.0
# source system: the kernel's sync status is asked this often while it says
# synced (a loss of sync is reported within this), and every
# observe_interval_s otherwise, so that sync, ending assumed time, is seen at once.
KERNEL_CHECK_SYNCED_S = 10.0

# Opens the clock-set watch: on_set -> a started watch, or None (poll instead).
OpenClockWatch = Callable[[Callable[[], None]], ClockSetWatch | None]


# -- kernel sync status -------------------------------------------------------------

# adjtimex(2) return value and status bit (linux/timex.h).
TIME_ERROR = 5
STA_UNSYNC = 0x0040


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class _Timex(ctypes.Structure):
    """struct timex (glibc and musl, 32- and 64-bit: every field is int or long)."""

    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time", _Timeval),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        # The kernel reserves 11 ints; extra room guards against a libc that
        # writes more than we declared.
        ("_reserved", ctypes.c_int * 32),
    ]


def interpret_adjtimex(result: int, status: int) -> KernelSync:
    """adjtimex's return value and status word -> sync state."""
    if result < 0:
        return KernelSync.UNKNOWN
    if result == TIME_ERROR or status & STA_UNSYNC:
        return KernelSync.UNSYNCED
    return KernelSync.SYNCED


@functools.cache
def _load_libc() -> ctypes.CDLL:
    # Cached: find_library runs `ldconfig -p` in a subprocess, and the kernel
    # status is checked twice a second (it was most of edged's idle CPU).
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def kernel_sync_status(load_libc: Callable[[], ctypes.CDLL] = _load_libc) -> KernelSync:
    """Ask the kernel whether something (chrony, ntpd, GPS, PTP) disciplines
    the clock. Read-only (modes = 0), needs no privilege, never raises."""
    try:
        libc = load_libc()
        timex = _Timex()
        timex.modes = 0
        result = int(libc.adjtimex(ctypes.byref(timex)))
        return interpret_adjtimex(result, int(timex.status))
    except Exception:  # not Linux, no libc, no adjtimex: no opinion
        return KernelSync.UNKNOWN


# -- NTP queries ---------------------------------------------------------------------


def parse_server(spec: str) -> tuple[str, int]:
    """'host', 'host:port', '[v6addr]:port' or a bare IPv6 address -> (host, port)."""
    spec = spec.strip()
    if not spec:
        raise ValueError("empty NTP server")
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        port = rest.removeprefix(":")
        return host, int(port) if port else NTP_PORT
    if spec.count(":") == 1:
        host, port = spec.split(":")
        return host, int(port)
    return spec, NTP_PORT


# One exchange: (server spec, timeout) -> sample or None. Injectable for tests.
NtpQuery = Callable[[str, float], NtpSample | None]


class _ReferenceClockBase:
    """`Clock` over a Timebase: readings, transitions, the watch loop."""

    def __init__(
        self,
        timebase: Timebase,
        *,
        system_now: Callable[[], float],
        monotonic: Callable[[], float],
        on_transition: Callable[[TimeTransition], None] | None,
        observe_interval_s: float,
        clock_watch: OpenClockWatch | None,
    ) -> None:
        self._timebase = timebase
        self._system_now = system_now
        self._monotonic = monotonic
        # The boot the monotonic clock counts from, when it is the system's.
        self.boot_id = kernel_boot_id() if monotonic is time.monotonic else None
        self._on_transition = on_transition
        self._observe_interval_s = observe_interval_s
        # The kernel can only tell us about the real system clock: an injected
        # one is polled, unless the watch is injected with it (tests).
        real = system_now is time.time or clock_watch is not open_clock_set_watch
        self._open_watch = clock_watch if real else None
        self._transitions: asyncio.Queue[TimeTransition] = asyncio.Queue(TRANSITION_QUEUE_SIZE)

    # -- Clock protocol -----------------------------------------------------------------

    def now(self) -> datetime:
        # Step detection runs on every reading, so a reference read right
        # after a system clock step is already compensated.
        system_s, mono_s = self._read()
        self._emit(self._timebase.observe_clock(system_s, mono_s))
        return self._timebase.reference(system_s, mono_s)

    def monotonic(self) -> float:
        return self._monotonic()

    @property
    def time_state(self) -> TimeState:
        return self._timebase.state

    # -- extras ---------------------------------------------------------------------------

    @property
    def transitions(self) -> asyncio.Queue[TimeTransition]:
        """Transitions in order; bounded, oldest dropped if nobody drains it."""
        return self._transitions

    @property
    def timebase(self) -> Timebase:
        return self._timebase

    def status(self) -> TimebaseStatus:
        system_s, mono_s = self._read()
        return self._timebase.status(system_s, mono_s)

    def _read(self) -> tuple[float, float]:
        """(system_s, mono_s) read as nearly together as possible."""
        for _ in range(READ_ATTEMPTS):
            before = self._monotonic()
            system_s = self._system_now()
            after = self._monotonic()
            if after - before <= READ_BRACKET_S:
                break
        return system_s, (before + after) / 2

    def _emit(self, transitions: Sequence[TimeTransition]) -> None:
        for transition in transitions:
            log.info(
                "time transition",
                kind=str(transition.kind),
                cause=str(transition.cause),
                state=str(transition.state),
                adjustment_s=round(transition.adjustment_s, 6),
                stepped=transition.stepped,
                system_step_s=transition.system_step_s,
                detail=transition.message,
            )
            if self._transitions.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    self._transitions.get_nowait()
            self._transitions.put_nowait(transition)
            if self._on_transition is not None:
                try:
                    self._on_transition(transition)
                except Exception:
                    # now() is called by every poller: a broken listener must
                    # not take reference time down with it.
                    log.exception("time transition callback failed", kind=str(transition.kind))

    def _start_watch(self) -> ClockSetWatch | None:
        """The kernel's clock-set notification, observing at once on a step."""
        if self._open_watch is None:
            return None
        return self._open_watch(self._clock_was_set)

    def _clock_was_set(self) -> None:
        # The step detector compares with the previous reading: observing right
        # after the step files it at the monotonic time it happened.
        self.now()

    async def _watch(self, *, poll: bool = True) -> None:
        """Step detection and holdover: on the kernel's word when the clock is
        set, with a slow safety poll; where timerfd is missing, a poll every
        observe_interval_s (half a second). `poll=False`: someone else
        observes periodically (the kernel-status loop)."""
        watch = self._start_watch()
        if watch is not None:
            log.debug("clock steps: kernel notification", safety_poll_s=SAFETY_OBSERVE_S)
        interval_s = (
            self._observe_interval_s
            if watch is None
            else max(self._observe_interval_s, SAFETY_OBSERVE_S)
        )
        loop = asyncio.get_running_loop()
        try:
            while True:
                if poll or watch is None:
                    self.now()
                    # On whole multiples of the interval (loop clock): the
                    # liveness mark ticks on the same instants, one wake-up for both.
                    await asyncio.sleep(interval_s - loop.time() % interval_s)
                else:
                    await asyncio.Future()  # until cancelled; the watch does the work
        finally:
            if watch is not None:
                watch.close()

    @property
    def watched_by_kernel(self) -> bool:
        """Whether steps come from the kernel (timerfd) rather than a poll."""
        return self._open_watch is not None


class NtpReferenceClock(_ReferenceClockBase):
    """Reference time = system time + offset fitted from NTP samples.

    Usable as a `Clock` right after construction (assumed time until the first
    accepted poll round); `run()` must be running for it to synchronise.
    """

    def __init__(
        self,
        servers: Sequence[str],
        config: TimebaseConfig | None = None,
        *,
        last_mark: datetime | None = None,
        timeout_s: float = 2.0,
        system_now: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        on_transition: Callable[[TimeTransition], None] | None = None,
        observe_interval_s: float = 0.5,
        query: NtpQuery | None = None,
        clock_watch: OpenClockWatch | None = open_clock_set_watch,
    ) -> None:
        config = config or TimebaseConfig()
        if config.source is not TimeSource.NTP:
            raise ValueError("NtpReferenceClock needs time.source ntp")
        if not servers:
            raise ValueError("time.ntp_servers is empty")
        for spec in servers:
            parse_server(spec)  # fail at start-up, not at the first poll
        super().__init__(
            Timebase(config),
            system_now=system_now,
            monotonic=monotonic,
            on_transition=on_transition,
            observe_interval_s=observe_interval_s,
            clock_watch=clock_watch,
        )
        self._servers = tuple(servers)
        self._timeout_s = timeout_s
        self._query: NtpQuery = query or self._query_ntplib
        system_s, mono_s = self._read()
        self._emit(self._timebase.start(system_s, mono_s, last_mark))

    async def run(self) -> None:
        """Poll every poll_s and watch the clocks, until cancelled."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._watch(), name="ntp clock watch")
            tg.create_task(self._poll_loop(), name="ntp poll")

    async def poll_once(self) -> list[TimeTransition]:
        """Query every server once (concurrently, off the loop) and feed the round."""
        results = await asyncio.gather(
            *(asyncio.to_thread(self._safe_query, spec) for spec in self._servers)
        )
        samples = [s for s in results if s is not None]
        system_s, mono_s = self._read()
        transitions = self._timebase.observe_ntp(samples, system_s, mono_s)
        round_ = self._timebase.last_round
        if round_ is not None and round_.rejected:
            log.info(
                "ntp samples rejected",
                rejected={s.server: str(reason) for s, reason in round_.rejected},
            )
        if not samples:
            log.warning("no ntp server answered", servers=list(self._servers))
        self._emit(transitions)
        return transitions

    async def _poll_loop(self) -> None:
        # Scheduled on the loop's own (monotonic) clock, which is what
        # asyncio.sleep waits on, so an injected monotonic cannot stall it.
        loop = asyncio.get_running_loop()
        poll_s = self._timebase.config.poll_s
        next_at = loop.time()
        while True:
            await self.poll_once()
            # Absolute schedule, so polls do not drift; a slow round skips
            # ahead rather than polling back to back.
            next_at += poll_s
            if next_at < loop.time():
                next_at = loop.time() + poll_s
            await asyncio.sleep(next_at - loop.time())

    def _safe_query(self, spec: str) -> NtpSample | None:
        try:
            return self._query(spec, self._timeout_s)
        except Exception as exc:  # one bad server must not end the round
            log.debug("ntp query failed", server=spec, error=repr(exc))
            return None

    def _query_ntplib(self, spec: str, timeout_s: float) -> NtpSample | None:
        """One exchange, in a worker thread.

        ntplib stamps the request with time.time(); edged's system clock may
        be injected, so the offset is computed from the server's receive and
        transmit stamps against our own readings taken just around the call.
        The name is resolved first so DNS time does not count as delay.
        """
        host, port = parse_server(spec)
        address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0][4][0]
        mono_1 = self._monotonic()
        t1 = self._system_now()
        stats = ntplib.NTPClient().request(
            address, version=NTP_VERSION, port=port, timeout=timeout_s
        )
        t4 = self._system_now()
        mono_4 = self._monotonic()
        if stats.mode != 4 or stats.tx_timestamp == 0:  # not a server reply
            return None
        t2 = float(stats.recv_time)
        t3 = float(stats.tx_time)
        return NtpSample(
            server=spec,
            mono_s=(mono_1 + mono_4) / 2,
            offset_s=((t2 - t1) + (t3 - t4)) / 2,
            delay_s=(t4 - t1) - (t3 - t2),
            stratum=int(stats.stratum),
            leap=int(stats.leap),
        )


class SystemReferenceClock(_ReferenceClockBase):
    """`time.source: system`: the system clock, trusted as far as the kernel
    says it is synchronised, with step detection and the AMT start-up rule."""

    def __init__(
        self,
        config: TimebaseConfig | None = None,
        *,
        last_mark: datetime | None = None,
        system_now: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        kernel_status: Callable[[], KernelSync] = kernel_sync_status,
        on_transition: Callable[[TimeTransition], None] | None = None,
        observe_interval_s: float = 0.5,
        clock_watch: OpenClockWatch | None = open_clock_set_watch,
    ) -> None:
        config = config or TimebaseConfig(source=TimeSource.SYSTEM)
        if config.source is not TimeSource.SYSTEM:
            raise ValueError("SystemReferenceClock needs time.source system")
        super().__init__(
            Timebase(config),
            system_now=system_now,
            monotonic=monotonic,
            on_transition=on_transition,
            observe_interval_s=observe_interval_s,
            clock_watch=clock_watch,
        )
        self._kernel_status = kernel_status
        status = kernel_status()
        system_s, mono_s = self._read()
        self._emit(
            self._timebase.start(system_s, mono_s, last_mark, confirmed=status is KernelSync.SYNCED)
        )

    async def run(self) -> None:
        """Watch the clocks and the kernel status, until cancelled."""
        async with asyncio.TaskGroup() as tg:
            # The kernel-status loop observes the clocks each time it asks.
            tg.create_task(self._watch(poll=False), name="system clock watch")
            tg.create_task(self._kernel_loop(), name="kernel sync status")

    async def _kernel_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self.check_kernel()
            interval_s = self.kernel_check_interval_s()
            # Aligned like the watch and the liveness mark: shared wake-ups.
            await asyncio.sleep(interval_s - loop.time() % interval_s)

    def kernel_check_interval_s(self) -> float:
        """Every observe_interval_s until synced (sync ends assumed time, and
        is waited for); once synced, slower where the kernel reports steps."""
        if self.watched_by_kernel and self._timebase.state is TimeState.SYNCED:
            return max(self._observe_interval_s, KERNEL_CHECK_SYNCED_S)
        return self._observe_interval_s

    def check_kernel(self) -> list[TimeTransition]:
        # adjtimex with modes = 0 is a cheap, non-blocking syscall: fine on the loop.
        status = self._kernel_status()
        system_s, mono_s = self._read()
        transitions = self._timebase.observe_kernel(status, system_s, mono_s)
        self._emit(transitions)
        return transitions
