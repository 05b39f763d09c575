"""The simulators: pure framing/encoding, the meter over real sockets and a pty
with the real pymodbus clients, fault injection, scenarios, the NTP server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import struct
import sys
import time
import tty
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import ntplib
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException
from pymodbus.framer.rtu import FramerRTU

from edged.sim.faults import Fault, FaultKind
from edged.sim.meter import (
    ClockPoint,
    CounterPoint,
    MeterServer,
    SimulatedMeter,
    StaticPoint,
    StatusPoint,
    Table,
    UnknownUnitPolicy,
    paced_write,
)
from edged.sim.modbus_frames import (
    DataType,
    Order,
    RtuRequestAssembler,
    char_time_s,
    crc16_modbus,
    decode_value,
    encode_value,
    frame_gap_s,
    mbap_frame,
    read_request_pdu,
    rtu_crc_ok,
    rtu_frame,
)
from edged.sim.ntp import NtpServer, build_reply, from_ntp_timestamp, to_ntp_timestamp
from edged.sim.scenario import (
    Action,
    ActionKind,
    ScenarioError,
    due_actions,
    load_scenario,
    next_due_s,
    parse_action_flag,
    parse_duration,
    parse_scenario,
)

REPO = Path(__file__).resolve().parents[1]
T0 = 1_763_683_200.0  # 2025-11-21T00:00:00Z, an interval boundary
CLIENT_TIMEOUT_S = 0.3


class FakeClock:
    """Injected meter time: tests move it, nothing sleeps."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@contextlib.asynccontextmanager
async def tcp_client(
    port: int, framer: FramerType = FramerType.SOCKET, reply_timeout_s: float = CLIENT_TIMEOUT_S
) -> AsyncIterator[AsyncModbusTcpClient]:
    client = AsyncModbusTcpClient(
        "127.0.0.1", port=port, framer=framer, timeout=reply_timeout_s, retries=0
    )
    assert await client.connect()
    try:
        yield client
    finally:
        client.close()


@contextlib.asynccontextmanager
async def serve(
    meters: dict[int, SimulatedMeter], **kwargs: Any
) -> AsyncIterator[tuple[MeterServer, int]]:
    async with MeterServer(meters, **kwargs) as server:
        yield server, await server.start_tcp("127.0.0.1", 0)


def assert_exception(response: Any, code: int) -> None:
    assert response.isError(), response
    assert response.exception_code == code, response


async def read_u32(client: Any, unit: int = 1, address: int = 0) -> int:
    response = await client.read_holding_registers(address, count=2, device_id=unit)
    assert not response.isError(), response
    value: int = client.convert_from_registers(
        response.registers, client.DATATYPE.UINT32, word_order="big"
    )
    return value


# ---------------------------------------------------------------------------------
# Pure framing and encoding
# ---------------------------------------------------------------------------------


def test_crc_matches_the_spec_example_and_pymodbus() -> None:
    # Modbus over serial line guide: "01 03 00 00 00 0A" carries CRC "C5 CD".
    assert rtu_frame(1, bytes.fromhex("030000000a")).hex() == "01030000000ac5cd"
    for body in (b"\x11\x03\x00\x6b\x00\x03", bytes(range(40)), b"\xff" * 7):
        assert crc16_modbus(body) == int.from_bytes(
            FramerRTU.compute_CRC(body).to_bytes(2, "big"), "little"
        )
    frame = rtu_frame(7, b"\x03\x00\x00\x00\x02")
    assert rtu_crc_ok(frame)
    assert not rtu_crc_ok(frame[:-1] + bytes([frame[-1] ^ 1]))


@pytest.mark.parametrize(
    ("word_order", "byte_order", "expected"),
    [
        ("big", "big", (0x1122, 0x3344)),  # ABCD
        ("little", "big", (0x3344, 0x1122)),  # CDAB
        ("big", "little", (0x2211, 0x4433)),  # BADC
        ("little", "little", (0x4433, 0x2211)),  # DCBA
    ],
)
def test_register_orders(word_order: Order, byte_order: Order, expected: tuple[int, int]) -> None:
    assert encode_value(0x11223344, DataType.UINT32, word_order, byte_order) == expected
    assert decode_value(expected, DataType.UINT32, word_order, byte_order) == 0x11223344


_PYMODBUS_TYPES = {
    DataType.UINT16: AsyncModbusTcpClient.DATATYPE.UINT16,
    DataType.INT16: AsyncModbusTcpClient.DATATYPE.INT16,
    DataType.UINT32: AsyncModbusTcpClient.DATATYPE.UINT32,
    DataType.INT32: AsyncModbusTcpClient.DATATYPE.INT32,
    DataType.UINT64: AsyncModbusTcpClient.DATATYPE.UINT64,
    DataType.INT64: AsyncModbusTcpClient.DATATYPE.INT64,
    DataType.FLOAT32: AsyncModbusTcpClient.DATATYPE.FLOAT32,
    DataType.FLOAT64: AsyncModbusTcpClient.DATATYPE.FLOAT64,
}


