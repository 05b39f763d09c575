"""The facade: edged's Modbus TCP server for other masters (docs/multimaster.md).

Framing is checked against bytes written out by hand from the Modbus TCP
implementation guide; the server against real clients (pymodbus and the
independent `mbpoll`) reading a simulated meter over real sockets through
edged's links."""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import socket
import struct
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pymodbus.client import AsyncModbusTcpClient

from edged.config.load import ConfigError, load_settings
from edged.config.schema import Device, Facade, Settings
from edged.core import mbap
from edged.core.mbap import ExceptionCode, FrameError
from edged.core.registers import Point, ReadRequest
from edged.core.reload import applied_settings, restart_required
from edged.io.bus import BusScheduler, Priority
from edged.io.facade import FacadeServer, TokenBucket, p99
from edged.io.modbus import RtuBus, ScheduledLink, build_links
from edged.sim.faults import Fault
from edged.sim.meter import MeterServer, SimulatedMeter, StaticPoint, Table
from edged.sim.modbus_frames import DataType
from tests.support.config import daemon_config
from tests.support.daemon import Daemon
from tests.support.meters import KWH_PER_COUNT
from tests.support.mqtt import Broker, Collector, collect, intervals
from tests.support.schema import validate_messages

# -- framing (pure) -----------------------------------------------------------


def test_header_parsed_from_hand_written_bytes() -> None:
    # transaction 0x1234, protocol 0, length 6, unit 17
    header = mbap.parse_header(bytes.fromhex("12340000000611"))
    assert (header.transaction_id, header.length, header.unit_id, header.pdu_bytes) == (
        0x1234, 6, 17, 5,
    )  # fmt: skip


@pytest.mark.parametrize(
    "raw",
    [
        "12340001000611",  # protocol id 1
        "12340000000111",  # length 1: no room for a function code
        "12340000010011",  # length 256
        "123400000006",  # six bytes
    ],
)
def test_headers_that_are_not_modbus_tcp_are_frame_errors(raw: str) -> None:
    with pytest.raises(FrameError):
        mbap.parse_header(bytes.fromhex(raw))


def test_pdus() -> None:
    assert mbap.parse_pdu(bytes.fromhex("03006b0003")) == mbap.ReadPdu(3, 107, 3)
    assert mbap.parse_pdu(bytes.fromhex("0400000001")) == mbap.ReadPdu(4, 0, 1)
    refused = {
        "0600010003": ExceptionCode.ILLEGAL_FUNCTION,  # write single register
        "1000010001020007": ExceptionCode.ILLEGAL_FUNCTION,  # write multiple
        "2b0e0100": ExceptionCode.ILLEGAL_FUNCTION,  # device identification
        "030000007e": ExceptionCode.ILLEGAL_DATA_VALUE,  # 126 registers
        "0300000000": ExceptionCode.ILLEGAL_DATA_VALUE,  # 0 registers
        "03000000": ExceptionCode.ILLEGAL_DATA_VALUE,  # short
        "030000000100": ExceptionCode.ILLEGAL_DATA_VALUE,  # long
        "03fffe0003": ExceptionCode.ILLEGAL_DATA_ADDRESS,  # 65534 + 3
    }
    for raw, code in refused.items():
        pdu = mbap.parse_pdu(bytes.fromhex(raw))
        assert isinstance(pdu, mbap.RefusedPdu), raw
        assert pdu.code == code, raw


def test_responses_as_the_guide_writes_them() -> None:
    header = mbap.MbapHeader(transaction_id=1, protocol_id=0, length=6, unit_id=2)
    # Application protocol spec 6.3: registers 108-110 = 0x022B 0x0000 0x0064.
    assert mbap.read_response(header, 3, (0x022B, 0, 0x64)) == bytes.fromhex(
        "000100000009020306022b00000064"
    )
    assert mbap.exception_response(header, 4, 0x0B) == bytes.fromhex("00010000000302840b")


def test_token_bucket_allows_a_seconds_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=2.0)
    assert [bucket.take(10.0) for _ in range(3)] == [True, True, False]
    assert bucket.take(10.4) is False  # 0.8 tokens
    assert bucket.take(10.5) is True  # 1.0 token


