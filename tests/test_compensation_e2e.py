"""Compensated channels end to end: a simulated meter serving kWh, kvarh, V and I
over real Modbus TCP -> `edged run` (a real process) -> real mosquitto -> a
subscriber. Second-long intervals.

Hand-worked figures (docs/compensation.md, same certificates): the meter serves
11 000 V and 600 A, i.e. 100 % of the VT's and 60 % of the CT's rating.
CT at 60 %: +0.10 %, +5.5 min; VT at 100 %: -0.12 %, and here +5.5 min too, so
that the phase displacements cancel (delta = 0) whatever the power factor:
k_P = k_Q = 1 / ((1 - 0.0012) x (1 + 0.0010)) = 1 / 0.9997988 = 1.000201240 (9 places).
Losses per hour at 11 000 V and 600 A: iron 12 kW x 1 = 12 kW, copper
90 kW x 0.6^2 = 32.4 kW, line 3 x 0.05 ohm x 600^2 A^2 / 1000 = 54 kW: 98.4 kW,
subtracted from the export (received) channel.
"""

from __future__ import annotations

import contextlib
import itertools
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from edged.sim.meter import CounterPoint, MeterServer, SimulatedMeter, StaticPoint
from edged.sim.modbus_frames import DataType
from tests.support.config import site_config, tcp_device
from tests.support.daemon import Daemon
from tests.support.mqtt import Broker, Collector, collect
from tests.support.schema import validate_messages

pytestmark = pytest.mark.integration

K = 1.000201240  # 1 / 0.9997988, rounded to 9 places
LOSS_KW = 98.4  # 12 + 32.4 + 54


def write_config(
    tmp_path: Path, broker: Broker, modbus_port: int, ntp_port: int, line_ohm: float = 0.05
) -> Path:
    def point(percent: float, ratio_error_pct: float, phase_min: float) -> dict[str, float]:
        return {"percent": percent, "ratio_error_pct": ratio_error_pct, "phase_min": phase_min}

    unit1 = tcp_device(
        "unit1",
        modbus_port,
        channels=[
            {"name": "energy_export", "register": 0, "type": "uint32", "multiplier": 0.001},
            {"name": "reactive_export", "register": 2, "type": "uint32", "multiplier": 0.001,
             "unit": "kvarh"},
        ],
        measurements={
            "every": "100ms",
            # report by exception: the steady V and I are published once, but every
            # poll still counts towards the operating point
            "points": [
                {"name": "V", "register": 10, "type": "float32", "unit": "V", "deadband": 1},
                {"name": "I", "register": 12, "type": "float32", "unit": "A", "deadband": 1},
            ],
        },
        compensation={
            "current": "I",
            "voltage": "V",
            "channels": [
                {"name": "energy_export", "flow": "received"},
                {"name": "reactive_export", "kind": "reactive", "flow": "received"},
            ],
            "ct": {
                "rated_current_a": 1000,
                "points": [point(5, 0.30, 15), point(20, 0.15, 8), point(100, 0.05, 3),
                           point(120, 0.04, 2)],
            },
            "vt": {
                "rated_voltage_v": 11000,
                "points": [point(80, -0.10, 4.5), point(100, -0.12, 5.5)],
            },
            "transformer": {"no_load_loss_kw": 12, "rated_voltage_v": 11000,
                            "load_loss_kw": 90, "rated_current_a": 1000},
            "line": {"resistance_ohm": line_ohm},
        },
    )  # fmt: skip
    total = {"name": "export_total", "add": ["unit1.energy_export_compensated"]}
    station = {"id": "station", "channels": [total]}
    return site_config(
        tmp_path,
        devices=[unit1],
        mqtt_port=broker.port,
        ntp_port=ntp_port,
        mqtt={"topic_prefix": None},
        virtual_meters=[station],
    )


