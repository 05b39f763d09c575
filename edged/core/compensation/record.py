"""A compensated interval record from a raw one (pure; docs/compensation.md).

`compensate(record, params, operating_point)` is applied to finished interval
records, after the interval engine: the engine and its raw records are left
exactly as they are, and the compensated record is a new channel
(`energy_export` -> `energy_export_compensated`) with the raw record's flags
and a `compensation` object naming what was applied.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import TYPE_CHECKING, Literal

from edged.core.compensation.losses import (
    NO_LOSSES,
    LineLoss,
    Losses,
    TransformerLoss,
    dec,
    losses,
)
from edged.core.compensation.transformers import (
    NO_ERROR,
    CertificatePoint,
    TransformerError,
    factors,
    interpolate,
)
from edged.core.model import Event, Flag, Interval

if TYPE_CHECKING:  # only annotations: the core loads no pydantic at run time
    from edged.config.schema import Channel, Device, InstrumentTransformer

# Compensated energy is published to the micro-kWh: finer than any revenue
# register, coarse enough that the decimal figures are reproducible by hand.
ENERGY_QUANTUM = Decimal("0.000001")
QUANTUM_EXPONENT = -6
FACTOR_PLACES = 9


@dataclass(frozen=True, slots=True)
class ChannelRole:
    kind: Literal["active", "reactive"]
    flow: Literal["delivered", "received"]


@dataclass(frozen=True, slots=True, kw_only=True)
class CompensationParams:
    """A device's compensation settings, as the pure functions need them."""

    device: str
    suffix: str
    roles: Mapping[str, ChannelRole]  # raw channel -> role
    ct_points: tuple[CertificatePoint, ...] = ()
    ct_rated_a: float | None = None
    vt_points: tuple[CertificatePoint, ...] = ()
    vt_rated_v: float | None = None
    transformer: TransformerLoss | None = None
    line: LineLoss | None = None
    current_point: str | None = None
    voltage_point: str | None = None
    i2h_channel: str | None = None
    v2h_channel: str | None = None
    params_hash: str = ""

    @property
    def needs_current(self) -> bool:
        return bool(self.ct_points) or self.transformer is not None or self.line is not None

    @property
    def needs_voltage(self) -> bool:
        return bool(self.vt_points) or self.transformer is not None

    def output_name(self, channel: str) -> str:
        return channel + self.suffix


def _points(it: InstrumentTransformer | None) -> tuple[CertificatePoint, ...]:
    if it is None:
        return ()
    return tuple(CertificatePoint(p.percent, p.error_pct, p.phase_min) for p in it.points)


