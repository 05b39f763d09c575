"""Config loading: the example file is valid, and each error class is reported
with file, line and key path, without a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edged.config.load import (
    ConfigError,
    load_settings,
)
from edged.core.units import parse_duration_s
from tests.support.config import GOOD, write

REPO = Path(__file__).resolve().parent.parent


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    return [str(p) for p in info.value.problems]


def test_issue_example_validates_as_written(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, GOOD))
    device = settings.devices[0]
    assert device.interval_s == 900
    channel = device.channels[0]
    assert (channel.address, channel.type, channel.multiplier) == (0, "uint32", 0.144)
    assert channel.rollover_counts == 4294967296
    assert settings.zone.key == "Pacific/Auckland"


def test_shipped_example_config_validates() -> None:
    settings = load_settings(REPO / "config" / "edged.yaml")
    assert [d.id for d in settings.devices] == ["unit1", "unit2"]
    # unit2 takes its register map from the pmc-1 profile
    assert settings.devices[1].channels[0].multiplier == 0.144


def test_unknown_key_names_line_and_path(tmp_path: Path) -> None:
    text = GOOD.replace("        multiplier: 0.144", "        multipler: 0.144")
    assert (
        f"{tmp_path / 'edged.yaml'}:19 devices[0].channels[0].multipler: unknown key"
        in problems(tmp_path, text)
    )


def test_wrong_type(tmp_path: Path) -> None:
    found = problems(tmp_path, GOOD.replace("port: 502", "port: fivehundred"))
    assert len(found) == 1
    assert ":12 devices[0].transport.port: " in found[0]
    assert "integer" in found[0]


def test_interval_must_divide_a_day(tmp_path: Path) -> None:
    found = problems(tmp_path, GOOD.replace("interval: 15m", "interval: 7m"))
    assert found == [f"{tmp_path / 'edged.yaml'}:11 devices[0].interval: interval 420s does not "
                     "divide a day (86400 s)"]  # fmt: skip


def test_duplicate_device_ids(tmp_path: Path) -> None:
    text = GOOD + GOOD[GOOD.index("  - id: unit1") :]
    found = problems(tmp_path, text)
    assert found == [f"{tmp_path / 'edged.yaml'}:21 devices[1].id: duplicate device id 'unit1'"]


def test_unknown_profile_lists_known_ones(tmp_path: Path) -> None:
    text = GOOD.split("    channels:")[0].replace("interval: 15m", "profile: pmc-9")
    found = problems(tmp_path, text)
    assert len(found) == 1
    assert ":11 devices[0].profile: unknown profile 'pmc-9' (known: " in found[0]
    assert "pmc-1" in found[0]


def test_profile_error_points_into_the_profile_file(tmp_path: Path) -> None:
    (tmp_path / "profiles").mkdir()
    write(
        tmp_path / "profiles", "name: mine\nchannels:\n  - name: e\n    register: -1\n", "mine.yaml"
    )
    text = GOOD.split("    channels:")[0].replace("interval: 15m", "profile: mine")
    found = problems(tmp_path, text)
    assert found == [f"{tmp_path / 'profiles' / 'mine.yaml'}:4 devices[0].channels[0].register: "
                     "Input should be greater than or equal to 0"]  # fmt: skip


def test_device_overrides_profile_channel(tmp_path: Path) -> None:
    text = GOOD.split("    channels:")[0].replace("interval: 15m", "profile: pmc-1")
    text += "    channels:\n      - name: energy_import\n        multiplier: 0.5\n"
    channel = load_settings(write(tmp_path, text)).devices[0].channels[0]
    assert (channel.multiplier, channel.type, channel.address) == (0.5, "uint32", 0)


def test_unknown_time_zone_and_bad_yaml(tmp_path: Path) -> None:
    found = problems(tmp_path, GOOD.replace("Pacific/Auckland", "Pacific/Nowhere"))
    assert found == [f"{tmp_path / 'edged.yaml'}:2 timezone: unknown IANA time zone "
                     "'Pacific/Nowhere'"]  # fmt: skip
    found = problems(tmp_path, "site: [unclosed\n")
    assert len(found) == 1
    assert "invalid YAML" in found[0]
    assert ":2 " in found[0]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = GOOD.replace("interval: 15m", "interval: 7m").replace(
        "multiplier: 0.144", "multiplier: -1"
    )
    assert len(problems(tmp_path, text)) == 2


@pytest.mark.parametrize(
    ("text", "seconds"), [("15m", 900.0), ("1s", 1.0), ("24h", 86400.0), ("500ms", 0.5), (30, 30.0)]
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration_s(text) == seconds


@pytest.mark.integration
def test_check_config_command(tmp_path: Path) -> None:
    good = write(tmp_path, GOOD)
    ok = subprocess.run(
        [sys.executable, "-m", "edged.cli.main", "check-config", "-c", str(good)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert ok.returncode == 0
    assert ok.stdout.strip().endswith("OK - site demo-site, 1 device(s), 1 channel(s), time zone "
                                      "Pacific/Auckland")  # fmt: skip
    bad = write(tmp_path, GOOD.replace("multiplier: 0.144", "multipler: 0.144"), "bad.yaml")
    fail = subprocess.run(
        [sys.executable, "-m", "edged.cli.main", "check-config", "-c", str(bad)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert fail.returncode == 1
    assert "bad.yaml:19 devices[0].channels[0].multipler: unknown key" in fail.stderr
    assert "Traceback" not in fail.stderr
