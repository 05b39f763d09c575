"""Pure Modbus framing and value encoding used by the meter simulator.

Nothing here does I/O or reads a clock: the functions take bytes and values
and return bytes and values, so they are unit-tested directly and the server
in ``edged.sim.meter`` stays a thin shell around them.

We implement the wire format ourselves instead of using pymodbus' server side
because the simulator must be able to produce *wrong* frames (garbage, cut
short, split) on purpose, and pymodbus' datastore API is mid-migration.

Value encoding here is deliberately independent of ``edged.core.registers``: the
simulator is the test oracle for the daemon's decoding, and an oracle that
shared the code under test would agree with its bugs.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Literal

Order = Literal["big", "little"]

# Modbus application protocol spec: at most 125 registers per fc3/fc4 read.
MAX_READ_REGISTERS = 125
# A Modbus PDU is at most 253 bytes (256-byte RTU ADU minus address and CRC).
MAX_PDU_BYTES = 253


class DataType(StrEnum):
    UINT16 = "uint16"
    INT16 = "int16"
    UINT32 = "uint32"
    INT32 = "int32"
    UINT64 = "uint64"
    INT64 = "int64"
    FLOAT32 = "float32"
    FLOAT64 = "float64"

    @property
    def register_count(self) -> int:
        return _REGISTERS[self]

    @property
    def is_float(self) -> bool:
        return self in (DataType.FLOAT32, DataType.FLOAT64)

    @property
    def is_signed(self) -> bool:
        return self in (DataType.INT16, DataType.INT32, DataType.INT64)


_REGISTERS = {
    DataType.UINT16: 1,
    DataType.INT16: 1,
    DataType.UINT32: 2,
    DataType.INT32: 2,
    DataType.UINT64: 4,
    DataType.INT64: 4,
    DataType.FLOAT32: 2,
    DataType.FLOAT64: 4,
}


class ExceptionCode(IntEnum):
    """Modbus exception codes (Modbus application protocol v1.1b3, 7)."""

    ILLEGAL_FUNCTION = 1
    ILLEGAL_DATA_ADDRESS = 2
    ILLEGAL_DATA_VALUE = 3
    SERVER_DEVICE_FAILURE = 4
    ACKNOWLEDGE = 5
    SERVER_DEVICE_BUSY = 6
    GATEWAY_PATH_UNAVAILABLE = 10
    GATEWAY_TARGET_FAILED_TO_RESPOND = 11


class ModbusError(Exception):
    """A request that must be answered with a Modbus exception response."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message or f"modbus exception {code}")
        self.code = code


# --------------------------------------------------------------------------
# Value <-> registers
# --------------------------------------------------------------------------


