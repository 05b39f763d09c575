"""Sparkplug B payloads on the wire: the protobuf encoding of sparkplug_b.proto,
by hand, for the few fields edged sends and reads.

Why not generated code: edged needs Payload, Metric and PropertySet with
scalar values (about a dozen fields, all varint, fixed64 or length-delimited),
and a generated module ties the daemon to a protobuf runtime whose gencode
and runtime versions must match; the published .proto is the specification
this follows field by field (numbers in the comments). The tests decode what
this writes with Google's protobuf runtime and code generated from the
published sparkplug_b.proto, so the two cannot agree by sharing a mistake.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from edged.core.errors import EdgedError
from edged.core.sparkplug import DataType, Metric, Property, Value

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5
_U64 = (1 << 64) - 1
_U32 = (1 << 32) - 1

# Which Metric/PropertyValue value field carries each datatype.
_INT_TYPES = frozenset({1, 2, 3, 5, 6, 7})  # Int8..Int32, UInt8..UInt32: uint32 int_value
_LONG_TYPES = frozenset({4, 8, 13})  # Int64, UInt64, DateTime: uint64 long_value
_FLOAT, _DOUBLE, _BOOLEAN = 9, 10, 11
_STRING_TYPES = frozenset({12, 14, 15})  # String, Text, UUID


class DecodeError(EdgedError, ValueError):
    """Bytes that are not a Sparkplug B payload edged can read."""


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= _U64  # negative numbers: two's complement in 64 bits, as protobuf does
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field_no: int, wire_type: int) -> bytes:
    return _varint((field_no << 3) | wire_type)


def _uint(field_no: int, value: int) -> bytes:
    return _key(field_no, _VARINT) + _varint(value)


def _bool(field_no: int, value: bool) -> bytes:
    return _key(field_no, _VARINT) + (b"\x01" if value else b"\x00")


def _bytes(field_no: int, value: bytes) -> bytes:
    return _key(field_no, _LEN) + _varint(len(value)) + value


def _string(field_no: int, value: str) -> bytes:
    return _bytes(field_no, value.encode())


def _typed_value(datatype: int, value: Value, fields: tuple[int, int, int, int, int, int]) -> bytes:
    """The value in the field its datatype uses; `fields` are the field numbers of
    (int, long, float, double, boolean, string) in the enclosing message."""
    f_int, f_long, f_float, f_double, f_bool, f_string = fields
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if datatype in _INT_TYPES and is_int:
        assert isinstance(value, int)
        return _uint(f_int, value & _U32)  # signed: two's complement in 32 bits
    if datatype in _LONG_TYPES and is_int:
        assert isinstance(value, int)
        return _uint(f_long, value & _U64)
    if datatype in (_FLOAT, _DOUBLE) and (is_int or isinstance(value, float)):
        assert isinstance(value, int | float)
        if datatype == _FLOAT:
            return _key(f_float, _FIXED32) + struct.pack("<f", float(value))
        return _key(f_double, _FIXED64) + struct.pack("<d", float(value))
    if datatype == _BOOLEAN and isinstance(value, bool):
        return _bool(f_bool, value)
    if datatype in _STRING_TYPES and isinstance(value, str):
        return _string(f_string, value)
    raise TypeError(f"{value!r} is not a value of Sparkplug datatype {datatype} edged encodes")


def _property_value(prop: Property) -> bytes:
    # PropertyValue: type = 1, is_null = 2, int_value = 3, long_value = 4,
    # float_value = 5, double_value = 6, boolean_value = 7, string_value = 8
    body = _uint(1, int(prop.datatype))
    if prop.value is None:
        return body + _bool(2, True)
    return body + _typed_value(int(prop.datatype), prop.value, (3, 4, 5, 6, 7, 8))


def _property_set(props: Sequence[Property]) -> bytes:
    # PropertySet: keys = 1 (repeated string), values = 2 (repeated PropertyValue)
    body = b"".join(_string(1, p.key) for p in props)
    return body + b"".join(_bytes(2, _property_value(p)) for p in props)


def encode_metric(metric: Metric, *, with_datatype: bool = True) -> bytes:
    # Metric: name = 1, alias = 2, timestamp = 3, datatype = 4, is_historical = 5,
    # is_null = 7, properties = 9, int_value = 10, long_value = 11, float_value = 12,
    # double_value = 13, boolean_value = 14, string_value = 15
    out = bytearray()
    if metric.alias is None or with_datatype:
        out += _string(1, metric.name)  # births carry name and alias; data the alias alone
    if metric.alias is not None:
        out += _uint(2, metric.alias)
    if metric.timestamp_ms is not None:
        out += _uint(3, metric.timestamp_ms)
    if with_datatype:
        out += _uint(4, int(metric.datatype))
    if metric.is_historical:
        out += _bool(5, True)
    if metric.value is None:
        out += _bool(7, True)
    if metric.properties:
        out += _bytes(9, _property_set(metric.properties))
    if metric.value is not None:
        out += _typed_value(int(metric.datatype), metric.value, (10, 11, 12, 13, 14, 15))
    return bytes(out)


def encode_payload(
    metrics: Sequence[Metric],
    *,
    timestamp_ms: int,
    seq: int | None,
    with_datatypes: bool,
) -> bytes:
    """A Payload: timestamp = 1, metrics = 2, seq = 3 (NDEATH has no seq).

    Datatypes go in births and deaths; data messages leave them out (the
    birth declared them: Sparkplug 3.0, tck-id-payloads-metric-datatype-not-req)."""
    out = bytearray(_uint(1, timestamp_ms))
    for metric in metrics:
        out += _bytes(2, encode_metric(metric, with_datatype=with_datatypes))
    if seq is not None:
        out += _uint(3, seq)
    return bytes(out)


# -- decoding (commands) --------------------------------------------------------


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise DecodeError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value & _U64, pos
        shift += 7
        if shift >= 70:
            raise DecodeError("varint too long")


def _fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of each field of one message."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        field_no, wire_type = key >> 3, key & 7
        value: int | bytes
        if wire_type == _VARINT:
            value, pos = _read_varint(data, pos)
        elif wire_type == _FIXED64:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire_type == _FIXED32:
            value, pos = data[pos : pos + 4], pos + 4
        elif wire_type == _LEN:
            length, pos = _read_varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        else:
            raise DecodeError(f"unsupported wire type {wire_type}")
        if pos > len(data):
            raise DecodeError("truncated field")
        yield field_no, wire_type, value


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceivedMetric:
    name: str | None
    alias: int | None
    value: Value
    timestamp_ms: int | None = None
    is_historical: bool = False
    properties: tuple[tuple[str, Value], ...] = ()


def _scalar(field_no: int, wire_type: int, raw: int | bytes, first: int) -> Value:
    """A value field of a Metric (first = 10) or PropertyValue (first = 3):
    int, long, float, double, boolean, string in that order."""
    offset = field_no - first
    if offset in (0, 1) and isinstance(raw, int):
        return raw
    if offset == 2 and wire_type == _FIXED32 and isinstance(raw, bytes):
        return float(struct.unpack("<f", raw)[0])
    if offset == 3 and wire_type == _FIXED64 and isinstance(raw, bytes):
        return float(struct.unpack("<d", raw)[0])
    if offset == 4 and isinstance(raw, int):
        return bool(raw)
    if offset == 5 and isinstance(raw, bytes):
        return raw.decode("utf-8", "replace")
    return None


def _properties(data: bytes) -> tuple[tuple[str, Value], ...]:
    keys: list[str] = []
    values: list[Value] = []
    for field_no, _, raw in _fields(data):
        if field_no == 1 and isinstance(raw, bytes):
            keys.append(raw.decode("utf-8", "replace"))
        elif field_no == 2 and isinstance(raw, bytes):
            value: Value = None
            for f, wire_type, r in _fields(raw):
                if 3 <= f <= 8:
                    value = _scalar(f, wire_type, r, 3)
            values.append(value)
    return tuple(zip(keys, values, strict=False))


def _metric(data: bytes) -> ReceivedMetric:
    name: str | None = None
    alias: int | None = None
    timestamp_ms: int | None = None
    historical = False
    properties: tuple[tuple[str, Value], ...] = ()
    value: Value = None
    for field_no, wire_type, raw in _fields(data):
        if field_no == 1 and isinstance(raw, bytes):
            name = raw.decode("utf-8", "replace")
        elif field_no == 2 and isinstance(raw, int):
            alias = raw
        elif field_no == 3 and isinstance(raw, int):
            timestamp_ms = raw
        elif field_no == 5 and isinstance(raw, int):
            historical = bool(raw)
        elif field_no == 9 and isinstance(raw, bytes):
            properties = _properties(raw)
        elif 10 <= field_no <= 15:
            value = _scalar(field_no, wire_type, raw, 10)
    return ReceivedMetric(
        name=name,
        alias=alias,
        value=value,
        timestamp_ms=timestamp_ms,
        is_historical=historical,
        properties=properties,
    )


@dataclass(frozen=True, slots=True)
class ReceivedPayload:
    seq: int | None
    metrics: tuple[ReceivedMetric, ...]


def decode_payload(payload: bytes) -> ReceivedPayload:
    """A received payload's seq and metrics (commands; the demo's view)."""
    seq: int | None = None
    metrics = []
    for field_no, _, raw in _fields(payload):
        if field_no == 2 and isinstance(raw, bytes):
            metrics.append(_metric(raw))
        elif field_no == 3 and isinstance(raw, int):
            seq = raw
    return ReceivedPayload(seq, tuple(metrics))


def decode_metrics(payload: bytes) -> list[ReceivedMetric]:
    """The metrics of a received payload (an NCMD/DCMD): name or alias, and value."""
    return list(decode_payload(payload).metrics)


__all__ = [
    "DataType",
    "DecodeError",
    "ReceivedMetric",
    "ReceivedPayload",
    "decode_metrics",
    "decode_payload",
    "encode_payload",
]
