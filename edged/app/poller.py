"""One device's loop, and the recorder that persists what the pollers produce.

The poller waits for the absolute boundary (never "previous + period"), sends
its requests the moment the boundary arrives, hands the read to the pure
interval engine and gives the results to the recorder. The recorder commits
everything queued since its last commit in one transaction (group commit: a
thousand devices on one boundary cost one fsync), then wakes the publisher.
Fast-poll measurements ride along with the next commit, or are flushed on
their own every few seconds. What the disk budget sheds (edged.app.housekeeping)
the recorder simply does not write: the pollers work the same either way.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo
from typing import Any

import structlog

from edged.app import logs
from edged.app.heartbeat import Heartbeat
from edged.app.holding import STORAGE_ERRORS, Holding
from edged.config.schema import Device
from edged.core import flags as flag_table
from edged.core.compensation.record import (
    NO_SAMPLES,
    channels_of,
    compensate_records,
    parameters_event,
    params_of,
)
from edged.core.deadband import Deadband, Reported, report
from edged.core.demand import PeakState, peak_event, update_peaks
from edged.core.engine import intervals as engine
from edged.core.engine.state import (
    ChannelState,
    IntervalContext,
)
from edged.core.model import (
    Event,
    Flag,
    Interval,
    Measurement,
    Quality,
    Read,
    ReadError,
    ReadErrorKind,
    iso_utc,
)
from edged.core.payloads import (
    Topics,
    encode,
    event_payload,
    interval_payload,
    measurement_payload,
)
from edged.core.plan import (
    DevicePlan,
    plan_device,
)
from edged.core.scale import rescaled
from edged.core.schedule import next_boundary
from edged.core.time.flags import TimeFlags
from edged.core.time.readtiming import ReadTiming
from edged.io.bus import Priority
from edged.io.clock import BoundaryWaiter, Clock
from edged.io.modbus import (
    DeviceRead,
    Link,
    ScheduledLink,
    read_device,
)
from edged.io.store import OutboxMessage, Store, StoreReplaced
from edged.io.sunspec import discover

log = structlog.get_logger("edged.app.poller")

# Fast-poll measurements are written with the next boundary commit, or after
# this long, or once this many are buffered: one transaction per batch, never
# one per poll (an fsync a second per device would wear the flash).
MEASUREMENT_FLUSH_S = 5.0
MEASUREMENT_BATCH_ROWS = 1000


@dataclass(slots=True, kw_only=True)
class Pending:
    """What one poller step hands to the recorder."""

    reads: list[Read] = field(default_factory=list)
    intervals: list[tuple[Interval, bytes]] = field(default_factory=list)
    states: dict[tuple[str, str], ChannelState] = field(default_factory=dict)
    messages: list[tuple[int, OutboxMessage]] = field(default_factory=list)
    peaks: dict[tuple[str, str], PeakState] = field(default_factory=dict)
    # Stored records queued again on request, under their original seq.
    replays: list[tuple[int, OutboxMessage]] = field(default_factory=list)
    # Called once this is durable (after the commit that holds it).
    after_commit: list[Callable[[], None]] = field(default_factory=list)


def outbox_pending(
    store: Store, topics: Topics, site: str, records: Sequence[Interval], events: Sequence[Event]
) -> Pending:
    """Records and events as payloads with their outbox seq, ready to commit."""
    pending = Pending()
    for record in records:
        seq = store.allocate_seq()
        payload = encode(interval_payload(record, seq, store_id=store.store_id))
        pending.intervals.append((record, payload))
        pending.messages.append(
            (
                seq,
                OutboxMessage(
                    topic=topics.interval(record.device, record.channel), payload=payload
                ),
            )
        )
    for event in events:
        seq = store.allocate_seq()
        payload = encode(event_payload(event, site, seq, store.store_id))
        pending.messages.append(
            (seq, OutboxMessage(topic=topics.event(event.device), payload=payload))
        )
    return pending


@dataclass(slots=True)
class MeasureCounts:
    """Fast-poll values since start: read, published after report-by-exception,
    and stored (published ones, unless the disk budget sheds measurements)."""

    polled: int = 0
    published: int = 0
    stored: int = 0


class Recorder:
    """Single writer: batches pollers' results into durable transactions."""

    def __init__(
        self,
        store: Store,
        on_committed: Callable[[], None],
        measurement_flush_s: float = MEASUREMENT_FLUSH_S,
        tap: Callable[[Sequence[Interval]], Sequence[OutboxMessage]] | None = None,
        tap_replaces: bool = False,
    ) -> None:
        self._store = store
        # More outbox rows for the same records (Sparkplug), in the same commit;
        # or, replacing, the records' rows themselves under their own seqs (which
        # the stored records carry: "unsent" keeps meaning what it says).
        self._tap = tap
        self._tap_replaces = tap_replaces
        self._on_committed = on_committed
        # A failed commit (disk full, read-only, I/O error) keeps its batch
        # here and retries; see edged.app.holding.
        self.holding: Holding[Pending] = Holding(Pending)
        # Called before every commit (the disk alarm's free-space check).
        self.before_commit: Callable[[], None] | None = None
        # Told when the store file was replaced or deleted under the daemon.
        self.on_fatal: Callable[[StoreReplaced], None] | None = None
        self._queue: asyncio.Queue[Pending | asyncio.Future[None] | None] = asyncio.Queue()
        self.heartbeat = Heartbeat(name="recorder")
        self._measurement_flush_s = measurement_flush_s
        self._measurements: list[Measurement] = []
        self._flush_timer: asyncio.TimerHandle | None = None
        self._shedding: frozenset[str] = frozenset()
        self.measure_counts = MeasureCounts()  # shared by the pollers

    @property
    def shedding(self) -> frozenset[str]:
        return self._shedding

    def set_shedding(self, kinds: frozenset[str]) -> None:
        """Kinds of rows not to store ("measurements", "reads"): the disk budget's call."""
        self._shedding = kinds
        if "measurements" in kinds:
            self._measurements.clear()

    def submit(self, pending: Pending) -> None:
        if self._tap is not None and pending.intervals:
            tapped = self._tap([record for record, _ in pending.intervals])
            if self._tap_replaces:
                by_seq = {
                    json.loads(payload)["seq"]: message
                    for (_, payload), message in zip(pending.intervals, tapped, strict=True)
                }
                pending.messages = [(seq, by_seq.get(seq, m)) for seq, m in pending.messages]
            else:
                # Seqs allocated now, right after the records' own: still in commit order.
                for message in tapped:
                    pending.messages.append((self._store.allocate_seq(), message))
        self._queue.put_nowait(pending)

    def add_measurement(self, measurement: Measurement) -> None:
        if "measurements" in self._shedding:
            return
        self.measure_counts.stored += len(measurement.values)
        self._measurements.append(measurement)
        if len(self._measurements) >= MEASUREMENT_BATCH_ROWS:
            self._queue.put_nowait(Pending())  # an empty step: commit what is buffered
        elif self._flush_timer is None:
            self._flush_timer = asyncio.get_running_loop().call_later(
                self._measurement_flush_s, self._queue.put_nowait, Pending()
            )

    async def _next(self, timeout_s: float | None) -> Pending | asyncio.Future[None] | None:
        """The next queued item; an empty step when held data is due a retry."""
        if timeout_s is None:
            return await self._queue.get()
        try:
            async with asyncio.timeout(timeout_s):
                return await self._queue.get()
        except TimeoutError:
            return Pending()

    async def close(self) -> None:
        """Flush what is queued and end `run`."""
        self._queue.put_nowait(None)

    async def flush(self) -> None:
        """Wait until everything submitted so far is committed."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(done)
        await done

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next(self.holding.retry_in_s())
            batch = self.holding.take()
            done = False
            items: list[Pending] = []
            flushed: list[asyncio.Future[None]] = []
            item: Pending | asyncio.Future[None] | None = first
            while True:
                if item is None:
                    done = True
                elif isinstance(item, asyncio.Future):
                    flushed.append(item)
                else:
                    items.append(item)
                if self._queue.empty():
                    break
                item = self._queue.get_nowait()
            for item in items:
                batch.reads.extend(item.reads)
                batch.intervals.extend(item.intervals)
                batch.states.update(item.states)
                batch.messages.extend(item.messages)
                batch.peaks.update(item.peaks)
                batch.replays.extend(item.replays)
                batch.after_commit.extend(item.after_commit)
            if "reads" in self._shedding:
                batch.reads.clear()
            measurements, self._measurements = self.holding.measurements + self._measurements, []
            self.holding.measurements = []
            if self._flush_timer is not None:
                self._flush_timer.cancel()
                self._flush_timer = None
            if measurements or any(
                (
                    batch.reads,
                    batch.intervals,
                    batch.states,
                    batch.messages,
                    batch.peaks,
                    batch.replays,
                )
            ):
                self.heartbeat.busy(loop.time())
                if self.before_commit is not None:
                    self.before_commit()
                try:
                    self._store.check_identity()
                except StoreReplaced as exc:
                    # Writing on would go to a file nobody reads: keep the
                    # batch (it is reported as lost at shutdown) and stop.
                    self.heartbeat.idle()
                    self.holding.failed(batch, measurements, exc)
                    if self.on_fatal is not None:
                        self.on_fatal(exc)
                    for future in flushed:
                        _resolve(future)
                    if done:
                        self.holding.abandon()
                        return
                    continue
                try:
                    await self._store.commit_boundary(
                        batch.reads,
                        batch.intervals,
                        batch.states,
                        batch.messages,
                        batch.peaks,
                        replays=batch.replays,
                        measurements=measurements,
                    )
                except STORAGE_ERRORS as exc:
                    # The daemon stays up: the batch waits in memory and is
                    # written, in full, once the store accepts writes again.
                    self.holding.failed(batch, measurements, exc)
                    for future in flushed:
                        _resolve(future)
                    if done:
                        self.holding.abandon()
                        return
                    continue
                finally:
                    self.heartbeat.idle()
                self.holding.succeeded()
                self._on_committed()
            for callback in batch.after_commit:
                callback()
            for future in flushed:
                _resolve(future)
            if done:
                return


@dataclass(slots=True, kw_only=True)
class DeviceHealth:
    """Comms state of a device, published retained on its status topic."""

    last_good_read: datetime | None = None
    last_error: str | None = None
    consecutive_errors: int = 0
    reads: int = 0
    errors: int = 0
    meter_clock_offset_s: float | None = None

    @property
    def comms(self) -> str:
        if self.reads == 0:
            return "unknown"
        return "online" if self.consecutive_errors == 0 else "offline"


# Meter clocks are read in whole seconds: a change of the offset within this
# is resolution, not news.
METER_CLOCK_REPUBLISH_S = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthShown:
    """What a published device status said, to tell whether a new one is news.

    `reads` and `last_good_read` move on every read; they are refreshed on the
    status cadence (`status_every`), not published after every read."""

    comms: str
    consecutive_errors: int
    errors: int
    last_error: str | None
    meter_clock_offset_s: float | None

    @classmethod
    def of(cls, health: DeviceHealth) -> HealthShown:
        return cls(
            comms=health.comms,
            consecutive_errors=health.consecutive_errors,
            errors=health.errors,
            last_error=health.last_error,
            meter_clock_offset_s=health.meter_clock_offset_s,
        )

    def news(self, now: HealthShown) -> bool:
        """Whether `now` says something this did not (pure)."""
        if (self.comms, self.consecutive_errors, self.errors, self.last_error) != (
            now.comms, now.consecutive_errors, now.errors, now.last_error,
        ):  # fmt: skip
            return True
        was, offset = self.meter_clock_offset_s, now.meter_clock_offset_s
        if was is None or offset is None:
            return (was is None) != (offset is None)
        return abs(offset - was) > METER_CLOCK_REPUBLISH_S


class DevicePoller:
    def __init__(
        self,
        *,
        site: str,
        device: Device,
        zone: tzinfo,
        link: Link,
        clock: Clock,
        waiter: BoundaryWaiter,
        store: Store,
        recorder: Recorder,
        topics: Topics,
        states: dict[str, ChannelState],
        on_health: Callable[[str, DeviceHealth], None],
        time_flags: TimeFlags | None = None,
        peaks: dict[str, PeakState] | None = None,
        on_records: Callable[[Sequence[Interval]], None] | None = None,
        on_peak: Callable[[str, str, PeakState], None] | None = None,
        on_measurement: Callable[[str, dict[str, Any]], bool] | None = None,
        health: DeviceHealth | None = None,
    ) -> None:
        self.device = device
        self._ctx = IntervalContext(site=site, device=device, zone=zone)
        self._link = link
        self._clock = clock
        self._waiter = waiter
        self._store = store
        self._recorder = recorder
        self._topics = topics
        self._states = states
        self._on_health = on_health
        self._time_flags = time_flags or TimeFlags()
        self._site = site
        self._peaks = dict(peaks or {})
        self._on_records = on_records
        self._on_peak = on_peak
        self._on_measurement = on_measurement
        # Last exponent of each scale-registered channel (SCALE_CHANGED on a change).
        self._scale_factors: dict[str, int] = {}
        # When the previous read was taken: time events (steps, AMT ending)
        # after it, in monotonic order, and outages after it, in reference
        # time, flag the record the next boundary read closes.
        known = [st.counter_at for st in states.values() if st.counter_at is not None]
        self._timing = ReadTiming(
            interval_s=device.interval_s,
            zone=zone,
            since=min(known) if known else None,
            mono_since=clock.monotonic(),
        )
        self._stop = asyncio.Event()
        self._wakes: set[asyncio.Future[None]] = set()
        # Carried over when a config reload restarts this device's poller.
        self.health = health or DeviceHealth()
        self._plan: DevicePlan = plan_device(device)
        # A SunSpec device's registers are offsets into a model found on the meter.
        self._located = device.sunspec is None
        # Compensated channels (docs/compensation.md): computed from finished
        # records, beside them; the fast-poll samples since the last boundary
        # read give the interval's operating point.
        self._compensation = params_of(device)
        self._samples = NO_SAMPLES
        self.heartbeat = Heartbeat(name=f"poller:{device.id}")
        self.measure_heartbeat = Heartbeat(name=f"measure:{device.id}")

    async def run_measurements(self) -> None:
        """Fast polling on an absolute schedule; boundary reads on the same link
        take priority (the link holds fast polls back around boundaries)."""
        if self._plan.measurements is None or self._plan.measure_every_s is None:
            return
        every_s = self._plan.measure_every_s
        points = self.device.measurements.points if self.device.measurements else ()
        units = {p.name: p.unit for p in points}
        # Report by exception (edged.core.deadband): what moved, or was silent too long.
        bands = {p.name: Deadband(p.deadband, p.deadband_percent) for p in points}
        max_silence_s = self.device.measurements.max_silence if self.device.measurements else None
        reported: dict[str, Reported] = {}
        counts = self._recorder.measure_counts
        loop = asyncio.get_running_loop()
        next_mono = loop.time()
        while not self._stop.is_set():
            next_mono += every_s
            delay_s = next_mono - loop.time()
            if delay_s < 0:  # overran: skip the ticks already missed
                next_mono += every_s * (-delay_s // every_s + 1)
                delay_s = next_mono - loop.time()
            self.measure_heartbeat.waiting_until(next_mono)
            await self._sleep(delay_s)
            if self._stop.is_set():
                return
            self.measure_heartbeat.busy(loop.time())
            plan = self._plan
            if not self._located or plan.measurements is None:
                continue  # the boundary reads locate a SunSpec model first
            started = self._clock.now()
            result = await read_device(
                self._link, plan.unit_id, plan.measurements, priority=Priority.FAST
            )
            if result.error is not None:
                continue
            at = started + timedelta(seconds=result.queued_s)
            if self._compensation is not None:
                # Every poll counts towards the interval's operating point,
                # whether or not report by exception publishes it.
                self._samples = self._samples.add(result.values, self._compensation)
            values, reported = report(bands, reported, result.values, loop.time(), max_silence_s)
            counts.polled += len(result.values)
            counts.published += len(values)
            if not values:
                continue  # nothing moved beyond its deadband
            shown = {name: units[name] for name in values if name in units}
            payload = measurement_payload(self._site, self.device.id, at, values, shown)
            if self._on_measurement is not None:
                self._on_measurement(self._topics.measurement(self.device.id), payload)
            # Kept locally too (unless the disk budget sheds them), so a
            # historian can be backfilled; payload["values"] has NaN as None.
            self._recorder.add_measurement(Measurement(self.device.id, at, payload["values"]))

    def stop(self) -> None:
        """Finish the read in flight (if any), then end `run`."""
        self._stop.set()
        for wake in self._wakes:
            _resolve(wake)

    async def _until(self, wake: asyncio.Future[None]) -> None:
        """Wait for `wake`, or for stop(), whichever comes first.

        The poller's waits are plain futures woken by a timer, the boundary or
        stop(): no task per wait. (Waiting on stop through wait_for and
        asyncio.wait made three tasks per poller per boundary; with a thousand
        meters they put the first request 200 ms after the boundary.)"""
        if self._stop.is_set():
            return
        self._wakes.add(wake)
        try:
            await wake
        finally:
            self._wakes.discard(wake)

    async def _sleep(self, delay_s: float) -> None:
        loop = asyncio.get_running_loop()
        wake: asyncio.Future[None] = loop.create_future()
        timer = loop.call_later(delay_s, _resolve, wake)
        try:
            await self._until(wake)
        finally:
            timer.cancel()

    async def run(self) -> None:
        # A start-up baseline read, so the first interval is PARTIAL rather
        # than lost; a counter persisted before a restart takes precedence.
        self.heartbeat.busy(asyncio.get_running_loop().time())
        read = await self._read(boundary=None, lateness_ms=None)
        self._states = engine.baseline_device(self._states, read, self.device.channels)
        self._samples = NO_SAMPLES
        started = [] if self._compensation is None else [
            parameters_event(self._compensation, read.read_at)
        ]  # fmt: skip
        self._submit(read, [], started)
        boundary = next_boundary(self._clock.now(), self.device.interval_s, self._ctx.zone)
        self._link.expect_boundary((boundary - self._clock.now()).total_seconds())
        while not self._stop.is_set():
            self.heartbeat.waiting_for(boundary)
            lateness_ms = await self._wait(boundary)
            if lateness_ms is None:
                return
            self.heartbeat.busy(asyncio.get_running_loop().time())
            read = await self._read(boundary, lateness_ms)
            step = engine.step_device(self._states, read, self._ctx)
            self._states = step.states
            self._submit(read, self._with_compensation(step.records), step.events)
            # A forward step of the reference may have labelled the read with
            # a later boundary than the one aimed at.
            boundary = read.boundary or boundary
            # Aim at the next boundary after now: if this read overran whole
            # intervals, the ones passed are closed as MISSING at the next read.
            boundary = next_boundary(
                max(boundary, self._clock.now()), self.device.interval_s, self._ctx.zone
            )
            self._link.expect_boundary((boundary - self._clock.now()).total_seconds())

    async def _wait(self, boundary: datetime) -> float | None:
        """Lateness (ms) at the boundary, or None when asked to stop first."""
        link = self._link
        if isinstance(link, ScheduledLink):
            # The read's first request goes on the wire at the instant itself,
            # before this poller wakes (ScheduledLink.presend); `_read` then
            # asks for the same requests and gets its answer.
            self._waiter.at_instant(boundary, lambda: self._presend(link))
        instant = self._waiter.instant(boundary)
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def arrived(_: asyncio.Future[float]) -> None:
            _resolve(wake)

        instant.add_done_callback(arrived)
        try:
            await self._until(wake)
        finally:
            instant.remove_done_callback(arrived)
        if not instant.done():
            return None
        return instant.result()

    def _presend(self, link: ScheduledLink) -> bool:
        """At the boundary instant: send the boundary read's first request,
        unless this poller was stopped meanwhile (a reload: its successor
        reads with its own plan, and must not find the line taken)."""
        if self._stop.is_set() or not self._located:
            return False
        return link.presend(self._plan.unit_id, self._plan.boundary.requests)

    async def _read(self, boundary: datetime | None, lateness_ms: float | None) -> Read:
        time_state = self._clock.time_state
        read_at = self._clock.now()
        mono_s = self._clock.monotonic()
        if boundary is not None:
            # Lateness is measured when the request is sent, not when we woke.
            lateness_ms = (read_at - boundary) / timedelta(milliseconds=1)
        error = await self._locate()
        if error is not None:
            result = DeviceRead(
                values={},
                flags=frozenset(),
                meter_clock_offset_s=None,
                registers=(),
                error=error,
                queued_s=0.0,
                duration_s=0.0,
                notes=(),
            )
        else:
            result = await read_device(
                self._link,
                self._plan.unit_id,
                self._plan.boundary,
                priority=Priority.BOUNDARY,
                reference_s=read_at.timestamp(),
            )
        # On a shared bus the request may wait its turn: record when it went out.
        # (A request sent at the boundary instant, before this poller woke,
        # has a negative queued_s; it cannot have left before the boundary.)
        woke_at = read_at
        read_at += timedelta(seconds=result.queued_s)
        mono_s += result.queued_s
        if result.queued_s < 0 and boundary is not None and read_at < boundary:
            mono_s += (boundary - read_at).total_seconds()
            read_at = boundary
        flags: frozenset[Flag] = result.flags
        outages: tuple[tuple[datetime, datetime], ...] = ()
        if boundary is not None:
            # Labelled by when it woke: waiting for a busy bus does not move a
            # read to the next boundary; a step of the reference does.
            timed = self._timing.boundary_read(
                boundary, read_at, mono_s, self._time_flags, woke_at=woke_at
            )
            boundary = timed.boundary
            flags |= timed.flags
            outages = timed.outages
            lateness_ms = (read_at - boundary) / timedelta(milliseconds=1)
        else:
            self._timing.baseline(read_at, mono_s)
        changed = rescaled(self._scale_factors, result.scale_factors)
        self._scale_factors.update(result.scale_factors)
        read = Read(
            flags=flags,
            rescaled=changed,
            device=self.device.id,
            boundary=boundary,
            read_at=read_at,
            read_lateness_ms=lateness_ms,
            time_state=time_state,
            values=dict(result.values) if result.error is None else {},
            registers=result.registers,
            error=result.error,
            meter_clock_offset_s=result.meter_clock_offset_s,
            mono_s=mono_s,
            boot_id=getattr(self._clock, "boot_id", None),
            outages=outages,
        )
        self._update_health(read)
        return read

    async def _locate(self) -> ReadError | None:
        """Find a SunSpec device's model (once); the error makes the read fail."""
        if self._located:
            return None
        sunspec = self.device.sunspec
        assert sunspec is not None
        found = await discover(self._link, self._plan.unit_id, sunspec.models)
        if isinstance(found, ReadError):
            return found
        try:
            self._plan = plan_device(self.device, base_address=found.address)
        except ValueError as exc:
            return ReadError(ReadErrorKind.MALFORMED, f"SunSpec model {found.model_id}: {exc}")
        self._located = True
        log.info("sunspec model found", device=self.device.id, model=found.model_id,
                 address=found.address, length=found.length)  # fmt: skip
        return None

    def _with_compensation(self, records: Sequence[Interval]) -> Sequence[Interval]:
        """The raw records and, after them, their compensated channels."""
        samples, self._samples = self._samples, NO_SAMPLES
        if self._compensation is None:
            return records
        return [*records, *compensate_records(records, self._compensation, samples)]

    def _update_health(self, read: Read) -> None:
        health = self.health
        health.reads += 1
        if read.ok:
            health.last_good_read = read.read_at
            health.consecutive_errors = 0
            health.meter_clock_offset_s = read.meter_clock_offset_s
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

    def _submit(self, read: Read, records: Sequence[Interval], events: Sequence[Event]) -> None:
        device = self.device
        before = self._peaks
        self._peaks, closed = update_peaks(
            self._peaks, records, self._ctx.zone, device.billing_reset_day
        )
        if closed:
            units = {name: c.demand_unit for name, c in channels_of(device).items()}
            events = [*events, peak_event(device.id, closed, units)]
        pending = outbox_pending(self._store, self._topics, self._site, records, events)
        pending.reads.append(read)
        debug = logs.enabled(logging.DEBUG)
        for record in records:
            # Every record at debug; at info only those worth a look: a line per
            # meter per boundary was a twentieth of a 1000-meter boundary's CPU,
            # and a dropped debug line still cost its fields and a bind.
            quality = flag_table.quality(record.flags)
            if quality is Quality.ACTUAL and not debug:
                continue
            (log.debug if quality is Quality.ACTUAL else log.info)(
                "interval",
                device=record.device,
                channel=record.channel,
                end=iso_utc(record.end),
                value=record.value,
                quality=str(quality),
                flags=sorted(str(f) for f in record.flags),
            )
        for name, state in self._states.items():
            pending.states[(device.id, name)] = state
        # Peaks that this boundary changed (most boundaries change none).
        changed = [
            name
            for name in {r.channel for r in records}
            if name in self._peaks and self._peaks[name] != before.get(name)
        ]
        for name in changed:
            pending.peaks[(device.id, name)] = self._peaks[name]
        self._recorder.submit(pending)
        if self._on_peak is not None:
            for name in changed:
                self._on_peak(device.id, name, self._peaks[name])
        if records and self._on_records is not None:
            self._on_records(records)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
