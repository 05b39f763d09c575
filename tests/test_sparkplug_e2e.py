"""Sparkplug B end to end: simulator (Modbus TCP) -> `edged run` (a real process)
-> real mosquitto -> a subscriber that decodes with code generated from the
published sparkplug_b.proto (tests/sparkplug_decoder.py), not with edged's
encoder. One run goes through births, seq wrapping, a rebirth command, refused
commands, a broker outage (historical data) and a crash (the NDEATH will), and
every interval metric is compared with the JSON record of the same run."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from edged import __version__
from edged.core.model import parse_iso_utc
from tests import sparkplug_decoder as spb
from tests.support.config import site_config, tcp_device
from tests.support.daemon import Daemon
from tests.support.meters import meter
from tests.support.mqtt import Broker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

UNITS = (1, 2, 3)
GROUP = "test-group"
NODE = "test-site"
OPC = {"actual": 192, "suspect": 64, "estimated": 64, "missing": 0}


def write_config(
    tmp_path: Path,
    broker: Broker,
    modbus_port: int,
    units: tuple[int, ...] = UNITS,
    sparkplug: dict[str, Any] | None = None,
) -> Path:
    pulses = {"name": "pulses", "register": 0, "type": "uint32", "unit": "count"}
    devices = [
        tcp_device(f"unit{unit}", modbus_port, unit=unit,
                   measurements={"every": "100ms", "points": [pulses]})
        for unit in units
    ]  # fmt: skip
    return site_config(
        tmp_path,
        devices=devices,
        mqtt_port=broker.port,
        site=NODE,
        mqtt={"topic_prefix": None},
        sparkplug={"enabled": True, "group_id": GROUP, **(sparkplug or {})},
    )


@dataclass
class Seen:
    """Every message on spBv1.0/# and on edged's JSON topics, in arrival order."""

    sparkplug: list[spb.Message] = field(default_factory=list)
    json: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def summary(self) -> str:
        kinds = collections.Counter(m.kind for m in self.sparkplug)
        json_kinds = collections.Counter(t.rsplit("/", 1)[-1] for t, _ in self.json)
        last = [(m.kind, m.device, m.decoded().seq) for m in self.sparkplug[-5:]]
        return f"sparkplug {dict(kinds)}, last {last}; JSON {dict(json_kinds)}"

    def of(self, kind: str) -> list[spb.Message]:
        return [m for m in self.sparkplug if m.kind == kind]

    def add(self, message: aiomqtt.Message) -> None:
        payload = message.payload
        assert isinstance(payload, bytes)
        name = message.topic.value
        if name.startswith("spBv1.0/STATE/"):
            return  # the host's own JSON STATE
        if name.startswith("spBv1.0/"):
            self.sparkplug.append(spb.Message(name, payload))
        else:
            self.json.append((name, json.loads(payload)))


async def wait_for(
    predicate: Callable[[], bool],
    timeout_s: float,
    what: str,
    detail: Callable[[], str] = lambda: "",
) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; {detail()}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def listen(broker: Broker, seen: Seen) -> AsyncIterator[aiomqtt.Client]:
    async def receive(client: aiomqtt.Client) -> None:
        async for message in client.messages:
            seen.add(message)

    async with aiomqtt.Client(broker.host, broker.port, identifier=f"host-{id(seen)}") as client:
        # QoS 0, as Sparkplug hosts subscribe: the broker then delivers in the
        # order edged published. (At QoS 1 mosquitto may pass QoS 0 births and
        # measurements ahead of QoS 1 interval data held by its in-flight window.)
        await client.subscribe("spBv1.0/#", qos=0)
        await client.subscribe("edged/#", qos=1)
        task = asyncio.create_task(receive(client))
        try:
            yield client
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def sessions(messages: list[spb.Message]) -> list[list[spb.Message]]:
    """Messages edged sent, split at each NBIRTH (the NBIRTH first); NDEATH
    (no seq) and the host's own commands left out."""
    out: list[list[spb.Message]] = []
    for message in messages:
        if message.kind == "NBIRTH":
            out.append([message])
        elif out and message.kind not in ("NDEATH", "NCMD", "DCMD"):
            out[-1].append(message)
    return out


def metric_names(payload: Any) -> dict[str, Any]:
    return {m.name: m for m in payload.metrics}


def wrapped(messages: list[spb.Message]) -> bool:
    for session in sessions(messages):
        seqs = [m.decoded().seq for m in session]
        if any(a == 255 and b == 0 for a, b in itertools.pairwise(seqs)):
            return True
    return False


