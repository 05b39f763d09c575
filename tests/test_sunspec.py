"""`profile: sunspec`: points placed from the SunSpec model definitions, model
discovery ("SunS" at 0/40000/50000, then the chain), and the daemon reading a
simulated SunSpec meter end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from edged.config.load import ConfigError, load_settings
from edged.config.schema import Device
from edged.config.sunspec import model_definition
from edged.core.model import ReadError, ReadErrorKind
from edged.core.sunspec import ModelRef, SunSpecError, common_point, model_points
from edged.io.modbus import build_links
from edged.io.sunspec import discover
from edged.sim.golden import load_table
from edged.sim.meter import CounterPoint, MeterServer, SimulatedMeter, StaticPoint
from edged.sim.modbus_frames import DataType
from tests.support.config import site_config, tcp_device
from tests.support.daemon import Daemon
from tests.support.mqtt import Broker, collect, intervals
from tests.support.schema import validate_messages

GOLDEN = Path(__file__).parent / "golden" / "sunspec.yaml"


@pytest.mark.parametrize("model", [201, 202, 203, 204])
def test_offsets_from_the_model_definitions_match_the_golden_table(model: int) -> None:
    """The golden rows give each point's offset as read from model_20x.json by hand."""
    points = model_points(model_definition(model))
    for row in load_table(GOLDEN).data["registers"]:
        assert points[row["point"]].offset == row["offset"], row["name"]
    assert points["TotWh_SF"].offset == 54
    assert points["TotVArh_SF"].offset == 104
    assert sum(p.size for p in points.values()) == 107  # ID, L and L = 105 registers


def test_a_point_must_sit_at_one_offset_in_every_listed_model() -> None:
    one = {"group": {"points": [{"name": "ID", "size": 1, "type": "uint16"},
                                {"name": "W", "size": 1, "type": "int16"}]}}  # fmt: skip
    other = {"group": {"points": [{"name": "ID", "size": 1, "type": "uint16"},
                                  {"name": "L", "size": 1, "type": "uint16"},
                                  {"name": "W", "size": 1, "type": "int16"}]}}  # fmt: skip
    assert common_point({1: one, 2: one}, "W").offset == 1
    with pytest.raises(SunSpecError, match="differs between models"):
        common_point({1: one, 2: other}, "W")
    with pytest.raises(SunSpecError, match=r"not in model\(s\) \[2\]"):
        common_point({1: other, 2: one}, "L")


def write(tmp_path: Path, port: int = 502, extra: str = "") -> Path:
    path = tmp_path / "edged.yaml"
    path.write_text(
        "site: lab\ndevices:\n  - id: pv\n    profile: sunspec\n"
        f"    transport: {{type: tcp, host: 127.0.0.1, port: {port}, timeout: 300ms}}\n{extra}"
    )
    return path


def test_the_profile_expands_to_offsets_with_scale_registers(tmp_path: Path) -> None:
    device = load_settings(write(tmp_path)).devices[0]
    assert device.sunspec is not None
    assert device.sunspec.models == (201, 202, 203, 204)
    energy = {c.name: c for c in device.channels}["energy_import"]
    assert (energy.address, energy.type, energy.unit, energy.multiplier) == (46, "uint32", "kWh",
                                                                             0.001)  # fmt: skip
    assert energy.scale_register is not None
    assert energy.scale_register.address == 54
    assert energy.not_implemented == 0  # acc32: 0 means "not implemented"
    assert device.measurements is not None
    power = {p.name: p for p in device.measurements.points}["power_total"]
    assert (power.address, power.not_implemented) == (18, -32768)