@contextlib.asynccontextmanager
async def meter() -> AsyncIterator[int]:
    sim = SimulatedMeter(
        [
            # 3600 kW export: 1 kWh per second; 1800 kvar: 0.5 kvarh per second.
            CounterPoint(address=0, name="kwh", kwh_per_count=0.001, load_kw=3600.0,
                         initial_counts=10_000),
            CounterPoint(address=2, name="kvarh", kwh_per_count=0.001, load_kw=1800.0,
                         initial_counts=20_000),
            StaticPoint(name="V", address=10, value=11000.0, data_type=DataType.FLOAT32),
            StaticPoint(name="I", address=12, value=600.0, data_type=DataType.FLOAT32),
        ]
    )  # fmt: skip
    async with MeterServer({1: sim}) as server:
        yield await server.start_tcp("127.0.0.1", 0)


def latest(got: Collector, topic_end: str) -> dict[str, dict[str, Any]]:
    """Latest record per end on the topic ending in `topic_end`."""
    return {p["end"]: p for t, p, _ in got.messages if t.endswith(topic_end)}


async def test_compensated_channels_flow_end_to_end(
    tmp_path: Path, broker: Broker, ntp_port: int
) -> None:
    async with meter() as port, collect(broker, "edged/#") as got:
        config = write_config(tmp_path, broker, port, ntp_port)
        async with Daemon(config, tmp_path) as d:
            await got.wait_for(
                lambda c: (
                    len(c.payloads("interval/energy_export_compensated")) >= 5
                    and len(c.payloads("station/interval/export_total")) >= 4
                ),
                30,
                "5 compensated intervals",
            )
            assert await d.stop() == 0
    validate_messages(got.messages)  # every message meets its JSON Schema
    raw = latest(got, "unit1/interval/energy_export")
    raw_q = latest(got, "unit1/interval/reactive_export")
    comp = latest(got, "unit1/interval/energy_export_compensated")
    comp_q = latest(got, "unit1/interval/reactive_export_compensated")
    total = latest(got, "station/interval/export_total")
    events = [p for p in got.payloads("unit1/event") if p["kind"] == "compensation_parameters"]
    assert len(events) == 1
    params_hash = events[0]["details"]["params_hash"]
    # The first interval (start-up, PARTIAL) may hold no fast-poll sample; all
    # later ones have several.
    ends = sorted(comp)[1:]
    assert len(ends) >= 4
    for end in ends:
        record, source = comp[end], raw[end]
        assert record["id"] == f"test-site/unit1/energy_export_compensated/{end}"
        assert record["flags"] == source["flags"]
        assert record["duration_s"] == source["duration_s"]
        c = record["compensation"]
        assert c["params_hash"] == params_hash
        assert c["source_channel"] == "energy_export"
        assert c["raw_value"] == source["value"]
        assert c["factor"] == K
        assert c["ct"] == {"percent": 60.0, "ratio_error_pct": 0.1, "phase_min": 5.5}
        assert c["vt"] == {"percent": 100.0, "ratio_error_pct": -0.12, "phase_min": 5.5}
        hours = source["duration_s"] / 3600  # rounded to the ms in the payload
        assert c["loss_kwh"]["iron"] == pytest.approx(12 * hours, abs=2e-6)
        assert c["loss_kwh"]["copper"] == pytest.approx(32.4 * hours, abs=2e-6)
        assert c["loss_kwh"]["line"] == pytest.approx(54 * hours, abs=2e-6)
        expected = source["value"] * K - LOSS_KW * hours
        assert record["value"] == pytest.approx(expected, abs=2e-5)
        assert record["value"] == pytest.approx(round(record["value"], 6), abs=1e-12)
        # the reactive channel: the correction factor only
        q = comp_q[end]
        assert q["value"] == pytest.approx(raw_q[end]["value"] * K, abs=1e-6)
        assert q["compensation"]["loss_applied_kwh"] == 0.0
        # raw records are published unchanged beside the compensated ones
        assert "compensation" not in source
        if end in total:
            assert total[end]["value"] == pytest.approx(record["value"], abs=1e-9)
    # a steady second: about 1 kWh raw, 1.000201 - 0.027333 compensated
    assert comp[ends[-1]]["value"] == pytest.approx(0.972868, abs=0.06)


