"""Virtual meters: per-interval sums and differences of real channels (pure).

A station total (the Tekapo/Waitaki aggregation meter of the revenue-metering
note) is ``add: [unit1.energy_export, unit2.energy_export]`` minus
``subtract: [aux.energy_import]``, computed per interval from the records the
engine produced for the same boundary end. Rules:

* Inputs must share the interval length (checked against the config by
  `plan_virtual_meter` and against each record by `combine`); summing a
  15-minute record with a 30-minute one is meaningless.
* Units must match the virtual channel's unit; no silent kWh + Wh.
* A missing input (no record for that end), or an input record without a
  value (MISSING, COUNTER_RESET), makes the virtual interval MISSING with a
  null value: never a silent partial sum.
* Flags are the union of the inputs' flags, so a station total is AMT,
  ESTIMATED, LONG, ... whenever any unit is; its quality follows from them.
* Block and rolling demand are the signed sums of the inputs' demands (each
  input's average power over the same interval), null when any is null (e.g.
  an AMT input).
* Arithmetic is decimal on the inputs' reprs: 252.576 + 100.2 is 352.776.

The record for a boundary is deterministic in its inputs and its id is
site/meter/channel/end, so when an input record is re-emitted for that end
(a prorated estimate replacing a MISSING record) the shell recombines and
publishes again; consumers keep the last record per id.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, tzinfo
from decimal import Decimal
from typing import TYPE_CHECKING

from edged.core.compensation.record import channels_of
from edged.core.errors import EdgedError
from edged.core.model import Flag, Interval, TimeState
from edged.core.schedule import nominal_start

if TYPE_CHECKING:  # only annotations: the engine loads no pydantic at run time
    from edged.config.schema import (
        Device,
        VirtualMeter,
    )


# Worst first: a virtual interval is as trustworthy as its least trusted input.
_TIME_STATE_RANK = {TimeState.SYNCED: 0, TimeState.HOLDOVER: 1, TimeState.ASSUMED: 2}


class VirtualMeterError(EdgedError, ValueError):
    """A virtual meter that cannot be computed; the message lists every problem."""


@dataclass(frozen=True, slots=True, kw_only=True)
class VirtualInput:
    ref: str  # as written in the config: "device.channel"
    device: str
    channel: str
    sign: int  # +1 for add, -1 for subtract


@dataclass(frozen=True, slots=True)
class VirtualChannelPlan:
    name: str
    unit: str
    inputs: tuple[VirtualInput, ...]

    @property
    def demand_unit(self) -> str | None:
        # As Channel.demand_unit: kWh -> kW, Wh -> W, kvarh -> kvar.
        return self.unit[:-1] if self.unit.endswith("h") else None


@dataclass(frozen=True, slots=True)
class VirtualMeterPlan:
    meter_id: str
    interval_s: int
    channels: tuple[VirtualChannelPlan, ...]


def resolve_ref(ref: str, devices: Sequence[Device]) -> tuple[str, str]:
    """'device.channel' -> (device, channel).

    Ids and channel names may themselves contain dots, so every split point is
    tried; exactly one must name an existing device and channel.
    """
    by_id = {d.id: d for d in devices}
    matches: list[tuple[str, str]] = []
    for i, char in enumerate(ref):
        if char != ".":
            continue
        device = by_id.get(ref[:i])
        channel = ref[i + 1 :]
        if device is not None and channel in channels_of(device):
            matches.append((device.id, channel))
    if not matches:
        raise VirtualMeterError(f"{ref!r} names no configured device.channel")
    if len(matches) > 1:
        raise VirtualMeterError(f"{ref!r} is ambiguous: {matches}")
    return matches[0]


def plan_virtual_meter(meter: VirtualMeter, devices: Sequence[Device]) -> VirtualMeterPlan:
    """Resolve and check a configured virtual meter against the devices.

    Raises VirtualMeterError listing every unknown input, unit mismatch and
    interval-length mismatch at once.
    """
    by_id = {d.id: d for d in devices}
    problems: list[str] = []
    channels: list[VirtualChannelPlan] = []
    interval_lengths: dict[int, list[str]] = {}
    for vc in meter.channels:
        inputs: list[VirtualInput] = []
        for sign, refs in ((1, vc.add), (-1, vc.subtract)):
            for ref in refs:
                try:
                    device_id, channel_name = resolve_ref(ref, devices)
                except VirtualMeterError as exc:
                    problems.append(f"{meter.id}.{vc.name}: {exc}")
                    continue
                device = by_id[device_id]
                channel = channels_of(device)[channel_name]
                if channel.unit != vc.unit:
                    problems.append(
                        f"{meter.id}.{vc.name}: {ref} is in {channel.unit}, not {vc.unit}"
                    )
                interval_lengths.setdefault(device.interval_s, []).append(ref)
                inputs.append(
                    VirtualInput(ref=ref, device=device_id, channel=channel_name, sign=sign)
                )
        channels.append(VirtualChannelPlan(vc.name, vc.unit, tuple(inputs)))
    if len(interval_lengths) > 1:
        described = "; ".join(
            f"{seconds}s: {', '.join(refs)}" for seconds, refs in sorted(interval_lengths.items())
        )
        problems.append(f"{meter.id}: inputs must share the interval length ({described})")
    if problems:
        raise VirtualMeterError("\n".join(problems))
    if not interval_lengths:
        raise VirtualMeterError(f"{meter.id}: no inputs")
    (interval_s,) = interval_lengths
    return VirtualMeterPlan(meter.id, interval_s, tuple(channels))


def _decimal(value: float) -> Decimal:
    return Decimal(repr(value))


def _signed_sum(terms: Iterable[tuple[int, float | None]]) -> float | None:
    total = Decimal(0)
    for sign, value in terms:
        if value is None:
            return None
        total += sign * _decimal(value)
    return float(total)


def combine(
    meter: VirtualMeterPlan,
    channel: VirtualChannelPlan,
    *,
    site: str,
    end: datetime,
    zone: tzinfo,
    inputs: Mapping[str, Interval | None],
) -> Interval:
    """The virtual interval ending at `end` from its inputs' records.

    `inputs` maps each input ref (as configured, "device.channel") to that
    channel's record for this end, or None / absent when there is none.
    Raises ValueError when a record is for another end, another interval
    length or another unit.
    """
    start = nominal_start(end, meter.interval_s, zone)
    nominal_s = (end - start).total_seconds()
    present: list[tuple[VirtualInput, Interval]] = []
    flags: set[Flag] = set()
    complete = True
    for item in channel.inputs:
        record = inputs.get(item.ref)
        if record is None:
            complete = False
            continue
        if record.end != end:
            raise ValueError(f"{item.ref}: record ends {record.end}, not {end}")
        if record.start != start:
            raise ValueError(
                f"{item.ref}: record starts {record.start}; inputs must share the "
                f"{meter.interval_s}s interval of {meter.meter_id}"
            )
        if record.unit != channel.unit:
            raise ValueError(f"{item.ref}: record is in {record.unit}, not {channel.unit}")
        flags |= record.flags
        if record.value is None or Flag.MISSING in record.flags:
            complete = False
        present.append((item, record))

    time_state = max(
        (record.time_state for _, record in present),
        key=_TIME_STATE_RANK.__getitem__,
        default=TimeState.SYNCED,
    )
    read_times = [r.read_at for _, r in present if r.read_at is not None]
    latenesses = [r.read_lateness_ms for _, r in present if r.read_lateness_ms is not None]
    value = demand = rolling = original = None
    duration_s = nominal_s
    if complete:
        value = _signed_sum((i.sign, r.value) for i, r in present)
        demand = _signed_sum((i.sign, r.demand) for i, r in present)
        rolling = _signed_sum((i.sign, r.rolling_demand) for i, r in present)
        if any(r.original_value is not None for _, r in present):
            # What the total would have been without the inputs' estimation.
            original = _signed_sum(
                (i.sign, r.original_value if r.original_value is not None else r.value)
                for i, r in present
            )
        # Irregular inputs (flagged PARTIAL/LONG) make the total span what the
        # longest of them spans.
        duration_s = max(r.duration_s for _, r in present) if present else nominal_s
        if duration_s != nominal_s and demand is not None and value is not None and duration_s > 0:
            # Over the time the record really covers, as for any irregular
            # record: value / duration, not a sum of averages over different
            # lengths.
            demand = float(_decimal(value) / (_decimal(duration_s) / 3600))
    else:
        flags.add(Flag.MISSING)
    if channel.demand_unit is None:
        demand = rolling = None
    return Interval(
        site=site,
        device=meter.meter_id,
        channel=channel.name,
        start=start,
        end=end,
        duration_s=duration_s,
        value=value,
        unit=channel.unit,
        demand=demand,
        demand_unit=channel.demand_unit,
        counter_start=None,
        counter_end=None,
        flags=frozenset(flags),
        time_state=time_state,
        read_at=max(read_times) if read_times else None,
        read_lateness_ms=max(latenesses) if latenesses else None,
        original_value=original,
        rolling_demand=rolling,
    )


def combine_meter(
    meter: VirtualMeterPlan,
    *,
    site: str,
    end: datetime,
    zone: tzinfo,
    records: Mapping[tuple[str, str], Interval],
) -> list[Interval]:
    """Every channel of a virtual meter for one end, from records keyed by
    (device, channel) (e.g. the last record per id the engine produced)."""
    out: list[Interval] = []
    for channel in meter.channels:
        inputs = {i.ref: records.get((i.device, i.channel)) for i in channel.inputs}
        out.append(combine(meter, channel, site=site, end=end, zone=zone, inputs=inputs))
    return out
