"""The interval engine: consecutive counter reads -> interval records (pure).

Per channel the engine keeps a small `ChannelState` (the last good counter and
when it was taken, the end of the last record emitted, the missed boundaries
since that counter, the rolling-demand window). The shell persists that state
in the same transaction as the records it produced (`ChannelState.to_json`),
so a restart continues the series exactly where it stopped. Nothing here does
I/O or reads a clock: time comes in on the `Read`.

Counter arithmetic
    energy = ((end - start) mod rollover) x multiplier, in decimal arithmetic,
    so 1754 pulses x 0.144 kWh is exactly 252.576 kWh and 3 pulses are
    0.432 kWh, not the 0.43199999999999994 that float arithmetic gives.

    A decrease is a wrap past `rollover` only when the energy it implies is
    physically plausible; an implausible wrap, a decrease on a counter without
    a modulus, or an implausible jump upward is a COUNTER_RESET: no energy
    (value null), re-baseline on the new reading, and a ``counter_reset``
    event. Plausibility (`check_delta`):

    * with ``max_demand`` configured: the forward distance may be at most
      max_demand x max(true span, nominal interval) / multiplier counts, plus
      one quantum (a count, or the float resolution) because a pulse counter
      read twice in quick succession can show one extra pulse. The span is the
      true time since the last good counter, so a gap allows proportionally
      more energy. If even one *extra* wrap would be plausible over the span
      (counts + rollover <= allowance) the number of wraps is unknowable and
      the read is treated as a reset (reason ``ambiguous_wraps``): a
      billing-grade series never publishes an energy that may be off by a
      whole modulus.
    * default (no ``max_demand``, integer counter with a modulus M): the
      forward distance must be under M/2 between two consecutive good reads,
      whatever the span (serial-number arithmetic, RFC 1982: half the modulus
      is the largest window in which "forward by d" and "backward by M - d"
      can be told apart). For a one-interval span that is max_demand = M/2
      counts per interval, as config.py documents. Over a span of up to two
      intervals (one missed read) it is k x M/2, still unambiguous (a 16-bit counter
      lost 40 kWh after one missed read without it); beyond that it is
      deliberately *not* scaled by the span: k x M/2 >= M would accept any
      reading and hide a meter exchange during an outage. Configure
      ``max_demand`` (the site's real maximum) for 16-bit counters, where M/2
      is little energy.
    * default for a float or signed counter without ``rollover``: no upward
      limit; any decrease is a reset.

Float registers and their resolution limit
    A float register is converted to a decimal through its shortest
    round-tripping representation in its own precision (float32 values
    through the shortest decimal that is the same float32, float64 through
    ``repr``), so 12345.7 stored as float32 is the decimal 12345.7, not
    12345.7001953125, and deltas are exact decimal differences. The register
    itself quantises the counter: a float32 of magnitude C resolves
    2**(floor(log2 C) - 23) units (0.0625 kWh at 1 000 000 kWh, 1 kWh at
    10 000 000 kWh, 2 kWh beyond 16 777 216 kWh); float64 resolves 2**-52 of
    the magnitude (0.000122 kWh at 10**12 kWh). The error of one delta is at
    most one such step and it does not accumulate: deltas telescope, so the
    sum over any span is exact to one step. When that step exceeds
    `RESOLUTION_FRACTION` (0.1 %) of an interval's delta the engine emits a
    ``counter_resolution`` event (once per channel; sticky in the state)
    because the per-interval split can no longer be billing grade; use an
    integer or float64 register for such meters. Such a record (and a zero
    delta on a float register that resolves a whole unit or worse) carries
    ESTNEEDED: not actual, kept out of peaks.

Gaps (``gaps:`` per device)
    Every boundary gets a record. A boundary without a good read is MISSING
    (value null); boundaries passed while the daemon was down come out MISSING
    when it next closes a boundary. With ``gaps: long`` (default) the energy
    across the gap is published on the first good record after it, flagged
    LONG with its true ``duration_s``. With ``gaps: prorate`` that energy is
    spread in proportion to time over the missed intervals and the closing
    one, all flagged ESTIMATED; the records for the missed boundaries are
    re-emitted with the same ids (same ``end``), so a consumer that keeps the
    last record per id sees the estimates replace the MISSING records. Shares
    are whole multiples of the counter's resolution (whole pulses for an
    integer counter) and add up exactly to the total. Either way energy is
    conserved: per id the last record's values sum to delta x multiplier.
    When the read closing a gap is a COUNTER_RESET, the energy across the gap
    is unknown and its records stay MISSING. Boundaries passed before the
    engine had any counter (down, then a fresh start-up read) stay MISSING.

Flags (docs/flags.md)
    read.flags (status bits, CLOCK_ERROR, DEVICE_ERROR, POWER_FAIL,
    CLOCK_SET_*, TIME_ADJUSTED set by the shell) go on the record the read
    closes; AMT when the read was taken on assumed time (demand null); DST
    when the interval lies in daylight-saving time (judged at its start:
    transitions fall on boundaries, so an interval is wholly in or out, and
    the interval ending at the spring-forward instant is still standard time);
    PARTIAL/LONG from true vs nominal duration (`IRREGULAR_TOLERANCE_S`,
    or 1 % of intervals shorter than 100 s);
    real elapsed time (docs/time.md): the reads carry their
    monotonic time (`Read.mono_s`), so the engine knows how long a record
    really lasted; when that differs from the reference span by more than
    max(device ``elapsed_tolerance``, ``elapsed_tolerance_fraction`` x
    interval), the record reports the real time in ``duration_s``, gets
    PARTIAL or LONG by it, and its demand is value / real time; a regular
    record reports its nominal length;
    TIME_ADJUSTED on the first record read on confirmed time after records
    on assumed time (`ChannelState.assumed`); flags of a read for a boundary
    already closed are carried to the next record (`ChannelState.carry`);
    POWER_FAIL on every record, MISSING ones included, whose interval
    overlaps an outage window the shell passes (`Read.outages`);
    ROLLOVER on an accepted wrap; COUNTER_RESET as above; MISSING without a
    good read, plus DEVICE_ERROR when the meter answered with Modbus exception
    4 (server device failure) or a non-finite float (data not valid);
    OUT_OF_RANGE when the value, normalised to the nominal interval, is outside
    the channel's ``limits``; ESTIMATED for prorated and zero-filled values;
    AMT + ESTNEEDED from the optional validation rule.

Validation and estimation (per device, off by default), after the Itron note
    ``validation: amt_rule`` is the named formula

        @if(@status($input \\AND, CLOCK, IOBOARD, IRREGULAR, POWER, TIMERESET),
            @if(@statuscount($input \\AMT) = 0 OR @status($input \\AND, ESTNEEDED), 1, 0),
            0)

    with "true result triggers FAIL" and "true result status AMT": an interval
    whose IEE statuses include any of the five codes fails when it has no AMT
    yet *or* still has ESTNEEDED, and then carries AMT + ESTNEEDED (failed,
    estimation needed; demand suspended as for any AMT interval). An interval
    with AMT and no ESTNEEDED (already estimated, or AMT from assumed time)
    passes, so re-validating is idempotent. ``estimation: zero_fill_amt`` is
    the note's Numeric Replacement routine: only intervals with AMT status
    and a value are estimated, value -> 0 with ESTIMATED, the original kept in
    ``original_value`` (excluded from any scaling), and ESTNEEDED cleared (the
    note shows such intervals as Estimated + Passed Validation). As in the
    note, it does not correct the TIME_ADJUSTED interval that follows the AMT
    intervals: that one keeps its measured value (and its ESTNEEDED, if
    validation set it) for an estimation step upstream.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, tzinfo
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from edged.core.demand import RollingSpec, block_demand, push_rolling, rolling_spec
from edged.core.model import Event, Flag, Interval, Read, TimeState
from edged.core.schedule import boundaries_between, is_dst, nominal_start

if TYPE_CHECKING:  # only annotations: the engine loads no pydantic at run time
    from edged.config.schema import (
        Channel,
    )
from edged.core.engine.counters import (
    RESOLUTION_FRACTION,
    DeltaCheck,
    _energy,
    allocate,
    check_delta,
)
from edged.core.engine.rules import out_of_range, validate_amt_rule, zero_fill_amt
from edged.core.engine.state import (
    ChannelState,
    ChannelStep,
    Counter,
    DeviceStep,
    GapRun,
    IntervalContext,
    _iso,
)

# A record's true length is measured from the boundary of the previous good
# read (exact) or from an off-boundary start-up read (never exactly on a
# boundary); it is irregular (PARTIAL or LONG) only when it differs from
# nominal by more than 1 s, or 1 % of a shorter interval, so second-long test
# and demo intervals follow the same rule as 15-minute ones.
IRREGULAR_TOLERANCE_S = 1.0
IRREGULAR_TOLERANCE_FRACTION = 0.01

# Modbus exception 4, SERVER DEVICE FAILURE: the meter itself reports a fault.
MODBUS_SERVER_DEVICE_FAILURE = 4
_ONE_US = timedelta(microseconds=1)


# Boundary arithmetic, remembered: at a boundary every meter on the same
# interval asks the same questions about the same instants (eight offset
# look-ups per record). Only for UTC datetimes: two local datetimes that
# differ only in `fold` compare equal but are different instants, so they
# must not share a cache entry; the engine's times are all UTC.
_SCHEDULE_CACHE = 1024


@functools.lru_cache(maxsize=_SCHEDULE_CACHE)
def _cached_start(end: datetime, interval_s: int, zone: tzinfo) -> datetime:
    return nominal_start(end, interval_s, zone)


@functools.lru_cache(maxsize=_SCHEDULE_CACHE)
def _cached_between(
    start: datetime, end: datetime, interval_s: int, zone: tzinfo
) -> tuple[datetime, ...]:
    return tuple(boundaries_between(start, end, interval_s, zone))


@functools.lru_cache(maxsize=_SCHEDULE_CACHE)
def _cached_dst(t: datetime, zone: tzinfo) -> bool:
    return is_dst(t, zone)


def _start(end: datetime, interval_s: int, zone: tzinfo) -> datetime:
    if end.tzinfo is UTC:
        return _cached_start(end, interval_s, zone)
    return nominal_start(end, interval_s, zone)


def _between(start: datetime, end: datetime, interval_s: int, zone: tzinfo) -> list[datetime]:
    # A long gap (a restart after weeks) is computed, not kept.
    short = end - start <= timedelta(seconds=4 * interval_s)
    if short and start.tzinfo is UTC and end.tzinfo is UTC:
        return list(_cached_between(start, end, interval_s, zone))
    return list(boundaries_between(start, end, interval_s, zone))


def _dst(t: datetime, zone: tzinfo) -> bool:
    return _cached_dst(t, zone) if t.tzinfo is UTC else is_dst(t, zone)


# --------------------------------------------------------------------------
# Start-up baseline


def _normalise(value: float | int | None, channel: Channel) -> Counter | None:
    """A decoded register value as a counter, or None if it is not usable."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        if not channel.type.startswith("float") and value.is_integer():
            return int(value)
    return value