def test_p99_nearest_rank() -> None:
    assert p99([]) is None
    assert p99([float(i) for i in range(1, 101)]) == 99.0
    assert p99([5.0]) == 5.0


def test_facade_config_checks_devices_and_unit_ids(tmp_path: Path) -> None:
    devices = """\
site: s
devices:
  - id: a
    transport: {type: tcp, host: h, unit_id: 1}
    channels: [{name: e, register: 0}]
  - id: b
    transport: {type: tcp, host: h2, unit_id: 1}
    channels: [{name: e, register: 0}]
"""
    config = tmp_path / "edged.yaml"
    config.write_text(
        devices
        + """\
facade:
  enabled: true
  listeners:
    - devices:
        - {device: a}
        - {device: b}
        - {device: c}
"""
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert [(p.line, p.key_path, p.message) for p in caught.value.problems] == [
        (14, "facade.listeners[0].devices[1]",
         "unit id 1 is already 'a' on this listener; give one an explicit unit_id"),
        (15, "facade.listeners[0].devices[2]", "no device 'c'"),
    ]  # fmt: skip
    config.write_text(
        devices + "facade: {enabled: true, listeners: [{devices: [{device: a}, "
        "{device: b, unit_id: 2}]}]}\n"
    )
    assert load_settings(config).facade.listeners[0].port == 1502
    with pytest.raises(ValueError, match="mode cache needs"):
        Facade.model_validate({"listeners": [{"devices": [{"device": "a", "mode": "cache"}]}]})
    with pytest.raises(ValueError, match="not a network"):
        Facade.model_validate({"allow": ["10.0.0.0/33"]})
    config.write_text(devices)
    assert load_settings(config).facade.enabled is False


# -- the server over real sockets -----------------------------------------------

# Register i of the simulated meters holds 100 * unit + i (holding) and
# 200 * unit + i (input): values known by hand.
REGISTERS = 20
REQUEST_0 = (
    ReadRequest(
        function="holding",
        address=0,
        count=1,
        points=(Point(name="r0", function="holding", address=0, data_type="uint16"),),
    ),
)


def meter(unit: int) -> SimulatedMeter:
    points = [StaticPoint(name=f"h{i}", address=i, value=100 * unit + i, data_type=DataType.UINT16)
              for i in range(REGISTERS)]  # fmt: skip
    points += [StaticPoint(name=f"i{i}", address=i, value=200 * unit + i, table=Table.INPUT,
                           data_type=DataType.UINT16) for i in range(REGISTERS)]  # fmt: skip
    return SimulatedMeter(points)


def device(device_id: str, port: int, unit: int) -> Device:
    return Device.model_validate(
        {"id": device_id, "interval": "1s",
         "transport": {"type": "tcp", "host": "127.0.0.1", "port": port, "unit_id": unit,
                       "timeout": 0.3},
         "channels": [{"name": "e", "register": 0}]}
    )  # fmt: skip


@dataclass
class Site:
    meters: dict[int, SimulatedMeter]
    links: dict[str, ScheduledLink]
    facade: FacadeServer
    port: int


def facade_settings(**overrides: Any) -> Facade:
    config: dict[str, Any] = {
        "enabled": True,
        "listeners": [{"host": "127.0.0.1", "port": 0, "devices": [
            {"device": "pt", "unit_id": 1},
            {"device": "cached", "unit_id": 2, "mode": "cache", "max_age": "1s",
             "blocks": [{"register": 0, "count": 10, "every": "0.2s"},
                        {"function": "input", "register": 0, "count": 10, "every": "0.2s"}]},
        ]}],
    }  # fmt: skip
    config.update(overrides)
    return Facade.model_validate(config)


@pytest.fixture
async def site(request: pytest.FixtureRequest) -> AsyncIterator[Site]:
    overrides: dict[str, Any] = getattr(request, "param", {})
    meters = {1: meter(1), 2: meter(2)}
    async with MeterServer(meters) as server:
        port = await server.start_tcp()
        devices = [device("pt", port, 1), device("cached", port, 2)]
        links = build_links(devices)

        def resolve(device_id: str) -> tuple[ScheduledLink, int] | None:
            d = next((d for d in devices if d.id == device_id), None)
            return None if d is None else (links[d.id], d.transport.unit_id)

        units = {d.id: d.transport.unit_id for d in devices}
        facade = FacadeServer(facade_settings(**overrides), resolve, units.get)
        (facade_port,) = await facade.start()
        try:
            yield Site(meters, links, facade, facade_port)
        finally:
            await facade.close()
            for link in set(links.values()):
                await link.aclose()


async def raw_exchange(port: int, frame: bytes, *, expect: int | None = None) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(frame)
        await writer.drain()
        if expect is None:  # read until the server closes (a reset is a close too)
            try:
                return await asyncio.wait_for(reader.read(), 3.0)
            except ConnectionResetError:
                return b""
        return await asyncio.wait_for(reader.readexactly(expect), 3.0)
    finally:
        writer.close()


def request(unit: int, function: int, address: int, count: int, tid: int = 7) -> bytes:
    return struct.pack(">HHHBBHH", tid, 0, 6, unit, function, address, count)


async def until_fresh(site: Site) -> None:
    for _ in range(100):
        if all(b["age_s"] is not None for b in site.facade.status()["blocks"]):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("cache blocks never filled")


@pytest.mark.integration
async def test_pymodbus_reads_pass_through_and_cache(site: Site) -> None:
    await until_fresh(site)
    client = AsyncModbusTcpClient("127.0.0.1", port=site.port, timeout=2, retries=0)
    await client.connect()
    try:
        got = await client.read_holding_registers(3, count=4, device_id=1)
        assert got.registers == [103, 104, 105, 106]
        got = await client.read_input_registers(0, count=2, device_id=1)
        assert got.registers == [200, 201]
        got = await client.read_holding_registers(5, count=5, device_id=2)  # cached
        assert got.registers == [205, 206, 207, 208, 209]
        got = await client.read_input_registers(8, count=2, device_id=2)
        assert got.registers == [408, 409]
        # Outside every cached block: illegal data address.
        got = await client.read_holding_registers(8, count=4, device_id=2)
        assert got.isError()
        assert got.exception_code == 2
        # A write is refused: edged's facade is read-only.
        got = await client.write_register(0, 1, device_id=1)
        assert got.isError()
        assert got.exception_code == 1
        got = await client.write_registers(0, [1, 2], device_id=2)
        assert got.isError()
        assert got.exception_code == 1
        # An unknown unit id: gateway target failed to respond.
        got = await client.read_holding_registers(0, count=1, device_id=9)
        assert got.isError()
        assert got.exception_code == 0x0B
    finally:
        client.close()
    # Nothing was written to the meters.
    assert list(site.meters[1].read_registers(Table.HOLDING, 0, 2)) == [100, 101]
    (stats,) = site.facade.status()["clients"]
    assert stats["client"] == "127.0.0.1"
    assert stats["requests"] == 8
    assert stats["exceptions"] == 4


MBPOLL = shutil.which("mbpoll")
# In CI (.ci/run installs mbpoll, CI=true) a missing mbpoll fails these tests.
NEEDS_MBPOLL = pytest.mark.skipif(
    MBPOLL is None and os.environ.get("CI") != "true",
    reason="mbpoll not installed (apt-get install -y mbpoll; .ci/run installs it)",
)


@pytest.mark.integration
@NEEDS_MBPOLL
async def test_mbpoll_reads_through_the_facade(site: Site) -> None:
    await until_fresh(site)
    assert MBPOLL is not None, "mbpoll is missing in CI: .ci/run must install it"
    # -0 -r 1: PDU address 1; holding of unit 1 (pass-through) and unit 2
    # (cached), input of unit 1.
    for unit, table, expected in ((1, "4", [101, 102, 103]), (2, "4", [201, 202, 203]),
                                  (1, "3", [201, 202, 203])):  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            MBPOLL, "-m", "tcp", "-p", str(site.port), "-a", str(unit), "-t", table,
            "-r", "1", "-c", "3", "-0", "-1", "-o", "2", "127.0.0.1",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 10)
        text = out.decode()
        assert proc.returncode == 0, (text, err.decode())
        # mbpoll prints "[ref]: value" per register.
        values = [int(line.split(":")[1]) for line in text.splitlines() if line.startswith("[")]
        assert values == expected, text