def _in_range(data_type: DataType) -> st.SearchStrategy[int | float]:
    if data_type is DataType.FLOAT32:
        return st.floats(width=32, allow_nan=False, allow_infinity=False)
    if data_type is DataType.FLOAT64:
        return st.floats(allow_nan=False, allow_infinity=False)
    bits = 16 * data_type.register_count
    if data_type.is_signed:
        return st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return st.integers(0, 2**bits - 1)


@given(
    data=st.data(),
    data_type=st.sampled_from(list(DataType)),
    word_order=st.sampled_from(["big", "little"]),
    byte_order=st.sampled_from(["big", "little"]),
)
def test_encoding_round_trips_and_agrees_with_pymodbus(
    data: st.DataObject, data_type: DataType, word_order: Order, byte_order: Order
) -> None:
    value = data.draw(_in_range(data_type))
    registers = encode_value(value, data_type, word_order, byte_order)
    assert len(registers) == data_type.register_count
    assert all(0 <= r <= 0xFFFF for r in registers)
    assert decode_value(registers, data_type, word_order, byte_order) == value
    if byte_order == "big":  # pymodbus only knows big-endian bytes within a word
        decoded = AsyncModbusTcpClient.convert_from_registers(
            list(registers), _PYMODBUS_TYPES[data_type], word_order=word_order
        )
        assert decoded == value


def test_rtu_assembler_cuts_frames_by_length_crc_and_silence() -> None:
    request = rtu_frame(1, read_request_pdu(3, 0, 2))
    assembler = RtuRequestAssembler()
    # byte by byte: nothing until the 8th byte
    assert [assembler.feed(bytes([b])) for b in request[:-1]] == [[]] * 7
    assert assembler.feed(request[-1:]) == [request]
    # line noise in front, two frames back to back in one read
    second = rtu_frame(2, read_request_pdu(4, 10, 1))
    assert assembler.feed(b"\x00\xff\x13" + request + second) == [request, second]
    assert assembler.pending == b""
    # fc16 length comes from its byte count
    write = rtu_frame(1, bytes.fromhex("1000000002" + "04" + "00010002"))
    assert assembler.feed(write) == [write]
    # an unknown function: only the silence ends it; a cut frame is dropped
    odd = rtu_frame(1, b"\x41\x01\x02")
    assert assembler.feed(odd) == []
    assert assembler.silence() == [odd]
    assert assembler.feed(request[:5]) == []
    assert assembler.silence() == []
    assert assembler.feed(request) == [request]


def test_character_and_gap_times() -> None:
    assert char_time_s(9600, "E", 1) == pytest.approx(11 / 9600)
    assert char_time_s(9600, "N", 2) == pytest.approx(11 / 9600)
    assert char_time_s(19200, "N", 1) == pytest.approx(10 / 19200)
    assert frame_gap_s(9600, "E", 1) == pytest.approx(3.5 * 11 / 9600)
    assert frame_gap_s(115200) == 0.00175  # fixed above 19200 baud
    with pytest.raises(ValueError, match="parity"):
        char_time_s(9600, "X", 1)


async def test_paced_write_takes_as_long_as_the_line() -> None:
    chunks: list[bytes] = []
    char_s = char_time_s(1200, "E", 1)  # 9.17 ms per character
    loop = asyncio.get_running_loop()
    start = loop.time()
    await paced_write(chunks.append, bytes(range(12)), char_s)
    elapsed = loop.time() - start
    assert b"".join(chunks) == bytes(range(12))
    assert 12 * char_s - 0.002 <= elapsed < 12 * char_s + 0.1
    assert len(chunks) > 1  # delivered progressively, not in one go


async def test_paced_write_hands_no_byte_over_before_its_time_on_the_wire() -> None:
    loop = asyncio.get_running_loop()
    char_s = char_time_s(38400, "E", 1)  # 0.29 ms: shorter than the loop's 1 ms sleeps
    writes: list[tuple[float, bytes]] = []
    start_s = loop.time() + 0.005  # a reply to a request whose last byte is 5 ms away
    await paced_write(lambda b: writes.append((loop.time(), b)), bytes(range(9)), char_s,
                      start_s=start_s)  # fmt: skip
    assert b"".join(b for _, b in writes) == bytes(range(9))
    sent = 0
    for at_s, chunk in writes:
        sent += len(chunk)
        assert at_s >= start_s + sent * char_s


# ---------------------------------------------------------------------------------
# Meter model (no sockets)
# ---------------------------------------------------------------------------------


def test_counter_reproduces_the_pmc1_worked_example(clock: FakeClock) -> None:
    # 1754 pulses x 0.144 kWh = 252.576 kWh in 15 min = 1010.304 kW
    meter = SimulatedMeter.pmc1(load_kw=1010.304, initial_counts=1_000_000, now_s=clock)
    assert meter.counts() == 1_000_000
    clock.advance(900)
    assert meter.counts() == 1_001_754  # exact at the boundary, not 1_001_753
    clock.advance(900)
    assert meter.counts() == 1_003_508


