"""Every shipped device profile loads, and reads from a simulator built from its
golden register table (tests/golden), over Modbus TCP through the Link a daemon
would use. The simulator never serves a profile's own map back to it."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from edged.config.load import (
    SHIPPED_PROFILES_DIR,
    ConfigError,
    load_settings,
)
from edged.core.model import Flag, ReadError, ReadErrorKind
from edged.core.plan import plan_device
from edged.io.modbus import (
    build_links,
    read_device,
)
from edged.io.sunspec import discover
from edged.sim.golden import golden_meter, load_table
from edged.sim.meter import MeterServer
from tests.support.golden import expected_in

PROFILES = sorted(
    p.name.removesuffix(".yaml") for p in SHIPPED_PROFILES_DIR.iterdir() if p.name.endswith(".yaml")
)
GOLDEN_DIR = Path(__file__).parent / "golden"


def test_the_long_shipped_profiles_are_still_shipped() -> None:
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


@pytest.mark.integration
@pytest.mark.parametrize("profile", PROFILES)
async def test_profile_reads_a_meter_built_from_its_golden_table(
    profile: str, tmp_path: Path
) -> None:
    """Over Modbus TCP, through the Link a daemon would use, against a simulated meter
    that serves the vendor's registers (tests/golden), never the profile's own map.
    Verified rows must read the golden value; a profile with unverified channels
    must fail its boundary read with an illegal-address exception (the golden meter
    has no such register), never read something plausible."""
    table = load_table(GOLDEN_DIR / f"{profile}.yaml")
    device = load_settings(config(tmp_path, profile, 502)).devices[0]
    names = [c.name for c in device.channels] + ["clock"] * (device.clock is not None)
    names += [p.name for p in (device.measurements.points if device.measurements else ())]
    # The profile only names the rows (and so how many template circuits to serve);
    # addresses and contents are the golden table's.
    verified = {name: rows[0] for name in names if isinstance(rows := table.rows_for(name), list)}
    meter = golden_meter(table, [*table.rows, *verified.values()])
    async with MeterServer({1: meter}) as server:
        port = await server.start_tcp()
        device = load_settings(config(tmp_path, profile, port)).devices[0]
        link = build_links([device])[device.id]
        base_address = 0
        if device.sunspec is not None:
            found = await discover(link, 1, device.sunspec.models)
            assert not isinstance(found, ReadError), found
            base_address = found.address
        plan = plan_device(device, base_address=base_address)
        clock_row = verified.pop("clock", None)
        reference_s = (
            None
            if clock_row is None
            else datetime.fromisoformat(clock_row.value).replace(tzinfo=UTC).timestamp()
        )
        channels_verified = all(c.name in verified for c in device.channels)
        try:
            read = await read_device(link, 1, plan.boundary, reference_s=reference_s)
            if channels_verified:
                assert read.error is None, read.error
                for channel in device.channels:
                    row = verified[channel.name]
                    want = expected_in(row, channel.unit)
                    assert want is not None
                    got = float(Decimal(repr(read.values[channel.name]))
                                * Decimal(repr(channel.multiplier)))  # fmt: skip
                    assert got == pytest.approx(float(want), abs=row.tolerance or 0), channel.name
                if clock_row is not None:
                    assert read.meter_clock_offset_s is not None
                    assert abs(read.meter_clock_offset_s) < 2
                    assert Flag.CLOCK_ERROR not in read.flags
            else:
                assert read.error is not None
                assert read.error.kind is ReadErrorKind.EXCEPTION
                assert read.error.exception_code == 2  # illegal data address
            if plan.measurements is not None:
                assert device.measurements is not None
                points = {p.name for p in device.measurements.points}
                fast = await read_device(link, 1, plan.measurements)
                if points <= set(verified):
                    assert fast.error is None, fast.error
                    assert set(fast.values) == points
                    units = {p.name: p.unit for p in device.measurements.points}
                    for name in points:
                        row = verified[name]
                        want = expected_in(row, units[name])
                        assert want is not None
                        assert fast.values[name] == pytest.approx(
                            float(want), abs=row.tolerance or 0
                        ), name
                else:
                    assert fast.error is not None
        finally:
            link.close()


def test_bcpm_channel_count_expands_the_template(tmp_path: Path) -> None:
    default = load_settings(config(tmp_path, "bcpm", 502)).devices[0]
    assert len(default.channels) == 42
    fewer = load_settings(config(tmp_path, "bcpm", 502, "    channel_count: 20\n")).devices[0]
    assert len(fewer.channels) == 20
    assert fewer.channel_count == 20
    assert [c.name for c in default.channels[:2]] == ["branch01_energy", "branch02_energy"]
    last = default.channels[41]
    assert last.name == "branch42_energy"
    # Register 1168 + 2 x 41 = 1250 (address 1249), its scale register 1084 + 41 = 1125.
    assert last.address == 1249
    assert last.scale_register is not None
    assert last.scale_register.address == 1124
    # 42 scale registers (1083-1124) and 84 energy registers (1167-1250), 42 apart:
    # two reads.
    assert [(r.address, r.count) for r in plan_device(default).boundary.requests] == [
        (1083, 42),
        (1167, 84),
    ]
    # 84 on one unit id would read past the circuit registers: an error that says why
    with pytest.raises(ConfigError) as info:
        load_settings(config(tmp_path, "bcpm", 502, "    channel_count: 84\n"))
    assert "channel_count 84 is more than the 42 channels this map has per unit id (an " in str(
        info.value
    )
    # a device may override a single expanded channel by name
    one = load_settings(
        config(
            tmp_path, "bcpm", 502, "    channels:\n      - {name: branch03_energy, multiplier: 2}\n"
        )
    ).devices[0]
    assert one.channels[2].multiplier == 2.0
    assert one.channels[3].multiplier == 1.0


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