def baseline(state: ChannelState | None, read: Read, channel: Channel) -> ChannelState:
    """An off-boundary read (start-up) gives the engine a counter to start from.

    A counter persisted before a restart is kept: the energy since that read is
    then carried into the next record instead of being lost.
    """
    state = state or ChannelState()
    value = _normalise(read.values.get(channel.name), channel) if read.ok else None
    if value is None or state.counter is not None:
        return state
    return _counter_taken(state, value, read.read_at, read)


def _counter_taken(
    state: ChannelState,
    value: int | float,
    at: datetime,
    read: Read,
    *,
    coarse: bool | None = None,
) -> ChannelState:
    """`state` with its counter taken from `read` at `at` (a boundary, or the
    read's own time for a start-up baseline): the energy before it is in the
    records already, so no gap is carried on."""
    return replace(
        state,
        counter=value,
        counter_at=at,
        gap=(),
        coarse=state.coarse if coarse is None else coarse,
        counter_mono=read.mono_s,
        counter_boot=read.boot_id,
    )


def baseline_device(
    states: Mapping[str, ChannelState], read: Read, channels: Sequence[Channel]
) -> dict[str, ChannelState]:
    return {c.name: baseline(states.get(c.name), read, c) for c in channels}


# --------------------------------------------------------------------------
# Closing a boundary