def test_counter_load_change_keeps_the_fractional_pulse(clock: FakeClock) -> None:
    meter = SimulatedMeter.pmc1(load_kw=1000, kwh_per_count=1, now_s=clock)
    clock.advance(1.8)  # 0.5 kWh: half a pulse
    assert meter.counts() == 0
    meter.set_load(2000)
    clock.advance(0.9)  # +0.5 kWh: the pulse completes
    assert meter.counts() == 1
    assert meter.load_kw() == 2000
    clock.advance(-100)  # the time source steps back: counted pulses stay counted
    assert meter.counts() == 1
    clock.advance(100 + 1.8)  # and the counter resumes from where it was
    assert meter.counts() == 2


def test_counter_rolls_over_resets_and_jumps(clock: FakeClock) -> None:
    meter = SimulatedMeter.pmc1(load_kw=3600, kwh_per_count=1, now_s=clock)  # 1 count/s
    meter.set_counts(2**32 - 3)
    clock.advance(5)
    assert meter.counts() == 2
    meter.set_counts(0)
    assert meter.counts() == 0
    clock.advance(10)
    assert meter.counts() == 10
    small = SimulatedMeter(
        [CounterPoint(load_kw=3600, kwh_per_count=1, rollover=1000)], now_s=clock
    )
    clock.advance(1234)
    assert small.counts() == 234


def test_register_map_validation(clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="overlaps"):
        SimulatedMeter(
            [CounterPoint(address=0), StaticPoint(name="x", address=1, value=5)], now_s=clock
        )
    with pytest.raises(ValueError, match="unique"):
        SimulatedMeter([CounterPoint(), CounterPoint(address=10)], now_s=clock)
    with pytest.raises(ValueError, match="address"):
        CounterPoint(address=65535)
    with pytest.raises(ValueError, match="kwh_per_count"):
        CounterPoint(kwh_per_count=0)


def test_fault_windows_run_on_meter_time(clock: FakeClock) -> None:
    meter = SimulatedMeter.pmc1(now_s=clock)
    meter.set_fault(Fault.silent(), for_s=15)
    meter.set_fault(Fault.delay(0.5))
    assert set(meter.active_faults()) == {FaultKind.SILENT, FaultKind.DELAY}
    clock.advance(15)
    assert set(meter.active_faults()) == {FaultKind.DELAY}
    meter.clear_faults(FaultKind.DELAY)
    assert meter.active_faults() == {}
    with pytest.raises(ValueError, match="pieces"):
        Fault.split(pieces=1)


# ---------------------------------------------------------------------------------
# Modbus TCP with the real pymodbus client
# ---------------------------------------------------------------------------------


@pytest.mark.integration
async def test_tcp_counter_decodes_and_advances_with_load(clock: FakeClock) -> None:
    meter = SimulatedMeter.pmc1(load_kw=1010.304, initial_counts=1_000_000, now_s=clock)
    async with serve({1: meter}) as (_server, port), tcp_client(port) as client:
        start = await read_u32(client)
        clock.advance(900)
        end = await read_u32(client)
    assert (start, end) == (1_000_000, 1_001_754)
    energy_kwh = (end - start) * 0.144
    assert energy_kwh == pytest.approx(252.576)
    assert energy_kwh / 0.25 == pytest.approx(1010.304)
    assert list(meter.request_times_s) == [T0, T0 + 900]


@pytest.mark.integration
async def test_tcp_counter_advances_in_real_time() -> None:
    # 3600 kW at 0.001 kWh/count: 1000 counts per second of wall time
    meter = SimulatedMeter.pmc1(load_kw=3600, kwh_per_count=0.001)
    async with serve({1: meter}) as (_server, port), tcp_client(port) as client:
        first = await read_u32(client)
        t0 = time.time()
        await asyncio.sleep(0.2)
        second = await read_u32(client)
        elapsed_s = time.time() - t0
    assert second - first == pytest.approx(1000 * elapsed_s, abs=30)


@pytest.mark.integration
async def test_tcp_several_units_and_unknown_unit(clock: FakeClock) -> None:
    meters = {
        unit: SimulatedMeter.pmc1(
            load_kw=3600 * unit, kwh_per_count=1, initial_counts=100 * unit, now_s=clock
        )
        for unit in (1, 2, 3)
    }
    async with serve(meters) as (_server, port), tcp_client(port) as client:
        clock.advance(10)
        values = {unit: await read_u32(client, unit) for unit in (1, 2, 3)}
        unknown = await client.read_holding_registers(0, count=2, device_id=9)
    assert values == {1: 110, 2: 220, 3: 330}
    assert_exception(unknown, 11)


