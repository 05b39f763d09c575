"""Shipped profiles against golden register vectors written from vendor documents.

The golden files (tests/golden/*.yaml, format in tests/golden/README.md) are the
source of the expected addresses, types, scales and values; the profiles are only
what is being checked. Every golden row's raw registers are decoded through the
profile exactly as the daemon would (config loader -> plan_device -> the register
decoder and apply_plan) and compared with the value the document gives. Every
profile row (channel, measurement point, clock, status word) must have a golden
row or an `unverified` entry with a reason in the golden file.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from edged.config.load import SHIPPED_PROFILES_DIR, load_settings
from edged.config.schema import Device
from edged.core.plan import plan_device
from edged.core.registers import ReadPlan, ReadRequest, apply_plan, decode_response
from edged.sim.golden import GoldenRow, GoldenTable, load_table, register_image
from tests.support.golden import PREFIXES, expected_in

GOLDEN_DIR = Path(__file__).parent / "golden"
PROFILES = sorted(
    p.name.removesuffix(".yaml") for p in SHIPPED_PROFILES_DIR.iterdir() if p.name.endswith(".yaml")
)
GOLDEN = sorted(p.stem for p in GOLDEN_DIR.glob("*.yaml"))


def table(profile: str) -> GoldenTable:
    return load_table(GOLDEN_DIR / f"{profile}.yaml")


def device_for(profile: str, tmp_path: Path, extra: str = "") -> Device:
    path = tmp_path / "edged.yaml"
    path.write_text(
        f"site: lab\ndevices:\n  - id: meter\n    profile: {profile}\n"
        f"    transport: {{type: tcp, host: 127.0.0.1, port: 502}}\n{extra}"
    )
    return load_settings(path).devices[0]


def profile_rows(device: Device) -> list[str]:
    """Every row of the device's register map, as golden `profile_rows` name them."""
    rows = [c.name for c in device.channels]
    if device.measurements is not None:
        rows += [p.name for p in device.measurements.points]
    if device.clock is not None:
        rows.append("clock")
    if len(device.status) == 1:
        rows.append("status")
    else:
        rows += [f"status[{i}]" for i in range(len(device.status))]
    return rows


def decode_all(plan: ReadPlan, image: dict[tuple[str, int], int]) -> dict[str, int | float]:
    """Decode every request of ``plan`` from a register image (absent registers read 0)."""
    decoded: dict[str, int | float] = {}
    requests: tuple[ReadRequest, ...] = (*plan.requests, *plan.optional)
    for request in requests:
        words = [
            image.get((request.function, a), 0)
            for a in range(request.address, request.address + request.count)
        ]
        decoded.update(decode_response(request, words))
    return decoded


def point_of(plan: ReadPlan, name: str) -> Any:
    for request in (*plan.requests, *plan.optional):
        for point in request.points:
            if point.name == name:
                return point
    raise AssertionError(f"{name} is not in the read plan")


def test_every_shipped_profile_has_a_golden_file() -> None:
    assert set(PROFILES) <= set(GOLDEN), set(PROFILES) - set(GOLDEN)


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_files_are_well_formed(name: str) -> None:
    golden = table(name)  # load_table checks rows, citations and templates
    data = golden.data
    assert golden.profile == name, "the file is named after its profile"
    for doc in data.get("documents") or []:
        assert {"id", "title", "where", "kind"} <= set(doc), doc
    for row in golden.rows:
        assert row.source_kind, row.name
        # The raw words must be as many as the type needs (2 for 32-bit, 4 for 64-bit).
        widths = {"uint16": 1, "int16": 1, "uint32": 2, "int32": 2, "float32": 2, "acc32": 2,
                  "uint64": 4, "int64": 4, "float64": 4, "datetime4": 4}  # fmt: skip
        if row.type in widths:
            assert len(row.raw) == widths[row.type], row
    assert isinstance(data.get("unverified", []), list)


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_row_has_a_golden_row_or_is_declared_unverified(
    profile: str, tmp_path: Path
) -> None:
    golden = table(profile)
    device = device_for(profile, tmp_path)
    missing = [row for row in profile_rows(device) if golden.rows_for(row) is None]
    assert not missing, f"{profile}: profile rows with no golden row and no unverified entry"
    if golden.verified_profile:
        unverified = [r for r in profile_rows(device) if isinstance(golden.rows_for(r), str)]
        assert not unverified, f"{profile} is shipped as verified, yet {unverified} are not"
    # No stale entries: every profile_rows key names a row the profile has.
    assert set(golden.profile_rows) <= set(profile_rows(device))


