"""The lean Modbus TCP client (edged.io.mbapclient) and the TCP link built on it.

Checked three ways, never against itself:

* against pymodbus' own server (pymodbus.server.ModbusTcpServer), values put
  in its datastore by hand;
* against edged's independent raw-framing simulator (edged.sim.meter);
* against a raw socket server answering with frames written here by hand from
  the Modbus messaging on TCP/IP guide v1.0b (MBAP: tid, protocol 0, length =
  unit + PDU, unit) and the application protocol v1.1b3 (fc 3: byte count,
  registers big-endian): wrong transaction id, short frame, wrong length
  field, wrong unit, exception reply, a reply split across TCP segments, two
  replies in one segment, a connection reset mid-reply, a reply after the
  timeout.

Plus the protocol's framing alone, bytes in by hand, no socket.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from edged.config.schema import Device
from edged.core.model import ReadError, ReadErrorKind
from edged.core.plan import plan_device
from edged.core.registers import ReadPlan
from edged.core.replies import ReceivedFrame
from edged.io.bus import Priority
from edged.io.clock import BoundaryWaiter, SystemClock
from edged.io.mbapclient import MbapClientProtocol, encode_read
from edged.io.modbus import TcpEndpoint, read_device
from edged.sim.faults import Fault
from edged.sim.meter import MeterServer, SimulatedMeter, StaticPoint
from edged.sim.modbus_frames import DataType

TIMEOUT_S = 0.3


def _plan(function: str = "holding", unit_id: int = 1) -> ReadPlan:
    """One uint32 'energy' at register 0 (2 registers, big-endian words)."""
    return plan_device(
        Device.model_validate(
            {
                "id": "d1",
                "transport": {"type": "tcp", "host": "127.0.0.1", "port": 502, "unit_id": unit_id},
                "channels": [{"name": "energy", "register": 0, "function": function}],
            }
        )
    ).boundary


# ---------------------------------------------------------------------------
# Framing alone


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.sent.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def test_read_request_frame_is_the_spec_frame() -> None:
    # fc 3, unit 17, address 0x006B, 3 registers: the application protocol's
    # own example PDU (03 006B 0003), MBAP length 6.
    assert encode_read(17, "holding", 0x6B, 3) == bytes.fromhex("0000 0006 11 03 006B 0003")
    assert encode_read(1, "input", 8, 2) == bytes.fromhex("0000 0006 01 04 0008 0002")
    with pytest.raises(KeyError):
        encode_read(1, "coils", 0, 1)


async def test_frames_are_cut_by_their_mbap_length_whatever_the_segments() -> None:
    loop = asyncio.get_running_loop()
    protocol = MbapClientProtocol(loop, "t")
    transport = _Transport()
    protocol.connection_made(transport)
    reply = bytes.fromhex("0001 0000 0007 01 03 04 0001 86A0")
    pending = asyncio.ensure_future(protocol.exchange(encode_read(1, "holding", 0, 2), 1.0))
    await asyncio.sleep(0)
    assert transport.sent == [bytes.fromhex("0001 0000 0006 01 03 0000 0002")]
    for byte in reply:  # one byte per segment
        protocol.data_received(bytes((byte,)))
    frame = await pending
    assert frame == ReceivedFrame(1, 1, bytes.fromhex("03 04 0001 86A0"))
    # Two frames in one segment: the first answers, the second arrives with
    # nothing pending and is dropped, not kept for the next request.
    pending = asyncio.ensure_future(protocol.exchange(encode_read(1, "holding", 0, 2), 1.0))
    await asyncio.sleep(0)
    second = bytes.fromhex("0002 0000 0007 01 03 04 0000 0005")
    stray = bytes.fromhex("0063 0000 0007 01 03 04 DEAD BEEF")
    protocol.data_received(second + stray)
    assert await pending == ReceivedFrame(1, 2, bytes.fromhex("03 04 0000 0005"))
    assert protocol.dropped == 1


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        ("0001 0001 0007 01", "protocol id 1"),
        ("0001 0000 0001 01", "length 1"),
        ("0001 0000 00FF 01", "length 255"),
    ],
)
async def test_a_header_that_cannot_be_modbus_fails_the_read_and_closes(
    header: str, problem: str
) -> None:
    protocol = MbapClientProtocol(asyncio.get_running_loop(), "t")
    transport = _Transport()
    protocol.connection_made(transport)
    pending = asyncio.ensure_future(protocol.exchange(encode_read(1, "holding", 0, 2), 1.0))
    await asyncio.sleep(0)
    protocol.data_received(bytes.fromhex(header + " 03 04 0001 86A0"))
    error = await pending
    assert isinstance(error, ReadError)
    assert error.kind is ReadErrorKind.MALFORMED
    assert problem in error.detail
    assert transport.closed
    assert protocol.closed


async def test_no_answer_is_a_timeout_and_a_late_reply_answers_nothing() -> None:
    protocol = MbapClientProtocol(asyncio.get_running_loop(), "t")
    protocol.connection_made(_Transport())
    error = await protocol.exchange(encode_read(1, "holding", 0, 2), 0.01)
    assert isinstance(error, ReadError)
    assert error.kind is ReadErrorKind.TIMEOUT
    protocol.data_received(bytes.fromhex("0001 0000 0007 01 03 04 0001 86A0"))
    assert protocol.dropped == 1


async def test_connection_lost_mid_reply_is_a_connection_error() -> None:
    protocol = MbapClientProtocol(asyncio.get_running_loop(), "t")
    protocol.connection_made(_Transport())
    pending = asyncio.ensure_future(protocol.exchange(encode_read(1, "holding", 0, 2), 1.0))
    await asyncio.sleep(0)
    protocol.data_received(bytes.fromhex("0001 0000 0007 01 03"))
    protocol.connection_lost(ConnectionResetError(104, "reset"))
    error = await pending
    assert isinstance(error, ReadError)
    assert error.kind is ReadErrorKind.CONNECTION
    again = await protocol.exchange(encode_read(1, "holding", 0, 2), 1.0)
    assert isinstance(again, ReadError)
    assert again.kind is ReadErrorKind.CONNECTION


# ---------------------------------------------------------------------------
# Against pymodbus' own server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
async def pymodbus_server() -> AsyncIterator[int]:
    from pymodbus import datastore
    from pymodbus.server import ModbusTcpServer

    # (pymodbus' datastore is untyped.)
    block: Any = datastore.ModbusSequentialDataBlock
    device: Any = datastore.ModbusDeviceContext
    context: Any = datastore.ModbusServerContext

    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    # pymodbus' sequential blocks are 1-based: register 0 on the wire is the
    # block's address 1.
    devices: dict[int, Any] = {
        7: device(
            hr=block(1, [0x0001, 0x86A0, 0x0000, 0x0005]),
            ir=block(1, [0x0012, 0xD687]),
        )
    }
    port = _free_port()
    server = ModbusTcpServer(context(devices=devices, single=False),
                             address=("127.0.0.1", port))  # fmt: skip
    task = asyncio.create_task(server.serve_forever())
    for _ in range(100):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.02)
            continue
        writer.close()
        break
    try:
        yield port
    finally:
        stop: Any = server.shutdown
        await stop()
        task.cancel()


@pytest.mark.integration
async def test_reads_from_pymodbus_server(pymodbus_server: int) -> None:
    link = TcpEndpoint("127.0.0.1", pymodbus_server, TIMEOUT_S)
    try:
        holding = await read_device(link, 7, _plan("holding"))
        assert holding.error is None
        assert holding.values["energy"] == 100000  # 0x0001_86A0
        assert holding.registers == ((0, (0x0001, 0x86A0)),)
        fast = await read_device(link, 7, _plan("input"), priority=Priority.FAST)
        assert fast.error is None
        assert fast.values["energy"] == 1234567  # 0x0012_D687
        # Many reads in a row on one connection: transaction ids move on.
        for _ in range(20):
            again = await read_device(link, 7, _plan("holding"))
            assert again.values["energy"] == 100000
        assert link.status()["transactions"] == 22
        assert link.status()["failures"] == 0
    finally:
        await link.aclose()


@pytest.mark.integration
async def test_pymodbus_server_exception_is_an_exception_read(pymodbus_server: int) -> None:
    plan = plan_device(
        Device.model_validate(
            {
                "id": "d1",
                "transport": {"type": "tcp", "host": "127.0.0.1", "port": 502, "unit_id": 7},
                "channels": [{"name": "energy", "register": 100}],  # beyond the datastore
            }
        )
    ).boundary
    link = TcpEndpoint("127.0.0.1", pymodbus_server, TIMEOUT_S)
    try:
        refused = await read_device(link, 7, plan)
        assert refused.error is not None
        assert refused.error.kind is ReadErrorKind.EXCEPTION
        assert refused.error.exception_code == 2  # illegal data address
        # an exception is an answer: the connection carries on
        good = await read_device(link, 7, _plan())
        assert good.values["energy"] == 100000
    finally:
        await link.aclose()


# ---------------------------------------------------------------------------
# Against edged's raw-framing simulator


def _static_meter(counts: int) -> SimulatedMeter:
    return SimulatedMeter([StaticPoint(name="energy", address=0, value=counts,
                                       data_type=DataType.UINT32)])  # fmt: skip


@pytest.mark.integration
async def test_reads_from_the_simulator_including_split_and_exception() -> None:
    meters = {1: _static_meter(305419896), 2: _static_meter(7)}
    async with MeterServer(meters) as server:
        port = await server.start_tcp()
        link = TcpEndpoint("127.0.0.1", port, TIMEOUT_S)
        link.set_units([(1, TIMEOUT_S), (2, TIMEOUT_S)])
        try:
            one, two = await asyncio.gather(
                read_device(link, 1, _plan(unit_id=1)), read_device(link, 2, _plan(unit_id=2))
            )
            assert one.values["energy"] == 305419896
            assert two.values["energy"] == 7
            meters[1].set_fault(Fault.split(pieces=4, pause_s=0.01))
            split = await read_device(link, 1, _plan(unit_id=1))
            assert split.error is None
            assert split.values["energy"] == 305419896
            meters[1].clear_faults()
            meters[2].set_fault(Fault.exception(6))
            busy = await read_device(link, 2, _plan(unit_id=2))
            assert busy.error is not None
            assert busy.error.kind is ReadErrorKind.EXCEPTION
            assert busy.error.exception_code == 6
            meters[2].clear_faults()
            assert (await read_device(link, 2, _plan(unit_id=2))).values["energy"] == 7
        finally:
            await link.aclose()


# ---------------------------------------------------------------------------
# Hostile replies, by hand


def _reply(tid: int, unit: int, words: tuple[int, ...] = (0x0001, 0x86A0)) -> bytes:
    pdu = bytes((3, 2 * len(words))) + b"".join(struct.pack(">H", w) for w in words)
    return struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu


Answer = Callable[[int, int], bytes | None]


class RawServer:
    """Answers each 12-byte request through `answer(tid, unit)`; special
    answers: 'split' (byte by byte), 'reset' (half a reply, then RST),
    'late' (after the client's timeout)."""

    def __init__(self) -> None:
        self.mode = "good"
        self.port = 0
        self.connections = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                request = await reader.readexactly(12)
                tid, _pid, _length, unit = struct.unpack(">HHHB", request[:7])
                good = _reply(tid, unit)
                mode = self.mode
                if mode == "good":
                    writer.write(good)
                elif mode == "wrong_tid":
                    writer.write(_reply((tid + 1) & 0xFFFF, unit, (0xDEAD, 0xBEEF)))
                elif mode == "wrong_unit":
                    writer.write(_reply(tid, unit + 1, (0xDEAD, 0xBEEF)))
                elif mode == "short":  # the header promises 7 bytes, 4 come
                    writer.write(good[:-3])
                elif mode == "wrong_length":  # length 9: two bytes too many
                    writer.write(good[:4] + struct.pack(">H", 9) + good[6:] + b"\xde\xad")
                elif mode == "exception":
                    writer.write(struct.pack(">HHHB", tid, 0, 3, unit) + bytes((0x83, 0x04)))
                elif mode == "split":
                    for byte in good:
                        writer.write(bytes((byte,)))
                        await writer.drain()
                        await asyncio.sleep(0.001)
                elif mode == "two":  # the reply and a stale copy in one segment
                    writer.write(good + _reply((tid - 1) & 0xFFFF, unit, (0xDEAD, 0xBEEF)))
                elif mode == "late":
                    await asyncio.sleep(TIMEOUT_S * 1.5)
                    writer.write(_reply(tid, unit, (0xDEAD, 0xBEEF)))
                elif mode == "reset":
                    writer.write(good[:9])
                    await writer.drain()
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def raw_server() -> AsyncIterator[RawServer]:
    server = RawServer()
    await server.start()
    yield server
    server.stop()


EXPECTED = {
    "wrong_tid": (ReadErrorKind.MALFORMED, "transaction id"),
    "wrong_unit": (ReadErrorKind.MALFORMED, "unit 2"),
    "short": (ReadErrorKind.TIMEOUT, "no answer within"),
    "wrong_length": (ReadErrorKind.MALFORMED, "data bytes"),
    "exception": (ReadErrorKind.EXCEPTION, "modbus exception 4"),
    "late": (ReadErrorKind.TIMEOUT, "no answer within"),
    "reset": (ReadErrorKind.CONNECTION, "connection lost"),
}


@pytest.mark.integration
@pytest.mark.parametrize("mode", sorted(EXPECTED))
async def test_hostile_reply_is_flagged_and_the_link_recovers(
    raw_server: RawServer, mode: str
) -> None:
    link = TcpEndpoint("127.0.0.1", raw_server.port, TIMEOUT_S)
    plan = _plan()
    try:
        assert (await read_device(link, 1, plan)).values["energy"] == 100000
        raw_server.mode = mode
        bad = await asyncio.wait_for(read_device(link, 1, plan), 3)
        kind, text = EXPECTED[mode]
        assert bad.error is not None, f"{mode}: decoded as {dict(bad.values)}"
        assert bad.error.kind is kind
        assert text in bad.error.detail
        assert dict(bad.values) == {}
        raw_server.mode = "good"
        link.scheduler.unit(1).backoff.record(ok=True, unresponsive=False, now_s=0)
        again = await asyncio.wait_for(read_device(link, 1, plan), 3)
        assert again.error is None
        assert again.values["energy"] == 100000
        # an exception reply is an answer: the connection is kept; everything
        # else starts a new one
        assert raw_server.connections == (1 if mode == "exception" else 2)
    finally:
        await link.aclose()


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["split", "two"])
async def test_split_and_doubled_replies_read_correctly(raw_server: RawServer, mode: str) -> None:
    link = TcpEndpoint("127.0.0.1", raw_server.port, TIMEOUT_S)
    raw_server.mode = mode
    try:
        for _ in range(3):
            read = await asyncio.wait_for(read_device(link, 1, _plan()), 3)
            assert read.error is None
            assert read.values["energy"] == 100000
        assert raw_server.connections == 1
    finally:
        await link.aclose()