def interval_metrics(seen: Seen) -> list[tuple[Any, bool]]:
    """(metric with its name resolved from the DBIRTH aliases, historical) of every
    interval metric in DDATA."""
    aliases: dict[tuple[str | None, int], str] = {}
    out = []
    for message in seen.sparkplug:
        payload = message.decoded()
        if message.kind in ("NBIRTH", "DBIRTH"):
            for m in payload.metrics:
                aliases[(message.device, m.alias)] = m.name
        elif message.kind == "DDATA":
            for m in payload.metrics:
                assert not m.HasField("name"), "data after birth by alias only"
                assert not m.HasField("datatype")
                name = aliases[(message.device, m.alias)]
                if name.startswith("interval/"):
                    m.name = name
                    out.append((m, m.is_historical))
    return out


async def test_sparkplug_session_end_to_end(tmp_path: Path, broker: Broker) -> None:
    seen = Seen()
    async with contextlib.AsyncExitStack() as stack:
        _server, port = await stack.enter_async_context(meter(UNITS))
        config = write_config(tmp_path, broker, port)
        # The host listens before edged starts, so it sees the first births.
        async with contextlib.AsyncExitStack() as first:
            host = await first.enter_async_context(listen(broker, seen))
            d = await stack.enter_async_context(Daemon(config, tmp_path))
            # -- births, data, and seq through 255 back to 0 ------------------
            await wait_for(
                lambda: wrapped(seen.sparkplug), 60, "seq to wrap from 255 to 0", seen.summary
            )
            await wait_for(
                lambda: len(interval_metrics(seen)) >= 3 * len(UNITS), 20, "interval DDATA"
            )
            # -- rebirth on NCMD, refusal of everything else --------------------
            births_before = len(seen.of("NBIRTH"))
            now_ms = int(time.time() * 1000)
            await host.publish(
                f"spBv1.0/{GROUP}/NCMD/{NODE}",
                spb.command([("Node Control/Rebirth", spb.BOOLEAN, True)], now_ms),
                qos=1,
            )
            await wait_for(
                lambda: len(seen.of("NBIRTH")) > births_before, 10, "rebirth", seen.summary
            )
            await host.publish(
                f"spBv1.0/{GROUP}/DCMD/{NODE}/unit2",
                spb.command([("measurement/pulses", spb.DOUBLE, 0.0)], now_ms),
                qos=1,
            )
            await host.publish(
                f"spBv1.0/{GROUP}/NCMD/{NODE}",
                spb.command([("Node Control/Reboot", spb.BOOLEAN, True)], now_ms),
                qos=1,
            )
            await wait_for(
                lambda: len(refused(seen)) >= 2, 10, "refused-command events", seen.summary
            )
            births_before = len(seen.of("NBIRTH"))
        # -- broker outage: store and forward, then is_historical ---------------
        broker.stop()
        await asyncio.sleep(3.5)  # intervals built while the broker is down
        broker.start()
        async with listen(broker, seen):
            await wait_for(
                lambda: len(seen.of("NBIRTH")) > births_before, 20, "births after", seen.summary
            )
            await wait_for(
                lambda: any(h for _, h in interval_metrics(seen)), 20, "historical interval data"
            )

            def live_after_outage() -> bool:
                flags = [h for _, h in interval_metrics(seen)]
                first_historical = flags.index(True)
                return any(not h for h in flags[first_historical:])

            await wait_for(
                live_after_outage, 20, "live interval data after the backlog", seen.summary
            )
            # -- crash: the broker sends the NDEATH will -----------------------
            last_birth = seen.of("NBIRTH")[-1].decoded()
            assert await d.stop(signal.SIGKILL) == -signal.SIGKILL
            await wait_for(lambda: bool(seen.of("NDEATH")), 10, "NDEATH will", seen.summary)

    check_births(seen)
    check_seq(seen)
    check_rebirth_and_commands(seen)
    # bdSeq of the will = bdSeq of the NBIRTH of the session that died
    death = seen.of("NDEATH")[-1].decoded()
    assert not death.HasField("seq")
    (bd_seq,) = death.metrics
    assert (bd_seq.name, bd_seq.datatype) == ("bdSeq", spb.INT64)
    assert bd_seq.long_value == metric_names(last_birth)["bdSeq"].long_value
    check_against_json(seen)


def refused(seen: Seen) -> list[dict[str, Any]]:
    return [
        p
        for t, p in seen.json
        if t.endswith("/event") and p.get("kind") == "sparkplug_command_refused"
    ]


def json_intervals(seen: Seen) -> dict[str, dict[str, Any]]:
    return {p["id"]: p for t, p in seen.json if "/interval/" in t}