@pytest.mark.integration
async def test_unknown_unit_policies(clock: FakeClock) -> None:
    meter = SimulatedMeter.pmc1(now_s=clock, initial_counts=42)
    async with (
        serve({5: meter}, unknown_unit=UnknownUnitPolicy.SILENT) as (_s, port),
        tcp_client(port) as client,
    ):
        # unit 255 (and 0) reach the only meter, as on a real TCP meter
        assert await read_u32(client, 255) == 42
        with pytest.raises(ModbusException):
            await client.read_holding_registers(0, count=2, device_id=6)
    async with serve({5: meter}, unknown_unit=UnknownUnitPolicy.CLOSE) as (_s, port):
        meter.set_fault(Fault.offline())
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(mbap_frame(1, 5, read_request_pdu(3, 0, 2)))
        assert await asyncio.wait_for(reader.read(), 1) == b""  # dropped, like a dead meter
        writer.close()


@pytest.mark.integration
async def test_tcp_types_orders_tables_clock_and_status(clock: FakeClock) -> None:
    meter = SimulatedMeter(
        [
            CounterPoint(
                address=0,
                data_type=DataType.FLOAT32,
                word_order="little",
                load_kw=3600,
                kwh_per_count=1,
            ),
            CounterPoint(
                name="export",
                address=10,
                table=Table.INPUT,
                data_type=DataType.UINT64,
                word_order="little",
                byte_order="little",
                initial_counts=2**40,
                rollover=2**64,
                load_kw=0,
            ),
            StaticPoint(name="voltage", address=20, value=-5, data_type=DataType.INT16),
            StaticPoint(name="frequency", address=21, value=50.0, data_type=DataType.FLOAT64),
            ClockPoint(address=30),
            StatusPoint(address=32, initial_bits=0x8001),
        ],
        now_s=clock,
    )
    async with serve({1: meter}) as (_server, port), tcp_client(port) as client:
        clock.advance(7)
        dt = client.DATATYPE
        r = await client.read_holding_registers(0, count=2, device_id=1)
        assert client.convert_from_registers(r.registers, dt.FLOAT32, word_order="little") == 7.0
        r = await client.read_input_registers(10, count=4, device_id=1)
        assert decode_value(r.registers, DataType.UINT64, "little", "little") == 2**40
        r = await client.read_holding_registers(20, count=5, device_id=1)
        assert client.convert_from_registers(r.registers[:1], dt.INT16) == -5
        assert client.convert_from_registers(r.registers[1:5], dt.FLOAT64) == 50.0
        r = await client.read_holding_registers(30, count=3, device_id=1)
        assert client.convert_from_registers(r.registers[:2], dt.UINT32) == int(T0) + 7
        assert r.registers[2] == 0x8001
        # runtime changes: status bits, clock offset, dead battery, static value
        meter.status_bits = 0x0004
        meter.clock_offset_s = -90
        meter.set_static("voltage", 231)
        r = await client.read_holding_registers(20, count=1, device_id=1)
        assert r.registers == [231]
        r = await client.read_holding_registers(30, count=3, device_id=1)
        assert client.convert_from_registers(r.registers[:2], dt.UINT32) == int(T0) + 7 - 90
        assert r.registers[2] == 0x0004
        meter.set_meter_clock(946_684_800)  # dead battery: back to 2000-01-01
        clock.advance(5)
        assert await read_u32(client, 1, 30) == 946_684_805


@pytest.mark.integration
async def test_tcp_exception_responses(clock: FakeClock) -> None:
    meter = SimulatedMeter.pmc1(now_s=clock)
    async with serve({1: meter}) as (_server, port), tcp_client(port) as client:
        r = await client.read_holding_registers(2, count=2, device_id=1)  # unmapped
        assert_exception(r, 2)
        r = await client.read_input_registers(0, count=2, device_id=1)  # no input registers
        assert_exception(r, 2)
        r = await client.read_coils(0, count=1, device_id=1)  # function 1 unsupported
        assert_exception(r, 1)
        assert await read_u32(client) == 0  # the connection is still good
    gaps = SimulatedMeter(
        [CounterPoint(), StaticPoint(name="x", address=5, value=9)], now_s=clock, fill_gaps=True
    )
    async with serve({1: gaps}) as (_server, port), tcp_client(port) as client:
        r = await client.read_holding_registers(0, count=6, device_id=1)
        assert r.registers == [0, 0, 0, 0, 0, 9]
        r = await client.read_holding_registers(5, count=2, device_id=1)
        assert_exception(r, 2)


