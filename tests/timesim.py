"""A deterministic world for the time path (issue 13): virtual clocks, a
simulated meter, and the pure parts of edged wired as the daemon wires them.

Three clocks, all virtual: true time (what the meter counts in and what the
NTP source serves, give or take its own error), the system clock (true time
plus an error someone may set) and the monotonic clock (true time since boot).
Nothing sleeps and nothing opens a socket: `run_until` advances true time from
event to event (an NTP poll, a scheduled action, the instant the reference
clock reaches the boundary a poller waits for).

What runs is edged's own code: `Timebase` (reference time), `TimeFlags` (time
events filed by monotonic time, as `App._on_transition` files them),
`ReadTiming` (what `DevicePoller._read` decides about a read), the interval
engine (`step_device`, `baseline_device`), `update_peaks`, and
`VirtualMeters`. The poller loop itself (asyncio) is mirrored by `_wake`:
wait for the reference to reach the aimed boundary, read, step the engine,
aim at the next boundary after max(boundary, now).

The world also keeps what really happened (true time and counter of every
read, every time event with its monotonic time) so an oracle can judge the
records independently of the engine.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Any

from edged.config.schema import Device
from edged.core.demand import PeakState, update_peaks
from edged.core.engine.intervals import (
    baseline_device,
    step_device,
)
from edged.core.engine.state import (
    ChannelState,
    IntervalContext,
)
from edged.core.model import Event, Flag, Interval, Read, ReadError, ReadErrorKind
from edged.core.schedule import next_boundary
from edged.core.time.flags import TimeFlags
from edged.core.time.ntpfit import NtpSample
from edged.core.time.outage import gateway_outage
from edged.core.time.readtiming import ReadTiming
from edged.core.time.settings import TimebaseConfig
from edged.core.time.timebase import Timebase
from edged.core.time.transitions import TimeTransition
from edged.core.virtual.meters import VirtualMeters
from edged.core.virtual.plan import plan_virtual_meter

SITE = "sim"


def utc(unix_s: float) -> datetime:
    return datetime.fromtimestamp(unix_s, UTC)


def make_device(
    device_id: str = "unit1",
    interval_s: int = 1,
    *,
    multiplier: float = 0.144,
    type_: str = "uint32",
    rollover: int | None = None,
    gaps: str = "long",
    **extra: Any,
) -> Device:
    channel: dict[str, Any] = {
        "name": "energy_import",
        "register": 0,
        "multiplier": multiplier,
        "type": type_,
    }
    if rollover is not None:
        channel["rollover"] = rollover
    return Device.model_validate(
        {
            "id": device_id,
            "interval": interval_s,
            "transport": {"type": "tcp", "host": "127.0.0.1"},
            "channels": [channel],
            "gaps": gaps,
            **extra,
        }
    )


@dataclass
class Meter:
    """A counter that is a function of true time: `rate` counts per second."""

    rate: float
    origin_s: float  # true time at which the counter read `start`
    start: int | float = 1_000_000
    rollover: int | None = None
    float32: bool = False
    offline: bool = False
    # (from true time, extra counts) added from then on: a counter reset.
    steps: list[tuple[float, float]] = field(default_factory=list)

    def counts_at(self, true_s: float) -> float:
        """Unwrapped counts since the origin (the independent energy model)."""
        extra = sum(c for at, c in self.steps if true_s >= at)
        return self.rate * (true_s - self.origin_s) + extra

    def register(self, true_s: float) -> int | float:
        raw = self.start + self.counts_at(true_s)
        if self.float32:
            return float(struct.unpack("<f", struct.pack("<f", raw))[0])
        value = math.floor(raw + 1e-9)
        return value % self.rollover if self.rollover else value


@dataclass
class ReadFact:
    """What really happened at one read."""

    device: str
    boundary: datetime | None
    true_s: float
    mono_s: float
    read_at: datetime
    register: int | float | None
    run: int = 0  # which start of the daemon took it
    boot: int = 1  # which boot of the machine (monotonic times compare within one)


@dataclass
class EventFact:
    mono_s: float
    flags: frozenset[Flag]
    transition: TimeTransition
    run: int = 0


@dataclass
class Poller:
    device: Device
    meter: Meter
    states: dict[str, ChannelState]
    timing: ReadTiming
    aimed: datetime | None = None
    peaks: dict[str, PeakState] = field(default_factory=dict)


class World:
    def __init__(
        self,
        devices: list[tuple[Device, Meter]],
        *,
        start_s: float = 1_795_000_000.0,  # 2026-11-18, a round-ish instant
        zone: tzinfo = UTC,
        poll_s: float = 1.0,
        sys_err_s: float = 0.0,
        ntp_err_s: float = 0.0,
        ntp_silent: bool = False,
        confirmed_before_start: bool = True,
        virtual_meters: list[dict[str, Any]] | None = None,
        mark_every_s: float = 1.0,
        poll_phase_s: float = 0.37,
    ) -> None:
        self.zone = zone
        self.true_s = start_s
        self.boot_s = start_s - 1000.0  # monotonic = true - boot
        self.sys_err_s = sys_err_s
        self.ntp_err_s = ntp_err_s
        self.ntp_silent = ntp_silent
        self.poll_s = poll_s
        self.mark_every_s = mark_every_s
        self.poll_phase_s = poll_phase_s
        self.config = TimebaseConfig(poll_s=poll_s, drift_min_span_s=1e9)
        self.records: list[Interval] = []
        self.events: list[Event] = []
        self.event_facts: list[EventFact] = []
        self.transitions: list[TimeTransition] = []
        self.reads: list[ReadFact] = []
        self.by_read: dict[int, list[Interval]] = {}  # index in reads -> records it closed
        self.actions: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self.devices = devices
        self.virtual_plans = []
        if virtual_meters:
            from edged.config.schema import VirtualMeter

            configured = [d for d, _ in devices]
            self.virtual_plans = [
                plan_virtual_meter(VirtualMeter.model_validate(v), configured)
                for v in virtual_meters
            ]
        self.virtual_records: list[Interval] = []
        self.virtual_peaks: dict[str, dict[str, PeakState]] = {}
        self.last_mark: datetime | None = None
        self.pollers: list[Poller] = []
        self._persisted: dict[str, dict[str, str]] = {}
        self._persisted_peaks: dict[str, dict[str, PeakState]] = {}
        self.run = 0
        self.boot = 1
        self._start(confirmed_before_start)

    # -- clocks -------------------------------------------------------------------

    @property
    def mono_s(self) -> float:
        return self.true_s - self.boot_s

    @property
    def system_s(self) -> float:
        return self.true_s + self.sys_err_s

    def reference(self) -> datetime:
        return self.timebase.reference(self.system_s, self.mono_s)

    # -- the daemon ------------------------------------------------------------------

    def _start(self, confirmed: bool, last_mark: datetime | None = None) -> None:
        self.run += 1
        self.timebase = Timebase(self.config)
        self.time_flags = TimeFlags()
        self.virtual = (
            VirtualMeters(self.virtual_plans, SITE, self.zone) if self.virtual_plans else None
        )
        self._emit(self.timebase.start(self.system_s, self.mono_s, last_mark))
        if confirmed and not self.ntp_silent:
            self._poll_ntp()
        self.next_poll_s = self.true_s + self.poll_phase_s
        self.next_mark_s = self.true_s
        self.pollers = []
        for device, meter in self.devices:
            states = {
                name: ChannelState.from_json(text)
                for name, text in self._persisted.get(device.id, {}).items()
            }
            known = [s.counter_at for s in states.values() if s.counter_at is not None]
            timing = ReadTiming(
                interval_s=device.interval_s,
                zone=self.zone,
                since=min(known) if known else None,
                mono_since=self.mono_s,
            )
            poller = Poller(device, meter, states, timing)
            poller.peaks = dict(self._persisted_peaks.get(device.id, {}))
            self.pollers.append(poller)
        for poller in self.pollers:
            read = self._read(poller, None)
            poller.states = baseline_device(poller.states, read, poller.device.channels)
            poller.timing.baseline(read.read_at, self.mono_s)
            self._persist(poller)
            now = self.reference()
            poller.aimed = next_boundary(now, poller.device.interval_s, self.zone)
        self._mark()

    def restart(
        self,
        down_s: float,
        *,
        clean: bool,
        sys_err_after_s: float | None = None,
        reboot: bool = True,
        confirmed: bool = False,
    ) -> None:
        """Stop (dropping every in-memory state), stay down, start again."""
        last_mark = self.last_mark
        self.true_s += down_s
        if reboot:
            self.boot_s = self.true_s - 10.0
            self.boot += 1
        if sys_err_after_s is not None:
            self.sys_err_s = sys_err_after_s
        system_now = utc(self.system_s)
        self._start(confirmed, last_mark)
        if not clean:
            outage = gateway_outage(last_mark, system_now)
            if outage is not None:
                self.time_flags.add(outage.start, outage.end, frozenset({Flag.POWER_FAIL}))

    def _mark(self) -> None:
        """The liveness mark (edged.app.liveness.Liveness): the reference time, persisted."""
        self._emit(self.timebase.observe_clock(self.system_s, self.mono_s))
        self.last_mark = self.reference()

    def _persist(self, poller: Poller) -> None:
        self._persisted[poller.device.id] = {k: v.to_json() for k, v in poller.states.items()}
        self._persisted_peaks[poller.device.id] = dict(poller.peaks)

    def _emit(self, transitions: list[TimeTransition]) -> None:
        for transition in transitions:
            self.transitions.append(transition)
            # As App._on_transition files it.
            self.time_flags.add_event(transition.mono_s, transition.flags)
            self.event_facts.append(
                EventFact(transition.mono_s, transition.flags, transition, self.run)
            )
            self.events.append(transition.to_event(None))

    def _poll_ntp(self) -> None:
        sample = NtpSample(
            server="ntp",
            mono_s=self.mono_s,
            offset_s=(self.true_s + self.ntp_err_s) - self.system_s,
            delay_s=0.002,
            stratum=2,
        )
        self._emit(self.timebase.observe_ntp([sample], self.system_s, self.mono_s))

    def _read(self, poller: Poller, boundary: datetime | None) -> Read:
        # Real clocks advance between any two readings: nothing in edged
        # happens at the same monotonic instant as the step before it.
        self.true_s += 1e-6
        self._emit(self.timebase.observe_clock(self.system_s, self.mono_s))
        read_at = self.reference()
        meter = poller.meter
        register = None if meter.offline else meter.register(self.true_s)
        self.reads.append(
            ReadFact(
                poller.device.id,
                boundary,
                self.true_s,
                self.mono_s,
                read_at,
                register,
                self.run,
                self.boot,
            )
        )
        flags: frozenset[Flag] = frozenset()
        outages: tuple[tuple[datetime, datetime], ...] = ()
        if boundary is not None:
            timed = poller.timing.boundary_read(boundary, read_at, self.mono_s, self.time_flags)
            boundary, flags, outages = timed.boundary, timed.flags, timed.outages
        channel = poller.device.channels[0].name
        return Read(
            device=poller.device.id,
            boundary=boundary,
            read_at=read_at,
            read_lateness_ms=None
            if boundary is None
            else (read_at - boundary).total_seconds() * 1000,
            time_state=self.timebase.state,
            values={} if register is None else {channel: register},
            error=None if register is not None else ReadError(ReadErrorKind.TIMEOUT, "offline"),
            flags=flags,
            mono_s=self.mono_s,
            boot_id=f"boot-{self.boot}",
            outages=outages,
        )

    def _wake(self, poller: Poller) -> None:
        assert poller.aimed is not None
        read = self._read(poller, poller.aimed)
        ctx = IntervalContext(SITE, poller.device, self.zone)
        known = [st.last_end or st.counter_at for st in poller.states.values()]
        since = min((k for k in known if k is not None), default=None)
        assert read.boundary is not None
        if (
            since is not None
            and abs((read.boundary - since).total_seconds()) > 2_000 * poller.device.interval_s
        ):
            raise RuntimeError(f"runaway: a read at {read.boundary} after {since}")
        step = step_device(poller.states, read, ctx)
        poller.states = step.states
        poller.peaks, _ = update_peaks(
            poller.peaks, step.records, self.zone, poller.device.billing_reset_day
        )
        self.records.extend(step.records)
        self.by_read[len(self.reads) - 1] = list(step.records)
        self.events.extend(step.events)
        if self.virtual is not None:
            combined = self.virtual.add(step.records)
            self.virtual_records.extend(combined)
            for record in combined:
                peaks = self.virtual_peaks.setdefault(record.device, {})
                new, _ = update_peaks(peaks, [record], self.zone)
                self.virtual_peaks[record.device] = new
        self._persist(poller)
        assert read.boundary is not None
        poller.aimed = next_boundary(
            max(read.boundary, self.reference()), poller.device.interval_s, self.zone
        )

    # -- running -------------------------------------------------------------------

    def set_ntp(self, *, err_s: float | None = None, silent: bool | None = None) -> None:
        """Change what the NTP source serves (now)."""
        if err_s is not None:
            self.ntp_err_s = err_s
        if silent is not None:
            if self.ntp_silent and not silent:
                self.next_poll_s = self.true_s + self.poll_phase_s
            self.ntp_silent = silent

    def at(self, true_s: float, action: Callable[[], None]) -> None:
        """Do `action` when true time reaches true_s."""
        self._seq += 1
        self.actions.append((true_s, self._seq, action))
        self.actions.sort()

    def _arrival(self, poller: Poller) -> float:
        """True time at which the reference reaches the poller's boundary, if
        nothing changes the reference before then."""
        assert poller.aimed is not None
        target = poller.aimed.timestamp()
        t = self.true_s
        for _ in range(50):
            ref = self.timebase.reference_s(t + self.sys_err_s, t - self.boot_s)
            if ref >= target:
                return t
            t += max(target - ref, 1e-6)
        return t

    def run_until(self, true_end_s: float, max_steps: int = 20_000) -> None:
        for _ in range(max_steps):
            candidates: list[tuple[float, int, str, Any]] = []
            if self.actions:
                candidates.append((self.actions[0][0], 0, "action", None))
            if not self.ntp_silent:
                candidates.append((self.next_poll_s, 1, "ntp", None))
            candidates.append((self.next_mark_s, 2, "mark", None))
            for i, poller in enumerate(self.pollers):
                candidates.append((self._arrival(poller), 3 + i, "wake", poller))
            when, _, kind, poller = min(candidates, key=lambda c: (c[0], c[1]))
            if when > true_end_s:
                self.true_s = max(self.true_s, true_end_s)
                return
            self.true_s = max(self.true_s, when)
            if kind == "action":
                _, _, action = self.actions.pop(0)
                action()
            elif kind == "ntp":
                self._poll_ntp()
                self.next_poll_s = self.true_s + self.poll_s
            elif kind == "mark":
                self._mark()
                self.next_mark_s = self.true_s + self.mark_every_s
            else:
                self._wake(poller)
        raise RuntimeError(f"runaway: {max_steps} steps before {utc(true_end_s)}")

    # -- queries ---------------------------------------------------------------------

    def channel_records(self, device: str = "unit1") -> list[Interval]:
        return [r for r in self.records if r.device == device]

    def peak(self, device: str = "unit1") -> float | None:
        for poller in self.pollers:
            if poller.device.id == device:
                state = poller.peaks.get("energy_import")
                if state is not None and state.block is not None:
                    return state.block.demand
        return None