def params_hash(device: Device) -> str:
    """First 16 hex digits of the SHA-256 of the compensation block as canonical
    JSON: the same parameters give the same hash on every gateway."""
    assert device.compensation is not None
    text = json.dumps(
        device.compensation.model_dump(mode="json"), sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def params_of(device: Device) -> CompensationParams | None:
    comp = device.compensation
    if comp is None:
        return None
    transformer = None
    if comp.transformer is not None:
        t = comp.transformer
        transformer = TransformerLoss(
            no_load_loss_kw=dec(t.no_load_loss_kw),
            rated_voltage_v=dec(t.rated_voltage_v),
            load_loss_kw=dec(t.load_loss_kw),
            rated_current_a=dec(t.rated_current_a),
        )
    line = None if comp.line is None else LineLoss(dec(comp.line.resistance_ohm), comp.line.phases)
    return CompensationParams(
        device=device.id,
        suffix=comp.suffix,
        roles={c.name: ChannelRole(c.kind, c.flow) for c in comp.channels},
        ct_points=_points(comp.ct),
        ct_rated_a=comp.ct.rated_current_a if comp.ct else None,
        vt_points=_points(comp.vt),
        vt_rated_v=comp.vt.rated_voltage_v if comp.vt else None,
        transformer=transformer,
        line=line,
        current_point=comp.current,
        voltage_point=comp.voltage,
        i2h_channel=comp.i2h,
        v2h_channel=comp.v2h,
        params_hash=params_hash(device),
    )


def output_channels(device: Device) -> dict[str, Channel]:
    """Each compensated channel's name -> the raw channel it is computed from
    (same unit and demand unit): what virtual meters and peaks look up."""
    comp = device.compensation
    if comp is None:
        return {}
    raw = {c.name: c for c in device.channels}
    return {c.name + comp.suffix: raw[c.name] for c in comp.channels if c.name in raw}


def channels_of(device: Device) -> dict[str, Channel]:
    """A device's raw channels and its compensated ones, by name."""
    return {c.name: c for c in device.channels} | output_channels(device)


def parameters_event(params: CompensationParams, at: datetime) -> Event:
    """Published whenever a parameter set comes into force (start, reload): records
    already published keep the hash they were computed with."""
    return Event(
        device=params.device,
        kind="compensation_parameters",
        at=at,
        message=f"compensation parameter set {params.params_hash} in force",
        details={"params_hash": params.params_hash},
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class OperatingPoint:
    """What one interval looked like, from the same interval's data.

    `active_kwh`/`reactive_kvarh`: the interval's net energies in the meter's
    load convention (delivered minus received) — their ratio is the power
    factor angle. `v2h`/`i2h`: integral of V² and I² over the interval (V²h,
    A²h); None when unknown. `hours`: the interval's real length."""

    active_kwh: Decimal
    reactive_kvarh: Decimal
    v2h: Decimal | None
    i2h: Decimal | None
    hours: Decimal

    @property
    def current_a(self) -> float | None:
        if self.i2h is None or self.hours <= 0:
            return None
        return math.sqrt(float(self.i2h / self.hours))

    @property
    def voltage_v(self) -> float | None:
        if self.v2h is None or self.hours <= 0:
            return None
        return math.sqrt(float(self.v2h / self.hours))

    @property
    def flow(self) -> Literal["delivered", "received"]:
        return "received" if self.active_kwh < 0 else "delivered"


def _error_dict(err: TransformerError, percent: float | None) -> dict[str, object]:
    return {
        "percent": None if percent is None else round(percent, 3),
        "ratio_error_pct": round(err.ratio_error_pct, 6),
        "phase_min": round(err.phase_min, 6),
    }


def _quantize(value: Decimal, like: Decimal = ENERGY_QUANTUM) -> Decimal:
    """Rounded to the micro-kWh, or to the raw value's own resolution where that
    is finer (so a factor of 1 and no losses give back the raw value exactly)."""
    exponent = like.as_tuple().exponent
    places = ENERGY_QUANTUM
    if isinstance(exponent, int) and exponent < QUANTUM_EXPONENT:
        places = Decimal(1).scaleb(exponent)
    return value.quantize(places, rounding=ROUND_HALF_EVEN)


def compensate(
    record: Interval, params: CompensationParams, operating_point: OperatingPoint | None
) -> Interval:
    """The compensated record of raw `record` (a channel named in `params`).

    A raw record without a value gives a compensated record without a value;
    an interval whose operating point is unknown (no samples, no V²h/I²h) gives
    a record without a value, flagged ESTNEEDED, rather than a guess."""
    role = params.roles[record.channel]

    def out(
        value: float | None, demand: float | None, flags: frozenset[Flag], info: dict[str, object]
    ) -> Interval:
        # One replace per record: it is most of the cost of a compensated record.
        return replace(
            record,
            channel=params.output_name(record.channel),
            value=value,
            demand=demand,
            flags=flags,
            counter_start=None,
            counter_end=None,
            original_value=None,
            rolling_demand=None,
            compensation=info,
        )

    info: dict[str, object] = {
        "params_hash": params.params_hash,
        "source_channel": record.channel,
        "raw_value": record.value,
    }
    if record.value is None:
        return out(None, None, record.flags, info)
    op = operating_point
    problem = None
    if op is None:
        problem = "no operating point for this interval"
    elif params.needs_current and op.i2h is None:
        problem = "no current for this interval (no samples, no I2h)"
    elif params.needs_voltage and op.v2h is None:
        problem = "no voltage for this interval (no samples, no V2h)"
    if problem is not None or op is None:
        info["error"] = problem
        return out(None, None, record.flags | {Flag.ESTNEEDED}, info)
    current_pct = voltage_pct = None
    ct = vt = NO_ERROR
    if params.ct_points and params.ct_rated_a and op.current_a is not None:
        current_pct = op.current_a / params.ct_rated_a * 100.0
        ct = interpolate(params.ct_points, current_pct)
    if params.vt_points and params.vt_rated_v and op.voltage_v is not None:
        voltage_pct = op.voltage_v / params.vt_rated_v * 100.0
        vt = interpolate(params.vt_points, voltage_pct)
    k_p, k_q = factors(float(op.active_kwh), float(op.reactive_kvarh), ct, vt)
    factor = round(k_p if role.kind == "active" else k_q, FACTOR_PLACES)
    loss = NO_LOSSES
    if op.i2h is not None or op.v2h is not None:
        loss = losses(
            params.transformer,
            params.line,
            v2h=op.v2h if op.v2h is not None else Decimal(0),
            i2h=op.i2h if op.i2h is not None else Decimal(0),
        )
    applied = Decimal(0)
    if role.kind == "active" and role.flow == op.flow:
        applied = loss.total_kwh if role.flow == "delivered" else -loss.total_kwh
    raw = dec(record.value)
    value = _quantize(raw * dec(factor) + applied, raw)
    demand = None
    if record.demand is not None:
        # Over the same length the engine averaged the raw demand over (nominal,
        # or duration_s for PARTIAL/LONG): the raw value / demand ratio.
        if record.value:
            demand = float(dec(record.demand) * value / raw)
        elif record.duration_s > 0:
            demand = float(value / (dec(record.duration_s) / 3600))
    info.update(
        {
            "factor": factor,
            "ct": _error_dict(ct, current_pct),
            "vt": _error_dict(vt, voltage_pct),
            "loss_kwh": _loss_dict(loss),
            "loss_applied_kwh": float(_quantize(applied)),
        }
    )
    return out(float(value), demand, record.flags, info)


def _loss_dict(loss: Losses) -> dict[str, float]:
    return {
        "iron": float(_quantize(loss.iron_kwh)),
        "copper": float(_quantize(loss.copper_kwh)),
        "line": float(_quantize(loss.line_kwh)),
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class Samples:
    """Fast-poll samples since the last boundary read: sums of squares, so the
    mean square over the interval is known however many polls were missed."""

    count: int = 0
    sum_v2: Decimal = Decimal(0)
    sum_i2: Decimal = Decimal(0)
    count_v: int = 0
    count_i: int = 0

    def add(self, values: Mapping[str, float | int | None], params: CompensationParams) -> Samples:
        v = values.get(params.voltage_point) if params.voltage_point else None
        i = values.get(params.current_point) if params.current_point else None
        sum_v2, count_v, sum_i2, count_i = self.sum_v2, self.count_v, self.sum_i2, self.count_i
        if v is not None and math.isfinite(v):
            sum_v2 += dec(v) ** 2
            count_v += 1
        if i is not None and math.isfinite(i):
            sum_i2 += dec(i) ** 2
            count_i += 1
        return Samples(
            count=self.count + 1, sum_v2=sum_v2, sum_i2=sum_i2, count_v=count_v, count_i=count_i
        )


NO_SAMPLES = Samples()


def operating_points(
    records: Sequence[Interval], params: CompensationParams, samples: Samples
) -> dict[datetime, OperatingPoint]:
    """The operating point of each interval end among `records` (one boundary's
    output): net energies from the configured channels, V²h and I²h from the
    V2h/I2h channels or from the samples' mean squares times the interval's
    real length."""
    by_end: dict[datetime, dict[str, Interval]] = {}
    for record in records:
        by_end.setdefault(record.end, {})[record.channel] = record
    out: dict[datetime, OperatingPoint] = {}
    for end, channels in by_end.items():
        p = q = Decimal(0)
        known = True
        duration_s = None
        for name, role in params.roles.items():
            rec = channels.get(name)
            if rec is None or rec.value is None:
                known = known and rec is None  # a channel absent from this end is not a gap
                continue
            duration_s = rec.duration_s
            signed = dec(rec.value) if role.flow == "delivered" else -dec(rec.value)
            if role.kind == "active":
                p += signed
            else:
                q += signed
        if not known or duration_s is None:
            continue
        hours = dec(duration_s) / 3600
        v2h = _square_hours(channels, params.v2h_channel, samples.sum_v2, samples.count_v, hours)
        i2h = _square_hours(channels, params.i2h_channel, samples.sum_i2, samples.count_i, hours)
        out[end] = OperatingPoint(active_kwh=p, reactive_kvarh=q, v2h=v2h, i2h=i2h, hours=hours)
    return out


def _square_hours(
    channels: Mapping[str, Interval],
    channel: str | None,
    sum_squares: Decimal,
    count: int,
    hours: Decimal,
) -> Decimal | None:
    if channel is not None:
        rec = channels.get(channel)
        return None if rec is None or rec.value is None else dec(rec.value)
    if count == 0:
        return None
    return sum_squares / count * hours


def compensate_records(
    records: Iterable[Interval], params: CompensationParams, samples: Samples
) -> list[Interval]:
    """Compensated records for one boundary's raw records (the shell's one call)."""
    records = list(records)
    points = operating_points(records, params, samples)
    return [compensate(r, params, points.get(r.end)) for r in records if r.channel in params.roles]
