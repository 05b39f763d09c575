"""BusScheduler on virtual time: ordering, backoff and the fast-poll hold.

No sockets and no wall clock. The scheduler's injected clock is either a
`FakeClock` the simulated wire advances by hand, or (where the scheduler itself
waits, the fast-poll hold) the `looptime` plugin's virtual event-loop clock.
Every expected time below is worked out by hand from the durations given to the
simulated wire (binary fractions, so the sums are exact).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import pytest

from edged.io.bus import BOUNDARY_GRACE_S, BusScheduler, Priority

TIMEOUT_S = 0.25  # a dead unit costs the wire this much
READ_S = 0.03125  # one live transaction (1/32 s)


@dataclass
class FakeClock:
    now_s: float = 1000.0

    def __call__(self) -> float:
        return self.now_s

    async def advance(self, seconds: float) -> None:
        self.now_s += seconds


@dataclass(frozen=True, slots=True)
class Outcome:
    unit_id: int
    kind: str  # "ok", "timeout" or "backoff" (skipped, never on the wire)
    queued_s: float = 0.0
    started_s: float = 0.0


@dataclass
class Wire:
    """One connection taking jobs in the scheduler's order, as a link's worker
    does: a transaction holds the wire for its unit's duration (a dead unit
    for its whole timeout) on the scheduler's clock."""

    scheduler: BusScheduler[Outcome]
    spend: Callable[[float], Awaitable[None]]
    durations_s: dict[int, float]
    dead: set[int] = field(default_factory=set)
    started: list[tuple[int, Priority]] = field(default_factory=list)

    async def serve(self) -> None:
        scheduler = self.scheduler
        while True:
            job = await scheduler.take()
            scheduler.started(job)
            self.started.append((job.unit_id, job.priority))
            dead = job.unit_id in self.dead
            await self.spend(job.timeout_s if dead else self.durations_s[job.unit_id])
            scheduler.finished(job, ok=not dead, unresponsive=dead, timeout=dead)
            job.future.set_result(
                Outcome(
                    job.unit_id,
                    "timeout" if dead else "ok",
                    queued_s=job.started_s - job.submitted_s,
                    started_s=job.started_s,
                )
            )

    async def read(self, unit_id: int, priority: Priority = Priority.BOUNDARY) -> Outcome:
        """What `ScheduledLink.read` does: ask admission, then queue and wait."""
        if self.scheduler.admit(unit_id, priority) is not None:
            return Outcome(unit_id, "backoff")
        return await self.scheduler.submit(unit_id, priority, None).future

    async def wave(self, units: Sequence[int]) -> list[Outcome]:
        """One boundary: every device's read submitted in the same loop iteration."""
        return list(await asyncio.gather(*(self.read(u) for u in units)))


@contextlib.asynccontextmanager
async def running(wire: Wire) -> AsyncIterator[Wire]:
    task = asyncio.create_task(wire.serve())
    await asyncio.sleep(0)  # the worker is waiting on an empty queue
    try:
        yield wire
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def three_units(clock: Callable[[], float]) -> BusScheduler[Outcome]:
    scheduler: BusScheduler[Outcome] = BusScheduler("bus", clock=clock)
    for unit in (1, 2, 3):  # configuration order
        scheduler.register_unit(unit, TIMEOUT_S)
    return scheduler


async def test_boundary_reads_go_in_configuration_order_before_fast_polls() -> None:
    clock = FakeClock()
    scheduler = three_units(clock)
    wire = Wire(scheduler, clock.advance, {1: READ_S, 2: READ_S, 3: READ_S})
    async with running(wire):
        # Arrival order is not service order: a fast poll first, then the
        # boundary reads in reverse, unit 1's a loop iteration late (the
        # worker waits COLLECT_TICKS iterations before it chooses).
        fast = asyncio.ensure_future(wire.read(3, Priority.FAST))
        late = asyncio.ensure_future(wire.read(2))
        early = asyncio.ensure_future(wire.read(3))
        await asyncio.sleep(0)
        first = asyncio.ensure_future(wire.read(1))
        outcomes = await asyncio.gather(fast, late, early, first)
    assert wire.started == [
        (1, Priority.BOUNDARY),
        (2, Priority.BOUNDARY),
        (3, Priority.BOUNDARY),
        (3, Priority.FAST),
    ]
    assert [o.kind for o in outcomes] == ["ok"] * 4
    # back to back on the wire; the fast poll waited for all three boundary reads
    assert outcomes[3].queued_s == 0.0
    assert outcomes[1].queued_s == READ_S
    assert outcomes[2].queued_s == 2 * READ_S
    assert outcomes[0].queued_s == 3 * READ_S
    assert scheduler.stats.last_spread_ms == 2 * READ_S * 1000  # 62.5
    assert scheduler.stats.last_wave_ms == 3 * READ_S * 1000  # 93.75
    assert scheduler.stats.last_wave_devices == 3