@pytest.mark.integration
async def test_malformed_frames_close_the_connection_and_the_server_carries_on(
    site: Site,
) -> None:
    bad = [
        struct.pack(">HHHB", 1, 1, 6, 1) + bytes.fromhex("0300000001"),  # protocol id 1
        struct.pack(">HHHB", 1, 0, 1, 1),  # length 1
        struct.pack(">HHHB", 1, 0, 300, 1) + bytes(300),  # length 300
    ]
    for frame in bad:
        assert await raw_exchange(site.port, frame) == b""
    # Wrong PDU length inside a good frame: an exception, the connection stays.
    short = struct.pack(">HHHBBH", 9, 0, 4, 1, 3, 0)
    assert await raw_exchange(site.port, short, expect=9) == bytes.fromhex("000900000003018303")
    # Oversized read: 0x03; address overflow: 0x02.
    assert await raw_exchange(site.port, request(1, 3, 0, 126), expect=9) == bytes.fromhex(
        "000700000003018303"
    )
    assert await raw_exchange(site.port, request(1, 4, 65535, 2), expect=9) == bytes.fromhex(
        "000700000003018402"
    )
    # And a good read still works.
    answer = await raw_exchange(site.port, request(1, 3, 0, 1), expect=11)
    assert answer == bytes.fromhex("0007000000050103020064")
    assert site.facade.status()["closed_malformed"] == 3