def check_births(seen: Seen) -> None:
    nbirth = seen.of("NBIRTH")[0].decoded()
    assert nbirth.seq == 0
    node = metric_names(nbirth)
    expected = {
        "bdSeq": spb.INT64,
        "Node Control/Rebirth": spb.BOOLEAN,
        "Properties/version": spb.STRING,
        "time/state": spb.STRING,
        "time/ntp_offset_s": spb.DOUBLE,
        "outbox/depth": spb.UINT64,
        "disk/used_bytes": spb.UINT64,
        "disk/free_bytes": spb.UINT64,
        "disk/alarm": spb.STRING,
    }
    assert {name: m.datatype for name, m in node.items()} == expected
    assert node["Node Control/Rebirth"].boolean_value is False
    assert node["Properties/version"].string_value == __version__
    assert node["time/state"].string_value in ("synced", "holdover", "assumed")
    assert all(m.HasField("alias") for m in node.values())
    dbirths = [m for m in seen.sparkplug[: len(UNITS) + 1] if m.kind == "DBIRTH"]
    assert sorted(m.device or "" for m in dbirths) == [f"unit{u}" for u in UNITS]
    aliases = [m.alias for m in node.values()]
    for message in dbirths:
        metrics = metric_names(message.decoded())
        assert set(metrics) == {"interval/energy_import", "measurement/pulses"}
        assert all(m.datatype == spb.DOUBLE for m in metrics.values())
        assert spb.properties(metrics["interval/energy_import"])["engUnit"] == (spb.STRING, "kWh")
        assert spb.properties(metrics["measurement/pulses"])["engUnit"] == (spb.STRING, "count")
        aliases += [m.alias for m in metrics.values()]
    assert len(set(aliases)) == len(aliases), "aliases unique across the edge node"


def check_seq(seen: Seen, wraps: int = 1) -> None:
    """Within a session, every message's seq is the previous one's + 1 mod 256."""
    seen_wraps = 0
    for session in sessions(seen.sparkplug):
        seqs = [m.decoded().seq for m in session]
        assert seqs[0] == 0
        for a, b in itertools.pairwise(seqs):
            assert b == (a + 1) % 256, [(m.kind, m.device, m.decoded().seq) for m in session]
            seen_wraps += a == 255
        assert all(m.decoded().HasField("seq") for m in session)
    assert seen_wraps >= wraps


def check_rebirth_and_commands(seen: Seen) -> None:
    births = [m.decoded() for m in seen.of("NBIRTH")]
    bd = [metric_names(b)["bdSeq"].long_value for b in births]
    # The rebirth kept the connection (same bdSeq); the outage made a new one.
    assert bd[1] == bd[0]
    assert bd[-1] != bd[0]
    after_rebirth = sessions(seen.sparkplug)[1]
    assert [m.kind for m in after_rebirth[: len(UNITS) + 1]] == ["NBIRTH"] + ["DBIRTH"] * len(UNITS)
    by_device = {p.get("device"): p for p in refused(seen)}
    assert "measurement/pulses" in by_device["unit2"]["message"]
    assert "Node Control/Reboot" in by_device[None]["message"]


def check_against_json(seen: Seen) -> None:
    """Every interval metric says what the JSON record of the same id says."""
    records = json_intervals(seen)
    compared = historical = 0
    for metric, is_historical in interval_metrics(seen):
        props = spb.properties(metric)
        record = records.get(props["id"][1])
        if record is None:
            continue  # its JSON copy was still in flight when the daemon was killed
        compared += 1
        historical += is_historical
        device, channel = record["device"], record["channel"]
        assert metric.name == f"interval/{channel}"
        assert device in {f"unit{u}" for u in UNITS}
        assert spb.metric_value(metric) == record["value"]
        assert metric.timestamp == int(parse_iso_utc(record["end"]).timestamp() * 1000)
        assert props["Quality"] == (spb.INT32, OPC[record["quality"]])
        assert props["quality"] == (spb.STRING, record["quality"])
        assert props["flags"] == (spb.STRING, ",".join(record["flags"]))
        assert props["engUnit"] == (spb.STRING, record["unit"])
        assert props["start"] == (
            spb.DATETIME,
            int(parse_iso_utc(record["start"]).timestamp() * 1000),
        )
    assert compared >= 3 * len(UNITS)
    assert historical >= 1


HOST = {"primary_host_id": "scada"}


def state(online: bool) -> bytes:
    return json.dumps({"online": online, "timestamp": int(time.time() * 1000)}).encode()


