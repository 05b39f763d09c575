"""Every shipped device profile loads, and reads from a simulator built from its
own register map (over Modbus TCP, through the Link a daemon would use)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from edged.config.load import (
    SHIPPED_PROFILES_DIR,
    load_settings,
)
from edged.config.schema import Device
from edged.core.plan import plan_device
from edged.core.registers import Point, ReadPlan
from edged.io.modbus import (
    build_links,
    read_device,
)
from edged.sim.meter import ClockPoint, MeterServer, SimulatedMeter, StaticPoint, Table
from edged.sim.meter import Point as SimPoint
from edged.sim.modbus_frames import DataType

PROFILES = sorted(
    p.name.removesuffix(".yaml") for p in SHIPPED_PROFILES_DIR.iterdir() if p.name.endswith(".yaml")
)
STATUS_WORD = 0b1


def test_the_profiles_issue_5_asks_for_are_shipped() -> None:
    assert {"pmc-1", "ion-8600", "pm8000", "pm5350", "bcpm", "generic"} <= set(PROFILES)


def config(tmp_path: Path, profile: str, port: int, extra: str = "") -> Path:
    path = tmp_path / "edged.yaml"
    path.write_text(
        f"""\
site: lab
devices:
  - id: meter
    profile: {profile}
    transport: {{type: tcp, host: 127.0.0.1, port: {port}, unit_id: 1, timeout: 500ms}}
{extra}"""
    )
    return path


def _points(plan: ReadPlan) -> list[Point]:
    return [p for r in (*plan.requests, *plan.optional) for p in r.points]


def _clock_words(fmt: str, now: datetime) -> list[int]:
    if fmt == "ymdhms":
        return [now.year, now.month, now.day, now.hour, now.minute, now.second]
    return [now.year - 2000, (now.month << 8) | now.day, (now.hour << 8) | now.minute,
            now.second * 1000]  # fmt: skip


def simulated(device: Device) -> tuple[SimulatedMeter, dict[str, int | float]]:
    """A meter serving the device's register map, and the values edged should read."""
    plan = plan_device(device)
    plans = [plan.boundary] + ([plan.measurements] if plan.measurements else [])
    channels = {c.name: c for c in device.channels}
    measured = {m.name: m for m in (device.measurements.points if device.measurements else ())}
    sim: dict[tuple[str, int], SimPoint] = {}
    expected: dict[str, int | float] = {}
    now = datetime.now(UTC).replace(microsecond=0)
    clock = device.clock
    for n, point in enumerate(p for pl in plans for p in _points(pl)):
        key = (point.function, point.address)
        table = Table(point.function)
        if point.name.startswith("_clock"):
            assert clock is not None
            if clock.format == "epoch":
                sim[key] = ClockPoint(
                    address=point.address,
                    table=table,
                    data_type=DataType(point.data_type),
                    word_order=point.word_order,
                    byte_order=point.byte_order,
                )
            else:
                base = clock.address
                word = _clock_words(clock.format, now)[point.address - base]
                sim[key] = StaticPoint(point.name, point.address, word, table)
            continue  # fmt: skip
        if point.name.startswith("_status"):
            sim[key] = StaticPoint(point.name, point.address, STATUS_WORD, table,
                                   DataType(point.data_type))  # fmt: skip
            continue
        if point.name.startswith("_sf"):
            sim[key] = StaticPoint(point.name, point.address, -1, table, DataType.INT16)
            continue
        is_float = point.data_type.startswith("float")
        value: int | float = 1000 + 7 * n + (0.5 if is_float else 0)
        spec: Any = channels.get(point.name) or measured[point.name]
        raw: int | float = value
        if spec.encoding == "m10k":
            raw = ((int(value) // 10_000) << 16) | (int(value) % 10_000)
        sim[key] = StaticPoint(point.name, point.address, raw, table, DataType(point.data_type),
                               point.word_order, point.byte_order)  # fmt: skip
        if spec.scale_register is not None:
            value = value / 10
        if point.name in measured:
            value = value * spec.scale * spec.ratio_factor + spec.offset
        expected[point.name] = value
    meter = SimulatedMeter(list(sim.values()), fill_gaps=True)
    return meter, expected


@pytest.mark.parametrize("profile", PROFILES)
async def test_profile_loads_and_reads_from_the_simulator(profile: str, tmp_path: Path) -> None:
    settings = load_settings(config(tmp_path, profile, 1502))
    device = settings.devices[0]
    meter, expected = simulated(device)
    async with MeterServer({1: meter}) as server:
        port = await server.start_tcp()
        device = load_settings(config(tmp_path, profile, port)).devices[0]
        link = build_links([device])[device.id]
        plan = plan_device(device)
        try:
            read = await read_device(link, 1, plan.boundary, reference_s=time.time())
            assert read.error is None, read.error
            assert read.notes == ()
            channel_values = {k: v for k, v in expected.items() if k in read.values}
            assert set(channel_values) == {c.name for c in device.channels}
            for name, value in channel_values.items():
                assert read.values[name] == pytest.approx(value), name
            if device.status:
                bits = device.status[0].bits
                assert read.flags == {flag for bit, flag in bits.items() if STATUS_WORD >> bit & 1}
            if device.clock is not None:
                assert read.meter_clock_offset_s is not None
                assert abs(read.meter_clock_offset_s) < 2
            if plan.measurements is not None:
                fast = await read_device(link, 1, plan.measurements)
                assert fast.error is None, fast.error
                for name, value in fast.values.items():
                    assert value == pytest.approx(expected[name]), name
                assert set(fast.values) == {p.name for p in device.measurements.points}  # type: ignore[union-attr]
        finally:
            link.close()


def test_bcpm_channel_count_expands_the_template(tmp_path: Path) -> None:
    default = load_settings(config(tmp_path, "bcpm", 502)).devices[0]
    assert len(default.channels) == 42
    big = load_settings(config(tmp_path, "bcpm", 502, "    channel_count: 84\n")).devices[0]
    assert len(big.channels) == 84
    assert big.channel_count == 84
    assert [c.name for c in big.channels[:2]] == ["branch01_energy", "branch02_energy"]
    assert big.channels[83].name == "branch84_energy"
    assert big.channels[83].address == big.channels[0].address + 83 * 2
    # 84 x 2 registers: two reads of at most 125 registers
    assert [r.count for r in plan_device(big).boundary.requests] == [124, 44]
    # a device may override a single expanded channel by name
    one = load_settings(
        config(
            tmp_path, "bcpm", 502, "    channels:\n      - {name: branch03_energy, multiplier: 1}\n"
        )
    ).devices[0]
    assert one.channels[2].multiplier == 1.0
    assert one.channels[3].multiplier == 0.01


def test_template_errors_point_at_the_profile(tmp_path: Path) -> None:
    from edged.config.load import ConfigError

    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "mine.yaml").write_text(
        "name: mine\nchannel_count: 4\nchannel_template:\n  name: fixed\n  register: 0\n"
    )
    with pytest.raises(ConfigError) as info:
        load_settings(config(tmp_path, "mine", 502))
    assert "mine.yaml:4 channel_template.name: must contain {n}" in str(info.value)


def test_profile_keys_are_inherited_and_overridable(tmp_path: Path) -> None:
    device = load_settings(
        config(
            tmp_path, "ion-8600", 502, "    clock_tolerance: 30s\n    measurements: {every: 5s}\n"
        )
    ).devices[0]
    assert device.interval_s == 1800
    assert device.max_gap == 0
    assert device.clock_tolerance == 30.0
    assert device.measurements is not None
    assert device.measurements.every == 5.0
    assert len(device.measurements.points) == 3  # inherited from the profile
    assert [c.encoding for c in device.channels] == ["m10k"] * 4
