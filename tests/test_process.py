"""The daemon as systemd runs it: sd_notify over a real AF_UNIX datagram socket
(READY, WATCHDOG, RELOADING, STOPPING) and SIGHUP config reloads, valid and
invalid, against the real simulator and broker."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Sequence
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
from tests.conftest import Broker, Collector, collect
from tests.schema_check import validate_messages
from tests.test_e2e import KWH_PER_COUNT, LOAD_KW, Daemon, by_end, intervals
from tests.test_sdnotify import datagrams

pytestmark = pytest.mark.integration

WATCHDOG_USEC = 1_000_000  # pings every 0.5 s
BCPM_BRANCHES = 8
BCPM_KWH_PER_COUNT = 0.01  # what one count of the simulated branch counters is worth
BCPM_SCALE = -2  # ... said by each branch's power-of-ten scale register: 10**-2 kWh
BCPM_MULTIPLIER = 1.0  # the bcpm profile's multiplier (the scale registers do the rest)


class NotifyDaemon(Daemon):
    """`edged run` with systemd's NOTIFY_SOCKET and WATCHDOG_USEC set."""

    def __init__(self, config: Path, log_path: Path, notify_socket: Path) -> None:
        super().__init__(config, log_path)
        self.notify_socket = notify_socket
        self.wrapper: list[str] = []  # a command to run edged under (a sandbox)

    async def start(self) -> None:
        log = self.log_path.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "NOTIFY_SOCKET": str(self.notify_socket),
               "WATCHDOG_USEC": str(WATCHDOG_USEC)}  # fmt: skip
        self.process = await asyncio.create_subprocess_exec(
            *self.wrapper, sys.executable, "-m", "edged.cli.main", "run", "-c", str(self.config),
            stdout=log, stderr=log, env=env,
        )  # fmt: skip
        log.close()

    async def reload(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)


@contextlib.asynccontextmanager
async def notifications(tmp_path: Path) -> AsyncIterator[tuple[Path, list[bytes]]]:
    """A bound notify socket and every datagram it receives, in order."""
    path = tmp_path / "notify.sock"
    async with datagrams(path) as got:
        yield path, got


async def wait_until(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        await asyncio.sleep(0.05)


def unit_config(port: int, ntp_port: int, broker: Broker, tmp_path: Path, body: str) -> str:
    return f"""\
site: test-site
timezone: Pacific/Auckland
storage:
  path: {tmp_path / "state" / "edged.db"}
mqtt: {{host: 127.0.0.1, port: {broker.port}, topic_prefix: edged}}
log: {{format: json}}
status_every: 1s
time: {{source: ntp, ntp_servers: ["127.0.0.1:{ntp_port}"], ntp_poll: 2s}}
devices:
{body}"""


def pmc1(device_id: str, port: int, unit: int) -> str:
    return f"""\
  - id: {device_id}
    interval: 1s
    transport: {{type: tcp, host: 127.0.0.1, port: {port}, unit_id: {unit}, timeout: 500ms}}
    channels:
      - {{name: energy_import, register: 0, type: uint32, multiplier: {KWH_PER_COUNT}}}
"""


def bcpm(port: int, unit: int, channel_count: int) -> str:
    return f"""\
  - id: panel
    profile: bcpm
    channel_count: {channel_count}
    interval: 1s
    transport: {{type: tcp, host: 127.0.0.1, port: {port}, unit_id: {unit}, timeout: 500ms}}
"""


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
        StaticPoint(f"scale{i + 1:02d}", 1083 + i, BCPM_SCALE, data_type=DataType.INT16)
        for i in range(BCPM_BRANCHES)
    ]
    points.append(StaticPoint("current01", 1335, 0, data_type=DataType.INT16))
    return SimulatedMeter(points, fill_gaps=True)  # unlisted registers below read 0


def pmc1_meter() -> SimulatedMeter:
    return SimulatedMeter.pmc1(load_kw=LOAD_KW, kwh_per_count=KWH_PER_COUNT, initial_counts=10_000)


def series(got: Collector, device: str, channel: str) -> list[dict[str, Any]]:
    records = [r for r in intervals(got) if r["device"] == device and r["channel"] == channel]
    return sorted(by_end(records).values(), key=lambda r: r["end"])


def assert_unbroken(records: Sequence[dict[str, Any]], what: str) -> None:
    """Consecutive 1 s intervals, each continuing the previous counter, with no
    MISSING, PARTIAL or LONG after the first record."""
    assert len(records) >= 2, what
    ends = [parse_iso_utc(r["end"]) for r in records]
    gaps = {(b - a).total_seconds() for a, b in itertools.pairwise(ends)}
    assert gaps == {1.0}, (what, [r["end"] for r in records])
    for previous, record in itertools.pairwise(records):
        assert not {"MISSING", "PARTIAL", "LONG"} & set(record["flags"]), (what, record)
        assert record["counter_start"] == previous["counter_end"], (what, record)


def events(got: Collector, kind: str) -> list[dict[str, Any]]:
    return [p for p in got.payloads("/gateway/event") if p["kind"] == kind]


def gateway_status(got: Collector) -> list[dict[str, Any]]:
    return [p for t, p, _ in got.messages if t.endswith("/gateway/status")]


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
        config = tmp_path / "edged.yaml"
        config.write_text(unit_config(port, ntp_port, broker, tmp_path,
                                      pmc1("unit1", port, 1) + bcpm(port, 2, 4)))  # fmt: skip
        first_hash = config_hash(config)
        async with notifications(tmp_path) as (socket_path, notes):
            d = NotifyDaemon(config, tmp_path / "edged.log", socket_path)
            await d.start()
            try:
                await wait_until(lambda: any(n.startswith(b"READY=1") for n in notes), 20, "READY")
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
                config.write_text(unit_config(port, ntp_port, broker, tmp_path,
                                              pmc1("unit1", port, 1) + bcpm(port, 2, 8)
                                              + pmc1("unit3", port, 3)))  # fmt: skip
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
            finally:
                await d.ensure_stopped()
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
        config = tmp_path / "edged.yaml"
        good = unit_config(port, ntp_port, broker, tmp_path, pmc1("unit1", port, 1))
        config.write_text(good)
        first_hash = config_hash(config)
        async with notifications(tmp_path) as (socket_path, notes):
            d = NotifyDaemon(config, tmp_path / "edged.log", socket_path)
            await d.start()
            try:
                await got.wait_for(lambda c: len(intervals(c)) >= 2, 20, "2 intervals")
                config.write_text(good + "  - id: [unclosed\n")
                expected = [located_problems(config)]
                await d.reload()
                await got.wait_for(lambda c: len(events(c, "config_rejected")) >= 1, 10, "1st")
                config.write_text(good.replace("interval: 1s\n", "interval: 1s\n    colour: red\n"))
                expected.append(located_problems(config))
                await d.reload()
                await got.wait_for(lambda c: len(events(c, "config_rejected")) >= 2, 10, "2nd")
                rejected_at = len(intervals(got))
                await got.wait_for(
                    lambda c: len(intervals(c)) >= rejected_at + 3, 10, "intervals after"
                )
                config.write_text(good.replace("edged}", "edged, keepalive: 20s}"))
                await d.reload()
                await got.wait_for(lambda c: bool(events(c, "config_reloaded")), 10, "reloaded")
                await got.wait_for(
                    lambda c: gateway_status(c)[-1].get("restart_required") == ["mqtt"],
                    5,
                    "status saying a restart is required",
                )
                assert await d.stop() == 0
            finally:
                await d.ensure_stopped()
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
