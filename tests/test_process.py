"""The daemon as systemd runs it: sd_notify over a real AF_UNIX datagram socket
(READY, WATCHDOG, RELOADING, STOPPING) and SIGHUP config reloads, valid and
invalid, against the real simulator and broker."""

from __future__ import annotations

import contextlib
import re
import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from edged.config.load import (
    ConfigError,
    config_hash,
    load_settings,
)
from edged.core.model import parse_iso_utc
from edged.sim.meter import CounterPoint, MeterServer, SimulatedMeter, StaticPoint
from edged.sim.modbus_frames import DataType
from tests.support.config import site_config, tcp_device
from tests.support.daemon import Daemon
from tests.support.meters import pmc1_meter
from tests.support.mqtt import (
    Broker,
    assert_unbroken,
    collect,
    events,
    gateway_status,
    intervals,
    series,
)
from tests.support.schema import validate_messages

pytestmark = pytest.mark.integration

WATCHDOG_USEC = 1_000_000  # pings every 0.5 s
BCPM_BRANCHES = 8
BCPM_KWH_PER_COUNT = 0.01  # what one count of the simulated branch counters is worth
BCPM_SCALE = -2  # ... said by each branch's power-of-ten scale register: 10**-2 kWh
BCPM_MULTIPLIER = 1.0  # the bcpm profile's multiplier (the scale registers do the rest)


def unit_config(
    tmp_path: Path, broker: Broker, ntp_port: int, devices: list[dict[str, Any]], **overrides: Any
) -> Path:
    return site_config(
        tmp_path, devices=devices, mqtt_port=broker.port, ntp_port=ntp_port, **overrides
    )


def pmc1(device_id: str, port: int, unit: int) -> dict[str, Any]:
    return tcp_device(device_id, port, unit=unit)


def bcpm(port: int, unit: int, channel_count: int) -> dict[str, Any]:
    return tcp_device("panel", port, unit=unit, profile="bcpm", channel_count=channel_count)


def bcpm_meter() -> SimulatedMeter:
    """The BCPM layout (tests/golden/bcpm.yaml): a uint32 counter per branch at
    register 1168 + 2(n-1) (address 1167 + 2(n-1)), scaled by the int16 power of
    ten at register 1084 + (n-1)."""
    points: list[CounterPoint | StaticPoint] = [
        CounterPoint(
            address=1167 + 2 * i,
            name=f"branch{i + 1:02d}",
            data_type=DataType.UINT32,
            kwh_per_count=BCPM_KWH_PER_COUNT,
            load_kw=36.0 * (i + 1),
        )
        for i in range(BCPM_BRANCHES)
    ]
    points += [
        StaticPoint(
            name=f"scale{i + 1:02d}", address=1083 + i, value=BCPM_SCALE, data_type=DataType.INT16
        )
        for i in range(BCPM_BRANCHES)
    ]
    points.append(StaticPoint(name="current01", address=1335, value=0, data_type=DataType.INT16))
    return SimulatedMeter(points, fill_gaps=True)  # unlisted registers below read 0


def located_problems(config: Path) -> list[str]:
    """What check-config says about the file: the located problems a rejection names."""
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    return [str(p) for p in caught.value.problems]


def log_time_of(log_path: Path, event: str) -> datetime:
    import json

    for line in log_path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if entry.get("event") == event:
                return parse_iso_utc(entry["timestamp"])
    raise AssertionError(f"{event!r} not logged")