@pytest.mark.integration
async def test_device_down_answers_0x0b_within_the_masters_timeout(site: Site) -> None:
    await until_fresh(site)
    site.meters[1].set_fault(Fault.silent())
    site.meters[2].set_fault(Fault.silent())
    loop = asyncio.get_running_loop()
    started = loop.time()
    # Pass-through: the link's timeout (0.3 s) then 0x0B; within answer_within (2 s).
    answer = await raw_exchange(site.port, request(1, 3, 0, 2), expect=9)
    assert answer == bytes.fromhex("000700000003018" + "30b")
    assert loop.time() - started < 2.0
    # Cache: the block ages past max_age (1 s) and then answers 0x0B, never stale data.
    await asyncio.sleep(1.3)
    answer = await raw_exchange(site.port, request(2, 3, 0, 2), expect=9)
    assert answer == bytes.fromhex("000700000003028" + "30b")
    # The device comes back. The bus spends no timeout on a unit it knows to
    # be down outside boundary reads, so it is edged's next boundary read
    # (driven here) that brings it back for the masters too.
    site.meters[1].clear_faults()
    site.meters[2].clear_faults()
    # (After two failures the unit's next boundary read is skipped: backoff.)
    for _ in range(3):
        boundary = await site.links["cached"].read(2, REQUEST_0, priority=Priority.BOUNDARY)
        if boundary.error is None:
            break
    assert boundary.error is None
    await asyncio.sleep(0.5)
    answer = await raw_exchange(site.port, request(2, 3, 0, 1), expect=11)
    assert answer == bytes.fromhex("00070000000502030200c8")


@pytest.mark.integration
async def test_identical_reads_in_flight_share_one_bus_transaction(site: Site) -> None:
    site.meters[1].set_fault(Fault.delay(0.2))  # keep the first read on the wire a while
    answers = await asyncio.gather(
        *(raw_exchange(site.port, request(1, 3, 0, 1, tid=n), expect=11) for n in range(4))
    )
    for n, answer in enumerate(answers):
        assert answer == struct.pack(">HHHBBBH", n, 0, 5, 1, 3, 2, 100)
    status = site.facade.status()
    assert status["pass_through_reads"] + status["pass_through_shared"] == 4
    assert status["pass_through_shared"] >= 2


@pytest.mark.integration
@pytest.mark.parametrize("site", [{"allow": ["10.0.0.0/8"]}], indirect=True)
async def test_a_client_outside_allow_is_closed(site: Site) -> None:
    assert await raw_exchange(site.port, request(1, 3, 0, 1)) == b""
    assert site.facade.status()["rejected_connections"] == 1


@pytest.mark.integration
@pytest.mark.parametrize("site", [{"max_connections": 2, "idle_timeout": "0.5s"}], indirect=True)
async def test_connection_limit_and_idle_timeout(site: Site) -> None:
    kept = [await asyncio.open_connection("127.0.0.1", site.port) for _ in range(2)]
    await asyncio.sleep(0.05)
    assert await raw_exchange(site.port, request(1, 3, 0, 1)) == b""  # the third
    # The idle ones are closed after 0.5 s.
    for reader, _ in kept:
        assert await asyncio.wait_for(reader.read(), 3.0) == b""
    answer = await raw_exchange(site.port, request(1, 3, 0, 1), expect=11)
    assert answer[-2:] == b"\x00\x64"