@pytest.mark.integration
async def test_unreachable_endpoint_backs_off_its_reconnects() -> None:
    link = TcpEndpoint("127.0.0.1", _free_port(), TIMEOUT_S)
    try:
        first = await read_device(link, 1, _plan())
        assert first.error is not None
        assert first.error.kind is ReadErrorKind.CONNECTION
        assert first.error.detail.startswith(f"cannot connect to {link.name}")
        # the next attempt waits for the backoff (0.5 s), without touching the network
        second = await read_device(link, 1, _plan())
        assert second.error is not None
        assert "next attempt in" in second.error.detail
    finally:
        await link.aclose()


# ---------------------------------------------------------------------------
# Requests sent at the boundary instant (ScheduledLink.presend)


@pytest.mark.integration
async def test_boundary_request_goes_out_at_the_instant_and_the_read_claims_it() -> None:
    async with MeterServer({1: _static_meter(4242)}) as server:
        link = TcpEndpoint("127.0.0.1", await server.start_tcp(), TIMEOUT_S)
        plan = _plan()
        waiter = BoundaryWaiter(SystemClock())
        try:
            assert (await read_device(link, 1, plan)).values["energy"] == 4242  # connects
            target = datetime.now(UTC) + timedelta(seconds=0.1)
            sent: list[bool] = []
            waiter.at_instant(target, lambda: sent.append(link.presend(1, plan.requests)))
            await waiter.wait(target)
            assert sent == [True]
            # the request is on the wire before the read is asked for
            await asyncio.sleep(0.05)
            read = await read_device(link, 1, plan)
            assert read.error is None
            assert read.values["energy"] == 4242
            assert read.queued_s < -0.04  # it went out ~50 ms before it was asked for
            assert link.status()["transactions"] == 2  # counted once, not twice
            assert link.status()["last_wave_devices"] == 1
        finally:
            await link.aclose()