async def test_sighup_applies_device_changes_and_systemd_sees_it(
    tmp_path: Path, broker: Broker, ntp_port: int
) -> None:
    """One shared Modbus TCP endpoint: unit1 unchanged, the BCPM panel's channel
    count 4 -> 8 (a changed device), unit3 added. unit1 keeps its series with
    no MISSING/PARTIAL; the panel's branches 1-4 carry on from their stored
    counters and 5-8 start; unit3 starts publishing; nothing restarts the
    process. systemd hears READY after the store is open, watchdog pings,
    RELOADING/READY around the reload and STOPPING at the end."""
    meters = {1: pmc1_meter(), 2: bcpm_meter(), 3: pmc1_meter()}
    async with MeterServer(meters) as server, collect(broker, "edged/#") as got:
        port = await server.start_tcp()
        config = unit_config(tmp_path, broker, ntp_port, [pmc1("unit1", port, 1), bcpm(port, 2, 4)])
        first_hash = config_hash(config)
        async with Daemon(config, tmp_path, watchdog_usec=WATCHDOG_USEC) as d:
            notes = d.notes
            ready_at = datetime.now().astimezone()
            with sqlite3.connect(tmp_path / "state" / "edged.db") as conn:
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
            assert {"intervals", "outbox", "channel_state"} <= tables
            await got.wait_for(
                lambda c: (
                    len(series(c, "unit1", "energy_import")) >= 3
                    and len(series(c, "panel", "branch04_energy")) >= 3
                ),
                20,
                "intervals before the reload",
            )
            grown = [pmc1("unit1", port, 1), bcpm(port, 2, 8), pmc1("unit3", port, 3)]
            unit_config(tmp_path, broker, ntp_port, grown)
            notes_before_reload = len(notes)
            await d.reload()
            await got.wait_for(lambda c: bool(events(c, "config_reloaded")), 10, "reloaded")
            before = len(series(got, "unit1", "energy_import"))
            await got.wait_for(
                lambda c: (
                    len(series(c, "unit3", "energy_import")) >= 3
                    and len(series(c, "panel", "branch08_energy")) >= 3
                    and len(series(c, "unit1", "energy_import")) >= before + 3
                ),
                20,
                "intervals after the reload",
            )
            assert await d.stop() == 0
    validate_messages(got.messages)

    # systemd's view
    assert notes[0].startswith(b"READY=1\nSTATUS=running: 2 device(s)")
    assert log_time_of(tmp_path / "edged.log", "store open") <= ready_at
    assert notes.count(b"WATCHDOG=1") >= 4
    after = notes[notes_before_reload:]
    reloading = next(i for i, n in enumerate(after) if n.startswith(b"RELOADING=1\n"))
    assert b"MONOTONIC_USEC=" in after[reloading]
    ready_again = next(i for i, n in enumerate(after) if n.startswith(b"READY=1"))
    assert ready_again > reloading
    assert b"running: 3 device(s)" in after[ready_again]
    assert any(n.startswith(b"STOPPING=1") for n in after[ready_again:])

    # the event and the gateway status
    (reloaded,) = events(got, "config_reloaded")
    second_hash = config_hash(config)
    assert reloaded["details"] == {
        "config_hash": second_hash,
        "added": ["unit3"],
        "removed": [],
        "changed": ["panel"],
        "unchanged": ["unit1"],
        "restart_required": [],
    }
    statuses = gateway_status(got)
    assert statuses[0]["config_hash"] == first_hash
    online = [s for s in statuses if s["state"] == "online"]
    assert online[-1]["config_hash"] == second_hash
    assert online[-1]["devices"] == 3
    assert len({s["started_at"] for s in statuses}) == 1  # one process throughout

    # the data
    assert_unbroken(series(got, "unit1", "energy_import")[1:], "unit1, untouched")
    reload_at = parse_iso_utc(reloaded["at"])
    for n in range(1, 5):
        branch = series(got, "panel", f"branch{n:02d}_energy")
        assert parse_iso_utc(branch[-1]["end"]) > reload_at
        # Across the reload the counter carries on from the store: no interval lost.
        assert_unbroken(branch[1:], f"branch {n}")
        for record in branch[1:]:
            assert record["value"] == pytest.approx(
                (record["counter_end"] - record["counter_start"]) * BCPM_MULTIPLIER
            )
    for n in range(5, 9):
        branch = series(got, "panel", f"branch{n:02d}_energy")
        assert "PARTIAL" in branch[0]["flags"]  # a new channel starts from a baseline
        assert_unbroken(branch[1:], f"new branch {n}")
    unit3 = series(got, "unit3", "energy_import")
    assert "PARTIAL" in unit3[0]["flags"]
    assert_unbroken(unit3[1:], "unit3, added")