@pytest.mark.integration
async def test_raw_mbap_pipelined_requests_and_bad_header(clock: FakeClock) -> None:
    meter = SimulatedMeter.pmc1(now_s=clock, initial_counts=0x00010002)
    async with serve({1: meter}) as (_server, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        request = read_request_pdu(3, 0, 2)
        writer.write(mbap_frame(0x1234, 1, request) + mbap_frame(0x1235, 1, request))
        first = await reader.readexactly(13)
        second = await reader.readexactly(13)
        assert first == mbap_frame(0x1234, 1, bytes.fromhex("030400010002"))
        assert second[:2] == b"\x12\x35"
        writer.write(struct.pack(">HHHB", 1, 7, 6, 1) + request)  # protocol id 7
        assert await asyncio.wait_for(reader.read(), 1) == b""  # server closed it
        writer.close()


# ---------------------------------------------------------------------------------
# Faults over TCP
# ---------------------------------------------------------------------------------


@pytest.mark.integration
async def test_fault_exception_for_a_window(clock: FakeClock) -> None:
    meter = SimulatedMeter.pmc1(now_s=clock)
    async with serve({1: meter}) as (_server, port), tcp_client(port) as client:
        meter.set_fault(Fault.exception(4), for_s=5)
        r = await client.read_holding_registers(0, count=2, device_id=1)
        assert_exception(r, 4)
        clock.advance(5)
        assert await read_u32(client) >= 0


@pytest.mark.integration
async def test_fault_silent_makes_the_client_time_out(clock: FakeClock) -> None:
    meter = SimulatedMeter.pmc1(now_s=clock)
    async with serve({1: meter}) as (_server, port), tcp_client(port) as client:
        meter.set_fault(Fault.silent(), for_s=15)
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(ModbusException):
            await client.read_holding_registers(0, count=2, device_id=1)
        assert loop.time() - start >= CLIENT_TIMEOUT_S * 0.9
        clock.advance(15)
        assert await read_u32(client) >= 0
    assert len(meter.request_times_s) == 2  # the silent one was received


@pytest.mark.integration
async def test_fault_delay_replies_late_with_the_value_at_receipt(clock: FakeClock) -> None:
    meter = SimulatedMeter.pmc1(load_kw=3600, kwh_per_count=1, now_s=clock)
    async with serve({1: meter}) as (_server, port), tcp_client(port, reply_timeout_s=2) as client:
        meter.set_fault(Fault.delay(0.2))
        loop = asyncio.get_running_loop()
        start = loop.time()
        pending = asyncio.create_task(read_u32(client))
        await asyncio.sleep(0.05)
        clock.advance(100)  # time moves on while the reply is delayed
        value = await pending
        assert loop.time() - start >= 0.2
    assert value == 0  # latched when the request arrived


@pytest.mark.integration
@pytest.mark.parametrize("fault", [Fault.garbage(), Fault.truncated()])
async def test_broken_replies_fail_the_client_without_hanging(
    clock: FakeClock, fault: Fault
) -> None:
    meter = SimulatedMeter.pmc1(now_s=clock, initial_counts=77)
    async with serve({1: meter}, seed=1) as (_server, port):
        async with tcp_client(port) as client:
            meter.set_fault(fault)
            with pytest.raises(ModbusException):
                await asyncio.wait_for(
                    client.read_holding_registers(0, count=2, device_id=1), CLIENT_TIMEOUT_S * 4
                )
        meter.clear_faults()
        async with tcp_client(port) as client:
            assert await read_u32(client) == 77


@pytest.mark.integration
async def test_split_reply_still_decodes(clock: FakeClock) -> None:
    meter = SimulatedMeter.pmc1(now_s=clock, initial_counts=123_456_789)
    async with serve({1: meter}) as (_server, port), tcp_client(port, reply_timeout_s=1) as client:
        meter.set_fault(Fault.split(pieces=4, pause_s=0.03))
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await read_u32(client) == 123_456_789
        assert loop.time() - start >= 3 * 0.03


@pytest.mark.integration
async def test_offline_unit_answers_like_an_unknown_one(clock: FakeClock) -> None:
    meters = {1: SimulatedMeter.pmc1(now_s=clock), 2: SimulatedMeter.pmc1(now_s=clock)}
    async with serve(meters) as (_server, port), tcp_client(port) as client:
        meters[1].set_fault(Fault.offline(), for_s=60)
        r = await client.read_holding_registers(0, count=2, device_id=1)
        assert_exception(r, 11)
        assert await read_u32(client, 2) == 0
        clock.advance(60)
        assert await read_u32(client, 1) >= 0


# ---------------------------------------------------------------------------------
# RTU: pty with the pymodbus serial client, and RTU framing over TCP
# ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serial_client(path: str, baudrate: int) -> AsyncIterator[AsyncModbusSerialClient]:
    # parity N on the client: some kernels' ptys reject PARENB (EINVAL from
    # tcsetattr); the server still paces with the parity bit it was given.
    client = AsyncModbusSerialClient(
        port=path,
        baudrate=baudrate,
        parity="N",
        framer=FramerType.RTU,
        timeout=CLIENT_TIMEOUT_S,
        retries=0,
    )
    assert await client.connect()
    try:
        yield client
    finally:
        client.close()


@pytest.mark.integration
async def test_rtu_pty_takes_the_request_and_the_reply_time_of_the_line() -> None:
    # A pty hands the request over at once: the slave answers when its last
    # byte would have arrived, and its reply ends when it would on the wire.
    async with MeterServer({1: SimulatedMeter.pmc1()}) as server:
        path = await server.start_rtu_pty(baudrate=2400, parity="E", stopbits=1)
        async with serial_client(path, 2400) as client:
            await read_u32(client, 1)  # connected; the line is idle again
            loop = asyncio.get_running_loop()
            start = loop.time()
            await read_u32(client, 1)
            elapsed = loop.time() - start
    line_s = (8 + 9) * 11 / 2400  # request + reply, 11-bit characters
    assert line_s <= elapsed < line_s + 0.05


@pytest.mark.integration
async def test_rtu_over_pty_reads_counters_at_line_speed(clock: FakeClock) -> None:
    meters = {
        unit: SimulatedMeter.pmc1(load_kw=1010.304, initial_counts=unit * 1000, now_s=clock)
        for unit in (1, 2)
    }
    async with MeterServer(meters) as server:
        path = await server.start_rtu_pty(baudrate=2400, parity="E", stopbits=1)
        async with serial_client(path, 2400) as client:
            loop = asyncio.get_running_loop()
            start = loop.time()
            assert await read_u32(client, 1) == 1000
            elapsed = loop.time() - start
            # reply: addr + fc + count + 4 data + CRC = 9 chars of 11 bits at 2400 Bd
            assert elapsed >= 9 * 11 / 2400 - 0.002
            clock.advance(900)
            assert await read_u32(client, 2) == 2000 + 1754
            # an unknown unit on a bus is silence, not an exception
            with pytest.raises(ModbusException):
                await client.read_holding_registers(0, count=2, device_id=9)
            r = await client.read_holding_registers(3, count=1, device_id=1)
            assert_exception(r, 2)


@pytest.fixture
def pty_pair() -> Iterator[tuple[int, str]]:
    master, slave = os.openpty()
    tty.setraw(slave)
    try:
        yield master, os.ttyname(slave)
    finally:
        os.close(master)
        os.close(slave)


@pytest.mark.integration
async def test_rtu_on_a_given_fd_with_faults(clock: FakeClock, pty_pair: tuple[int, str]) -> None:
    master, path = pty_pair
    meter = SimulatedMeter.pmc1(now_s=clock, initial_counts=4_294_967_000)
    async with MeterServer({3: meter}, seed=3) as server:
        await server.start_rtu(master, baudrate=9600, parity="E")
        async with serial_client(path, 9600) as client:
            assert await read_u32(client, 3) == 4_294_967_000
            meter.set_fault(Fault.garbage())
            with pytest.raises(ModbusException):
                await asyncio.wait_for(
                    client.read_holding_registers(0, count=2, device_id=3), CLIENT_TIMEOUT_S * 4
                )
            meter.clear_faults()
            await asyncio.sleep(0.05)  # let the garbage drain before the next frame
            meter.set_fault(Fault.split(pieces=3, pause_s=0.005))
            assert await read_u32(client, 3) == 4_294_967_000
            meter.set_fault(Fault.exception(6))
            r = await client.read_holding_registers(0, count=2, device_id=3)
            assert_exception(r, 6)


@pytest.mark.integration
async def test_rtu_over_tcp(clock: FakeClock) -> None:
    meter = SimulatedMeter.pmc1(now_s=clock, initial_counts=31337)
    async with MeterServer({1: meter, 2: meter}) as server:
        port = await server.start_rtu_over_tcp("127.0.0.1", 0, baudrate=19200)
        async with tcp_client(port, framer=FramerType.RTU) as client:
            assert await read_u32(client, 1) == 31337
            r = await client.read_holding_registers(9, count=1, device_id=2)
            assert_exception(r, 2)
            with pytest.raises(ModbusException):  # unknown unit: silence, as on a bus
                await client.read_holding_registers(0, count=2, device_id=4)


# ---------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------

EXAMPLE_SCENARIO = """\
- at: 12s      # relative to start
  unit: 1
  action: silent
  for: 15s
- at: 30s
  unit: 1
  action: jump_to
  value: 4294967000
- {at: 40s, unit: 1, action: exception, code: 4, for: 5s}
- {at: 50s, unit: 1, action: status_bits, value: 1}
- {at: 500ms, action: load, value: 250.5, point: channel1}
- {at: 2m, unit: 2, action: split, pieces: 4, pause: 10ms}
- {at: 1h, unit: 2, action: dead_battery}
- {at: 1h, unit: 2, action: clock_offset, value: -2m}
- {at: 1h, unit: 2, action: clear, fault: split}
"""


def test_parse_durations() -> None:
    assert parse_duration("500ms") == 0.5
    assert parse_duration("10s") == 10
    assert parse_duration("2m") == 120
    assert parse_duration("1.5h") == 5400
    assert parse_duration(7) == 7
    assert parse_duration("-2m", signed=True) == -120
    for bad in ("-1s", "10 sec", "", True, "1e3s"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)


def test_parse_good_scenario(tmp_path: Path) -> None:
    path = tmp_path / "scenario.yaml"
    path.write_text(EXAMPLE_SCENARIO)
    actions = load_scenario(path)
    assert [a.at_s for a in actions] == [0.5, 12, 30, 40, 50, 120, 3600, 3600, 3600]
    load, silent, jump, exc, bits, split, dead, offset, clear = actions
    assert (load.kind, load.unit, load.value, load.point) == (
        ActionKind.LOAD,
        None,
        250.5,
        "channel1",
    )
    assert (silent.fault, silent.for_s, silent.unit) == (Fault.silent(), 15, 1)
    assert (jump.kind, jump.value, jump.for_s) == (ActionKind.JUMP_TO, 4294967000, None)
    assert (exc.fault, exc.for_s) == (Fault.exception(4), 5)
    assert (bits.kind, bits.value) == (ActionKind.STATUS_BITS, 1)
    assert split.fault == Fault.split(pieces=4, pause_s=0.01)
    assert (dead.kind, dead.value) == (ActionKind.DEAD_BATTERY, 946_684_800)
    assert (offset.kind, offset.value) == (ActionKind.CLOCK_OFFSET, -120)
    assert (clear.kind, clear.clear) == (ActionKind.CLEAR, FaultKind.SPLIT)
    assert silent.source.endswith("scenario.yaml:1: item 1")
    assert parse_scenario("") == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- {at: 1s, unit: 1, action: explode}", "unknown action 'explode'"),
        ("- {unit: 1, action: silent}", "missing key 'at'"),
        ("- {at: soon, unit: 1, action: silent}", "key 'at': expected a duration"),
        ("- {at: 1s, unit: 1, action: jump_to, value: 1, for: 5s}", "'for' is not allowed"),
        ("- {at: 1s, unit: 1, action: jump_to}", "needs key 'value'"),
        ("- {at: 1s, unit: 1, action: status_bits, value: 70000}", "key 'value'"),
        ("- {at: 1s, unit: 300, action: silent}", "key 'unit'"),
        ("- {at: 1s, unit: 1, action: exception, code: 0}", "key 'code'"),
        ("- {at: 1s, unit: 1, action: silent, for: 0s}", "longer than 0"),
        ("- {at: 1s, unit: 1, action: clear, fault: reset}", "key 'fault'"),
        ("at: 1s", "a scenario is a list of actions"),
        ("- [1, 2]", "expected a mapping"),
        ("- {at: 1s, unit: 1, action: silent\n", "not valid YAML"),
        ("- {at: 1s, action: load, value: yes}", "expected a number"),
    ],
)
def test_bad_scenarios_are_explained(text: str, message: str) -> None:
    with pytest.raises(ScenarioError, match=message):
        parse_scenario(text, "bad.yaml")