def encode_value(
    value: int | float,
    data_type: DataType,
    word_order: Order = "big",
    byte_order: Order = "big",
) -> tuple[int, ...]:
    """Encode ``value`` into 16-bit registers.

    word_order/byte_order big/big = ABCD, little/big = CDAB, big/little = BADC,
    little/little = DCBA. Integers are reduced modulo 2**bits (two's complement
    for negatives), which is what a meter's register does when its counter
    outgrows the register: the bits wrap, they never saturate.
    """
    n_regs = data_type.register_count
    bits = 16 * n_regs
    if data_type.is_float:
        fmt = ">f" if data_type is DataType.FLOAT32 else ">d"
        raw = struct.pack(fmt, float(value))
    else:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"cannot encode {value} as {data_type}")
        raw = (int(value) % (1 << bits)).to_bytes(bits // 8, "big")
    words = [raw[i : i + 2] for i in range(0, len(raw), 2)]
    if byte_order == "little":
        words = [w[::-1] for w in words]
    if word_order == "little":
        words.reverse()
    return tuple(int.from_bytes(w, "big") for w in words)


def decode_value(
    registers: Sequence[int],
    data_type: DataType,
    word_order: Order = "big",
    byte_order: Order = "big",
) -> int | float:
    """Inverse of :func:`encode_value` (used by tests and humans)."""
    if len(registers) != data_type.register_count:
        raise ValueError(f"{data_type} needs {data_type.register_count} registers")
    words = [r.to_bytes(2, "big") for r in registers]
    if word_order == "little":
        words.reverse()
    if byte_order == "little":
        words = [w[::-1] for w in words]
    raw = b"".join(words)
    if data_type is DataType.FLOAT32:
        return float(struct.unpack(">f", raw)[0])
    if data_type is DataType.FLOAT64:
        return float(struct.unpack(">d", raw)[0])
    return int.from_bytes(raw, "big", signed=data_type.is_signed)


# --------------------------------------------------------------------------
# PDUs
# --------------------------------------------------------------------------

READ_HOLDING_REGISTERS = 3
READ_INPUT_REGISTERS = 4


@dataclass(frozen=True)
class ReadRequest:
    function_code: int
    address: int
    count: int


def parse_read_request(pdu: bytes) -> ReadRequest:
    """Parse an fc3/fc4 request PDU (function code first).

    Raises ModbusError with the exception code a server must answer with.
    """
    if not pdu:
        raise ModbusError(ExceptionCode.ILLEGAL_FUNCTION, "empty PDU")
    function_code = pdu[0]
    if function_code not in (READ_HOLDING_REGISTERS, READ_INPUT_REGISTERS):
        raise ModbusError(ExceptionCode.ILLEGAL_FUNCTION, f"function {function_code}")
    if len(pdu) != 5:
        raise ModbusError(ExceptionCode.ILLEGAL_DATA_VALUE, f"request length {len(pdu)}")
    address, count = struct.unpack(">HH", pdu[1:5])
    if not 1 <= count <= MAX_READ_REGISTERS:
        raise ModbusError(ExceptionCode.ILLEGAL_DATA_VALUE, f"count {count}")
    if address + count > 0x10000:
        raise ModbusError(ExceptionCode.ILLEGAL_DATA_ADDRESS, "range beyond 65535")
    return ReadRequest(function_code, address, count)


def read_request_pdu(function_code: int, address: int, count: int) -> bytes:
    return struct.pack(">BHH", function_code, address, count)


def read_response_pdu(function_code: int, registers: Sequence[int]) -> bytes:
    return bytes((function_code, 2 * len(registers))) + b"".join(
        r.to_bytes(2, "big") for r in registers
    )


def exception_pdu(function_code: int, code: int) -> bytes:
    # The function code with its high bit set marks an exception response.
    return bytes(((function_code | 0x80) & 0xFF, code & 0xFF))


# --------------------------------------------------------------------------
# Modbus TCP (MBAP)
# --------------------------------------------------------------------------

MBAP_HEADER_BYTES = 7


@dataclass(frozen=True, kw_only=True)
class MbapHeader:
    transaction_id: int
    protocol_id: int
    length: int  # unit id + PDU bytes
    unit_id: int

    @property
    def pdu_bytes(self) -> int:
        return self.length - 1


def parse_mbap_header(header: bytes) -> MbapHeader:
    if len(header) != MBAP_HEADER_BYTES:
        raise ValueError(f"MBAP header is {MBAP_HEADER_BYTES} bytes, got {len(header)}")
    tid, pid, length, unit = struct.unpack(">HHHB", header)
    return MbapHeader(transaction_id=tid, protocol_id=pid, length=length, unit_id=unit)


def mbap_frame(transaction_id: int, unit_id: int, pdu: bytes) -> bytes:
    return struct.pack(">HHHB", transaction_id, 0, len(pdu) + 1, unit_id) + pdu


# --------------------------------------------------------------------------
# Modbus RTU
# --------------------------------------------------------------------------


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc16_modbus(data: bytes) -> int:
    """CRC-16/MODBUS (poly 0xA001 reflected, init 0xFFFF)."""
    crc = 0xFFFF
    for byte in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ byte) & 0xFF]
    return crc


