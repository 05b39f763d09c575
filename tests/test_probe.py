"""`edged probe`: every shipped profile against a simulated meter built from its
golden table (tests/golden), through the real CLI; per-point errors."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from edged.config.load import SHIPPED_PROFILES_DIR, load_settings
from edged.core.probe import device_probes
from edged.sim.golden import GoldenRow, golden_meter, load_table
from edged.sim.meter import MeterServer, UnknownUnitPolicy
from tests.support.golden import expected_in

pytestmark = pytest.mark.integration

PROFILES = sorted(
    p.name.removesuffix(".yaml") for p in SHIPPED_PROFILES_DIR.iterdir() if p.name.endswith(".yaml")
)
GOLDEN_DIR = Path(__file__).parent / "golden"
COLUMNS = ("point", "kind", "register", "type", "raw registers", "value", "unit", "note")


def write_config(tmp_path: Path, profile: str, port: int, unit_id: int = 1) -> Path:
    path = tmp_path / "edged.yaml"
    path.write_text(
        f"site: lab\ndevices:\n  - id: meter\n    profile: {profile}\n"
        f"    transport: {{type: tcp, host: 127.0.0.1, port: {port}, unit_id: {unit_id}, "
        "timeout: 300ms}\n"
    )
    return path


async def probe(config: Path, device: str = "meter") -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edged.cli.main", "probe", "-c", str(config), "--device", device,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def table(text: str) -> dict[str, dict[str, str]]:
    """Rows of the printed table by point name (columns cut at the header's positions)."""
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("point "))
    starts = [lines[header].index(c) for c in COLUMNS]
    rows = {}
    for line in lines[header + 1 : -1]:
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        rows[cells[0]] = dict(zip(COLUMNS, cells, strict=True))
    return rows


@pytest.mark.parametrize("profile", PROFILES)
async def test_probe_reads_every_point_of_every_profile(profile: str, tmp_path: Path) -> None:
    golden = load_table(GOLDEN_DIR / f"{profile}.yaml")
    device = load_settings(write_config(tmp_path, profile, 502)).devices[0]
    names = [p.name for p in device_probes(device)]
    verified: dict[str, GoldenRow] = {}
    for name in names:
        found = golden.rows_for(name)
        if isinstance(found, list):
            verified[name] = found[0]
    meter = golden_meter(golden, [*golden.rows, *verified.values()])
    async with MeterServer({1: meter}) as server:
        code, out, err = await probe(write_config(tmp_path, profile, await server.start_tcp()))
    rows = table(out)
    if device.sunspec is not None:
        # The model found by discovery comes first (model 203 at 40070 in the golden image).
        model = rows.pop("sunspec")
        assert (model["value"], model["register"]) == ("203", "holding 40070 (x2)"), model
    assert list(rows) == names, out  # every channel, measurement, clock, status: once each
    units = {p.name: p.unit for p in device_probes(device)}
    for name, row in rows.items():
        golden_row = verified.get(name)
        if golden_row is None:
            # Unverified: the golden meter has no such register, and the probe says so.
            assert row["note"].startswith("ERROR: exception: modbus exception 2"), row
            assert row["value"] == "-"
        elif name == "clock":
            assert row["value"] == golden_row.value[:19] + "Z", row
        else:
            want = expected_in(golden_row, units[name])
            assert want is not None
            assert float(row["value"]) == pytest.approx(
                float(want), abs=golden_row.tolerance or 1e-9
            ), row
            raw = " ".join(f"{w:04X}" for w in golden_row.raw)
            assert row["raw registers"].startswith(raw), row
            assert row["unit"] == units[name], row
    assert code == (0 if len(verified) == len(names) else 1), (out, err)
    ok = len(verified) + (device.sunspec is not None)
    assert out.splitlines()[-1] == f"{ok} ok, {len(names) - len(verified)} failed"


async def test_a_silent_unit_gives_a_timeout_row_per_point(tmp_path: Path) -> None:
    """A unit that never answers: the first points time out, the rest are skipped as
    backed off; every row says which, none shows a value."""
    meter = golden_meter(load_table(GOLDEN_DIR / "sdm120.yaml"))
    async with MeterServer({1: meter}, unknown_unit=UnknownUnitPolicy.SILENT) as server:
        config = write_config(tmp_path, "sdm120", await server.start_tcp(), unit_id=7)
        code, out, _ = await probe(config)
    rows = table(out)
    assert code == 1
    assert len(rows) == 8
    assert all(r["value"] == "-" for r in rows.values())
    notes = [r["note"] for r in rows.values()]
    assert notes[0].startswith("ERROR: timeout: "), notes
    assert all(n.startswith(("ERROR: timeout: ", "ERROR: backoff: ")) for n in notes), notes
    assert out.splitlines()[-1] == "0 ok, 8 failed"


async def test_unknown_device_is_a_usage_error(tmp_path: Path) -> None:
    code, _, err = await probe(write_config(tmp_path, "sdm120", 1), device="nope")
    assert code == 2
    assert "no device 'nope'" in err
    assert "known: meter" in err