def write_register_config(tmp_path: Path, broker: Broker, modbus_port: int, ntp_port: int) -> Path:
    """The meter's own I2h and V2h accumulators as the operating point, and flat
    certificates (the same errors at every current and voltage: k = 1.000201240)."""
    config = tmp_path / "edged.yaml"
    config.write_text(
        f"""\
site: test-site
timezone: Pacific/Auckland
storage:
  path: {tmp_path / "state" / "edged.db"}
mqtt:
  host: 127.0.0.1
  port: {broker.port}
log:
  format: json
status_every: 1s
time:
  source: ntp
  ntp_servers: ["127.0.0.1:{ntp_port}"]
  ntp_poll: 2s
devices:
  - id: unit1
    interval: 1s
    transport: {{type: tcp, host: 127.0.0.1, port: {modbus_port}, unit_id: 1, timeout: 500ms}}
    channels:
      - {{name: energy_export, register: 0, type: uint32, multiplier: 0.001}}
      - {{name: reactive_export, register: 2, type: uint32, multiplier: 0.001, unit: kvarh}}
      - {{name: i2h, register: 4, type: uint32, multiplier: 1, unit: A2h}}
      - {{name: v2h, register: 6, type: uint32, multiplier: 1000, unit: V2h}}
    compensation:
      i2h: i2h
      v2h: v2h
      channels:
        - {{name: energy_export, flow: received}}
        - {{name: reactive_export, kind: reactive, flow: received}}
      ct:
        rated_current_a: 1000
        points:
          - {{percent: 20, ratio_error_pct: 0.10, phase_min: 5.5}}
          - {{percent: 100, ratio_error_pct: 0.10, phase_min: 5.5}}
      vt:
        rated_voltage_v: 11000
        points:
          - {{percent: 80, ratio_error_pct: -0.12, phase_min: 5.5}}
          - {{percent: 120, ratio_error_pct: -0.12, phase_min: 5.5}}
      transformer: {{no_load_loss_kw: 12, rated_voltage_v: 11000, load_loss_kw: 90,
                     rated_current_a: 1000}}
      line: {{resistance_ohm: 0.05}}
"""
    )
    return config


@contextlib.asynccontextmanager
async def register_meter() -> AsyncIterator[int]:
    sim = SimulatedMeter(
        [
            CounterPoint(address=0, name="kwh", kwh_per_count=0.001, load_kw=3600.0),
            CounterPoint(address=2, name="kvarh", kwh_per_count=0.001, load_kw=1800.0),
            # 600 A: 360 000 A2h per hour, counted in A2h
            CounterPoint(address=4, name="i2h", kwh_per_count=1, load_kw=360_000.0),
            # 11 000 V: 121 000 000 V2h per hour, counted in kV2h
            CounterPoint(address=6, name="v2h", kwh_per_count=1000, load_kw=121_000_000.0),
        ]
    )
    async with MeterServer({1: sim}) as server:
        yield await server.start_tcp("127.0.0.1", 0)


