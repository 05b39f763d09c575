"""`edged demo` as a newcomer runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from decimal import Decimal

import pytest

pytestmark = pytest.mark.integration

INTERVAL = re.compile(
    r"^interval (?P<meter>\S+) end=(?P<end>\S+) value=(?P<value>\S+) (?P<unit>\S+) "
)


def run_demo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "edged.cli.main", "demo", *args],
        capture_output=True, text=True, timeout=90, check=False, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_demo_plain_prints_intervals_with_kwh_and_a_flagged_one() -> None:
    result = run_demo("--duration", "25", "--plain")
    lines = [line for line in result.stdout.splitlines() if line.startswith("interval ")]
    measured = [line for line in lines if re.search(r"value=\d+\.\d{3} kWh", line)]
    assert measured, result.stdout
    # Every flag other than the informational DST marks the start-up PARTIAL etc.
    flagged = [
        line for line in lines if re.search(r"flags=\S*(PARTIAL|MISSING|LONG|ROLLOVER|AMT)", line)
    ]
    assert flagged, result.stdout
    assert "mosquitto_sub -h 127.0.0.1 -p " in result.stdout

    # The virtual station total is printed like any meter, in kWh, and is the
    # sum of both meters' energy for the same end.
    values: dict[str, dict[str, str]] = {}
    for line in lines:
        match = INTERVAL.match(line)
        assert match, line
        values.setdefault(match["end"], {})[match["meter"]] = match["value"]
    station = [line for line in lines if line.startswith("interval station/total_import ")]
    assert any(re.search(r"value=\d+\.\d{3} kWh", line) for line in station), result.stdout
    sums = [
        (Decimal(v["station/total_import"]),
         Decimal(v["pmc1/energy_import"]) + Decimal(v["ion8600/energy_delivered"]))
        for v in values.values()
        if "null" not in v.values() and len(v) == 3
    ]  # fmt: skip
    assert sums, result.stdout
    assert all(total == parts for total, parts in sums), sums


def test_demo_live_view_shows_the_station_total() -> None:
    # Not a terminal: rich prints the live table once, as it was at the end.
    result = run_demo("--duration", "6", "--interval", "2", env={**os.environ, "COLUMNS": "200"})
    rows = [line for line in result.stdout.splitlines() if "station/total_import" in line]
    assert any(re.search(r"\d+\.\d{3} kWh", row) for row in rows), result.stdout
    assert any("pmc1/energy_import" in line for line in result.stdout.splitlines())


def test_demo_sparkplug_shows_births_and_interval_data_decoded() -> None:
    result = run_demo("--duration", "8", "--interval", "2", "--plain", "--sparkplug")
    lines = result.stdout.splitlines()
    assert any(line.startswith("sparkplug NBIRTH seq=0: bdSeq=") for line in lines), result.stdout
    births = {line.split()[2] for line in lines if line.startswith("sparkplug DBIRTH ")}
    assert births == {"pmc1", "ion8600", "station"}, result.stdout
    data = [line for line in lines if line.startswith("sparkplug DDATA station ")]
    assert any(re.search(r"interval/total_import=\d+\.\d+ Quality=(192|64)", x) for x in data)
    assert "spBv1.0/demo/#" in result.stdout