def golden_cases() -> list[tuple[str, str]]:
    cases = []
    for profile in PROFILES:
        path = GOLDEN_DIR / f"{profile}.yaml"
        if path.exists():
            data = yaml.safe_load(path.read_text())
            cases += [(profile, row) for row in data.get("profile_rows") or {}]
            # A channel template: its last circuit too (circuit 1 is in profile_rows).
            shipped = yaml.safe_load((SHIPPED_PROFILES_DIR / f"{profile}.yaml").read_text())
            template = (shipped.get("channel_template") or {}).get("name")
            for spec in (data.get("template") or {}).values():
                if isinstance(spec, dict) and spec.get("name") == template:
                    last = min(spec["n"][1], shipped.get("channel_count", spec["n"][1]))
                    cases.append((profile, spec["name"].format(n=last)))
    return cases


@pytest.mark.parametrize(("profile", "row_name"), golden_cases())
def test_profile_decodes_the_golden_vectors(profile: str, row_name: str, tmp_path: Path) -> None:
    golden = table(profile)
    rows = golden.rows_for(row_name)
    if isinstance(rows, str):
        pytest.skip(f"unverified: {rows}")
    assert rows is not None, f"{row_name}: no golden row"
    check_rows(profile, device_for(profile, tmp_path), row_name, rows)


# SunSpec point types as edged reads them (acc32 is an unsigned 32-bit counter).
EDGED_TYPES = {"acc32": "uint32", "sunssf": "int16"}


# A golden row in Wh/varh checked against a profile publishing kWh/kvarh.
def check_rows(profile: str, device: Device, row_name: str, rows: list[GoldenRow]) -> None:
    """Decode each golden row through the device's plan and compare (asserts)."""
    # A SunSpec row gives its offset in the model: the model is where the row says.
    base = 0 if rows[0].offset is None else rows[0].address - rows[0].offset
    assert (device.sunspec is not None) == (rows[0].offset is not None)
    plan = plan_device(device, base_address=base)
    channels = {c.name: c for c in device.channels}
    measured = {p.name: p for p in (device.measurements.points if device.measurements else ())}
    for row in rows:
        label = f"{profile}.{row_name} ({row.variant or 'main'}; {row.citation})"
        image = register_image([row])
        if row_name == "clock":
            assert device.clock is not None
            assert (device.clock.function, device.clock.address) == (row.function, row.address)
            assert device.clock.format == row.type, label
            result = apply_plan(plan.boundary, decode_all(plan.boundary, image))
            zone = plan.boundary.clock.zone  # type: ignore[union-attr]
            want_s = datetime.fromisoformat(row.value).replace(tzinfo=zone).timestamp()
            assert result.meter_clock_s == want_s, label
            continue
        if row_name.startswith("status"):
            # A status row's value is the list of flags its raw word raises.
            index = int(row_name[7:-1]) if row_name != "status" else 0
            word = device.status[index]
            assert (word.function, word.address, word.type) == (
                row.function,
                row.address,
                row.type,
            ), label
            result = apply_plan(plan.boundary, decode_all(plan.boundary, image))
            assert sorted(str(f) for f in result.flags) == sorted(row.value), label
            continue
        if row_name in channels:
            spec: Any = channels[row_name]
            read_plan = plan.boundary
        else:
            spec = measured[row_name]
            assert plan.measurements is not None
            read_plan = plan.measurements
        point = point_of(read_plan, row_name)
        # Where and how: the golden row, not the profile, says.
        assert (point.function, point.address) == (row.function, row.address), label
        assert point.data_type == EDGED_TYPES.get(row.type, row.type), label
        if row.word_order != "n/a":
            assert point.word_order == row.word_order, label
        if row.scale_address is not None:
            assert spec.scale_register is not None, f"{label}: needs a scale register"
            assert base + spec.scale_register.address == row.scale_address, label
        want = expected_in(row, spec.unit or "")
        if row.unit is not None:
            assert want is not None
            factor = PREFIXES.get(((row.unit or "").lower(), (spec.unit or "").lower()))
            assert factor is not None or (spec.unit or "").lower() == row.unit.lower(), label
        result = apply_plan(read_plan, decode_all(read_plan, image))
        if want is None:
            # The document's "not implemented" value: no value may be recorded.
            assert row_name not in result.values, (label, result.values)
            continue
        assert row_name in result.values, (label, result.problems)
        got = result.values[row_name]
        if row_name in channels:
            # Counts x unit per count, exactly as the interval engine multiplies.
            got = float(Decimal(repr(got)) * Decimal(repr(channels[row_name].multiplier)))
        if row.tolerance is not None:
            assert abs(float(got) - float(want)) <= row.tolerance, (label, got, want)
        else:
            assert Decimal(repr(got)) == want, (label, got, want)