def test_scenario_errors_point_at_the_line() -> None:
    text = "- {at: 1s, unit: 1, action: silent}\n\n- at: 2s\n  unit: 1\n  action: nope\n"
    with pytest.raises(ScenarioError, match=r"^bad\.yaml:3: item 2: unknown action"):
        parse_scenario(text, "bad.yaml")
    with pytest.raises(ScenarioError, match="cannot read scenario"):
        load_scenario("/nonexistent/scenario.yaml")


def test_due_actions_fire_each_action_once() -> None:
    actions = parse_scenario(EXAMPLE_SCENARIO)
    assert [a.at_s for a in due_actions(actions, float("-inf"), 0.0)] == []
    assert [a.at_s for a in due_actions(actions, float("-inf"), 0.5)] == [0.5]
    assert [a.at_s for a in due_actions(actions, 0.5, 29.999)] == [12]
    assert [a.at_s for a in due_actions(actions, 29.999, 30)] == [30]
    assert [a.at_s for a in due_actions(actions, 30, 4000)] == [40, 50, 120, 3600, 3600, 3600]
    assert due_actions(actions, 4000, 9000) == ()
    # irregular polling covers every action exactly once
    fired: list[Action] = []
    previous = float("-inf")
    for now in (0.1, 0.7, 11.0, 31.0, 31.5, 200.0, 3600.0, 7200.0):
        fired.extend(due_actions(actions, previous, now))
        previous = now
    assert fired == list(actions)
    assert next_due_s(actions, 12) == 30
    assert next_due_s(actions, 3600) is None