def rtu_frame(unit_id: int, pdu: bytes) -> bytes:
    body = bytes((unit_id,)) + pdu
    # The CRC goes on the wire low byte first (the one little-endian field).
    return body + crc16_modbus(body).to_bytes(2, "little")


def rtu_crc_ok(frame: bytes) -> bool:
    return len(frame) >= 4 and crc16_modbus(frame[:-2]) == int.from_bytes(frame[-2:], "little")


def expected_rtu_request_length(buffer: bytes) -> int | None:
    """Length of the request frame at the start of ``buffer``, if it can be told
    from the bytes seen so far; None means "wait for the inter-frame silence".

    Knowing the length lets the server answer as soon as the last byte arrives
    instead of waiting 3.5 character times, like most real slaves do.
    """
    if len(buffer) < 2:
        return None
    function_code = buffer[1]
    if function_code in (1, 2, 3, 4, 5, 6, 8):
        return 8
    if function_code in (7, 11, 12, 17):
        return 4
    if function_code in (15, 16):
        return 9 + buffer[6] if len(buffer) >= 7 else None
    if function_code == 22:
        return 10
    if function_code == 23:
        return 13 + buffer[10] if len(buffer) >= 11 else None
    return None


class RtuRequestAssembler:
    """Cuts a serial byte stream into RTU request frames.

    Frames of a known length (fc3/fc4 requests are 8 bytes) are delivered as
    soon as they are complete and their CRC checks; anything else is delivered
    or discarded when the caller reports the 3.5-character silence. On a CRC
    failure one byte is dropped and the search restarts, so line noise in
    front of a request does not cost the request.
    """

    def __init__(self) -> None:
        self._buffer = b""

    @property
    def pending(self) -> bytes:
        return self._buffer

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        frames: list[bytes] = []
        while True:
            length = expected_rtu_request_length(self._buffer)
            if length is None and (skip := self._noise_before_frame()):
                self._buffer = self._buffer[skip:]
                continue
            if length is None or len(self._buffer) < length:
                break
            candidate = self._buffer[:length]
            if rtu_crc_ok(candidate):
                frames.append(candidate)
                self._buffer = self._buffer[length:]
            else:
                self._buffer = self._buffer[1:]
        return frames

    def _noise_before_frame(self) -> int:
        """Offset of a complete, CRC-valid frame of known length behind bytes
        that do not start one (line noise); 0 if there is none yet."""
        for offset in range(1, len(self._buffer) - 3):
            rest = self._buffer[offset:]
            length = expected_rtu_request_length(rest)
            if length is not None and len(rest) >= length and rtu_crc_ok(rest[:length]):
                return offset
        return 0

    def silence(self) -> list[bytes]:
        """The line has been idle for 3.5 characters: the frame, if any, is over."""
        buffer, self._buffer = self._buffer, b""
        if rtu_crc_ok(buffer):
            return [buffer]
        return []


def bits_per_char(parity: str, stopbits: float) -> float:
    """1 start bit + 8 data bits + optional parity bit + stop bits."""
    if parity.upper() not in ("N", "E", "O", "M", "S"):
        raise ValueError(f"parity must be N, E, O, M or S, not {parity!r}")
    return 1 + 8 + (0 if parity.upper() == "N" else 1) + stopbits


def char_time_s(baudrate: int, parity: str = "N", stopbits: float = 1) -> float:
    if baudrate <= 0:
        raise ValueError("baudrate must be positive")
    return bits_per_char(parity, stopbits) / baudrate


def frame_gap_s(baudrate: int, parity: str = "N", stopbits: float = 1) -> float:
    """The 3.5-character inter-frame silence; above 19200 baud the Modbus
    serial-line spec fixes it at 1.75 ms."""
    if baudrate > 19200:
        return 0.00175
    return 3.5 * char_time_s(baudrate, parity, stopbits)
