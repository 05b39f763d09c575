"""`edged demo` as a newcomer runs it (issue 7)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_demo_plain_prints_intervals_with_kwh_and_a_flagged_one() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edged.cli", "demo", "--duration", "25", "--plain"],
        capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("interval ")]
    measured = [line for line in lines if re.search(r"value=\d+\.\d{3} kWh", line)]
    assert measured, result.stdout
    # Every flag other than the informational DST marks the start-up PARTIAL etc.
    flagged = [
        line for line in lines if re.search(r"flags=\S*(PARTIAL|MISSING|LONG|ROLLOVER|AMT)", line)
    ]
    assert flagged, result.stdout
    assert "mosquitto_sub -h 127.0.0.1 -p " in result.stdout