def test_an_unknown_point_is_a_profile_error(tmp_path: Path) -> None:
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "sunspec.yaml").write_text(
        "name: sunspec\nsunspec:\n  models: [203]\n  channels:\n    - {name: e, point: TotWhX}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path))
    assert "sunspec.yaml:2 sunspec: point TotWhX is not in model(s) [203]" in str(info.value)


def chain(base: int, models: list[tuple[int, int]]) -> list[StaticPoint]:
    """'SunS' at ``base`` then (id, length) models, each followed by its registers."""
    points = [StaticPoint(name="marker", address=base, value=0x53756E53, data_type=DataType.UINT32)]
    address = base + 2
    for model_id, length in models:
        points.append(StaticPoint(name=f"id{address}", address=address, value=model_id))
        points.append(StaticPoint(name=f"len{address}", address=address + 1, value=length))
        address += 2 + length
    points.append(
        StaticPoint(name="end", address=address, value=0xFFFF0000, data_type=DataType.UINT32)
    )  # id, L 0
    return points


@pytest.mark.integration
@pytest.mark.parametrize(
    ("points", "expected"),
    [
        # golden discovery image: model 1 (L 66) at 40002, model 203 at 40070
        (chain(40000, [(1, 66), (203, 105)]), ModelRef(203, 40070, 105)),
        # base 0, a vendor model 1 of length 65 (seen in the field): follow L, never fix
        (chain(0, [(1, 65), (201, 105)]), ModelRef(201, 69, 105)),
        (chain(50000, [(1, 66), (120, 26), (204, 105)]), ModelRef(204, 50098, 105)),
    ],
)
async def test_discovery_follows_the_chain(points: list[StaticPoint], expected: ModelRef) -> None:
    meter = SimulatedMeter(points, fill_gaps=True)
    async with MeterServer({1: meter}) as server:
        link = build_links([_device(await server.start_tcp())])["pv"]
        try:
            found = await discover(link, 1, (201, 202, 203, 204))
        finally:
            link.close()
    assert found == expected


def _device(port: int) -> Device:
    return Device.model_validate(
        {
            "id": "pv",
            "transport": {"type": "tcp", "host": "127.0.0.1", "port": port, "timeout": "300ms"},
            "channels": [{"name": "e", "register": 0}],
        }
    )


@pytest.mark.integration
@pytest.mark.parametrize(
    ("points", "message"),
    [
        (
            [StaticPoint(name="x", address=0, value=1)],
            "no SunSpec marker 'SunS' at 0, 40000 or 50000",
        ),
        (chain(40000, [(1, 66), (101, 50)]), "SunSpec chain at 40000 has models [1, 101]"),
    ],
)
async def test_discovery_says_why_it_found_no_meter_model(
    points: list[StaticPoint], message: str
) -> None:
    async with MeterServer({1: SimulatedMeter(points, fill_gaps=True)}) as server:
        link = build_links([_device(await server.start_tcp())])["pv"]
        try:
            found = await discover(link, 1, (201, 202, 203, 204))
        finally:
            link.close()
    assert isinstance(found, ReadError)
    assert found.kind is ReadErrorKind.MALFORMED
    assert found.detail.startswith(message)


def sunspec_meter() -> SimulatedMeter:
    """The golden discovery image (model 203 at 40070) with a live TotWhImp counter:
    1 Wh per count (TotWh_SF 0), 3600 kW, i.e. 1 kWh per second."""
    table = load_table(GOLDEN)
    points: list[StaticPoint | CounterPoint] = [
        StaticPoint(name=f"r{address}", address=address, value=word)
        for (_function, address), word in sorted(table.extra_registers.items())
    ]
    points.append(CounterPoint(address=40116, name="TotWhImp", kwh_per_count=0.001,
                               load_kw=3600.0, initial_counts=5_000_000))  # fmt: skip
    points.append(
        StaticPoint(name="TotWhExp", address=40108, value=12345, data_type=DataType.UINT32)
    )
    points.append(
        StaticPoint(name="TotVArhImpQ1", address=40142, value=1000, data_type=DataType.UINT32)
    )
    points.append(StaticPoint(name="TotVArh_SF", address=40174, value=0, data_type=DataType.INT16))
    return SimulatedMeter(points, fill_gaps=True)


@pytest.mark.integration
async def test_the_daemon_discovers_and_reads_a_sunspec_meter(
    tmp_path: Path, broker: Broker, ntp_port: int
) -> None:
    async with MeterServer({1: sunspec_meter()}) as server:
        port = await server.start_tcp()
        config = site_config(
            tmp_path,
            devices=[tcp_device("pv", port, profile="sunspec")],
            mqtt_port=broker.port,
            ntp_port=ntp_port,
            timezone=None,
            storage={"path": str(tmp_path / "edged.db")},
            status_every=None,
        )
        async with collect(broker, "edged/#") as got, Daemon(config, tmp_path) as d:
            await got.wait_for(
                lambda c: sum(r["channel"] == "energy_import" for r in intervals(c)) >= 4,
                20,
                "4 energy_import intervals",
            )
            assert await d.stop() == 0
    validate_messages(got.messages)
    records = [r for r in intervals(got) if r["channel"] == "energy_import"]
    for record in records[1:]:  # the first runs from the start-up read: PARTIAL
        assert record["unit"] == "kWh"
        assert record["value"] == pytest.approx(1.0, abs=0.05)  # 1000 Wh x 10^0 x 0.001
        assert record["quality"] == "actual", record
    exported = [r for r in intervals(got) if r["channel"] == "energy_export"]
    assert exported[-1]["counter_end"] == 12345
    assert exported[-1]["value"] == 0


@pytest.mark.integration
async def test_probe_says_when_no_sunspec_model_is_found(tmp_path: Path) -> None:
    from edged.cli.probe import run_probe

    async with MeterServer(
        {1: SimulatedMeter([StaticPoint(name="x", address=0, value=1)], fill_gaps=True)}
    ) as s:
        device = load_settings(write(tmp_path, await s.start_tcp())).devices[0]
        text, ok = await run_probe(device)
    assert not ok
    assert text == (
        "device pv: SunSpec discovery failed: malformed: no SunSpec marker 'SunS' at 0, "
        "40000 or 50000\n"
    )
