"""Link and read planning (pure): which devices share a line, and a device's
register map as read plans.

The Modbus shell (:mod:`edged.io.modbus`) builds one link per identity
computed here and reads the plans; check-config reports the same problems
without opening anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC
from typing import Any
from zoneinfo import ZoneInfo

from edged.config.schema import (
    Device,
    MeasurementPoint,
    MeterClock,
    RtuOverTcpTransport,
    RtuTransport,
    StatusWord,
    TcpTransport,
    _RegisterMap,
)
from edged.core.errors import EdgedError
from edged.core.registers import ClockSpec, Point, ReadPlan, StatusSpec, ValueSpec, build_plan


class LinkConfigError(EdgedError, ValueError):
    """Devices that share a port or endpoint disagree on how to use it."""


AnyTransport = TcpTransport | RtuTransport | RtuOverTcpTransport


def _link_key(transport: AnyTransport) -> tuple[str, ...]:
    if isinstance(transport, RtuTransport):
        return ("serial", transport.port)
    # A TCP port is one link whatever the framing; mixing framings is an error.
    return ("net", transport.host.lower(), str(transport.port))


# What makes two devices share one link object: the port/endpoint and how
# the line is driven. A reload keeps a link whose identity is unchanged.
LinkIdentity = tuple[tuple[str, ...], tuple[Any, ...]]


def link_identity(transport: AnyTransport) -> LinkIdentity:
    return (_link_key(transport), _line_settings(transport))


def _line_settings(transport: AnyTransport) -> tuple[Any, ...]:
    if isinstance(transport, TcpTransport):
        return ("tcp", transport.max_connections, transport.request_gap_ms)
    if isinstance(transport, RtuTransport):
        return ("rtu", transport.baudrate, transport.parity, transport.bytesize, transport.stopbits)
    return ("rtu_over_tcp",)


def check_links(devices: Iterable[Device]) -> list[str]:
    """Problems with how devices share ports and endpoints (for check-config)."""
    first: dict[tuple[str, ...], tuple[str, tuple[Any, ...]]] = {}
    problems: list[str] = []
    for device in devices:
        transport = device.transport
        key = _link_key(transport)
        settings = _line_settings(transport)
        seen = first.setdefault(key, (device.id, settings))
        if seen[1] != settings:
            problems.append(
                f"devices {seen[0]} and {device.id} share {':'.join(key[1:])} but configure "
                f"it differently ({seen[1]} vs {settings})"
            )
    return problems


@dataclass(frozen=True, slots=True, kw_only=True)
class DevicePlan:
    """Everything a poller needs to read one device."""

    unit_id: int
    boundary: ReadPlan  # channels (+ scale factors), status and clock
    measurements: ReadPlan | None  # fast-poll points, if configured
    measure_every_s: float | None


def register_point(name: str, spec: _RegisterMap, base: int = 0) -> Point:
    """Where a channel or measurement point lives and how it is encoded."""
    return Point(
        name=name,
        function=spec.function,
        address=base + spec.address,
        data_type=spec.type,
        word_order=spec.word_order,
        byte_order=spec.byte_order,
    )


def status_point(word: StatusWord) -> tuple[Point, StatusSpec]:
    """The point a status word is read into, and how its bits are named."""
    name = f"_status.{word.function}.{word.address}"
    point = Point(
        name=name,
        function=word.function,
        address=word.address,
        data_type=word.type,
        word_order=word.word_order,
        byte_order=word.byte_order,
    )
    return point, StatusSpec(name, dict(word.bits))


def meter_clock_points(clock: MeterClock, tolerance_s: float) -> tuple[list[Point], ClockSpec]:
    """The points a meter's clock is read into (one epoch value, or one uint16
    per date/time field), and how they are decoded."""
    if clock.format == "epoch":
        points = [
            Point(
                name="_clock.epoch",
                function=clock.function,
                address=clock.address,
                data_type=clock.type,
                word_order=clock.word_order,
                byte_order=clock.byte_order,
            )
        ]
    else:
        fields = 6 if clock.format == "ymdhms" else 4
        points = [
            Point(
                name=f"_clock.{i}",
                function=clock.function,
                address=clock.address + i,
                data_type="uint16",
            )
            for i in range(fields)
        ]
    zone = UTC if clock.timezone == "UTC" else ZoneInfo(clock.timezone)
    spec = ClockSpec(
        format=clock.format,
        points=tuple(p.name for p in points),
        zone=zone,
        tolerance_s=tolerance_s,
    )
    return points, spec


def _sf_name(function: str, address: int) -> str:
    return f"_sf.{function}.{address}"


def _register_plan(
    specs: Sequence[_RegisterMap], *, counters: bool, base: int = 0
) -> tuple[list[Point], list[ValueSpec]]:
    points: dict[str, Point] = {}
    values: list[ValueSpec] = []
    for spec in specs:
        points[spec.name] = register_point(spec.name, spec, base)
        sf_point = None
        if spec.scale_register is not None:
            sf = spec.scale_register
            sf_point = _sf_name(sf.function, base + sf.address)
            points[sf_point] = Point(
                name=sf_point, function=sf.function, address=base + sf.address, data_type=sf.type
            )
        na = spec.not_implemented
        if counters:
            # Counters stay in counts: scale and CT/VT live in Channel.multiplier.
            values.append(ValueSpec(name=spec.name, point=spec.name, sf_point=sf_point,
                                    m10k=spec.encoding == "m10k", not_implemented=na))  # fmt: skip
        else:
            assert isinstance(spec, MeasurementPoint)
            factor = spec.scale * spec.ratio_factor
            values.append(
                ValueSpec(
                    name=spec.name,
                    point=spec.name,
                    scale=factor,
                    offset=spec.offset,
                    sf_point=sf_point,
                    m10k=spec.encoding == "m10k",
                    not_implemented=na,
                )
            )
    return list(points.values()), values


def plan_device(device: Device, *, base_address: int = 0) -> DevicePlan:
    """Turn a device's config into its read plans (pure; coalesced with ``max_gap``).

    ``base_address`` is added to every channel and measurement register (and
    their scale registers): a SunSpec device's registers are offsets into the
    model found on the meter. Raises ``ValueError`` if the register map cannot
    be read (two channels named like a status point, say) — config validation
    makes that rare.
    """
    points, values = _register_plan(device.channels, counters=True, base=base_address)
    optional: list[Point] = []
    status: list[StatusSpec] = []
    for word in device.status:
        point, spec = status_point(word)
        optional.append(point)
        status.append(spec)
    clock_spec = None
    if device.clock is not None:
        clock_points, clock_spec = meter_clock_points(device.clock, device.clock_tolerance)
        optional.extend(clock_points)
    boundary = build_plan(
        points,
        values,
        optional_points=_dedupe(optional),
        status=status,
        clock=clock_spec,
        max_gap=device.max_gap,
    )
    measurements = None
    every = None
    if device.measurements is not None:
        m_points, m_values = _register_plan(
            device.measurements.points, counters=False, base=base_address
        )
        measurements = build_plan(m_points, m_values, max_gap=device.max_gap)
        every = device.measurements.every
    return DevicePlan(
        unit_id=device.transport.unit_id,
        boundary=boundary,
        measurements=measurements,
        measure_every_s=every,
    )


def _dedupe(points: Sequence[Point]) -> list[Point]:
    seen: dict[str, Point] = {}
    for point in points:
        seen.setdefault(point.name, point)
    return list(seen.values())