async def test_a_dead_unit_goes_last_then_is_backed_off_and_delays_nobody() -> None:
    """The dead unit is first in configuration order. Boundary 0: it costs the
    live units its timeout. Boundary 1: read last (the first failure may have
    been a bystander's). Then skipped 1 boundary, retried last, skipped 2."""
    clock = FakeClock()
    scheduler = three_units(clock)
    wire = Wire(scheduler, clock.advance, {2: READ_S, 3: READ_S}, dead={1})
    rounds: list[list[Outcome]] = []
    async with running(wire):
        for boundary in range(7):
            clock.now_s = 2000.0 + boundary
            rounds.append(await wire.wave((1, 2, 3)))
    kinds = [[o.kind for o in r] for r in rounds]
    assert kinds == [
        ["timeout", "ok", "ok"],
        ["timeout", "ok", "ok"],
        ["backoff", "ok", "ok"],
        ["timeout", "ok", "ok"],
        ["backoff", "ok", "ok"],
        ["backoff", "ok", "ok"],
        ["timeout", "ok", "ok"],
    ]
    # boundary 0: unit 1 first, paying its timeout in front of the others
    assert [o.queued_s for o in rounds[0]] == [0.0, TIMEOUT_S, TIMEOUT_S + READ_S]
    # from boundary 1 on the live units go out at once, the dead one after them
    for r in (rounds[1], rounds[3], rounds[6]):
        assert [o.queued_s for o in r] == [2 * READ_S, 0.0, READ_S]
    for r in (rounds[2], rounds[4], rounds[5]):
        assert [o.queued_s for o in r[1:]] == [0.0, READ_S]
    assert wire.started[:6] == [
        (1, Priority.BOUNDARY), (2, Priority.BOUNDARY), (3, Priority.BOUNDARY),
        (2, Priority.BOUNDARY), (3, Priority.BOUNDARY), (1, Priority.BOUNDARY),
    ]  # fmt: skip
    stats = scheduler.stats
    assert stats.transactions == 4 + 2 * 7
    assert stats.timeouts == stats.failures == 4
    assert stats.skipped == 3
    # the last wave: 2 and 3 back to back, then unit 1's timeout
    assert stats.last_spread_ms == 2 * READ_S * 1000
    assert stats.last_wave_ms == (2 * READ_S + TIMEOUT_S) * 1000
    # the widest wave was the first: unit 1's timeout in front of the others
    assert stats.max_spread_ms == (TIMEOUT_S + READ_S) * 1000
    assert scheduler.offline_units() == [1]
    # fast polls never probe an offline unit
    reason = scheduler.admit(1, Priority.FAST)
    assert reason is not None
    assert "fast polls wait" in reason


async def test_backoff_is_bounded_in_time_and_survives_a_reload() -> None:
    clock = FakeClock()
    scheduler = three_units(clock)
    wire = Wire(scheduler, clock.advance, {1: READ_S, 2: READ_S, 3: READ_S}, dead={1})
    async with running(wire):
        for _ in range(4):  # timeout, timeout, skip, timeout: 3 failures, 2 skips due
            await wire.wave((1, 2, 3))
        # a reload that keeps unit 1 keeps what the bus learnt about it
        scheduler.set_units([(3, TIMEOUT_S), (1, TIMEOUT_S)])
        assert scheduler.offline_units() == [1]
        assert [o.kind for o in await wire.wave((1, 3))] == ["backoff", "ok"]
        # max_backoff_s (300 s) after its last attempt it is tried whatever
        # skips are left, and an answer brings it back at once
        clock.now_s += 300.0
        wire.dead.clear()
        retried = await wire.wave((1, 3))
        assert [o.kind for o in retried] == ["ok", "ok"]
        assert scheduler.offline_units() == []
        # back in good standing it takes its configured place again: after 3
        before = len(wire.started)
        await wire.wave((1, 3))
        assert wire.started[before:] == [(3, Priority.BOUNDARY), (1, Priority.BOUNDARY)]