def _read_outcome(read: Read, channel: Channel) -> tuple[Counter | None, frozenset[Flag]]:
    """The channel's counter from this read (None: no good value) and the
    flags the read puts on the record it closes."""
    flags = set(read.flags)
    if read.error is not None:
        if read.error.exception_code == MODBUS_SERVER_DEVICE_FAILURE:
            flags.add(Flag.DEVICE_ERROR)
        return None, frozenset(flags)
    raw = read.values.get(channel.name)
    value = _normalise(raw, channel)
    if value is None and isinstance(raw, float):
        flags.add(Flag.DEVICE_ERROR)  # NaN/inf: the meter says "data not valid"
    if channel.name in read.rescaled:
        # Both ends are raw x 10**sf with their own sf, so the delta is right only
        # if the meter rescaled its counter consistently: worth a look, not a value.
        flags.add(Flag.SCALE_CHANGED)
    return value, frozenset(flags)


@dataclass(frozen=True, slots=True)
class _Builder:
    """Record construction for one channel of one device."""

    channel: Channel
    ctx: IntervalContext

    @property
    def interval_s(self) -> int:
        return self.ctx.device.interval_s

    def base_flags(self, start: datetime, time_state: TimeState) -> set[Flag]:
        flags: set[Flag] = set()
        if _dst(start, self.ctx.zone):
            flags.add(Flag.DST)
        if time_state is TimeState.ASSUMED:
            flags.add(Flag.AMT)
        return flags

    def start_of(self, end: datetime) -> datetime:
        return _start(end, self.interval_s, self.ctx.zone)

    def irregular(self, duration_s: float, nominal_s: float) -> set[Flag]:
        tolerance_s = min(IRREGULAR_TOLERANCE_S, nominal_s * IRREGULAR_TOLERANCE_FRACTION)
        if duration_s < nominal_s - tolerance_s:
            return {Flag.PARTIAL}
        if duration_s > nominal_s + tolerance_s:
            return {Flag.LONG}
        return set()

    def elapsed_tolerance(self, nominal_s: float) -> float:
        """How far real elapsed time may differ from the reference span unflagged."""
        device = self.ctx.device
        return max(device.elapsed_tolerance, device.elapsed_tolerance_fraction * nominal_s)

    def outage_flags(self, start: datetime, end: datetime, read: Read | None) -> set[Flag]:
        """POWER_FAIL when the gateway was down during [start, end)."""
        if read is None:
            return set()
        for down_from, down_to in read.outages:
            if down_from < end and down_to > start:
                return {Flag.POWER_FAIL}
        return set()

    def missing(
        self,
        end: datetime,
        time_state: TimeState,
        extra: Iterable[Flag] = (),
        read: Read | None = None,
        outages_of: Read | None = None,
    ) -> Interval:
        start = self.start_of(end)
        flags = self.base_flags(start, time_state) | set(extra) | {Flag.MISSING}
        flags |= self.outage_flags(start, end, outages_of or read)
        return self.bare(start, end, (end - start).total_seconds(), None, flags, time_state, read)

    def valued(
        self,
        end: datetime,
        value: Decimal,
        since: datetime,
        flags: set[Flag],
        time_state: TimeState,
        read: Read | None,
        counter_start: Counter | None,
        counter_end: Counter | None,
        real_s: float | None = None,
    ) -> Interval:
        start = self.start_of(end)
        nominal_s = (end - start).total_seconds()
        duration_s = (end - since).total_seconds()
        if duration_s <= 0:
            # The counter was taken at a later reference time than this
            # boundary: the reference went back in between (across a restart,
            # where the monotonic clock cannot say by how much). Never a
            # negative length: zero, flagged, and no demand.
            flags = flags | {Flag.CLOCK_SET_BACKWARD}
            if real_s is None:
                duration_s = 0.0
        irregular = self.irregular(duration_s, nominal_s)
        elapsed = real_s is not None and abs(real_s - duration_s) > self.elapsed_tolerance(
            nominal_s
        )
        if elapsed:
            assert real_s is not None
            # The reference clock moved (a step, assumed time ending, someone
            # setting the clock): the monotonic clock says how long the
            # record really lasted. It is never actual: PARTIAL or LONG says
            # why, besides any CLOCK_SET_*/TIME_ADJUSTED its time events gave.
            irregular = self.irregular(real_s, nominal_s) or (
                {Flag.PARTIAL} if real_s < duration_s else {Flag.LONG}
            )
            duration_s = real_s
        flags = flags | self.base_flags(start, time_state) | irregular
        energy_value = _energy(value, self.channel.multiplier)
        # Block demand over the nominal interval; an irregular record's demand
        # is its average over the time it really covers, so a LONG record
        # closing a gap does not show a false spike. Suspended on AMT.
        regular = not elapsed and {Flag.PARTIAL, Flag.LONG}.isdisjoint(flags)
        if regular:
            # Within the tolerance of nominal: a regular record has its
            # nominal length (a read a few ms off the boundary is not news).
            duration_s = nominal_s
        hours = Decimal(repr(nominal_s if regular else duration_s)) / 3600
        record_demand = None
        if self.channel.demand_unit is not None and Flag.AMT not in flags and hours > 0:
            record_demand = block_demand(energy_value, hours)
        # Built whole: a replace() of the bare record cost more than the record.
        return self.bare(
            start, end, duration_s, float(energy_value), flags, time_state, read,
            demand=record_demand, counter_start=counter_start, counter_end=counter_end,
        )  # fmt: skip

    def bare(
        self,
        start: datetime,
        end: datetime,
        duration_s: float,
        value: float | None,
        flags: set[Flag],
        time_state: TimeState,
        read: Read | None,
        *,
        demand: float | None = None,
        counter_start: Counter | None = None,
        counter_end: Counter | None = None,
    ) -> Interval:
        return Interval(
            site=self.ctx.site,
            device=self.ctx.device.id,
            channel=self.channel.name,
            start=start,
            end=end,
            duration_s=duration_s,
            value=value,
            unit=self.channel.unit,
            demand=demand,
            demand_unit=self.channel.demand_unit,
            counter_start=counter_start,
            counter_end=counter_end,
            flags=frozenset(flags),
            time_state=time_state,
            read_at=read.read_at if read else None,
            read_lateness_ms=read.read_lateness_ms if read else None,
        )


