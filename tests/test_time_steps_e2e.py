"""Issue 13 end to end: NTP steps true time while the real daemon runs.

The NTP server is steered through its control file (as a server in another
process would be); what edged publishes over MQTT is checked against the
billing rules of docs/time.md: the record in which the reference stepped
back is flagged and not actual, reports the real time between its reads and
its demand over that time, and the retained peak shows no phantom.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edged.sim.meter import MeterServer, SimulatedMeter
from edged.sim.ntp import NtpServer
from tests.support.config import site_config, tcp_device
from tests.support.daemon import Daemon
from tests.support.mqtt import Broker, Collector, collect
from tests.support.schema import validate_messages

pytestmark = pytest.mark.integration

LOAD_KW = 3600.0  # 1 kWh per second at 0.001 kWh per count


def latest(got: Collector) -> list[dict[str, Any]]:
    by_id = {p["id"]: p for p in got.payloads("/device/m/interval/")}
    return sorted(by_id.values(), key=lambda r: r["end"])


async def test_backward_step_is_flagged_with_real_duration_and_no_phantom_peak(
    tmp_path: Path, broker: Broker
) -> None:
    control = tmp_path / "ntp.control"
    control.write_text(json.dumps({"offset": 0.0}))
    meter = SimulatedMeter.pmc1(load_kw=LOAD_KW, kwh_per_count=0.001)
    async with (
        MeterServer({1: meter}) as server,
        NtpServer(control=control) as ntp,
        collect(broker, "edged/#") as got,
    ):
        port = await server.start_tcp("127.0.0.1", 0)
        ntp_port = await ntp.start("127.0.0.1", 0)
        channel = {"name": "energy", "register": 0, "multiplier": 0.001}
        config = site_config(
            tmp_path,
            devices=[tcp_device("m", port, timeout="300ms", channels=[channel])],
            mqtt_port=broker.port,
            ntp_port=ntp_port,
            site="steps",
            timezone="UTC",
            storage={"path": str(tmp_path / "edged.db")},
            log=None,
            mqtt={"topic_prefix": None},
            time={"ntp_poll": "1s"},
        )
        daemon = Daemon(config, tmp_path)
        try:
            await daemon.start()

            def actual() -> list[dict[str, Any]]:
                return [r for r in latest(got) if r["quality"] == "actual"]

            await got.wait_for(lambda c: len(actual()) >= 3, 20, "actual records")
            # True time steps 3 s back (through the control file).
            control.write_text(json.dumps({"offset": -3.0}))

            def stepped_back() -> list[dict[str, Any]]:
                return [r for r in latest(got) if "CLOCK_SET_BACKWARD" in r["flags"]]

            await got.wait_for(lambda c: bool(stepped_back()), 20, "a CLOCK_SET_BACKWARD record")
            await got.wait_for(
                lambda c: len([r for r in actual() if r["end"] > stepped_back()[0]["end"]]) >= 2,
                15,
                "actual records after the step",
            )
            assert await daemon.stop() == 0
        finally:
            await daemon.close()
    validate_messages(got.messages)
    # Never one id with two contents.
    contents: dict[str, dict[str, Any]] = {}
    for payload in got.payloads("/device/m/interval/"):
        body = {k: v for k, v in payload.items() if k not in ("seq", "replay")}
        assert contents.setdefault(payload["id"], body) == body
    record = stepped_back()[0]
    assert record["quality"] == "suspect"
    assert "LONG" in record["flags"]
    # 1 s of interval + 3 s the reference went back: about 4 s of real time.
    assert 3.5 < record["duration_s"] < 4.6
    assert record["value"] == pytest.approx(record["duration_s"] * 1.0, rel=0.05)
    assert record["demand"] == pytest.approx(LOAD_KW, rel=0.05)
    # Ids strictly increase: the step re-emitted nothing.
    ends = [r["end"] for r in latest(got)]
    assert ends == sorted(set(ends))
    peaks = got.payloads("/device/m/peak/energy")
    assert peaks
    assert peaks[-1]["peak"]["demand"] < LOAD_KW * 1.5, peaks[-1]
