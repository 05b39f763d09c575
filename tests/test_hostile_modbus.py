"""Hostile Modbus servers: a reply that is not exactly the answer to the
request sent is never decoded into a meter read (issue 20, defects 1 and 6).

Every reply here is built by hand from the Modbus specifications (application
protocol v1.1b3 6.3/6.4, messaging on TCP/IP v1.0b 3.1.3, serial line v1.02
2.5.1), not with edged's or pymodbus' encoders.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator

import pytest

from edged.config.schema import Device
from edged.core.model import ReadErrorKind
from edged.core.plan import plan_device
from edged.core.replies import ReceivedFrame, reply_problem
from edged.io.modbus import RtuOverTcpEndpoint, TcpEndpoint, read_device
from edged.sim.faults import Fault
from edged.sim.meter import MeterServer, SimulatedMeter
from edged.sim.modbus_frames import crc16_modbus

pytestmark = pytest.mark.integration

TIMEOUT_S = 0.2
GOOD = (0x0001, 0x86A0)  # 100000 counts as a big-endian uint32
GOOD_COUNTS = 100000


def _device() -> Device:
    return Device.model_validate(
        {
            "id": "d1",
            "transport": {"type": "tcp", "host": "127.0.0.1", "port": 502, "unit_id": 1},
            "channels": [{"name": "energy", "register": 0}],  # uint32 holding, fc 3
        }
    )


def _words(*words: int) -> bytes:
    return b"".join(struct.pack(">H", w) for w in words)


# (name, transform of (transaction id, unit id, request fc) -> MBAP reply)
# A correct reply to "fc 3, 2 registers" is: tid, 0, len=7, unit, 3, 4, 4 data bytes.
def _mbap(tid: int, unit: int, pdu: bytes, *, length: int | None = None) -> bytes:
    return struct.pack(">HHHB", tid, 0, length if length is not None else len(pdu) + 1, unit) + pdu


MBAP_HOSTILE = {
    # fc 4 (input registers) answering an fc 3 request, registers 0xDEAD 0xBEEF
    "wrong_function": lambda tid, unit: _mbap(tid, unit, bytes((4, 4)) + _words(0xDEAD, 0xBEEF)),
    # an odd byte count whose bytes are all there: pymodbus reads 2 registers
    "odd_byte_count": lambda tid, unit: _mbap(tid, unit, bytes((3, 5)) + _words(*GOOD) + b"\x00"),
    # the right byte count, but the frame carries two more bytes
    "trailing_bytes": lambda tid, unit: _mbap(tid, unit, bytes((3, 4)) + _words(*GOOD, 0xDEAD)),
    # three registers for a two-register request
    "extra_register": lambda tid, unit: _mbap(tid, unit, bytes((3, 6)) + _words(*GOOD, 0xDEAD)),
    # one register
    "short_register": lambda tid, unit: _mbap(tid, unit, bytes((3, 2)) + _words(0xDEAD)),
    # transaction id 0 whatever was asked (pymodbus lets 0 through)
    "transaction_zero": lambda tid, unit: _mbap(0, unit, bytes((3, 4)) + _words(0xDEAD, 0xBEEF)),
    # another transaction's id
    "wrong_transaction": lambda tid, unit: _mbap(
        (tid + 7) & 0xFFFF, unit, bytes((3, 4)) + _words(0xDEAD, 0xBEEF)
    ),
    # another unit's answer
    "wrong_unit": lambda tid, unit: _mbap(tid, unit + 1, bytes((3, 4)) + _words(0xDEAD, 0xBEEF)),
    # an exception reply with a trailing byte
    "long_exception": lambda tid, unit: _mbap(tid, unit, bytes((0x83, 4, 0))),
}


def _rtu(unit: int, pdu: bytes) -> bytes:
    body = bytes((unit,)) + pdu
    return body + struct.pack("<H", crc16_modbus(body))


RTU_HOSTILE = {
    "wrong_function": lambda unit: _rtu(unit, bytes((4, 4)) + _words(0xDEAD, 0xBEEF)),
    "odd_byte_count": lambda unit: _rtu(unit, bytes((3, 5)) + _words(*GOOD) + b"\x00"),
    "extra_register": lambda unit: _rtu(unit, bytes((3, 6)) + _words(*GOOD, 0xDEAD)),
    "wrong_unit": lambda unit: _rtu(unit + 1, bytes((3, 4)) + _words(0xDEAD, 0xBEEF)),
}


class HostileServer:
    """Answers each request with the reply `mode` names; mode None: correctly."""

    def __init__(self, rtu: bool) -> None:
        self.rtu = rtu
        self.mode: str | None = None
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                if self.rtu:
                    request = await reader.readexactly(8)
                    unit = request[0]
                    if self.mode is None:
                        reply = _rtu(unit, bytes((3, 4)) + _words(*GOOD))
                    else:
                        reply = RTU_HOSTILE[self.mode](unit)
                else:
                    request = await reader.readexactly(12)
                    tid, _pid, _len, unit = struct.unpack(">HHHB", request[:7])
                    if self.mode is None:
                        reply = _mbap(tid, unit, bytes((3, 4)) + _words(*GOOD))
                    else:
                        reply = MBAP_HOSTILE[self.mode](tid, unit)
                writer.write(reply)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def mbap_server() -> AsyncIterator[HostileServer]:
    server = HostileServer(rtu=False)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def rtu_server() -> AsyncIterator[HostileServer]:
    server = HostileServer(rtu=True)
    await server.start()
    yield server
    await server.stop()


@pytest.mark.parametrize("mode", sorted(MBAP_HOSTILE))
async def test_hostile_mbap_reply_is_never_a_read(mbap_server: HostileServer, mode: str) -> None:
    link = TcpEndpoint("127.0.0.1", mbap_server.port, TIMEOUT_S)
    plan = plan_device(_device()).boundary
    try:
        good = await read_device(link, 1, plan)
        assert good.error is None
        assert good.values["energy"] == GOOD_COUNTS
        mbap_server.mode = mode
        bad = await asyncio.wait_for(read_device(link, 1, plan), 3)
        assert bad.error is not None, f"{mode}: decoded as {dict(bad.values)}"
        assert bad.error.kind in (ReadErrorKind.MALFORMED, ReadErrorKind.TIMEOUT)
        assert dict(bad.values) == {}
        # the unit recovers: the next correct reply is read again
        mbap_server.mode = None
        link.scheduler.unit(1).backoff.record(ok=True, unresponsive=False, now_s=0)
        again = await asyncio.wait_for(read_device(link, 1, plan), 3)
        assert again.error is None
        assert again.values["energy"] == GOOD_COUNTS
    finally:
        await link.aclose()


@pytest.mark.parametrize("mode", sorted(RTU_HOSTILE))
async def test_hostile_rtu_reply_is_never_a_read(rtu_server: HostileServer, mode: str) -> None:
    link = RtuOverTcpEndpoint("127.0.0.1", rtu_server.port, TIMEOUT_S)
    plan = plan_device(_device()).boundary
    try:
        rtu_server.mode = mode
        bad = await asyncio.wait_for(read_device(link, 1, plan), 3)
        assert bad.error is not None, f"{mode}: decoded as {dict(bad.values)}"
        assert dict(bad.values) == {}
        rtu_server.mode = None
        link.scheduler.unit(1).backoff.record(ok=True, unresponsive=False, now_s=0)
        again = await asyncio.wait_for(read_device(link, 1, plan), 3)
        assert again.error is None
        assert again.values["energy"] == GOOD_COUNTS
    finally:
        await link.aclose()


def test_reply_problem_accepts_only_the_exact_answer() -> None:
    ok = ReceivedFrame(unit_id=1, transaction_id=9, pdu=bytes((3, 4, 0, 1, 0x86, 0xA0)))
    args = {"function": "holding", "count": 2, "unit_id": 1, "transaction_id": 9}
    assert reply_problem(ok, **args) is None  # type: ignore[arg-type]
    exc = ReceivedFrame(unit_id=1, transaction_id=9, pdu=bytes((0x83, 2)))
    assert reply_problem(exc, **args) is None  # type: ignore[arg-type]
    as_input = ReceivedFrame(unit_id=1, transaction_id=9, pdu=bytes((4, 4, 0, 1, 0x86, 0xA0)))
    assert "function code 4" in (reply_problem(as_input, **args) or "")  # type: ignore[arg-type]
    rtu = ReceivedFrame(unit_id=1, transaction_id=0, pdu=bytes((4, 2, 0, 7)))
    assert reply_problem(rtu, function="input", count=1, unit_id=1, transaction_id=None) is None
    assert reply_problem(None, **args) is not None  # type: ignore[arg-type]


async def test_slow_unit_does_not_poison_the_shared_gateway_link() -> None:
    """Unit 1 answers late, in pieces that straddle its timeout; unit 2 behind
    the same gateway connection must read correctly every time and never be
    backed off for unit 1's failures (defect 6)."""
    meters = {
        1: SimulatedMeter.pmc1(initial_counts=1000),
        2: SimulatedMeter.pmc1(initial_counts=2000),
    }
    async with MeterServer(meters) as server:
        port = await server.start_tcp()
        link = TcpEndpoint("127.0.0.1", port, TIMEOUT_S)
        link.register_unit(1, TIMEOUT_S)
        link.register_unit(2, TIMEOUT_S)
        plan = plan_device(_device()).boundary
        # the first piece arrives just before the timeout, the rest trickles after
        meters[1].set_fault(Fault.delay(TIMEOUT_S * 0.8))
        meters[1].set_fault(Fault.split(pieces=4, pause_s=TIMEOUT_S * 0.4))
        try:
            for _ in range(4):
                slow, healthy = await asyncio.gather(
                    read_device(link, 1, plan), read_device(link, 2, plan)
                )
                assert healthy.error is None, healthy.error
                assert healthy.values["energy"] // 1000 == 2
                # the slow unit is never decoded from a mixture of frames
                if slow.error is None:
                    assert slow.values["energy"] // 1000 == 1
            assert 2 not in link.status()["units_offline"]
        finally:
            await link.aclose()