async def test_sighup_with_an_invalid_config_keeps_the_running_one(
    tmp_path: Path, broker: Broker, ntp_port: int
) -> None:
    """Broken YAML, then an unknown key: each rejected with a config_rejected
    event naming file and line, while intervals keep coming unbroken. Then a
    valid file that changes the MQTT section: applied except that section,
    which is reported as needing a restart."""
    async with MeterServer({1: pmc1_meter()}) as server, collect(broker, "edged/#") as got:
        port = await server.start_tcp()
        config = unit_config(tmp_path, broker, ntp_port, [pmc1("unit1", port, 1)])
        good = config.read_text()
        first_hash = config_hash(config)
        async with Daemon(config, tmp_path, watchdog_usec=WATCHDOG_USEC) as d:
            notes = d.notes
            await got.wait_for(lambda c: len(intervals(c)) >= 2, 20, "2 intervals")
            config.write_text(good + "  - id: [unclosed\n")
            expected = [located_problems(config)]
            await d.reload()
            await got.wait_for(lambda c: len(events(c, "config_rejected")) >= 1, 10, "1st")
            unit_config(tmp_path, broker, ntp_port, [{**pmc1("unit1", port, 1), "colour": "red"}])
            expected.append(located_problems(config))
            await d.reload()
            await got.wait_for(lambda c: len(events(c, "config_rejected")) >= 2, 10, "2nd")
            rejected_at = len(intervals(got))
            await got.wait_for(
                lambda c: len(intervals(c)) >= rejected_at + 3, 10, "intervals after"
            )
            unit_config(tmp_path, broker, ntp_port, [pmc1("unit1", port, 1)],
                        mqtt={"keepalive": "20s"})  # fmt: skip
            await d.reload()
            await got.wait_for(lambda c: bool(events(c, "config_reloaded")), 10, "reloaded")
            await got.wait_for(
                lambda c: gateway_status(c)[-1].get("restart_required") == ["mqtt"],
                5,
                "status saying a restart is required",
            )
            assert await d.stop() == 0
    validate_messages(got.messages)
    broken, unknown = events(got, "config_rejected")
    assert [broken["details"]["problems"], unknown["details"]["problems"]] == expected
    assert "invalid YAML" in expected[0][0]
    assert "devices[0].colour" in expected[1][0]
    for event in (broken, unknown):
        (problem,) = event["details"]["problems"]
        assert re.match(rf"{re.escape(str(config))}:\d+ ", problem), problem  # file and line
        assert problem in event["message"]
        assert "the running configuration is kept" in event["message"]
        assert event["details"]["running_config_hash"] == first_hash
    # Each rejection was bracketed by RELOADING/READY for systemd.
    assert sum(n.startswith(b"RELOADING=1") for n in notes) == 3
    assert sum(n.startswith(b"READY=1") for n in notes) == 4
    # The old config kept running: one unbroken series across both rejections.
    assert_unbroken(series(got, "unit1", "energy_import")[1:], "unit1")
    statuses = [s for s in gateway_status(got) if s["state"] == "online"]
    (reloaded,) = events(got, "config_reloaded")
    assert reloaded["details"]["restart_required"] == ["mqtt"]
    assert "restart required to apply mqtt" in reloaded["message"]
    assert reloaded["details"]["unchanged"] == ["unit1"]
    assert statuses[-1]["config_hash"] == config_hash(config)
    before_reload = [s for s in statuses if s["config_hash"] == first_hash]
    assert before_reload
    assert all(s["restart_required"] == [] for s in before_reload)
