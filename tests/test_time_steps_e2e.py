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


async def test_restart_behind_mark_ntp_silent_then_backward_correction_is_time_adjusted(
    tmp_path: Path, broker: Broker
) -> None:
    """Observation 2 over MQTT: the daemon (in process, so its system clock can
    be a dead RTC's) restarts a day behind its last mark with NTP silent, runs
    on assumed time (mark + 5 s, ahead of true time after a short stop), then
    NTP answers and the reference steps back."""
    import asyncio
    import time

    from edged.cli.demo import DEAD_BATTERY_S
    from edged.cli.demo import Daemon as InProcess
    from edged.config.load import load_settings

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
        config = tmp_path / "edged.yaml"
        config.write_text(
            f"site: amt\ntimezone: UTC\nstorage: {{path: {tmp_path / 'edged.db'}}}\n"
            f"mqtt: {{host: 127.0.0.1, port: {broker.port}}}\nstatus_every: 1s\n"
            f"time: {{source: ntp, ntp_servers: ['127.0.0.1:{ntp_port}'], ntp_poll: 1s}}\n"
            "devices:\n  - id: m\n    interval: 1s\n"
            f"    transport: {{type: tcp, host: 127.0.0.1, port: {port}, timeout: 300ms}}\n"
            "    channels: [{name: energy, register: 0, multiplier: 0.001}]\n"
        )
        daemon = InProcess(load_settings(config), config)
        daemon.start()
        try:
            await got.wait_for(
                lambda c: len([r for r in latest(c) if r["quality"] == "actual"]) >= 3,
                20,
                "actual records",
            )
            control.write_text(json.dumps({"offset": 0.0, "unreachable": True}))
            await daemon.stop()
            daemon.start(system_now=lambda: time.time() - DEAD_BATTERY_S)
            await got.wait_for(
                lambda c: len([r for r in latest(c) if "AMT" in r["flags"]]) >= 2,
                20,
                "records on assumed time",
            )
            control.write_text(json.dumps({"offset": 0.0, "unreachable": False}))
            await got.wait_for(
                lambda c: any("TIME_ADJUSTED" in r["flags"] for r in latest(c)),
                20,
                "the TIME_ADJUSTED record",
            )
            await asyncio.sleep(2.5)
        finally:
            await daemon.stop()
    events = [p for p in got.payloads("/gateway/event") if p["kind"] == "time_adjusted"]
    assert events
    record = next(r for r in latest(got) if "TIME_ADJUSTED" in r["flags"])
    assert record["quality"] == "suspect"
    stepped = events[-1]["details"]
    if stepped["stepped"] and stepped["direction"] == "backward":
        # Assumed time ran ahead of true time: the record lasted longer in
        # real time than its 1 s label, and says so.
        assert "CLOCK_SET_BACKWARD" in record["flags"]
        assert record["duration_s"] > 1.0
        assert "LONG" in record["flags"]
    if record["demand"] is not None:
        assert record["demand"] == pytest.approx(
            record["value"] / (record["duration_s"] / 3600), rel=1e-3
        )  # (the payload rounds duration_s to the millisecond)
    peaks = got.payloads("/device/m/peak/energy")
    assert peaks
    assert peaks[-1]["peak"]["demand"] < LOAD_KW * 1.5, peaks[-1]