def test_ion_m10k_format_vectors_decode_through_the_profile(tmp_path: Path) -> None:
    """The vendor's own M10K examples, through the profile's energy channel encoding."""
    golden = table("ion-8600")
    device = device_for("ion-8600", tmp_path)
    plan = plan_device(device)
    channel = device.channels[0]
    vectors = [v for v in golden.data["format_vectors"] if v.get("encoding") == "m10k"]
    assert len(vectors) == 2
    for vector in vectors:
        image = {("holding", channel.address + i): w for i, w in enumerate(vector["raw"])}
        values = apply_plan(plan.boundary, decode_all(plan.boundary, image)).values
        assert values[channel.name] == vector["value"], vector


def test_pmc1_worked_example_with_the_stated_pulse_value(tmp_path: Path) -> None:
    """The application note's arithmetic (1754 pulses x 0.144 = 252.576 kWh) holds
    when the site states the pulse value, as the profile asks it to."""
    vector = table("pmc-1").data["derived_vectors"][0]
    pulse_kwh = vector["inputs"]["pulse_value_kwh"]
    device = device_for(
        "pmc-1",
        tmp_path,
        f"    channels:\n      - {{name: energy_import, multiplier: {pulse_kwh}}}\n",
    )
    delta = vector["inputs"]["pulse_count_delta"]
    got = Decimal(delta) * Decimal(repr(device.channels[0].multiplier))
    assert got == Decimal(repr(vector["value"]))


def test_golden_meter_serves_the_raw_registers() -> None:
    """The simulator side: a meter built from a golden table answers with the table's
    raw words at the table's addresses (PM8000 energy delivered, reg 3204 -> 3203)."""
    from edged.sim.golden import golden_meter
    from edged.sim.meter import Table

    meter = golden_meter(table("pm8000"))
    assert meter.read_registers(Table.HOLDING, 3203, 4) == (0x0000, 0x0000, 0x0001, 0xE240)
    # DATETIME at 1844 (reg 1845), the first vector of the clock (no day-of-week bits)
    assert meter.read_registers(Table.HOLDING, 1844, 4) == (0x001A, 0x0C06, 0x031F, 0x5208)


@pytest.mark.parametrize("profile", PROFILES)
def test_shipped_profiles_draw_no_address_warnings(profile: str, tmp_path: Path) -> None:
    """No shipped profile uses a 4xxxx/3xxxx register number as an address."""
    from edged.config.load import load_settings_with_warnings

    path = tmp_path / "edged.yaml"
    path.write_text(
        f"site: lab\ndevices:\n  - id: meter\n    profile: {profile}\n"
        "    transport: {type: tcp, host: 127.0.0.1, port: 502}\n"
    )
    _, warnings = load_settings_with_warnings(path)
    assert [w for w in warnings if "looks like" in w.message] == []


def test_a_status_row_is_checked_by_the_flags_it_raises(tmp_path: Path) -> None:
    """No shipped profile reads a status word today; the check for one works (and
    catches a wrong bit map) on a profile and golden table written here."""
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "st.yaml").write_text(
        "name: st\nchannels:\n  - {name: e, register: 0}\n"
        "status:\n  register: 9\n  bits: {0: DEVICE_ERROR, 3: POWER_FAIL}\n"
    )
    golden_file = tmp_path / "st.yaml"
    golden_file.write_text(
        "profile: st\ndocuments: [{id: d, title: t, where: w, kind: vendor}]\n"
        "registers:\n  - {name: status, address: 9, function: holding, type: uint16, "
        "raw: [0x0009], value: [DEVICE_ERROR, POWER_FAIL], source: {document: d, table: x}, "
        "source_kind: vendor}\n"
        "profile_rows: {status: status, e: {unverified: test}}\n"
    )
    golden = load_table(golden_file)
    rows = golden.rows_for("status")
    assert isinstance(rows, list)
    check_rows("st", device_for("st", tmp_path), "status", rows)
    wrong = replace(rows[0], value=["DEVICE_ERROR"])  # bit 3 forgotten
    with pytest.raises(AssertionError):
        check_rows("st", device_for("st", tmp_path), "status", [wrong])