@pytest.mark.integration
@pytest.mark.parametrize("site", [{"max_rate": 5, "client_queue": 2}], indirect=True)
async def test_a_flooding_client_is_told_busy(site: Site) -> None:
    # Ten requests pipelined on one connection: a burst of five is admitted
    # (two may wait for the bus; the rest of the burst is over the queue),
    # everything beyond answers 0x06 at once.
    site.meters[1].set_fault(Fault.delay(0.1))
    reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
    try:
        writer.write(b"".join(request(1, 3, 0, 1, tid=n) for n in range(10)))
        await writer.drain()
        codes: dict[int, str] = {}
        for _ in range(10):
            head = await asyncio.wait_for(reader.readexactly(7), 3.0)
            tid, _, length, _ = struct.unpack(">HHHB", head)
            body = await reader.readexactly(length - 1)
            codes[tid] = "ok" if body[0] == 3 else f"{body[1]:02x}"
    finally:
        writer.close()
    busy = sorted(t for t, c in codes.items() if c == "06")
    assert sum(1 for c in codes.values() if c == "ok") == 2
    assert len(busy) == 8
    assert set(codes.values()) == {"ok", "06"}


# -- the daemon: edged run with a facade, a broker, pymodbus and mbpoll ----------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def mbpoll(port: int, unit: int, count: int) -> tuple[int, str]:
    assert MBPOLL is not None, "mbpoll is missing in CI: .ci/run must install it"
    proc = await asyncio.create_subprocess_exec(
        MBPOLL, "-m", "tcp", "-p", str(port), "-a", str(unit), "-t", "4", "-r", "0", "-0",
        "-c", str(count), "-1", "-o", "1", "127.0.0.1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def mbpoll_values(text: str) -> list[int]:
    return [int(line.split(":")[1]) for line in text.splitlines() if line.startswith("[")]


@pytest.mark.integration
@NEEDS_MBPOLL
async def test_daemon_serves_masters_and_a_dead_meter_is_0x0b_and_missing(
    tmp_path: Path, broker: Broker, ntp_port: int
) -> None:
    # No load: the counter stays at 70000 = 0x0001_1170, registers [1, 4464].
    sim = SimulatedMeter.pmc1(load_kw=0.0, kwh_per_count=KWH_PER_COUNT, initial_counts=70_000)
    facade_port = free_port()
    async with MeterServer({1: sim}) as server, collect(broker, "edged/#") as got:
        modbus_port = await server.start_tcp()
        facade = {
            "enabled": True,
            "listeners": [
                {
                    "port": facade_port,
                    "devices": [
                        {"device": "unit1"},
                        {"device": "unit1", "unit_id": 2, "mode": "cache", "max_age": "1500ms",
                         "blocks": [{"register": 0, "count": 2, "every": "250ms"}]},
                    ],
                }
            ],
        }  # fmt: skip
        config = daemon_config(tmp_path, broker.port, modbus_port, ntp_port, facade=facade)
        async with Daemon(config, tmp_path) as d:
            await got.wait_for(lambda c: len(intervals(c)) >= 2, 20, "2 intervals")
            client = AsyncModbusTcpClient("127.0.0.1", port=facade_port, timeout=2, retries=0)
            await client.connect()
            try:
                for unit in (1, 2):
                    answer = await client.read_holding_registers(0, count=2, device_id=unit)
                    assert answer.registers == [1, 4464], unit
                for unit in (1, 2):
                    code, text = await mbpoll(facade_port, unit, 2)
                    assert code == 0, text
                    assert mbpoll_values(text) == [1, 4464]
                # The meter stops answering.
                sim.set_fault(Fault.silent())
                await asyncio.sleep(2.0)  # past max_age and a boundary read or two
                loop = asyncio.get_running_loop()
                for unit in (1, 2):
                    asked = loop.time()
                    answer = await client.read_holding_registers(0, count=2, device_id=unit)
                    assert answer.isError(), unit
                    assert answer.exception_code == 0x0B
                    assert loop.time() - asked < 2.0  # within the master's timeout
                code, text = await mbpoll(facade_port, 1, 2)
                assert code != 0
                assert mbpoll_values(text) == []
            finally:
                client.close()
            sim.clear_faults()

            def missing(c: Collector) -> bool:
                return any(r["quality"] == "missing" for r in intervals(c))

            await got.wait_for(missing, 20, "a MISSING interval after the outage")
            await got.wait_for(
                lambda c: any("facade" in p for p in c.payloads("/gateway/status")),
                10, "a gateway status with the facade",
            )  # fmt: skip
            assert await d.stop() == 0
    validate_messages(got.messages)
    statuses = [p for p in got.payloads("/gateway/status") if "facade" in p]
    clients = {c["client"]: c for c in statuses[-1]["facade"]["clients"]}
    # pymodbus 2 + mbpoll 2 answered, then pymodbus 2 + mbpoll 1 refused with 0x0B.
    assert clients["127.0.0.1"]["requests"] == 7
    assert clients["127.0.0.1"]["exceptions"] == 3
    # `edged status` (which reads the store) shows the facade's last state.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edged.cli.main", "status", "-c", str(config),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    (line,) = [x for x in out.decode().splitlines() if "facade" in x]
    assert f"listening 127.0.0.1:{facade_port} (2 devices)" in line
    assert "7 requests, 3 exceptions" in line


@pytest.mark.integration
async def test_a_flood_leaves_boundary_reads_on_time_and_other_masters_served() -> None:
    """A 9600-baud RTU bus (pty; the simulator paces replies at the line speed)
    with two meters read on 1 s boundaries, one master flooding the facade and
    one polling politely."""
    baud = 9600
    async with MeterServer({1: meter(1), 2: meter(2)}) as server:
        path = await server.start_rtu_pty(baudrate=baud, parity="N")
        bus = RtuBus(path, baudrate=baud, parity="N", timeout_s=0.25)
        bus.set_units([(1, 0.25), (2, 0.25)])
        units = {"m1": 1, "m2": 2}

        def resolve(device_id: str) -> tuple[RtuBus, int] | None:
            return (bus, units[device_id]) if device_id in units else None

        settings = Facade.model_validate(
            {"enabled": True, "max_rate": 20, "client_queue": 2,
             "listeners": [{"port": 0, "devices": [{"device": "m1"}, {"device": "m2"}]}]}
        )  # fmt: skip
        facade = FacadeServer(settings, resolve, units.get)
        (port,) = await facade.start()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        async def flood() -> dict[str, int]:
            # Another client address on loopback (127.0.0.2) so the polite
            # master's own rate and queue are its own.
            reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                           local_addr=("127.0.0.2", 0))  # fmt: skip
            answers: dict[str, int] = {}

            async def drain() -> None:
                while True:
                    head = await reader.readexactly(7)
                    body = await reader.readexactly(struct.unpack(">H", head[4:6])[0] - 1)
                    key = "ok" if body[0] < 0x80 else f"{body[1]:02x}"
                    answers[key] = answers.get(key, 0) + 1

            drainer = asyncio.create_task(drain())
            n = 0
            while not stop.is_set():
                writer.write(request(1 + n % 2, 3, n % 10, 10, tid=n % 65536))
                n += 1
                if n % 20 == 0:
                    await writer.drain()
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.5)
            drainer.cancel()
            writer.close()
            return answers

        async def polite() -> list[list[int] | str]:
            client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
            await client.connect()
            got: list[list[int] | str] = []
            while not stop.is_set():
                answer = await client.read_holding_registers(0, count=3, device_id=2)
                got.append(f"{answer.exception_code:#04x}" if answer.isError()
                           else list(answer.registers))  # fmt: skip
                await asyncio.sleep(0.3)
            client.close()
            return got

        energy = (
            ReadRequest(
                function="holding",
                address=0,
                count=2,
                points=(Point(name="e", function="holding", address=0, data_type="uint32"),),
            ),
        )
        lateness: list[float] = []
        try:
            await bus.read(1, energy)  # open the port
            flooding = asyncio.create_task(flood())
            asking = asyncio.create_task(polite())
            boundary = math.floor(loop.time()) + 1.0
            for _ in range(5):
                bus.expect_boundary(boundary - loop.time())
                await asyncio.sleep(boundary - loop.time())
                asked = loop.time()
                reads = await asyncio.gather(
                    *(bus.read(u, energy, priority=Priority.BOUNDARY) for u in (1, 2))
                )
                for raw in reads:
                    assert raw.error is None
                    lateness.append(asked + raw.queued_s - boundary)
                boundary += 1.0
            stop.set()
            flood_answers = await flooding
            polite_answers = await asking
        finally:
            stop.set()
            await facade.close()
            await bus.aclose()
    # The flooder was told to back off, and some of its reads were served.
    assert flood_answers.get("06", 0) > 100
    assert flood_answers.get("ok", 0) > 0
    # The polite master got every answer, all of them right.
    assert len(polite_answers) >= 10
    assert all(a == [200, 201, 202] for a in polite_answers), polite_answers
    # Boundary reads: at most the one transaction on the wire ahead of them
    # (a 10-register read, ~40 ms at 9600 Bd) plus the other meter's boundary
    # read (~24 ms); bounded loosely, the machine is shared.
    assert max(lateness) < 0.25, lateness