def _extend_gap(gap: tuple[GapRun, ...], records: Iterable[Interval]) -> tuple[GapRun, ...]:
    runs = list(gap)
    for record in records:
        flags = record.flags - {Flag.MISSING, Flag.DST}
        last = runs[-1] if runs else None
        if last is not None and last.flags == flags and last.time_state is record.time_state:
            runs[-1] = replace(last, last=record.end)
        else:
            runs.append(
                GapRun(first=record.end, last=record.end, flags=flags, time_state=record.time_state)
            )
    return tuple(runs)


def _gap_entry(gap: Sequence[GapRun], end: datetime) -> GapRun | None:
    for run in gap:
        if run.first <= end <= run.last:
            return run
    return None


def _gap_flags(gap: Sequence[GapRun]) -> set[Flag]:
    flags: set[Flag] = set()
    for run in gap:
        flags |= run.flags
        if run.time_state is TimeState.ASSUMED:
            flags.add(Flag.AMT)
    return flags


def _channel_event(
    kind: str, device: str, at: datetime, channel: str, message: str, details: Mapping[str, object]
) -> Event:
    # Details are keyed by channel so `_merge_events` can fold the channels of
    # one device into one event (event ids are site/device/kind/time).
    return Event(
        device=device,
        kind=kind,
        at=at,
        message=f"{channel}: {message}",
        details={"channels": {channel: dict(details)}},
    )


