"""The small ones of issue 20 (defect 9): absurd time ranges and deeply
nested JSON are validation errors; durations with non-ASCII digits are
refused; a rollover outside the register's range is an error (above) or a
located warning (below); a flood of replay requests is answered, every one."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from edged.app.poller import Recorder
from edged.app.replay import ReplayCommands, RequestError, parse_request
from edged.cli.main import main
from edged.config.load import ConfigError, load_settings, load_settings_with_warnings
from edged.core.export import TimeArgumentError, parse_time
from edged.core.payloads import Topics
from edged.core.units import parse_duration_s, parse_size_bytes
from edged.io.mqtt import Publisher
from edged.io.store import Store
from tests.support.mqtt import Broker, requester

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


@pytest.mark.integration
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
    rated_power_kva: 100
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
    assert f"warning: {path}:11 devices[0].channels[0].rollover: rollover 10000" in err
    path.write_text(CONFIG.format(rollover=65536))
    assert load_settings_with_warnings(path)[1] == ()


@pytest.mark.integration
async def test_a_flood_of_replay_requests_is_answered_every_one(
    tmp_path: Path, broker: Broker
) -> None:
    """300 requests at once: the first few are served, the rest refused as
    busy, and every requester hears an answer (none dropped past 100)."""
    config = tmp_path / "edged.yaml"
    config.write_text(
        f"site: s1\ntimezone: Pacific/Auckland\nstorage: {{path: {tmp_path / 'edged.db'}}}\n"
        f"mqtt: {{host: 127.0.0.1, port: {broker.port}, protocol: '5',\n"
        "       commands: {enabled: true, max_intervals: 100}}\n"
        "devices:\n  - id: unit1\n    transport: {type: tcp, host: 127.0.0.1}\n"
        "    channels: [{name: energy_import, register: 0}]\n"
    )
    settings = load_settings(config)
    store = await Store.open(settings.storage.path)
    topics = Topics("edged", "s1")
    publisher = Publisher(settings.mqtt, store, "edged-s1", topics.gateway_status, b"{}")
    recorder = Recorder(store, on_committed=publisher.wake)
    commands = ReplayCommands(settings, store, recorder, publisher, topics, lambda: NOW)
    publisher.accept_commands(commands.topic, commands.receive, commands.acked)
    tasks = [asyncio.create_task(t) for t in (recorder.run(), publisher.run(), commands.run())]
    count = 300
    try:
        async with requester(broker, "replies/#", v5=True) as upstream:
            await asyncio.sleep(0.5)  # the publisher's session subscribes
            await asyncio.gather(
                *(
                    upstream.send(
                        commands.topic,
                        {"request_id": f"r{n}", "from": "2026-11-20", "to": "2026-11-21"},
                        response_topic="replies/s1",
                        correlation=f"c{n}".encode(),
                    )
                    for n in range(count)
                )
            )
            async with asyncio.timeout(30):
                while len({p["request_id"] for _t, p, _c in upstream.answers}) < count:
                    upstream.arrived.clear()
                    await upstream.arrived.wait()
        answered = {p["request_id"] for _t, p, _c in upstream.answers}
        assert answered == {f"r{n}" for n in range(count)}
        busy = [p for _t, p, _c in upstream.answers if "busy" in str(p.get("error"))]
        assert len(busy) > 100, len(busy)  # more than the old cap of 100, all answered
        # each answer carries its own request's correlation data
        assert all(c == f"c{p['request_id'][1:]}".encode() for _t, p, c in upstream.answers)
    finally:
        await publisher.stop({})
        await recorder.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await store.close()


def test_a_device_without_a_rating_is_a_located_warning(tmp_path: Path) -> None:
    """Defect 1: the plausibility limit should come from the site's rating;
    without one check-config says so, at the device."""
    path = tmp_path / "edged.yaml"
    path.write_text(CONFIG.format(rollover=65536).replace("    rated_power_kva: 100\n", ""))
    _settings, warnings = load_settings_with_warnings(path)
    (warning,) = warnings
    assert (warning.line, warning.key_path) == (5, "devices[0]")
    assert "no rated_power_kva, meter_rating or max_demand for energy_import" in warning.message
