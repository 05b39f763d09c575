"""The commissioning read (`edged probe`), pure part: one small read plan per
point of a device, and the table an engineer compares with the meter's display.

Every channel, measurement point, clock and status word is its own probe, read
on its own (with its scale register, if any), so an exception or a timeout on
one point is reported on that point's row and does not hide the others. The
reading itself is :mod:`edged.cli.probe`; nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Literal

from edged.config.schema import Channel, Device, MeasurementPoint
from edged.core.plan import meter_clock_points, register_point, status_point
from edged.core.registers import (
    Point,
    ReadPlan,
    ValueSpec,
    apply_plan,
    build_plan,
)

Kind = Literal["channel", "measurement", "clock", "status", "model"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Probe:
    """One point of a device and the plan that reads it alone."""

    kind: Kind
    name: str
    function: str
    address: int
    data_type: str
    unit: str
    plan: ReadPlan
    count: int  # registers of the value itself
    scale_address: int | None = None  # its power-of-ten scale register, if any
    multiplier: float = 1.0  # channels: unit per count (counts are what the engine stores)


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeRow:
    """One line of the probe table."""

    kind: Kind
    name: str
    where: str  # "holding 3203 (x4)"
    data_type: str
    registers: str  # raw words, hex
    value: str
    unit: str
    ok: bool
    note: str


def _value_probe(kind: Kind, spec: Channel | MeasurementPoint, base: int) -> Probe:
    points = [register_point(spec.name, spec, base)]
    sf_point = None
    scale_address = None
    if spec.scale_register is not None:
        sf = spec.scale_register
        scale_address = base + sf.address
        sf_point = f"_sf.{sf.function}.{scale_address}"
        points.append(
            Point(name=sf_point, function=sf.function, address=scale_address, data_type=sf.type)
        )
    m10k = spec.encoding == "m10k"
    na = spec.not_implemented
    if isinstance(spec, Channel):
        values = [ValueSpec(name=spec.name, point=spec.name, sf_point=sf_point, m10k=m10k,
                            not_implemented=na)]  # fmt: skip
        multiplier, unit = spec.multiplier, spec.unit
    else:
        factor = spec.scale * spec.ratio_factor
        values = [ValueSpec(name=spec.name, point=spec.name, scale=factor, offset=spec.offset,
                            sf_point=sf_point, m10k=m10k, not_implemented=na)]  # fmt: skip
        multiplier, unit = 1.0, spec.unit
    return Probe(
        kind=kind,
        name=spec.name,
        function=spec.function,
        address=base + spec.address,
        data_type=spec.type + (" m10k" if m10k else ""),
        unit=unit,
        plan=build_plan(points, values, max_gap=0),
        count=points[0].count,
        scale_address=scale_address,
        multiplier=multiplier,
    )


def device_probes(device: Device, *, base_address: int = 0) -> list[Probe]:
    """A probe for every channel, measurement point, clock and status word
    (``base_address``: the SunSpec model's address, added to channels and points)."""
    probes = [_value_probe("channel", c, base_address) for c in device.channels]
    if device.measurements is not None:
        probes += [_value_probe("measurement", p, base_address)
                   for p in device.measurements.points]  # fmt: skip
    if (clock := device.clock) is not None:
        points, spec = meter_clock_points(clock, device.clock_tolerance)
        data_type = (
            clock.type if clock.format == "epoch" else f"{clock.format} ({len(points)} x uint16)"
        )
        probes.append(
            Probe(
                kind="clock",
                name="clock",
                function=clock.function,
                address=clock.address,
                data_type=data_type,
                unit=clock.timezone,
                plan=build_plan(points, [], clock=spec, max_gap=0),
                count=sum(p.count for p in points),
            )
        )
    for i, word in enumerate(device.status):
        point, status = status_point(word)
        probes.append(
            Probe(
                kind="status",
                name="status" if len(device.status) == 1 else f"status[{i}]",
                function=word.function,
                address=word.address,
                data_type=word.type,
                unit="flags",
                plan=build_plan([point], [], status=[status], max_gap=0),
                count=point.count,
            )
        )
    return probes


def _words_at(
    registers: Sequence[tuple[int, tuple[int, ...]]], address: int, count: int
) -> list[tuple[int, tuple[int, ...]]]:
    """The ``count`` words at ``address`` out of the reads that returned them."""
    for start, words in registers:
        if start <= address and address + count <= start + len(words):
            return [(address, words[address - start : address - start + count])]
    return []


def _hex(registers: Sequence[tuple[int, tuple[int, ...]]]) -> str:
    return " | ".join(" ".join(f"{w:04X}" for w in words) for _, words in registers)


def _number(value: float | int) -> str:
    return f"{value:g}" if isinstance(value, float) and abs(value) < 1e-4 else str(value)


def probe_row(
    probe: Probe,
    *,
    registers: Sequence[tuple[int, tuple[int, ...]]],
    values: Mapping[str, int | float] | None,
    error: str | None,
    reference_s: float,
) -> ProbeRow:
    """The table row of one probe from what its read returned (values None: failed)."""
    where = f"{probe.function} {probe.address}" + (f" (x{probe.count})" if probe.count > 1 else "")
    # The value's own words first, then its scale register's (reads go in address
    # order, and one read may carry both).
    registers_hex = _hex(_words_at(registers, probe.address, probe.count))
    if probe.scale_address is not None:
        where += f", scale {probe.scale_address}"
        scale = _words_at(registers, probe.scale_address, 1)
        if scale:
            registers_hex += f"; scale {_hex(scale)}"

    def row(value: str, unit: str, ok: bool, note: str) -> ProbeRow:
        return ProbeRow(kind=probe.kind, name=probe.name, where=where,
                        data_type=probe.data_type, registers=registers_hex, value=value,
                        unit=unit, ok=ok, note=note)  # fmt: skip

    if error is not None or values is None:
        return row("-", probe.unit, False, error or "no answer")
    result = apply_plan(probe.plan, values, reference_s)
    notes = list(result.problems)
    if probe.kind == "clock":
        if result.meter_clock_s is None:
            return row(value="-", unit=probe.unit, ok=False, note="; ".join(notes))
        when = datetime.fromtimestamp(result.meter_clock_s, UTC).isoformat(timespec="seconds")
        offset = result.meter_clock_offset_s or 0.0
        notes.insert(0, f"{offset:+.1f} s from this host's clock")
        return row(when.replace("+00:00", "Z"), "UTC", True, "; ".join(notes))
    if probe.kind == "status":
        flags = sorted(str(f) for f in result.flags)
        word = next(iter(values.values()))
        return row(f"0x{int(word):X}", "flags", True, ", ".join(flags) or "no flag bits set")
    if probe.name not in result.values:
        return row(value="-", unit=probe.unit, ok=False, note="; ".join(notes))
    raw = result.values[probe.name]
    if probe.kind == "channel":
        value: float | int = raw
        if probe.multiplier != 1.0:
            value = float(Decimal(repr(raw)) * Decimal(repr(probe.multiplier)))
            notes.insert(0, f"counter {_number(raw)} x {probe.multiplier:g}")
    else:
        value = raw
    if result.scale_factors:
        notes.append(f"scale 10^{next(iter(result.scale_factors.values()))}")
    return row(value=_number(value), unit=probe.unit, ok=True, note="; ".join(notes))


_COLUMNS = ("point", "kind", "register", "type", "raw registers", "value", "unit", "note")


def format_table(device_id: str, rows: Sequence[ProbeRow]) -> str:
    """A plain-text table (fixed-width columns) for the terminal."""
    cells = [
        (r.name, r.kind, r.where, r.data_type, r.registers or "-", r.value, r.unit,
         ("" if r.ok else "ERROR: ") + r.note)
        for r in rows
    ]  # fmt: skip
    widths = [max(len(str(c)) for c in column) for column in zip(_COLUMNS, *cells, strict=False)]
    lines = [f"device {device_id}: {len(rows)} point(s), read once, read-only"]
    for line in (_COLUMNS, *cells):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    failed = sum(not r.ok for r in rows)
    lines.append(f"{len(rows) - failed} ok, {failed} failed")
    return "\n".join(lines) + "\n"
