"""The small ones of issue 20 (defect 9): absurd time ranges and deeply
nested JSON are validation errors; durations with non-ASCII digits are
refused; a rollover outside the register's range is an error (above) or a
located warning (below); a flood of replay requests is answered, every one."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from edged.app.replay import RequestError, parse_request
from edged.cli.main import main
from edged.config.load import ConfigError, load_settings, load_settings_with_warnings
from edged.core.export import TimeArgumentError, parse_time
from edged.core.units import parse_duration_s, parse_size_bytes

NZ = ZoneInfo("Pacific/Auckland")
NOW = datetime(2026, 11, 21, 3, 0, tzinfo=UTC)
KNOWN = {"unit1": frozenset({"energy_import"})}
ROOT = Path(__file__).resolve().parent.parent


def request(**fields: object) -> bytes:
    return json.dumps(
        {"request_id": "r1", "from": "2026-11-21", "to": "2026-11-22", **fields}
    ).encode()


@pytest.mark.parametrize(
    "fields",
    [{"from": "-999999999d"}, {"to": "9999-12-31T23:59:59Z"}, {"from": "0001-01-01"},
     {"from": "-99999999999999999999h"}],
)  # fmt: skip
def test_absurd_ranges_are_validation_errors(fields: dict[str, str]) -> None:
    with pytest.raises(RequestError) as caught:
        parse_request(request(**fields), NZ, NOW, KNOWN)
    assert caught.value.request_id == "r1"
    assert "internal" not in str(caught.value)


def test_deeply_nested_json_is_a_validation_error() -> None:
    payload = b'{"request_id": "r1", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(RequestError, match="JSON"):
        parse_request(payload, NZ, NOW, KNOWN)


def test_time_arguments_out_of_range() -> None:
    for text in ("-999999999d", "9999-12-31", "0001-01-01T00:00Z", "-1e300s"):
        with pytest.raises(TimeArgumentError):
            parse_time(text, NZ, NOW)
    assert parse_time("-2h", NZ, NOW) == datetime(2026, 11, 21, 1, 0, tzinfo=UTC)


def test_intervals_cli_with_absurd_from_is_an_error_not_a_crash(tmp_path: Path) -> None:
    config = tmp_path / "edged.yaml"
    config.write_text(
        f"site: s1\nstorage: {{path: {tmp_path / 'edged.db'}}}\nmqtt: {{host: 127.0.0.1}}\n"
        "devices:\n  - id: unit1\n    transport: {type: tcp, host: 127.0.0.1}\n"
        "    channels: [{name: energy_import, register: 0}]\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "edged.cli.main", "intervals", "-c", str(config),
         "--from=-999999999d"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "-999999999d" in done.stderr


@pytest.mark.parametrize("text", ["\u0661\u0665m", "\uff11\uff15s", "1\u0665 h", "\u0967d"])
def test_durations_with_non_ascii_digits_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration_s(text)


def test_sizes_with_non_ascii_digits_and_non_finite_durations_are_refused() -> None:
    with pytest.raises(ValueError, match="expected a size"):
        parse_size_bytes("\u0665 MB")
    for value in (math.inf, -math.inf, math.nan):
        with pytest.raises(ValueError, match="finite"):
            parse_duration_s(value)


CONFIG = """\
site: s1
storage: {{path: /tmp/x.db}}
mqtt: {{host: 127.0.0.1}}
devices:
  - id: unit1
    transport: {{type: tcp, host: 127.0.0.1}}
    channels:
      - name: energy_import
        register: 0
        type: uint16
        rollover: {rollover}
"""


def test_rollover_beyond_the_register_range_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "edged.yaml"
    path.write_text(CONFIG.format(rollover=70000))
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    (problem,) = caught.value.problems
    assert (problem.line, problem.key_path) == (11, "devices[0].channels[0].rollover")
    assert "65536" in problem.message


def test_rollover_below_the_register_range_is_a_located_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "edged.yaml"
    path.write_text(CONFIG.format(rollover=10000))
    _settings, warnings = load_settings_with_warnings(path)
    (warning,) = warnings
    assert (warning.line, warning.key_path) == (11, "devices[0].channels[0].rollover")
    assert main(["check-config", "-c", str(path)]) == 0
    err = capsys.readouterr().err
    assert f"{path}:11 devices[0].channels[0].rollover: warning:" in err
    path.write_text(CONFIG.format(rollover=65536))
    assert load_settings_with_warnings(path)[1] == []