# -- the bus: pass-through reads below boundary reads and fast polls -------------


async def test_pass_through_reads_come_last_and_yield_around_boundaries() -> None:
    now = [100.0]
    bus: BusScheduler[str] = BusScheduler("bus", clock=lambda: now[0])
    bus.register_unit(1, 0.5)
    submitted = [
        bus.submit(1, Priority.PASS_THROUGH, "master"),
        bus.submit(1, Priority.FAST, "fast poll"),
        bus.submit(1, Priority.BOUNDARY, "boundary"),
    ]
    order = []
    for _ in submitted:
        job = await bus.take()
        bus.started(job)
        now[0] += 0.04  # each 40 ms on the wire
        bus.finished(job, ok=True, unresponsive=False, timeout=False)
        order.append(job.payload)
    assert order == ["boundary", "fast poll", "master"]
    # The unit's estimate is 40 ms (from the fast poll and the pass-through
    # read): a pass-through
    # read 45 ms before a boundary would still be on the wire then, so it is
    # held until the boundary's reads are taken; 60 ms before, it may go.
    bus.expect_boundary(now[0] + 0.045)
    job = bus.submit(1, Priority.PASS_THROUGH, "late master")
    assert bus._fast_hold_s(job, now[0]) > 0.045
    now[0] -= 0.015
    assert bus._fast_hold_s(job, now[0]) == 0.0


