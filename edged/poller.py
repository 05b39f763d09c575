"""One device's loop, and the recorder that persists what the pollers produce.

The poller waits for the absolute boundary (never "previous + period"), sends
its requests the moment the boundary arrives, hands the read to the pure
interval engine and gives the results to the recorder. The recorder commits
everything queued since its last commit in one transaction (group commit: a
thousand devices on one boundary cost one fsync), then wakes the publisher.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo

import structlog

from edged import intervals as engine
from edged.clock import BoundaryWaiter, Clock
from edged.config import Device
from edged.intervals import ChannelState, IntervalContext
from edged.modbus import RawRead, TcpEndpoint
from edged.model import Flag, Interval, Read
from edged.payloads import Topics, encode, interval_payload, iso_utc
from edged.registers import Point, ReadRequest, coalesce
from edged.schedule import next_boundary
from edged.store import OutboxMessage, Store
from edged.timeflags import TimeFlags

log = structlog.get_logger("edged.poller")


@dataclass(slots=True)
class Pending:
    """What one poller step hands to the recorder."""

    reads: list[Read] = field(default_factory=list)
    intervals: list[tuple[Interval, bytes]] = field(default_factory=list)
    states: dict[tuple[str, str], ChannelState] = field(default_factory=dict)
    messages: list[tuple[int, OutboxMessage]] = field(default_factory=list)


class Recorder:
    """Single writer: batches pollers' results into durable transactions."""

    def __init__(self, store: Store, on_committed: Callable[[], None]) -> None:
        self._store = store
        self._on_committed = on_committed
        self._queue: asyncio.Queue[Pending | None] = asyncio.Queue()

    def submit(self, pending: Pending) -> None:
        self._queue.put_nowait(pending)

    async def close(self) -> None:
        """Flush what is queued and end `run`."""
        self._queue.put_nowait(None)

    async def run(self) -> None:
        while True:
            first = await self._queue.get()
            batch = Pending()
            done = first is None
            items = [first] if first is not None else []
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if item is None:
                    done = True
                else:
                    items.append(item)
            for item in items:
                batch.reads.extend(item.reads)
                batch.intervals.extend(item.intervals)
                batch.states.update(item.states)
                batch.messages.extend(item.messages)
            if items:
                await self._store.commit_boundary(
                    batch.reads, batch.intervals, batch.states, batch.messages
                )
                self._on_committed()
            if done:
                return


@dataclass(slots=True)
class DeviceHealth:
    """Comms state of a device, published retained on its status topic."""

    last_good_read: datetime | None = None
    last_error: str | None = None
    consecutive_errors: int = 0
    reads: int = 0
    errors: int = 0

    @property
    def comms(self) -> str:
        if self.reads == 0:
            return "unknown"
        return "online" if self.consecutive_errors == 0 else "offline"


class DevicePoller:
    def __init__(
        self,
        *,
        site: str,
        device: Device,
        zone: tzinfo,
        endpoint: TcpEndpoint,
        clock: Clock,
        waiter: BoundaryWaiter,
        store: Store,
        recorder: Recorder,
        topics: Topics,
        states: dict[str, ChannelState],
        on_health: Callable[[str, DeviceHealth], None],
        time_flags: TimeFlags | None = None,
    ) -> None:
        self.device = device
        self._ctx = IntervalContext(site=site, device=device, zone=zone)
        self._endpoint = endpoint
        self._clock = clock
        self._waiter = waiter
        self._store = store
        self._recorder = recorder
        self._topics = topics
        self._states = states
        self._on_health = on_health
        self._time_flags = time_flags or TimeFlags()
        # End of the interval the next boundary read closes: time events
        # (steps, AMT ending, outages) after it flag that interval.
        known = [st.counter_at for st in states.values() if st.counter_at is not None]
        self._interval_since: datetime | None = min(known) if known else None
        self._stop = asyncio.Event()
        self.health = DeviceHealth()
        self._requests: tuple[ReadRequest, ...] = coalesce(
            [Point(c.name, c.function, c.address, c.type, c.word_order) for c in device.channels]
        )

    def stop(self) -> None:
        """Finish the read in flight (if any), then end `run`."""
        self._stop.set()

    async def run(self) -> None:
        # A start-up baseline read, so the first interval is PARTIAL rather
        # than lost; a counter persisted before a restart takes precedence.
        read = await self._read(boundary=None, lateness_ms=None)
        self._states = engine.baseline_device(self._states, read, self.device.channels)
        self._submit(read, [])
        boundary = next_boundary(self._clock.now(), self.device.interval_s, self._ctx.zone)
        while not self._stop.is_set():
            lateness_ms = await self._wait(boundary)
            if lateness_ms is None:
                return
            read = await self._read(boundary, lateness_ms)
            self._states, records = engine.close_device(self._states, read, self._ctx)
            self._submit(read, records)
            # Aim at the next boundary after now: if this read overran whole
            # intervals, the ones passed are closed as MISSING at the next read.
            boundary = next_boundary(
                max(boundary, self._clock.now()), self.device.interval_s, self._ctx.zone
            )

    async def _wait(self, boundary: datetime) -> float | None:
        """Lateness (ms) at the boundary, or None when asked to stop first."""
        boundary_task = asyncio.ensure_future(self._waiter.wait(boundary))
        stop_task = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({boundary_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_task.cancel()
        if not boundary_task.done():
            boundary_task.cancel()
            return None
        return boundary_task.result()

    async def _read(self, boundary: datetime | None, lateness_ms: float | None) -> Read:
        time_state = self._clock.time_state
        read_at = self._clock.now()
        if boundary is not None:
            # Lateness is measured when the request is sent, not when we woke.
            lateness_ms = (read_at - boundary) / timedelta(milliseconds=1)
        raw: RawRead = await self._endpoint.read(self.device.transport.unit_id, self._requests)
        flags: frozenset[Flag] = frozenset()
        if boundary is not None:
            flags = self._time_flags.flags_for(self._interval_since, read_at)
            self._interval_since = read_at
        elif self._interval_since is None:
            self._interval_since = read_at
        read = Read(
            flags=flags,
            device=self.device.id,
            boundary=boundary,
            read_at=read_at,
            read_lateness_ms=lateness_ms,
            time_state=time_state,
            values=raw.values if raw.error is None else {},
            registers=raw.registers,
            error=raw.error,
        )
        self._update_health(read)
        return read

    def _update_health(self, read: Read) -> None:
        health = self.health
        health.reads += 1
        if read.ok:
            health.last_good_read = read.read_at
            health.consecutive_errors = 0
        else:
            assert read.error is not None
            health.errors += 1
            health.consecutive_errors += 1
            health.last_error = f"{read.error.kind}: {read.error.detail}"
            log.warning(
                "read failed",
                device=self.device.id,
                boundary=iso_utc(read.boundary) if read.boundary else None,
                error_kind=str(read.error.kind),
                error=read.error.detail,
            )
        self._on_health(self.device.id, health)

    def _submit(self, read: Read, records: list[Interval]) -> None:
        pending = Pending(reads=[read])
        for record in records:
            seq = self._store.allocate_seq()
            payload = encode(interval_payload(record, seq))
            pending.intervals.append((record, payload))
            pending.messages.append(
                (seq, OutboxMessage(self._topics.interval(record.device, record.channel), payload))
            )
            log.info(
                "interval",
                device=record.device,
                channel=record.channel,
                end=iso_utc(record.end),
                value=record.value,
                flags=sorted(str(f) for f in record.flags),
            )
        for name, state in self._states.items():
            pending.states[(self.device.id, name)] = state
        self._recorder.submit(pending)
