"""Flags end to end: one daemon, one simulated unit per scenario,
everything observed as an MQTT consumer receives it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edged.core.model import parse_iso_utc
from edged.sim.faults import Fault
from edged.sim.meter import MeterServer, SimulatedMeter
from tests.support.config import site_config, tcp_device
from tests.support.daemon import Daemon
from tests.support.mqtt import Broker, Collector, collect
from tests.support.schema import validate_messages

pytestmark = pytest.mark.integration

KWH_PER_COUNT = 0.001
MODULUS = 1 << 32
# unit -> scenario; each unit is one device of the same name
UNITS = {1: "steady", 2: "wrap", 3: "reset", 4: "exception", 5: "outage", 6: "status", 7: "clock",
         8: "limits", 9: "estimate"}  # fmt: skip


def write_config(tmp_path: Path, broker: Broker, port: int, ntp_port: int) -> Path:
    devices = []
    for unit, name in UNITS.items():
        channel: dict[str, Any] = {"name": "energy", "register": 0, "type": "uint32",
                                   "multiplier": KWH_PER_COUNT}  # fmt: skip
        extra: dict[str, Any] = {}
        if name == "limits":
            # 1 kWh per 1 s interval: a 0.5 kWh ceiling makes every interval OUT_OF_RANGE.
            channel["limits"] = {"max": 0.5}
        if name == "steady":
            extra["measurements"] = {
                "every": "500ms",
                "points": [{"name": "pulses", "register": 0, "type": "uint32", "unit": "count"}],
            }
        if name == "status":
            extra["status"] = {"register": 102, "bits": {0: "POWER_FAIL", 3: "DEVICE_ERROR"}}
        if name == "estimate":
            extra.update(gaps="prorate", validation="amt_rule")
        if name == "clock":
            extra.update(clock={"format": "epoch", "register": 100}, clock_tolerance="10s")
        devices.append(
            tcp_device(name, port, unit=unit, timeout="300ms", channels=[channel], **extra)
        )
    station = {"id": "station", "channels": [
        {"name": "total", "add": ["steady.energy", "wrap.energy"], "unit": "kWh"}]}  # fmt: skip
    return site_config(
        tmp_path,
        devices=devices,
        mqtt_port=broker.port,
        ntp_port=ntp_port,
        site="flags",
        timezone="UTC",
        storage={"path": str(tmp_path / "edged.db")},
        status_every=None,
        mqtt={"topic_prefix": None},
        virtual_meters=[station],
    )


def records(got: Collector, device: str) -> list[dict[str, Any]]:
    latest = {p["id"]: p for p in got.payloads(f"/device/{device}/interval/")}
    return sorted(latest.values(), key=lambda r: r["end"])


def flagged(got: Collector, device: str, flag: str) -> list[dict[str, Any]]:
    return [r for r in records(got, device) if flag in r["flags"]]


async def test_every_scenario_produces_its_flag(
    tmp_path: Path, broker: Broker, ntp_port: int
) -> None:
    # The wrap meter stands still 1500 counts short of the modulus until the
    # daemon has its baseline, then runs at 1 kWh/s: it wraps 1.5 s later
    # whatever the daemon's start-up time (a counter that wrapped before the
    # baseline read would show no rollover at all).
    meters = {
        unit: SimulatedMeter.pmc1(load_kw=0.0 if name == "wrap" else 3600.0,
                                  kwh_per_count=KWH_PER_COUNT,
                                  initial_counts=(MODULUS - 1500) if name == "wrap" else 50_000)
        for unit, name in UNITS.items()
    }  # fmt: skip
    async with MeterServer(meters) as server, collect(broker, "edged/#") as got:
        port = await server.start_tcp("127.0.0.1", 0)
        config = write_config(tmp_path, broker, port, ntp_port)
        daemon = Daemon(config, tmp_path)
        try:
            await daemon.start()
            await got.wait_for(
                lambda c: len(records(c, "steady")) >= 2 and len(records(c, "wrap")) >= 1,
                20,
                "first intervals",
            )
            meters[2].set_load(3600.0)  # the wrap meter starts counting towards its wrap
            meters[3].set_counts(10)  # meter replaced / counter cleared
            meters[4].set_fault(Fault.exception(4), for_s=1.5)  # server device failure
            meters[5].set_fault(Fault.silent(), for_s=2.2)  # outage
            meters[9].set_fault(Fault.silent(), for_s=2.2)  # outage, estimated by prorating
            meters[6].status_bits = 0b1001  # power fail + device error bits
            meters[7].clock_offset_s = 120.0  # meter clock 2 minutes fast
            await got.wait_for(
                lambda c: (
                    len(flagged(c, "outage", "LONG")) >= 1
                    and len(flagged(c, "estimate", "ESTIMATED")) >= 2
                    and len(records(c, "station")) >= 4
                    and len(flagged(c, "wrap", "ROLLOVER")) >= 1
                ),
                25,
                "scenario flags",
            )
            assert await daemon.stop() == 0
        finally:
            await daemon.close()
    # Every message (intervals, events, statuses, peaks, measurements) meets its schema.
    validate_messages(got.messages)
    assert flagged(got, "wrap", "ROLLOVER"), records(got, "wrap")
    wrapped = flagged(got, "wrap", "ROLLOVER")[0]
    # 1 kWh/s over the time between the two reads (not 4 million): on a loaded
    # machine a read may be a few hundred ms late, so measure that time.
    series = records(got, "wrap")
    at = series.index(wrapped)
    if at == 0:
        # The first record runs from the start-up read: PARTIAL, and its
        # duration_s is the real time since that read.
        assert "PARTIAL" in wrapped["flags"], wrapped
        between_reads_s = wrapped["duration_s"]
    else:
        before = series[at - 1]
        between_reads_s = (
            parse_iso_utc(wrapped["read_at"]) - parse_iso_utc(before["read_at"])
        ).total_seconds()
    assert wrapped["value"] == pytest.approx(between_reads_s * 1.0, abs=0.05)
    assert 0.5 < wrapped["value"] < 1.5
    reset = flagged(got, "reset", "COUNTER_RESET")
    assert reset, records(got, "reset")
    assert reset[0]["value"] is None
    assert reset[0]["quality"] == "suspect"
    assert any(p["kind"] == "counter_reset" for p in got.payloads("/device/reset/event"))
    device_error = flagged(got, "exception", "DEVICE_ERROR")
    assert device_error, records(got, "exception")
    assert "IOBOARD" in device_error[0]["iee_status"]
    missing = flagged(got, "outage", "MISSING")
    assert missing
    assert all(r["value"] is None for r in missing)
    long_ = flagged(got, "outage", "LONG")[0]
    assert long_["duration_s"] > 1.0
    assert long_["value"] == pytest.approx(long_["duration_s"] * 1.0, abs=0.1)
    assert flagged(got, "limits", "OUT_OF_RANGE"), records(got, "limits")
    # gaps: prorate -> the gap's energy spread over the missed intervals as
    # ESTIMATED records replacing the MISSING ones (same ids); amt_rule marks
    # the irregular ones AMT + ESTNEEDED as the Itron rule says.
    estimated = flagged(got, "estimate", "ESTIMATED")
    assert all(r["value"] is not None for r in estimated), estimated
    assert not flagged(got, "estimate", "MISSING"), records(got, "estimate")
    assert flagged(got, "estimate", "ESTNEEDED"), records(got, "estimate")
    assert all("AMT" in r["flags"] for r in flagged(got, "estimate", "ESTNEEDED"))
    clock_status = got.payloads("/device/clock/status")[-1]
    assert clock_status["meter_clock_offset_s"] == pytest.approx(120.0, abs=2.0)
    status = records(got, "status")[-1]
    assert {"POWER_FAIL", "DEVICE_ERROR"} <= set(status["flags"])
    assert {"POWER", "IOBOARD"} <= set(status["iee_status"])
    clock = flagged(got, "clock", "CLOCK_ERROR")
    assert clock, records(got, "clock")
    # Virtual meters have a peak too (issue 13, observation 9).
    station_peaks = got.payloads("/device/station/peak/total")
    assert station_peaks, "no peak topic for the virtual meter"
    assert station_peaks[-1]["demand_unit"] == "kW"
    # Fast polling: QoS 0 measurements between boundaries, the counter rising.
    measured = [p["values"]["pulses"] for p in got.payloads("/device/steady/measurement")]
    assert len(measured) >= 4
    assert measured == sorted(measured)
    assert measured[-1] > measured[0]
    # The station total is the sum of its inputs, interval by interval.
    steady = {r["end"]: r for r in records(got, "steady")}
    wrap = {r["end"]: r for r in records(got, "wrap")}
    for total in records(got, "station"):
        a, b = steady.get(total["end"]), wrap.get(total["end"])
        assert a is not None
        assert b is not None
        if a["value"] is None or b["value"] is None:
            assert total["value"] is None
            assert "MISSING" in total["flags"]
        else:
            assert total["value"] == pytest.approx(a["value"] + b["value"], abs=1e-9)
            assert set(a["flags"]) | set(b["flags"]) <= set(total["flags"])