async def test_births_wait_for_the_primary_host_and_devices_die_and_are_reborn(
    tmp_path: Path, broker: Broker
) -> None:
    from edged.sim.faults import Fault

    seen = Seen()
    async with meter((1, 2)) as (server, port), listen(broker, seen) as host:
        config = write_config(tmp_path, broker, port, (1, 2), HOST)
        await host.publish("spBv1.0/STATE/scada", state(False), qos=1, retain=True)
        async with Daemon(config, tmp_path) as d:
            # The host is offline: edged runs (JSON records flow) but stays unborn.
            await wait_for(lambda: len(json_intervals(seen)) >= 4, 20, "JSON records")
            assert seen.of("NBIRTH") == []
            await host.publish("spBv1.0/STATE/scada", state(True), qos=1, retain=True)
            await wait_for(
                lambda: bool(seen.of("NBIRTH")), 10, "NBIRTH once the host is online", seen.summary
            )
            # What waited for the host is store-and-forward data.
            await wait_for(
                lambda: any(h for _, h in interval_metrics(seen)),
                10,
                "historical data",
                seen.summary,
            )
            # A meter that stops answering: DDEATH; answering again: DBIRTH.
            server.meters[1].set_fault(Fault.silent(), for_s=2.5)
            await wait_for(lambda: bool(seen.of("DDEATH")), 10, "DDEATH", seen.summary)
            await wait_for(
                lambda: len([m for m in seen.of("DBIRTH") if m.device == "unit1"]) >= 2,
                15,
                "DBIRTH when unit1 answers again",
            )
            birth = seen.of("NBIRTH")[-1].decoded()
            # The host goes away: edged says NDEATH itself and waits again.
            await host.publish("spBv1.0/STATE/scada", state(False), qos=1, retain=True)
            await wait_for(lambda: bool(seen.of("NDEATH")), 10, "NDEATH", seen.summary)
            assert await d.stop() == 0
        # A restart continues bdSeq from the store: a host never sees the
        # number of a session it already knows come back for another.
        await host.publish("spBv1.0/STATE/scada", state(True), qos=1, retain=True)
        async with Daemon(config, tmp_path) as d:
            await wait_for(lambda: len(seen.of("NBIRTH")) == 2, 15, "NBIRTH", seen.summary)
            # A reload that removes a device: births again, without it.
            config.write_text(write_config(tmp_path, broker, port, (1,), HOST).read_text())
            assert d.process is not None
            d.process.send_signal(signal.SIGHUP)
            await wait_for(lambda: len(seen.of("NBIRTH")) == 3, 15, "rebirth", seen.summary)
            await asyncio.sleep(0.5)  # its DBIRTHs follow at once
            assert await d.stop() == 0
        await host.publish("spBv1.0/STATE/scada", b"", qos=1, retain=True)
    (ddeath,) = seen.of("DDEATH")
    assert ddeath.device == "unit1"
    assert list(ddeath.decoded().metrics) == []
    first, restarted, reloaded = (
        metric_names(b.decoded())["bdSeq"].long_value for b in seen.of("NBIRTH")
    )
    death = seen.of("NDEATH")[0].decoded()
    assert death.metrics[0].long_value == first == metric_names(birth)["bdSeq"].long_value
    assert restarted > first
    assert reloaded == restarted  # a rebirth, not a new connection
    after_reload = sessions(seen.sparkplug)[-1]
    assert [(m.kind, m.device) for m in after_reload if "BIRTH" in m.kind] == [
        ("NBIRTH", None),
        ("DBIRTH", "unit1"),
    ]
    check_seq(seen, wraps=0)


async def test_sparkplug_instead_of_json_data(tmp_path: Path, broker: Broker) -> None:
    """`json_data: false`: intervals and fast polls only as Sparkplug; the
    gateway status stays on JSON."""
    seen = Seen()
    async with meter((1,)) as (_server, port), listen(broker, seen):
        config = write_config(tmp_path, broker, port, (1,), {"json_data": False})
        async with Daemon(config, tmp_path) as d:
            await wait_for(
                lambda: len(interval_metrics(seen)) >= 3, 20, "interval DDATA", seen.summary
            )
            await wait_for(
                lambda: any(t.endswith("/gateway/status") for t, _ in seen.json),
                10,
                "gateway status",
                seen.summary,
            )
            assert await d.stop() == 0
    assert not [t for t, _ in seen.json if "/interval/" in t or t.endswith("/measurement")]
    measurements = [
        m
        for m in seen.of("DDATA")
        if any(not x.HasField("properties") for x in m.decoded().metrics)
    ]
    assert measurements, seen.summary()
    for metric, _ in interval_metrics(seen):
        assert spb.properties(metric)["id"][1].startswith(f"{NODE}/unit1/energy_import/")
