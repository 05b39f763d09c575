"""Bus scheduling: who gets the line next (no pymodbus, no sockets here).

A *link* (a serial bus, an RTU-over-TCP device server, a Modbus TCP gateway)
carries one transaction at a time per connection. Every device on it submits
its reads to the link's :class:`BusScheduler`, and the link's workers take them
in this order:

1. boundary reads before fast polls (:class:`Priority`);
2. units in good standing before units that failed lately, so a dead meter's
   timeout is paid after every live meter has been read, never in front of one;
3. then a stable order (the order the devices were registered, which is the
   configuration order), then arrival.

Reads for one boundary arrive in the same loop iteration (one shared
:class:`edged.io.clock.BoundaryWaiter`), and a worker that was idle waits that
iteration out before choosing, so the first boundary request on the wire is
always the same device's and the spread between the first and the last device
is just the sum of their transaction times. The spread of every boundary
*wave* is measured (``last_spread_ms``) for the gateway status.

Fast polls yield around boundaries: a link told when the next boundary read is
due (:meth:`BusScheduler.expect_boundary`) does not start a fast poll that
might still be on the wire then, and holds fast polls until that boundary's
reads have been taken.

A unit that does not answer (timeout, garbled reply, gateway "target failed to
respond") is *backed off* (:class:`UnitBackoff`): after its first failure it is
read last (so it delays nobody at the next boundary, and a bystander that lost
one transaction to another unit's late reply is not punished); after further
failures it is skipped for 1, 2, 4 … boundary reads (capped, and never longer
than ``max_backoff_s``); its fast polls are skipped until it answers again.
Skipped reads cost nothing on the wire; they come back as
``ReadError(kind=BACKOFF)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Generic, TypeVar

T = TypeVar("T")

# A worker that finds the queue empty waits this many loop iterations after the
# first boundary read arrives, so every read woken by the same boundary is
# queued before one is chosen.
COLLECT_TICKS = 2
# A fast poll is held back when a boundary is due within its expected duration
# plus this margin.
FAST_MARGIN_S = 0.010
# After a boundary instant, fast polls wait this long for the boundary reads
# to be queued (the pollers wake within microseconds of it).
BOUNDARY_GRACE_S = 0.050


class Priority(IntEnum):
    """Lower first."""

    BOUNDARY = 0  # interval-boundary reads: billing data
    FAST = 1  # measurement polls between boundaries (and the facade's cached blocks)
    PASS_THROUGH = 2  # reads other masters forward through the facade


@dataclass(slots=True, kw_only=True)
class UnitBackoff:
    """Failure bookkeeping of one unit id on one link (pure: times are passed in)."""

    max_skip: int = 32
    max_backoff_s: float = 300.0
    failures: int = 0
    skip_left: int = 0
    last_attempt_s: float = 0.0

    @property
    def offline(self) -> bool:
        return self.failures > 0

    def admit(self, priority: Priority, now_s: float) -> str | None:
        """None to go ahead, or why the read is skipped."""
        if not self.failures:
            return None
        if priority is not Priority.BOUNDARY:
            return f"offline after {self.failures} failed read(s); fast polls wait for it"
        if self.skip_left > 0 and now_s - self.last_attempt_s < self.max_backoff_s:
            self.skip_left -= 1
            when = (
                f"after {self.skip_left} more boundary read(s)"
                if self.skip_left
                else "at the next boundary read"
            )
            return f"backed off after {self.failures} failed read(s); retried {when}"
        return None

    def record(self, *, ok: bool, unresponsive: bool, now_s: float) -> None:
        """After a read that reached the wire. Only an unresponsive unit (one
        that cost the bus a timeout) is backed off; an exception reply is an
        answer."""
        if ok:
            self.failures = self.skip_left = 0
        elif unresponsive:
            # The first failure only moves the unit to the back of the line: it
            # may have been a bystander (a late reply from another unit ate its
            # transaction). From the second on it skips 1, 2, 4 … boundaries.
            self.failures += 1
            self.skip_left = (
                min(2 ** (self.failures - 2), self.max_skip) if self.failures > 1 else 0
            )
            self.last_attempt_s = now_s


@dataclass(slots=True, eq=False, kw_only=True)
class Job(Generic[T]):
    unit_id: int
    priority: Priority
    seq: int
    submitted_s: float
    payload: Any
    timeout_s: float
    future: asyncio.Future[T]
    started_s: float = 0.0


@dataclass(slots=True, kw_only=True)
class BusStats:
    transactions: int = 0  # jobs that reached the wire
    failures: int = 0
    timeouts: int = 0
    skipped: int = 0  # BACKOFF answers given without touching the wire
    last_spread_ms: float | None = None  # first to last device start of the last wave
    last_wave_ms: float | None = None  # first start to last end of the last wave
    last_wave_devices: int = 0
    max_spread_ms: float = 0.0


@dataclass(slots=True)
class _Wave:
    first_s: float
    last_start_s: float
    devices: int = 0


@dataclass(slots=True, kw_only=True)
class _UnitInfo:
    rank: int
    timeout_s: float
    backoff: UnitBackoff = field(default_factory=UnitBackoff)
    fast_estimate_s: float | None = None  # smoothed duration of this unit's fast polls


class BusScheduler(Generic[T]):
    """The queue, ordering, backoff and wave statistics of one link."""

    def __init__(
        self,
        name: str,
        *,
        default_timeout_s: float = 1.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.name = name
        self.default_timeout_s = default_timeout_s
        self._clock = clock
        self._queue: list[Job[T]] = []
        self._wakeup = asyncio.Event()
        self._units: dict[int, _UnitInfo] = {}
        self._seq = itertools.count()
        self._boundaries: list[float] = []  # heap of expected boundary times (loop clock)
        self._boundary_in_flight = 0
        self._wave: _Wave | None = None
        self.stats = BusStats()

    def now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    # -- units ----------------------------------------------------------------

    def register_unit(self, unit_id: int, timeout_s: float) -> None:
        """Units are served in registration order; a unit registered twice keeps
        its first place and the longer timeout."""
        info = self._units.get(unit_id)
        if info is None:
            self._units[unit_id] = _UnitInfo(rank=len(self._units), timeout_s=timeout_s)
        else:
            info.timeout_s = max(info.timeout_s, timeout_s)

    def set_units(self, units: Sequence[tuple[int, float]]) -> None:
        """Replace the registrations (a config reload): served in this order,
        each with the longest timeout given for it; a unit still present keeps
        its backoff and fast-poll estimate."""
        old = self._units
        self._units = {}
        for unit_id, timeout_s in units:
            info = self._units.get(unit_id)
            if info is None:
                kept = old.get(unit_id)
                self._units[unit_id] = _UnitInfo(
                    rank=len(self._units),
                    timeout_s=timeout_s,
                    backoff=kept.backoff if kept is not None else UnitBackoff(),
                    fast_estimate_s=kept.fast_estimate_s if kept is not None else None,
                )
            else:
                info.timeout_s = max(info.timeout_s, timeout_s)

    def unit(self, unit_id: int) -> _UnitInfo:
        info = self._units.get(unit_id)
        if info is None:  # a read for a unit nobody registered: serve it last
            info = self._units[unit_id] = _UnitInfo(
                rank=len(self._units) + 1000, timeout_s=self.default_timeout_s
            )
        return info

    def admit(self, unit_id: int, priority: Priority) -> str | None:
        reason = self.unit(unit_id).backoff.admit(priority, self.now())
        if reason is not None:
            self.stats.skipped += 1
        return reason

    def offline_units(self) -> list[int]:
        return sorted(u for u, info in self._units.items() if info.backoff.offline)

    # -- queue ----------------------------------------------------------------

    def expect_boundary(self, at_s: float) -> None:
        """A boundary read is due at loop time ``at_s`` (idempotent per instant)."""
        if at_s not in self._boundaries:
            heapq.heappush(self._boundaries, at_s)

    def _job(
        self, unit_id: int, priority: Priority, payload: Any, timeout_s: float | None
    ) -> Job[T]:
        return Job(
            unit_id=unit_id,
            priority=priority,
            seq=next(self._seq),
            submitted_s=self.now(),
            payload=payload,
            timeout_s=timeout_s if timeout_s is not None else self.unit(unit_id).timeout_s,
            future=asyncio.get_running_loop().create_future(),
        )

    def submit(
        self, unit_id: int, priority: Priority, payload: Any, timeout_s: float | None = None
    ) -> Job[T]:
        job = self._job(unit_id, priority, payload, timeout_s)
        self._queue.append(job)
        self._wakeup.set()
        return job

    def direct(
        self, unit_id: int, priority: Priority, payload: Any, timeout_s: float | None = None
    ) -> Job[T] | None:
        """A job for the caller to put on the wire itself, now, or None to
        queue it (:meth:`submit`). The caller must know the line is idle.

        Only a job `take` would hand out at once anyway: nothing is queued, and
        it is a boundary read on a link with at most one unit (nothing to
        order: a TCP meter on its own port), or a fast poll that no boundary
        is due to hold back. Skipping the worker saves two task switches and
        a loop iteration per read, and puts a boundary request on the wire in
        the poller's own step (docs/performance.md, "Boundary reads")."""
        if self._queue or (priority is Priority.BOUNDARY and len(self._units) > 1):
            return None
        job = self._job(unit_id, priority, payload, timeout_s)
        if priority is not Priority.BOUNDARY and self._fast_hold_s(job, job.submitted_s) > 0:
            return None
        return job

    def putback(self, job: Job[T]) -> None:
        """A job `take` handed out that could not start (the line was busy):
        back in the queue, in its place (its sequence number is kept)."""
        self._queue.append(job)

    @property
    def depth(self) -> int:
        return len(self._queue)

    def _key(self, job: Job[T]) -> tuple[int, int, int, int]:
        info = self.unit(job.unit_id)
        return (job.priority, int(info.backoff.offline), info.rank, job.seq)

    def _fast_hold_s(self, job: Job[T], now_s: float) -> float:
        """How long a fast poll must wait so it cannot delay a boundary read."""
        boundaries = self._boundaries
        while boundaries and boundaries[0] + BOUNDARY_GRACE_S < now_s:
            heapq.heappop(boundaries)
        if not boundaries:
            return 0.0
        info = self.unit(job.unit_id)
        estimate = info.fast_estimate_s if info.fast_estimate_s is not None else job.timeout_s
        due = boundaries[0]
        if due - now_s <= estimate + FAST_MARGIN_S:
            return due + BOUNDARY_GRACE_S - now_s
        return 0.0

    async def take(self) -> Job[T]:
        """The next job to put on the wire (waits for one)."""
        woke = False
        while True:
            live = [j for j in self._queue if not j.future.done()]
            if len(live) != len(self._queue):
                self._queue = live
            if (
                woke
                and len(self._units) > 1
                and any(j.priority is Priority.BOUNDARY for j in self._queue)
            ):
                # Let every read woken by the same boundary join the queue first
                # (a link with one unit has nothing to order: a TCP meter's own
                # port; waiting would only add loop iterations to its lateness).
                for _ in range(COLLECT_TICKS):
                    await asyncio.sleep(0)
                woke = False
                continue
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                woke = True
                continue
            job = min(self._queue, key=self._key)
            if job.priority is not Priority.BOUNDARY:
                hold_s = self._fast_hold_s(job, self.now())
                if hold_s > 0:
                    self._wakeup.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), hold_s)
                    woke = True
                    continue
            self._queue.remove(job)
            return job

    # -- accounting -------------------------------------------------------------

    def started(self, job: Job[T]) -> None:
        now_s = job.started_s = self.now()
        self.stats.transactions += 1
        if job.priority is Priority.BOUNDARY:
            self._boundary_in_flight += 1
            if self._wave is None:
                self._wave = _Wave(first_s=now_s, last_start_s=now_s)
            self._wave.last_start_s = now_s
            self._wave.devices += 1

    def finished(self, job: Job[T], *, ok: bool, unresponsive: bool, timeout: bool) -> None:
        now_s = self.now()
        info = self.unit(job.unit_id)
        info.backoff.record(ok=ok, unresponsive=unresponsive, now_s=now_s)
        if not ok:
            self.stats.failures += 1
        if timeout:
            self.stats.timeouts += 1
        # Every read that yields around boundaries teaches the estimate its
        # hold is based on (a unit read only through the facade has no fast polls).
        if job.priority is not Priority.BOUNDARY and ok:
            took = now_s - job.started_s
            previous = info.fast_estimate_s
            info.fast_estimate_s = took if previous is None else 0.8 * previous + 0.2 * took
        if job.priority is Priority.BOUNDARY:
            self._boundary_in_flight -= 1
            waiting = any(j.priority is Priority.BOUNDARY for j in self._queue)
            wave = self._wave
            if wave is not None and not waiting and self._boundary_in_flight == 0:
                spread_ms = (wave.last_start_s - wave.first_s) * 1000.0
                self.stats.last_spread_ms = round(spread_ms, 3)
                self.stats.last_wave_ms = round((now_s - wave.first_s) * 1000.0, 3)
                self.stats.last_wave_devices = wave.devices
                self.stats.max_spread_ms = max(self.stats.max_spread_ms, round(spread_ms, 3))
                self._wave = None
        # A fast poll held for a boundary re-checks once the boundary reads are done.
        self._wakeup.set()