def test_action_flags_are_the_file_format() -> None:
    action = parse_action_flag("at=12s,unit=1,action=silent,for=15s")
    assert (action.at_s, action.unit, action.fault, action.for_s) == (12, 1, Fault.silent(), 15)
    assert parse_action_flag("at=0, action=jump_to, value=4294967000").value == 4294967000
    with pytest.raises(ScenarioError, match="key=value"):
        parse_action_flag("at=1s,silent")


@pytest.mark.integration
async def test_scenario_runs_against_the_server(clock: FakeClock) -> None:
    meters = {1: SimulatedMeter.pmc1(now_s=clock), 2: SimulatedMeter.pmc1(now_s=clock)}
    actions = parse_scenario(
        "- {at: 0s, unit: 1, action: jump_to, value: 4294967000}\n"
        "- {at: 50ms, unit: 2, action: exception, code: 6, for: 10s}\n"
        "- {at: 80ms, action: status_bits, value: 3}\n"
    )
    async with serve(meters) as (server, port), tcp_client(port) as client:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.wait_for(server.start_scenario(actions), 2)
        assert loop.time() - start >= 0.08
        assert await read_u32(client, 1) == 4294967000
        r = await client.read_holding_registers(0, count=2, device_id=2)
        assert_exception(r, 6)
        assert meters[1].status_bits == meters[2].status_bits == 3
        with pytest.raises(ScenarioError, match="unit 7 is not simulated"):
            server.start_scenario(parse_scenario("- {at: 1s, unit: 7, action: silent}"))
        with pytest.raises(ScenarioError, match="no counter 'ch9'"):
            server.check_actions(
                parse_scenario("- {at: 1s, unit: 1, action: reset, point: ch9}", "s.yaml")
            )


