"""Device status on change: the retained status is published when it
says something new (comms, error counts, meter clock) and refreshed on the
status cadence, not after every read."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from edged.app.poller import METER_CLOCK_REPUBLISH_S, DeviceHealth, HealthShown
from edged.sim.faults import Fault
from edged.sim.meter import MeterServer, SimulatedMeter
from tests.support.config import site_config, tcp_device
from tests.support.daemon import Daemon
from tests.support.mqtt import Broker, Collector, collect

ONLINE = DeviceHealth(reads=5, meter_clock_offset_s=0.2)


def shown(**changes: object) -> HealthShown:
    health = DeviceHealth(reads=5, meter_clock_offset_s=0.2)
    for name, value in changes.items():
        setattr(health, name, value)
    return HealthShown.of(health)


def test_more_reads_alone_are_no_news() -> None:
    assert not shown().news(shown(reads=6))
    assert not HealthShown.of(ONLINE).news(shown(reads=500))


@pytest.mark.parametrize(
    "changes",
    [
        {"reads": 0},  # comms unknown -> online
        {"consecutive_errors": 1, "errors": 1, "last_error": "timeout: x"},  # offline
        {"errors": 1},  # a failure counted, already back online
        {"last_error": "malformed: y"},
        {"meter_clock_offset_s": None},
    ],
)
def test_comms_errors_and_clock_presence_are_news(changes: dict[str, object]) -> None:
    assert shown().news(shown(**changes))
    assert shown(**changes).news(shown())


def test_meter_clock_offset_is_news_beyond_its_resolution() -> None:
    step = METER_CLOCK_REPUBLISH_S
    assert not shown().news(shown(meter_clock_offset_s=0.2 + step * 0.9))
    assert shown().news(shown(meter_clock_offset_s=0.2 + step * 1.1))
    assert shown().news(shown(meter_clock_offset_s=0.2 - step * 1.1))


def write_config(tmp_path: Path, broker: Broker, port: int) -> Path:
    channel = {"name": "energy", "register": 0, "type": "uint32", "multiplier": 0.001}
    return site_config(
        tmp_path,
        devices=[tcp_device("unit1", port, timeout="300ms", channels=[channel])],
        mqtt_port=broker.port,
        site="status-site",
        timezone=None,
        storage={"path": str(tmp_path / "edged.db")},
        mqtt={"topic_prefix": None},
        status_every="3s",
    )


def device_statuses(got: Collector) -> list[dict[str, object]]:
    return got.payloads("/device/unit1/status")


@pytest.mark.integration
async def test_status_follows_comms_changes_and_the_cadence(tmp_path: Path, broker: Broker) -> None:
    meter = SimulatedMeter.pmc1(load_kw=3600.0, kwh_per_count=0.001)
    async with (
        MeterServer({1: meter}) as server,
        collect(broker, "edged/status-site/#") as got,
        Daemon(write_config(tmp_path, broker, await server.start_tcp("127.0.0.1", 0)), tmp_path),
    ):
        await got.wait_for(lambda c: len(device_statuses(c)) >= 1, 20, "first status")
        loop = asyncio.get_running_loop()
        since = loop.time()
        first = device_statuses(got)[0]
        assert first["comms"] == "online"
        await got.wait_for(lambda c: len(c.payloads("/interval/")) >= 5, 20, "five intervals")
        healthy = device_statuses(got)
        cadences = int((loop.time() - since) / 3.0) + 1  # status_every: 3s
        # Six reads and more (the start-up read and five boundaries), but only
        # the first status and the cadence's refreshes with growing read counts.
        assert 1 <= len(healthy) <= 1 + cadences, [s["reads"] for s in healthy]
        assert len(healthy) < 6
        assert [s["comms"] for s in healthy] == ["online"] * len(healthy)
        reads = [int(str(s["reads"])) for s in healthy]
        assert reads == sorted(reads)

        meter.set_fault(Fault.silent(), for_s=2.5)
        await got.wait_for(
            lambda c: device_statuses(c)[-1]["comms"] == "offline", 10, "offline status"
        )
        offline = device_statuses(got)[-1]
        assert offline["consecutive_errors"] == 1
        assert str(offline["last_error"]).startswith("timeout")
        # The gateway status follows the comms change (debounced).
        await got.wait_for(
            lambda c: any(p.get("devices_online") == 0 for p in c.payloads("gateway/status")),
            5,
            "gateway status with the device offline",
        )
        await got.wait_for(lambda c: device_statuses(c)[-1]["comms"] == "online", 15, "back online")
        back = device_statuses(got)[-1]
        assert back["consecutive_errors"] == 0
        assert int(str(back["errors"])) >= 1
    # Every status is valid JSON of the device status schema's shape.
    for payload in device_statuses(got):
        assert json.loads(json.dumps(payload))["device"] == "unit1"