def _merge_events(events: Iterable[Event]) -> tuple[Event, ...]:
    merged: dict[tuple[str | None, str, datetime], Event] = {}
    for event in events:
        key = (event.device, event.kind, event.at)
        previous = merged.get(key)
        if previous is None:
            merged[key] = event
            continue
        channels: dict[str, Any] = {}
        for source in (previous, event):
            found = source.details.get("channels")
            if isinstance(found, Mapping):
                channels.update(found)
        merged[key] = replace(
            previous,
            message=f"{previous.message}; {event.message}",
            details={**previous.details, "channels": channels},
        )
    return tuple(merged.values())


def step_channel(
    state: ChannelState | None, read: Read, channel: Channel, ctx: IntervalContext
) -> ChannelStep:
    """Records and events for every boundary up to `read.boundary`, given the read there.

    Boundaries since the last record that nobody read (the daemon was down)
    come out as MISSING first, so the series never has a silent hole. A read
    for a boundary already closed (a replay after restart) changes nothing.
    """
    if read.boundary is None:
        raise ValueError("step_channel needs a boundary read")
    state = state or ChannelState()
    end = read.boundary
    if state.last_end is not None and end <= state.last_end:
        if read.flags - state.carry:
            return ChannelStep(replace(state, carry=state.carry | read.flags), (), ())
        return ChannelStep(state, (), ())
    build = _Builder(channel, ctx)
    interval_s = ctx.device.interval_s
    value, read_flags = _read_outcome(read, channel)
    since = state.last_end or state.counter_at
    skipped = _between(since, end, interval_s, ctx.zone) if since else []
    events: list[Event] = []
    raw: list[Interval]

    if value is None or state.counter is None or state.counter_at is None:
        # No energy can be computed at this boundary.
        raw = [build.missing(b, read.time_state, outages_of=read) for b in skipped]
        raw.append(build.missing(end, read.time_state, read_flags, read))
        if value is None:
            gap = _extend_gap(state.gap, raw) if state.counter is not None else ()
            new = replace(state, gap=gap)
        else:  # the first good counter: a baseline taken on a boundary
            new = _counter_taken(state, value, end, read)
        return _finish(new, end, _time_adjusted(raw, state, read), events, channel, ctx)

    counter_at = state.counter_at
    nominal_s = (end - build.start_of(end)).total_seconds()
    span_s = (end - counter_at).total_seconds()
    check = check_delta(state.counter, value, channel, span_s, nominal_s)
    if check.reset is not None:
        raw = [build.missing(b, read.time_state, outages_of=read) for b in skipped]
        start = build.start_of(end)
        flags = build.base_flags(start, read.time_state) | read_flags | {Flag.COUNTER_RESET}
        reset = build.bare(start, end, nominal_s, None, flags, read.time_state, read)
        raw.append(replace(reset, counter_start=state.counter, counter_end=value))
        events.append(_reset_event(ctx, channel, end, counter_at, state.counter, value, check))
        new = _counter_taken(state, value, end, read)
        return _finish(new, end, _time_adjusted(raw, state, read), events, channel, ctx)

    # Boundaries after the counter was taken had no good read: their energy is
    # in this delta. Skipped boundaries before it (down, then a fresh start-up
    # baseline) have no energy to give and stay MISSING.
    missed = _between(counter_at, end, interval_s, ctx.zone)
    before_counter = [b for b in skipped if b <= counter_at]
    raw = [build.missing(b, read.time_state, outages_of=read) for b in before_counter]
    closing_flags = set(read_flags)
    if check.wrapped:
        closing_flags.add(Flag.ROLLOVER)
    is_float = channel.type in ("float32", "float64")
    if check.coarse or (is_float and check.counts == 0 and check.quantum >= 1):
        # The register cannot resolve this interval's energy at its magnitude:
        # the split between intervals is not billing grade (the sum over any
        # span still is, deltas telescope). Not actual, and out of peaks.
        closing_flags.add(Flag.ESTNEEDED)
    # Real elapsed time between the two reads, when both were taken in this
    # process (the monotonic clock is not comparable across restarts).
    real_s = None
    same_boot = state.counter_boot == read.boot_id
    if read.mono_s is not None and state.counter_mono is not None and same_boot:
        real_s = round(max(0.0, read.mono_s - state.counter_mono), 6)
    span_ref_s = (end - counter_at).total_seconds()
    moved = real_s is not None and abs(real_s - span_ref_s) > build.elapsed_tolerance(nominal_s)
    if missed and ctx.device.gaps == "prorate" and not moved:
        raw += _prorate(build, state, missed, end, value, check, closing_flags, read)
    else:
        in_gap = [
            build.missing(b, read.time_state, outages_of=read) for b in skipped if b > counter_at
        ]
        raw += in_gap
        # A LONG record spans the gap: it carries what the gap's records carried.
        closing_flags |= _gap_flags(_extend_gap(state.gap, in_gap))
        closing = build.valued(
            end,
            check.counts,
            counter_at,
            closing_flags,
            read.time_state,
            read,
            state.counter,
            value,
            real_s,
        )
        raw.append(closing)
    coarse = state.coarse
    if check.coarse and not coarse:
        coarse = True
        events.append(_resolution_event(ctx, channel, end, value, check))
    new = _counter_taken(state, value, end, read, coarse=coarse)
    return _finish(new, end, _time_adjusted(raw, state, read), events, channel, ctx)