@pytest.mark.integration
async def test_presend_only_where_the_read_would_go_out_at_once() -> None:
    async with MeterServer({1: _static_meter(1), 2: _static_meter(2)}) as server:
        port = await server.start_tcp()
        plan = _plan()
        unconnected = TcpEndpoint("127.0.0.1", port, TIMEOUT_S)
        gateway = TcpEndpoint("127.0.0.1", port, TIMEOUT_S)
        gateway.set_units([(1, TIMEOUT_S), (2, TIMEOUT_S)])
        try:
            assert not unconnected.presend(1, plan.requests)  # no connection yet
            assert (await read_device(gateway, 1, plan)).error is None
            # two units on one line: the scheduler orders them, nothing is sent ahead
            assert not gateway.presend(1, plan.requests)
        finally:
            await unconnected.aclose()
            await gateway.aclose()


@pytest.mark.integration
async def test_a_read_queued_behind_a_presend_waits_and_then_goes() -> None:
    async with MeterServer({1: _static_meter(77)}) as server:
        link = TcpEndpoint("127.0.0.1", await server.start_tcp(), TIMEOUT_S)
        plan = _plan()
        fast_plan = _plan("holding")  # other objects: not the presend's requests
        try:
            assert (await read_device(link, 1, plan)).error is None
            assert link.presend(1, plan.requests)
            fast = asyncio.ensure_future(read_device(link, 1, fast_plan, priority=Priority.FAST))
            await asyncio.sleep(0.02)
            assert not fast.done()  # the line is the presend's until it is claimed
            boundary = await read_device(link, 1, plan)
            assert boundary.values["energy"] == 77
            assert (await asyncio.wait_for(fast, 2)).values["energy"] == 77
        finally:
            await link.aclose()


