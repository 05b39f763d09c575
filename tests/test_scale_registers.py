"""Per-channel power-of-ten scale registers: applied exactly, and a change between
two reads flags the interval SCALE_CHANGED (BCPM circuits, SunSpec models)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from edged.config.load import load_settings
from edged.config.schema import Device
from edged.core.engine.intervals import step_channel
from edged.core.engine.state import (
    ChannelState,
    IntervalContext,
)
from edged.core.flags import quality
from edged.core.model import Flag, Quality, Read, TimeState
from edged.core.plan import plan_device
from edged.core.registers import Point, ValueSpec, apply_plan, build_plan, scaled_value
from edged.core.scale import rescaled
from edged.io.modbus import build_links, read_device
from edged.sim.meter import MeterServer, SimulatedMeter, StaticPoint
from edged.sim.modbus_frames import DataType

T0 = datetime(2026, 12, 6, 0, 0, tzinfo=UTC)
Q = timedelta(minutes=15)


@pytest.mark.parametrize(
    ("raw", "exponent", "expected"),
    [
        (123456, 0, 123456),  # BCPM golden: circuit 1 energy, scale 0
        (123456, -1, 12345.6),  # ... scale -1
        (50, -2, 0.5),  # BCPM golden: circuit 1 power, scale -2
        (1000, 1, 10000),  # SunSpec golden: TotVArhImpQ1 x 10^1
        (0.1, -1, 0.01),  # a float register: exactly, not 0.010000000000000002
        (2.675, 2, 267.5),
    ],
)
def test_scale_factor_is_applied_exactly(
    raw: int | float, exponent: int, expected: int | float
) -> None:
    spec = ValueSpec(name="v", point="v", sf_point="sf")
    assert scaled_value(spec, {"v": raw, "sf": exponent}) == expected


def test_not_implemented_scale_factor_gives_no_value() -> None:
    spec = ValueSpec(name="v", point="v", sf_point="sf")
    assert scaled_value(spec, {"v": 123, "sf": -32768}) is None  # SunSpec "not implemented"


def test_apply_plan_reports_the_exponent_each_value_was_read_with() -> None:
    points = [
        Point(name="a", function="holding", address=0, data_type="uint32"),
        Point(name="sf", function="holding", address=2, data_type="int16"),
        Point(name="b", function="holding", address=3, data_type="uint16"),
    ]
    plan = build_plan(
        points, [ValueSpec(name="a", point="a", sf_point="sf"), ValueSpec(name="b", point="b")]
    )
    result = apply_plan(plan, {"a": 7, "sf": -3, "b": 1})
    assert result.values == {"a": 0.007, "b": 1}
    assert result.scale_factors == {"a": -3}


def test_rescaled_names_only_real_changes() -> None:
    assert rescaled({}, {"a": -1}) == frozenset()  # first read: nothing to compare with
    assert rescaled({"a": -1, "b": 0}, {"a": -1, "b": 0}) == frozenset()
    assert rescaled({"a": -1, "b": 0}, {"a": -2, "b": 0}) == {"a"}


def bcpm(tmp_path: Path, port: int = 502) -> Device:
    path = tmp_path / "edged.yaml"
    path.write_text(
        "site: lab\ndevices:\n  - id: panel\n    profile: bcpm\n    channel_count: 2\n"
        f"    transport: {{type: tcp, host: 127.0.0.1, port: {port}, timeout: 500ms}}\n"
    )
    return load_settings(path).devices[0]


def read_at(boundary: datetime, values: dict[str, float | int], changed: set[str]) -> Read:
    return Read(
        device="panel",
        boundary=boundary,
        read_at=boundary,
        read_lateness_ms=0.0,
        time_state=TimeState.SYNCED,
        values=values,
        rescaled=frozenset(changed),
    )


def test_a_rescaled_channel_is_flagged_and_its_neighbour_is_not(tmp_path: Path) -> None:
    device = bcpm(tmp_path)
    ctx = IntervalContext(site="lab", device=device, zone=UTC)
    one, two = device.channels
    start = ChannelState(counter=1234.5, counter_at=T0, last_end=T0)
    # Circuit 1 went from scale -1 (12345 -> 1234.5 kWh) to 0 (1240 -> 1240 kWh).
    read = read_at(T0 + Q, {one.name: 1240, two.name: 1240}, {one.name})
    flagged = step_channel(start, read, one, ctx).records[0]
    assert Flag.SCALE_CHANGED in flagged.flags
    assert flagged.value == 5.5  # the value is kept: the flag asks a person to look
    assert quality(flagged.flags) is Quality.SUSPECT
    plain = step_channel(start, read, two, ctx).records[0]
    assert Flag.SCALE_CHANGED not in plain.flags


@pytest.mark.integration
async def test_a_scale_register_change_is_seen_between_two_reads(tmp_path: Path) -> None:
    """Over TCP against a simulated BCPM (registers from tests/golden/bcpm.yaml):
    circuit 1 energy 1168-1169, its scale at 1084; circuit 2 at 1170 / 1085."""
    meter = SimulatedMeter(
        [
            StaticPoint(name="kwh1", address=1167, value=123456, data_type=DataType.UINT32),
            StaticPoint(name="kwh2", address=1169, value=12345, data_type=DataType.UINT32),
            StaticPoint(name="sf1", address=1083, value=-1, data_type=DataType.INT16),
            StaticPoint(name="sf2", address=1084, value=0, data_type=DataType.INT16),
            StaticPoint(name="amps1", address=1335, value=25, data_type=DataType.INT16),
        ],
        fill_gaps=True,
    )
    async with MeterServer({1: meter}) as server:
        device = bcpm(tmp_path, await server.start_tcp())
        link = build_links([device])[device.id]
        plan = plan_device(device).boundary
        try:
            first = await read_device(link, 1, plan)
            assert first.error is None, first.error
            assert first.values == {"branch01_energy": 12345.6, "branch02_energy": 12345}
            meter.set_static("kwh1", 12346)
            meter.set_static("sf1", 0)
            second = await read_device(link, 1, plan)
        finally:
            link.close()
    assert second.values == {"branch01_energy": 12346, "branch02_energy": 12345}
    assert rescaled(first.scale_factors, second.scale_factors) == {"branch01_energy"}