def _time_adjusted(raw: list[Interval], state: ChannelState, read: Read) -> list[Interval]:
    """TIME_ADJUSTED on the record in which assumed time ended.

    Once records on assumed time (AMT) were published, the first record read
    on confirmed time is the one during which assumed time ended, whichever
    way it ended (a step, a slew, someone setting the clock). A start-up whose
    time was confirmed before any record closed published no AMT record and
    marks nothing.
    """
    if not raw:
        return raw
    extra = set(state.carry)
    if state.assumed and read.time_state is not TimeState.ASSUMED:
        extra.add(Flag.TIME_ADJUSTED)
    if not extra:
        return raw
    last = raw[-1]
    return [*raw[:-1], replace(last, flags=last.flags | extra)]


def _prorate(
    build: _Builder,
    state: ChannelState,
    missed: Sequence[datetime],
    end: datetime,
    value: Counter,
    check: DeltaCheck,
    closing_flags: set[Flag],
    read: Read,
) -> list[Interval]:
    """Spread the energy across a gap over its intervals (ESTIMATED).

    Counter values at the missed boundaries are unknown, so only the first
    record has a counter_start and only the closing one a counter_end.
    """
    assert state.counter_at is not None
    ends = [*missed, end]
    starts = [state.counter_at, *missed]
    weights = [(e - s) // _ONE_US for s, e in zip(starts, ends, strict=True)]
    # Whole pulses for an integer counter; thousandths of a unit for a float
    # one (a kWh register prorated to the Wh), whatever digits its repr shows.
    finest = 0 if isinstance(value, int) else -3
    shares = allocate(check.counts, weights, finest)
    records: list[Interval] = []
    for i, (since, upto, share) in enumerate(zip(starts, ends, shares, strict=True)):
        closing = upto == end
        if closing:
            flags, time_state = set(closing_flags), read.time_state
        else:
            run = _gap_entry(state.gap, upto)
            flags = set(run.flags) if run else set()
            time_state = run.time_state if run else read.time_state
        # read_at: the value of every share comes from the read that closed the gap.
        record = build.valued(
            upto,
            share,
            since,
            flags | {Flag.ESTIMATED},
            time_state,
            read,
            state.counter if i == 0 else None,
            value if closing else None,
        )
        if not closing:
            record = replace(record, read_lateness_ms=None)
        records.append(record)
    return records


def _finish(
    state: ChannelState,
    end: datetime,
    raw: list[Interval],
    events: list[Event],
    channel: Channel,
    ctx: IntervalContext,
) -> ChannelStep:
    """Rules that apply to every record, in order: limits, validation,
    estimation (on the validated flags), then rolling demand (on the final
    record, so validated and estimated intervals are excluded)."""
    spec: RollingSpec | None = rolling_spec(ctx.device)
    rolling = state.rolling
    records: list[Interval] = []
    for record in raw:
        if out_of_range(record, channel):
            record = replace(record, flags=record.flags | {Flag.OUT_OF_RANGE})
        if ctx.device.validation == "amt_rule":
            record = validate_amt_rule(record)
        if ctx.device.estimation == "zero_fill_amt":
            record = zero_fill_amt(record)
        if spec is not None:
            rolling, rolling_value = push_rolling(rolling, record, spec)
            record = replace(record, rolling_demand=rolling_value)
        records.append(record)
    assumed = any(r.time_state is TimeState.ASSUMED for r in records[-1:]) or (
        not records and state.assumed
    )
    new = replace(state, last_end=end, rolling=rolling, assumed=assumed, carry=frozenset())
    return ChannelStep(new, tuple(records), tuple(events))


def _reset_event(
    ctx: IntervalContext,
    channel: Channel,
    end: datetime,
    counter_at: datetime,
    counter_start: Counter,
    counter_end: Counter,
    check: DeltaCheck,
) -> Event:
    reason = {
        "went_back": "went back",
        "jumped": "jumped implausibly",
        "ambiguous_wraps": "may have wrapped more than once",
    }.get(check.reset or "", check.reset or "")
    return _channel_event(
        "counter_reset",
        ctx.device.id,
        end,
        channel.name,
        f"counter {reason} ({counter_start!r} -> {counter_end!r}); no energy for the "
        "interval, re-baselined",
        {
            "reason": check.reset,
            "counter_start": counter_start,
            "counter_end": counter_end,
            "counter_start_at": _iso(counter_at),
            "rollover": channel.rollover_counts,
            "implied_demand": check.implied_demand,
            "max_demand": check.max_demand,
            "demand_unit": channel.demand_unit,
        },
    )


def _resolution_event(
    ctx: IntervalContext, channel: Channel, end: datetime, counter: Counter, check: DeltaCheck
) -> Event:
    return _channel_event(
        "counter_resolution",
        ctx.device.id,
        end,
        channel.name,
        f"{channel.type} counter at {counter!r} resolves only {check.quantum} counts, more "
        f"than {RESOLUTION_FRACTION:%} of the interval's {check.counts} counts",
        {
            "type": channel.type,
            "counter": counter,
            "resolution_counts": float(check.quantum),
            "delta_counts": float(check.counts),
        },
    )


def step_device(states: Mapping[str, ChannelState], read: Read, ctx: IntervalContext) -> DeviceStep:
    """`step_channel` for every channel of the device; events merged per kind."""
    new_states: dict[str, ChannelState] = dict(states)
    records: list[Interval] = []
    events: list[Event] = []
    for channel in ctx.device.channels:
        step = step_channel(states.get(channel.name), read, channel, ctx)
        new_states[channel.name] = step.state
        records.extend(step.records)
        events.extend(step.events)
    return DeviceStep(new_states, tuple(records), _merge_events(events))