@pytest.mark.integration
async def test_an_unclaimed_presend_releases_the_line_after_its_timeout() -> None:
    async with MeterServer({1: _static_meter(5)}) as server:
        link = TcpEndpoint("127.0.0.1", await server.start_tcp(), TIMEOUT_S)
        plan = _plan()
        try:
            assert (await read_device(link, 1, plan)).error is None
            assert link.presend(1, plan.requests)  # and its poller never asks
            late = await asyncio.wait_for(
                read_device(link, 1, _plan(), priority=Priority.FAST), TIMEOUT_S + 3
            )
            assert late.error is None
            assert late.values["energy"] == 5
            assert link.status()["failures"] == 1  # the abandoned read
        finally:
            await link.aclose()


async def test_a_failing_boundary_hook_does_not_stop_the_others() -> None:
    waiter = BoundaryWaiter(SystemClock())
    target = datetime.now(UTC) + timedelta(seconds=0.02)
    called: list[str] = []

    def broken() -> None:
        raise RuntimeError("boom")

    waiter.at_instant(target, broken)
    waiter.at_instant(target, lambda: called.append("second"))
    lateness_ms = await waiter.wait(target)
    assert lateness_ms >= 0
    assert called == ["second"]


@pytest.mark.integration
async def test_a_stale_presend_never_answers_a_later_read() -> None:
    meter = _static_meter(5)
    async with MeterServer({1: meter}) as server:
        link = TcpEndpoint("127.0.0.1", await server.start_tcp(), TIMEOUT_S)
        plan = _plan()
        try:
            assert (await read_device(link, 1, plan)).error is None
            assert link.presend(1, plan.requests)  # answered with 5, never claimed
            await asyncio.sleep(0.1)
            meter.set_static("energy", 6)
            await asyncio.sleep(TIMEOUT_S + 0.6)  # past its timeout and the guard
            # the same requests, as the same poller would ask: a fresh answer
            read = await read_device(link, 1, plan)
            assert read.error is None
            assert read.values["energy"] == 6
            assert read.queued_s >= 0
        finally:
            await link.aclose()