async def test_compensated_energy_is_conserved_across_a_daemon_restart(
    tmp_path: Path, broker: Broker, ntp_port: int
) -> None:
    def compensated(c: Collector) -> int:
        return len(latest(c, "unit1/interval/energy_export_compensated"))

    async with register_meter() as port, collect(broker, "edged/#") as got:
        config = write_register_config(tmp_path, broker, port, ntp_port)
        async with Daemon(config, tmp_path) as d:
            await got.wait_for(lambda c: compensated(c) >= 3, 30, "3 compensated intervals")
            assert await d.stop() == 0
            before = compensated(got)
            await d.start()
            await got.wait_for(lambda c: compensated(c) >= before + 3, 30, "3 more after restart")
            assert await d.stop() == 0
    validate_messages(got.messages)
    events = [p for p in got.payloads("unit1/event") if p["kind"] == "compensation_parameters"]
    assert len(events) == 2  # one per start, the same parameter set
    assert events[0]["details"]["params_hash"] == events[1]["details"]["params_hash"]
    raw = latest(got, "unit1/interval/energy_export")
    i2h = latest(got, "unit1/interval/i2h")
    v2h = latest(got, "unit1/interval/v2h")
    comp = latest(got, "unit1/interval/energy_export_compensated")
    ends = sorted(comp)
    # Boundaries missed while the daemon was down are MISSING (no value), raw
    # and compensated; every record with a raw value has a compensated value: the
    # meter's registers give the operating point even around the restart.
    assert all((comp[e]["value"] is None) == (raw[e]["value"] is None) for e in ends)
    ends = [e for e in ends if raw[e]["value"] is not None]
    for end in ends:
        # losses from the interval's own I2h and V2h: iron 12 kW x V2h / 11000^2,
        # copper 90 kW x I2h / 1000^2, line 3 x 0.05 ohm x I2h / 1000
        losses = 12 * v2h[end]["value"] / 121e6 + 2.4e-4 * i2h[end]["value"]
        expected = raw[end]["value"] * K - losses
        assert comp[end]["value"] == pytest.approx(expected, abs=2e-6)
    # Conservation across the restart: the raw counters continue, and the
    # compensated records add up to K x (kWh from the first to the last counter)
    # minus the losses of the I2h and V2h counted over the same span.
    first, last = raw[ends[0]], raw[ends[-1]]
    for a, b in itertools.pairwise(ends):
        assert raw[b]["counter_start"] == raw[a]["counter_end"]
    kwh = (last["counter_end"] - first["counter_start"]) * 0.001
    a2h = i2h[ends[-1]]["counter_end"] - i2h[ends[0]]["counter_start"]
    v2h_total = (v2h[ends[-1]]["counter_end"] - v2h[ends[0]]["counter_start"]) * 1000
    expected_total = kwh * K - 12 * v2h_total / 121e6 - 2.4e-4 * a2h
    total = sum(comp[e]["value"] for e in ends)
    assert total == pytest.approx(expected_total, abs=len(ends) * 1e-6)


async def test_a_parameter_change_is_an_event_and_leaves_published_records_alone(
    tmp_path: Path, broker: Broker, ntp_port: int
) -> None:
    def compensated(c: Collector) -> list[dict[str, Any]]:
        return [p for t, p, _ in c.messages if t.endswith("interval/energy_export_compensated")]

    def hashes(c: Collector) -> list[str]:
        return [
            p["details"]["params_hash"]
            for p in c.payloads("unit1/event")
            if p["kind"] == "compensation_parameters"
        ]

    async with meter() as port, collect(broker, "edged/#") as got:
        config = write_config(tmp_path, broker, port, ntp_port)
        async with Daemon(config, tmp_path) as d:
            await got.wait_for(lambda c: len(compensated(c)) >= 3, 30, "3 compensated intervals")
            write_config(tmp_path, broker, port, ntp_port, line_ohm=0.10)  # a new line figure
            assert d.process is not None
            d.process.send_signal(signal.SIGHUP)
            await got.wait_for(lambda c: len(hashes(c)) >= 2, 30, "the new parameter set")
            await got.wait_for(
                lambda c: any(
                    r["compensation"]["params_hash"] == hashes(c)[-1] and r["value"] is not None
                    for r in compensated(c)
                ),
                30,
                "a record under the new set",
            )
            assert await d.stop() == 0
    validate_messages(got.messages)
    old, new = hashes(got)
    assert old != new
    records = compensated(got)
    # Each record was published once (no re-publication of an id under the new
    # set) and names the set it was computed with: the old one up to the
    # reload, the new one after.
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids))
    used = [r["compensation"]["params_hash"] for r in records]
    assert used == sorted(used, key=lambda h: h == new)  # old ..., then new ...
    assert used[0] == old
    assert used[-1] == new
    # the line loss doubled with the resistance: 3 x 0.10 ohm x 600^2 / 1000 = 108 kW
    last = [r for r in records if r["value"] is not None][-1]
    hours = last["duration_s"] / 3600
    assert last["compensation"]["loss_kwh"]["line"] == pytest.approx(108 * hours, abs=2e-6)