# ---------------------------------------------------------------------------------
# NTP
# ---------------------------------------------------------------------------------


async def ntp_query(port: int, reply_timeout_s: float = 1.0) -> Any:
    client = ntplib.NTPClient()
    return await asyncio.to_thread(
        client.request, "127.0.0.1", version=4, port=port, timeout=reply_timeout_s
    )


@pytest.mark.integration
async def test_ntp_offset_is_measured_and_changes_at_runtime() -> None:
    async with NtpServer(offset_s=12.5) as server:
        port = await server.start("127.0.0.1", 0)
        stats = await ntp_query(port)
        assert stats.offset == pytest.approx(12.5, abs=0.05)
        assert (stats.stratum, stats.leap, stats.mode) == (1, 0, 4)
        server.offset_s = -3.25
        stats = await ntp_query(port)
        assert stats.offset == pytest.approx(-3.25, abs=0.05)
        assert stats.delay < 0.05
        server.unsynced = True
        stats = await ntp_query(port)
        assert (stats.stratum, stats.leap) == (16, 3)
        server.unreachable = True
        with pytest.raises(ntplib.NTPException):
            await ntp_query(port, reply_timeout_s=0.2)
        assert (server.answered, server.dropped) == (3, 1)


def test_ntp_reply_is_only_for_client_requests() -> None:
    request = bytearray(48)
    request[0] = (4 << 3) | 3
    request[40:48] = to_ntp_timestamp(T0).to_bytes(8, "big")
    reply = build_reply(bytes(request), T0 + 10, T0 + 10.001)
    assert reply is not None
    assert reply[0] == (4 << 3) | 4
    assert reply[24:32] == bytes(request[40:48])  # originate = client transmit
    assert from_ntp_timestamp(int.from_bytes(reply[40:48], "big")) == pytest.approx(T0 + 10.001)
    request[0] = (4 << 3) | 4  # a server packet is not answered
    assert build_reply(bytes(request), T0, T0) is None
    assert build_reply(b"\x23" * 10, T0, T0) is None


# ---------------------------------------------------------------------------------
# Command lines
# ---------------------------------------------------------------------------------


async def _start(*args: str) -> tuple[asyncio.subprocess.Process, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 10)
    return process, line.decode()


@pytest.mark.integration
async def test_meter_cli_serves_until_sigterm(tmp_path: Path) -> None:
    scenario = tmp_path / "s.yaml"
    scenario.write_text("- {at: 0s, unit: 2, action: exception, code: 4}\n")
    process, line = await _start(
        "-m", "edged.sim.meter", "--port", "0", "--units", "1,2", "--initial-counts", "500",
        "--scenario", str(scenario), "--action", "at=0s,unit=1,action=status_bits,value=9",
    )  # fmt: skip
    try:
        assert line.startswith("listening tcp 127.0.0.1:"), line
        port = int(line.split()[2].rsplit(":", 1)[1])
        async with tcp_client(port, reply_timeout_s=1) as client:
            assert await read_u32(client, 1) >= 500
            r = await client.read_holding_registers(0, count=2, device_id=2)
            assert_exception(r, 4)
            r = await client.read_holding_registers(102, count=1, device_id=1)
            assert r.registers == [9]
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 5) == 0


@pytest.mark.integration
async def test_meter_cli_rejects_a_bad_scenario(tmp_path: Path) -> None:
    scenario = tmp_path / "s.yaml"
    scenario.write_text("- {at: 1s, unit: 1, action: explode}\n")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edged.sim.meter", "--port", "0", "--scenario", str(scenario),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 2
    assert "s.yaml:1: item 1: unknown action 'explode'" in stderr.decode()


@pytest.mark.integration
async def test_ntp_cli() -> None:
    process, line = await _start("-m", "edged.sim.ntp", "--port", "0", "--offset", "5")
    try:
        assert line.startswith("listening ntp 127.0.0.1:"), line
        port = int(line.split()[2].rsplit(":", 1)[1])
        stats = await ntp_query(port)
        assert stats.offset == pytest.approx(5, abs=0.05)
    finally:
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), 5) == 0