# -- the fast-poll hold: the scheduler waits, so on the virtual loop clock ----


def two_units_on_the_loop_clock() -> BusScheduler[Outcome]:
    # the injected clock is the event loop's, which looptime makes virtual
    scheduler: BusScheduler[Outcome] = BusScheduler("bus", clock=asyncio.get_running_loop().time)
    scheduler.register_unit(1, 0.5)
    scheduler.register_unit(2, 0.5)
    return scheduler


FAST_S = 0.0390625  # unit 2's fast poll (5/128 s)
BOUNDARY_READ_S = 0.015625  # unit 1's boundary read (1/64 s)


@pytest.mark.looptime
async def test_a_fast_poll_that_would_overlap_the_boundary_waits_for_it() -> None:
    scheduler = two_units_on_the_loop_clock()
    wire = Wire(scheduler, asyncio.sleep, {1: BOUNDARY_READ_S, 2: FAST_S})
    loop = asyncio.get_running_loop()
    async with running(wire):
        learnt = await wire.read(2, Priority.FAST)  # learns unit 2's fast-poll duration
        assert learnt.kind == "ok"
        t0 = loop.time()
        scheduler.expect_boundary(t0 + 0.03125)  # due before a 39 ms poll could end
        fast = asyncio.ensure_future(wire.read(2, Priority.FAST))
        await asyncio.sleep(0.03125)
        boundary = await wire.read(1)
        held = await fast
    # the boundary read went out the instant it was asked for
    assert boundary.queued_s == 0.0
    assert boundary.started_s == pytest.approx(t0 + 0.03125, abs=1e-6)
    # the fast poll went after it, once the boundary's grace for late pollers
    # was over (another device's boundary read could still have come)
    assert held.started_s == pytest.approx(t0 + 0.03125 + BOUNDARY_GRACE_S, abs=1e-6)
    assert held.started_s > boundary.started_s + BOUNDARY_READ_S
    assert wire.started[1:] == [(1, Priority.BOUNDARY), (2, Priority.FAST)]


@pytest.mark.looptime
async def test_a_fast_poll_that_fits_before_the_boundary_goes_at_once() -> None:
    scheduler = two_units_on_the_loop_clock()
    wire = Wire(scheduler, asyncio.sleep, {1: BOUNDARY_READ_S, 2: FAST_S})
    loop = asyncio.get_running_loop()
    async with running(wire):
        await wire.read(2, Priority.FAST)
        t0 = loop.time()
        # 39 ms poll + 10 ms margin < 100 ms to the boundary
        scheduler.expect_boundary(t0 + 0.1)
        fast = await wire.read(2, Priority.FAST)
    assert fast.queued_s == 0.0
    assert fast.started_s == pytest.approx(t0, abs=1e-6)


@pytest.mark.looptime
async def test_a_held_fast_poll_goes_after_the_grace_when_no_boundary_read_comes() -> None:
    """Every boundary read may be backed off: the hold ends BOUNDARY_GRACE_S
    after the boundary instant, not never."""
    scheduler = two_units_on_the_loop_clock()
    wire = Wire(scheduler, asyncio.sleep, {1: BOUNDARY_READ_S, 2: FAST_S})
    loop = asyncio.get_running_loop()
    async with running(wire):
        await wire.read(2, Priority.FAST)
        t0 = loop.time()
        scheduler.expect_boundary(t0 + 0.03125)
        fast = await wire.read(2, Priority.FAST)
    assert fast.started_s == pytest.approx(t0 + 0.03125 + BOUNDARY_GRACE_S, abs=1e-6)
    assert fast.queued_s == pytest.approx(0.03125 + BOUNDARY_GRACE_S, abs=1e-6)
