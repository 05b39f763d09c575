"""Reference time for the shell: the `Clock` protocol and boundary waiting.

Pure code takes `now` as an argument; shell code takes a `Clock`, so tests can
drive restarts, clock steps and outages without faking `time.monotonic`
globally (which hangs asyncio).
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

import structlog

from edged.core.model import TimeState
from edged.io.bootid import kernel_boot_id

log = structlog.get_logger("edged.io.clock")

# asyncio timers are only about a millisecond precise and may fire early, so
# waits end this far before the target and the rest is settled by polling the
# clock; the settle is bounded and short, so it cannot starve the loop.
SETTLE_S = 0.002


class Clock(Protocol):
    def now(self) -> datetime:
        """Reference time (UTC, aware): the best estimate of true time."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never jumps (for waiting and durations)."""
        ...

    @property
    def time_state(self) -> TimeState: ...


class SystemClock:
    """The system clock, trusted as it is (`time.source: system`).

    `system_now` reads it (epoch seconds); the demo passes one reset by a
    "dead RTC battery"."""

    def __init__(
        self,
        time_state: TimeState = TimeState.SYNCED,
        *,
        system_now: Callable[[], float] = time.time,
    ) -> None:
        self._time_state = time_state
        self._system_now = system_now
        self.boot_id = kernel_boot_id()

    def now(self) -> datetime:
        return datetime.fromtimestamp(self._system_now(), UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    @property
    def time_state(self) -> TimeState:
        return self._time_state


async def sleep_until_reference(clock: Clock, target: datetime) -> float:
    """Sleep until the reference clock reaches `target`; never returns early.

    Returns how late (ms) the clock was when this returned. The coarse wait is
    on the monotonic clock via the loop's timer; the last `SETTLE_S` is spent
    re-reading the reference clock so a slewed or stepped reference is honoured.
    """
    while True:
        remaining_s = (target - clock.now()).total_seconds()
        if remaining_s <= 0:
            return -remaining_s * 1000.0
        if remaining_s > SETTLE_S:
            await asyncio.sleep(remaining_s - SETTLE_S)
            continue
        # Settle: spin on the clock for at most SETTLE_S.
        deadline_mono = clock.monotonic() + remaining_s + SETTLE_S
        while clock.now() < target and clock.monotonic() < deadline_mono:
            pass


class BoundaryWaiter:
    """One precise wait per distinct instant, shared by every poller aiming at it.

    A thousand devices on one boundary cost one settle loop, and they all wake
    in the same loop iteration, so their requests start together.
    """

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._waits: dict[datetime, asyncio.Future[float]] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # strong refs until done
        self._hooks: dict[datetime, list[Callable[[], object]]] = {}

    async def wait(self, target: datetime) -> float:
        """Wait for `target`; returns the lateness (ms) at wake-up."""
        return await asyncio.shield(self.instant(target))

    def instant(self, target: datetime) -> asyncio.Future[float]:
        """The shared future of `target`: done with the lateness (ms) when it
        arrives. Await it shielded or watch it with a done-callback; never
        cancel it (other waiters share it)."""
        future = self._waits.get(target)
        if future is None or future.cancelled():
            future = asyncio.get_running_loop().create_future()
            self._waits[target] = future
            task = asyncio.create_task(self._run(target, future), name=f"boundary {target}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return future

    def at_instant(self, target: datetime, hook: Callable[[], object]) -> None:
        """Call `hook` the moment `target` arrives, before any waiter wakes:
        in the same loop step as the end of the precise wait, one hook after
        the other. For work that must happen *at* the boundary and is cheap
        (a request frame written to a socket); a hook must not raise (it is
        logged and skipped if it does). Hooks for an instant nobody waits for
        (`instant`) are never called; they go with that instant's wait."""
        self._hooks.setdefault(target, []).append(hook)

    @staticmethod
    def _call_hooks(hooks: list[Callable[[], object]]) -> None:
        if not hooks:
            return
        # A thousand sends in a row allocate a few thousand small objects:
        # the young-generation collections they would trigger (and a full one
        # now and then, tens of ms with a large heap) land in the spread
        # between the first and the last request. They run after the burst.
        collecting = gc.isenabled()
        gc.disable()
        try:
            for hook in hooks:
                try:
                    hook()
                except Exception as exc:  # one broken hook must not stop a boundary
                    log.error("boundary hook failed", hook=repr(hook), error=repr(exc))
        finally:
            if collecting:
                gc.enable()

    async def _run(self, target: datetime, future: asyncio.Future[float]) -> None:
        try:
            lateness_ms = await sleep_until_reference(self._clock, target)
            self._call_hooks(self._hooks.pop(target, []))
            if not future.done():
                future.set_result(lateness_ms)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
        finally:
            # Keep the table small: later waiters for a past instant start afresh.
            if self._waits.get(target) is future:
                del self._waits[target]
                self._hooks.pop(target, None)
