"""Modbus TCP (MBAP) framing for edged's server side, the facade (pure: bytes in,
values out, and back).

Written from the Modbus Messaging on TCP/IP Implementation Guide v1.0b (MBAP
header: transaction id, protocol id 0, length = unit id + PDU bytes, unit id)
and the Modbus Application Protocol v1.1b3 (function 3/4: address, quantity
1..125; exception responses: function | 0x80, one code byte). Deliberately
separate from ``edged.sim.modbus_frames`` (the simulators' framing, the test
oracle): the import contract keeps edged.io off edged.sim, and the oracle must
not share the code under test.

What is checked here decides between three answers, which the server applies:

* a header that cannot be a Modbus TCP frame (protocol id not 0, a length
  outside 2..254): :class:`FrameError`, the connection is closed, since the
  byte stream can no longer be split into frames;
* a well-framed request that edged will not or cannot serve: an exception
  response (:class:`ExceptionCode`);
* a read: :class:`ReadPdu`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from edged.core.errors import EdgedError

MBAP_HEADER_BYTES = 7
# Length field: the unit id plus a PDU of 1..253 bytes.
MIN_LENGTH = 2
MAX_LENGTH = 254
# Function 3/4: at most 125 registers per read (250 data bytes in a 253-byte PDU).
MAX_READ_REGISTERS = 125
ADDRESS_SPACE = 65536

READ_HOLDING = 3
READ_INPUT = 4
WRITE_SINGLE = 6
WRITE_MULTIPLE = 16


class ExceptionCode(IntEnum):
    ILLEGAL_FUNCTION = 0x01
    ILLEGAL_DATA_ADDRESS = 0x02
    ILLEGAL_DATA_VALUE = 0x03
    SERVER_DEVICE_FAILURE = 0x04
    SERVER_DEVICE_BUSY = 0x06
    GATEWAY_PATH_UNAVAILABLE = 0x0A
    GATEWAY_TARGET_FAILED = 0x0B


class FrameError(EdgedError, ValueError):
    """The byte stream is not Modbus TCP: close the connection."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MbapHeader:
    transaction_id: int
    protocol_id: int
    length: int  # bytes that follow the length field: unit id + PDU
    unit_id: int

    @property
    def pdu_bytes(self) -> int:
        return self.length - 1


@dataclass(frozen=True, slots=True)
class ReadPdu:
    """A read request: function 3 (holding) or 4 (input)."""

    function: int
    address: int
    count: int

    @property
    def table(self) -> str:
        return "holding" if self.function == READ_HOLDING else "input"


@dataclass(frozen=True, slots=True)
class RefusedPdu:
    """A well-framed request answered with an exception."""

    function: int
    code: ExceptionCode


def parse_header(data: bytes) -> MbapHeader:
    """The 7-byte MBAP header; raises FrameError for what cannot be Modbus TCP."""
    if len(data) != MBAP_HEADER_BYTES:
        raise FrameError(f"MBAP header is {MBAP_HEADER_BYTES} bytes, got {len(data)}")
    transaction_id, protocol_id, length, unit_id = struct.unpack(">HHHB", data)
    if protocol_id != 0:
        raise FrameError(f"protocol id {protocol_id} is not Modbus (0)")
    if not MIN_LENGTH <= length <= MAX_LENGTH:
        raise FrameError(f"MBAP length {length} is outside {MIN_LENGTH}..{MAX_LENGTH}")
    return MbapHeader(
        transaction_id=transaction_id, protocol_id=protocol_id, length=length, unit_id=unit_id
    )


def parse_pdu(pdu: bytes) -> ReadPdu | RefusedPdu:
    """A request PDU: a read to serve, or the exception to answer it with.

    Writes (6, 16) and every other function are refused with ILLEGAL_FUNCTION:
    the facade is read-only (docs/multimaster.md)."""
    if not pdu:
        raise FrameError("empty PDU")
    function = pdu[0]
    if function not in (READ_HOLDING, READ_INPUT):
        return RefusedPdu(function & 0x7F, ExceptionCode.ILLEGAL_FUNCTION)
    if len(pdu) != 5:
        # The frame is intact (the MBAP length delimited it) but the request
        # is the wrong size for its function.
        return RefusedPdu(function, ExceptionCode.ILLEGAL_DATA_VALUE)
    address, count = struct.unpack(">HH", pdu[1:5])
    if not 1 <= count <= MAX_READ_REGISTERS:
        return RefusedPdu(function, ExceptionCode.ILLEGAL_DATA_VALUE)
    if address + count > ADDRESS_SPACE:
        return RefusedPdu(function, ExceptionCode.ILLEGAL_DATA_ADDRESS)
    return ReadPdu(function, address, count)


def _frame(header: MbapHeader, pdu: bytes) -> bytes:
    return struct.pack(">HHHB", header.transaction_id, 0, len(pdu) + 1, header.unit_id) + pdu


def read_response(header: MbapHeader, function: int, words: tuple[int, ...]) -> bytes:
    """The answer to a read: byte count, then the registers big-endian."""
    return _frame(header, struct.pack(f">BB{len(words)}H", function, 2 * len(words), *words))


def exception_response(header: MbapHeader, function: int, code: int) -> bytes:
    return _frame(header, bytes((function | 0x80, code)))