def test_a_changed_facade_applies_at_the_next_start() -> None:
    base: dict[str, Any] = {
        "site": "s",
        "devices": [{"id": "a", "transport": {"type": "tcp", "host": "h", "unit_id": 1},
                     "channels": [{"name": "e", "register": 0}]}],
    }  # fmt: skip
    old = Settings.model_validate(base)
    new = Settings.model_validate(
        {**base, "facade": {"enabled": True, "listeners": [{"devices": [{"device": "a"}]}]}}
    )
    assert restart_required(old, new) == ("facade",)
    assert applied_settings(old, new).facade.enabled is False


@pytest.mark.integration
async def test_a_facade_that_cannot_bind_costs_no_billing_data(
    tmp_path: Path, broker: Broker, ntp_port: int
) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    sim = SimulatedMeter.pmc1(load_kw=3600.0, kwh_per_count=KWH_PER_COUNT, initial_counts=1000)
    try:
        async with MeterServer({1: sim}) as server, collect(broker, "edged/#") as got:
            modbus_port = await server.start_tcp()
            facade = {
                "enabled": True,
                "listeners": [{"port": port, "devices": [{"device": "unit1"}]}],
            }
            config = daemon_config(tmp_path, broker.port, modbus_port, ntp_port, facade=facade)
            async with Daemon(config, tmp_path) as d:
                await got.wait_for(lambda c: len(intervals(c)) >= 3, 20, "3 intervals")
                assert await d.stop() == 0
    finally:
        taken.close()
    (event,) = [p for p in got.payloads("/gateway/event") if p["kind"] == "facade_failed"]
    assert event["details"]["listeners"] == [f"127.0.0.1:{port}"]
    assert all("facade" not in p for p in got.payloads("/gateway/status"))
    validate_messages(got.messages)
