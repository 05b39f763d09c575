"""Tests for edged.core.registers: value codecs, order codes, coalescing, response slicing."""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Sequence
from typing import Any, get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pymodbus.client import ModbusTcpClient

from edged.core.registers import (
    MAX_READ_COUNT,
    ByteOrder,
    DataType,
    Function,
    MalformedResponse,
    OrderCode,
    Point,
    ReadRequest,
    WordOrder,
    coalesce,
    decode,
    decode_bits,
    decode_response,
    encode,
    order_from_code,
    register_count,
)

DATA_TYPES: tuple[DataType, ...] = get_args(DataType)
ORDER_CODES: tuple[OrderCode, ...] = get_args(OrderCode)
WORD_ORDERS: tuple[WordOrder, ...] = get_args(WordOrder)
BYTE_ORDERS: tuple[ByteOrder, ...] = get_args(ByteOrder)
FUNCTIONS: tuple[Function, ...] = get_args(Function)

INT_RANGES: dict[str, tuple[int, int]] = {
    "uint16": (0, 2**16 - 1),
    "int16": (-(2**15), 2**15 - 1),
    "uint32": (0, 2**32 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint64": (0, 2**64 - 1),
    "int64": (-(2**63), 2**63 - 1),
}

PYMODBUS_TYPES = {
    "uint16": ModbusTcpClient.DATATYPE.UINT16,
    "int16": ModbusTcpClient.DATATYPE.INT16,
    "uint32": ModbusTcpClient.DATATYPE.UINT32,
    "int32": ModbusTcpClient.DATATYPE.INT32,
    "uint64": ModbusTcpClient.DATATYPE.UINT64,
    "int64": ModbusTcpClient.DATATYPE.INT64,
    "float32": ModbusTcpClient.DATATYPE.FLOAT32,
    "float64": ModbusTcpClient.DATATYPE.FLOAT64,
}


def values_of(data_type: DataType) -> st.SearchStrategy[int | float]:
    if data_type == "float32":
        return st.floats(width=32)
    if data_type == "float64":
        return st.floats()
    lo, hi = INT_RANGES[data_type]
    return st.integers(lo, hi)


def same(a: int | float, b: int | float) -> bool:
    """Equality that treats NaN as equal to NaN and tells -0.0 from 0.0."""
    if isinstance(a, float) or isinstance(b, float):
        if not (isinstance(a, float) and isinstance(b, float)):
            return False
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return struct.pack(">d", a) == struct.pack(">d", b)
    return a == b


def same_dict(a: dict[str, int | float], b: dict[str, int | float]) -> bool:
    return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)


words16 = st.integers(0, 0xFFFF)


# --- codecs -----------------------------------------------------------------


def test_register_count() -> None:
    assert [register_count(t) for t in DATA_TYPES] == [1, 1, 2, 2, 4, 4, 2, 4]
    with pytest.raises(ValueError, match="unknown data type"):
        register_count("uint8")  # type: ignore[arg-type]


def test_order_from_code() -> None:
    assert order_from_code("ABCD") == ("big", "big")
    assert order_from_code("CDAB") == ("little", "big")
    assert order_from_code("BADC") == ("big", "little")
    assert order_from_code("DCBA") == ("little", "little")
    with pytest.raises(ValueError, match="unknown order code"):
        order_from_code("ACBD")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "data_type", "code", "words"),
    [
        (1754, "uint32", "ABCD", (0, 1754)),
        (0x12345678, "uint32", "ABCD", (0x1234, 0x5678)),
        (0x12345678, "uint32", "CDAB", (0x5678, 0x1234)),
        (0x12345678, "uint32", "BADC", (0x3412, 0x7856)),
        (0x12345678, "uint32", "DCBA", (0x7856, 0x3412)),
        (-1, "int16", "ABCD", (0xFFFF,)),
        (-2, "int32", "ABCD", (0xFFFF, 0xFFFE)),
        (0x1234, "uint16", "BADC", (0x3412,)),
        (0x1234, "uint16", "CDAB", (0x1234,)),  # word order is moot for one word
        (1.0, "float32", "ABCD", (0x3F80, 0x0000)),
        (1.0, "float32", "CDAB", (0x0000, 0x3F80)),
        (1.0, "float64", "ABCD", (0x3FF0, 0, 0, 0)),
        # 64-bit: the same rule applied word-wise.
        (0x0102030405060708, "uint64", "ABCD", (0x0102, 0x0304, 0x0506, 0x0708)),
        (0x0102030405060708, "uint64", "CDAB", (0x0708, 0x0506, 0x0304, 0x0102)),
        (0x0102030405060708, "uint64", "BADC", (0x0201, 0x0403, 0x0605, 0x0807)),
        (0x0102030405060708, "uint64", "DCBA", (0x0807, 0x0605, 0x0403, 0x0201)),
    ],
)
def test_known_vectors(
    value: int | float, data_type: DataType, code: OrderCode, words: tuple[int, ...]
) -> None:
    word_order, byte_order = order_from_code(code)
    assert encode(value, data_type, word_order, byte_order) == words
    assert same(decode(words, data_type, word_order, byte_order), value)


def test_int16_all_ones_is_minus_one() -> None:
    assert decode([0xFFFF], "int16") == -1
    assert decode([0xFFFF], "uint16") == 0xFFFF


def test_decode_returns_python_types() -> None:
    assert type(decode([0, 1], "uint32")) is int
    assert type(decode([0x3F80, 0], "float32")) is float


@pytest.mark.parametrize(
    ("words", "check"),
    [
        ((0x7FC0, 0x0000), math.isnan),
        ((0x7F80, 0x0000), lambda v: v == math.inf),
        ((0xFF80, 0x0000), lambda v: v == -math.inf),
    ],
)
def test_float_specials_returned_as_is(words: tuple[int, int], check: Any) -> None:
    assert check(decode(words, "float32"))


@given(st.data())
def test_round_trip_all_types_and_orders(data: st.DataObject) -> None:
    data_type = data.draw(st.sampled_from(DATA_TYPES))
    code = data.draw(st.sampled_from(ORDER_CODES))
    value = data.draw(values_of(data_type))
    word_order, byte_order = order_from_code(code)
    words = encode(value, data_type, word_order, byte_order)
    assert len(words) == register_count(data_type)
    assert all(0 <= w <= 0xFFFF for w in words)
    assert same(decode(words, data_type, word_order, byte_order), value)


@given(st.data())
def test_words_round_trip(data: st.DataObject) -> None:
    """Every register pattern decodes and re-encodes to itself (except float NaNs,
    whose payload the C float conversions may quieten)."""
    data_type = data.draw(st.sampled_from(DATA_TYPES))
    word_order, byte_order = order_from_code(data.draw(st.sampled_from(ORDER_CODES)))
    words = tuple(data.draw(st.tuples(*[words16] * register_count(data_type))))
    value = decode(words, data_type, word_order, byte_order)
    if isinstance(value, float) and math.isnan(value):
        return
    assert encode(value, data_type, word_order, byte_order) == words


@given(st.data())
def test_orders_match_a_reference_permutation(data: st.DataObject) -> None:
    """little word order = words reversed; little byte order = bytes of each word swapped."""
    data_type = data.draw(st.sampled_from(DATA_TYPES))
    word_order = data.draw(st.sampled_from(WORD_ORDERS))
    byte_order = data.draw(st.sampled_from(BYTE_ORDERS))
    words = list(data.draw(st.tuples(*[words16] * register_count(data_type))))
    canonical = list(reversed(words)) if word_order == "little" else list(words)
    if byte_order == "little":
        canonical = [((w & 0xFF) << 8) | (w >> 8) for w in canonical]
    assert same(decode(words, data_type, word_order, byte_order), decode(canonical, data_type))


@given(st.data())
def test_matches_pymodbus_converters(data: st.DataObject) -> None:
    data_type = data.draw(st.sampled_from(DATA_TYPES))
    word_order = data.draw(st.sampled_from(WORD_ORDERS))
    value = data.draw(values_of(data_type))
    theirs = ModbusTcpClient.convert_to_registers(
        value, PYMODBUS_TYPES[data_type], word_order=word_order
    )
    assert encode(value, data_type, word_order) == tuple(theirs)
    assert same(decode(theirs, data_type, word_order), value)
    back = ModbusTcpClient.convert_from_registers(
        list(encode(value, data_type, word_order)), PYMODBUS_TYPES[data_type], word_order=word_order
    )
    assert isinstance(back, int | float)
    assert same(back, value)


@pytest.mark.parametrize(
    "words", [[], [1], [1, 2, 3], [0x10000, 0], [-1, 0], [1.5, 0], [None, 0], ["1", 0]]
)
def test_decode_rejects_malformed_words(words: Sequence[Any]) -> None:
    with pytest.raises(MalformedResponse):
        decode(words, "uint32")


def test_malformed_response_is_a_value_error() -> None:
    assert issubclass(MalformedResponse, ValueError)


@pytest.mark.parametrize(
    ("value", "data_type"),
    [
        (65536, "uint16"),
        (-1, "uint16"),
        (-32769, "int16"),
        (2**32, "uint32"),
        (2**64, "uint64"),
        (1.5, "int32"),
        (1e39, "float32"),
        (2**1100, "float64"),
    ],
)
def test_encode_rejects_out_of_range(value: int | float, data_type: DataType) -> None:
    with pytest.raises(ValueError, match="cannot encode"):
        encode(value, data_type)


def test_bad_type_or_order_rejected() -> None:
    with pytest.raises(ValueError, match="unknown data type"):
        decode([0], "uint8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="word_order"):
        decode([0, 0], "uint32", "middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="word_order"):
        encode(0, "uint32", "big", "BIG")  # type: ignore[arg-type]


# --- bit fields -------------------------------------------------------------


def test_decode_bits() -> None:
    bit_map = {0: "phase_loss", 3: "reverse_power", 15: "battery_low", 7: "unused"}
    assert decode_bits(0b1000_0000_0000_1001, bit_map) == {
        "phase_loss",
        "reverse_power",
        "battery_low",
    }
    assert decode_bits(0, bit_map) == frozenset()
    assert decode_bits(0b0100, bit_map) == frozenset()  # set bits without a mapping are ignored
    assert decode_bits(1 << 20, {20: "wide"}) == {"wide"}  # 32-bit status words work too


def test_decode_bits_rejects_signed_words_and_bad_indexes() -> None:
    with pytest.raises(ValueError, match="unsigned"):
        decode_bits(-1, {0: "a"})
    with pytest.raises(ValueError, match="bit index"):
        decode_bits(1, {-1: "a"})


@given(st.integers(0, 0xFFFF), st.sets(st.integers(0, 15)))
def test_decode_bits_property(word: int, bits: set[int]) -> None:
    assert decode_bits(word, {b: b for b in bits}) == {b for b in bits if word & (1 << b)}


# --- points -----------------------------------------------------------------


def test_point_count_and_validation() -> None:
    assert Point(name="p", function="holding", address=0, data_type="float64").count == 4
    assert Point(name="p", function="input", address=0xFFFE, data_type="uint32").end == 0x10000
    with pytest.raises(ValueError, match="does not fit"):
        Point(name="p", function="input", address=0xFFFF, data_type="uint32")
    with pytest.raises(ValueError, match="does not fit"):
        Point(name="p", function="input", address=-1, data_type="uint16")
    with pytest.raises(ValueError, match="unknown data type"):
        Point(name="p", function="input", address=0, data_type="uint8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown function"):
        Point(name="p", function="coil", address=0, data_type="uint16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        Point(name="", function="input", address=0, data_type="uint16")


def test_point_value_semantics() -> None:
    a = Point(name="e", function="holding", address=10, data_type="uint32", word_order="little")
    b = Point(name="e", function="holding", address=10, data_type="uint32", word_order="little")
    assert a == b
    assert hash(a) == hash(b)
    assert a != Point(name="e", function="holding", address=10, data_type="uint32")
    assert "codec" not in repr(a)


# --- coalescing -------------------------------------------------------------


def u16(name: str, address: int, function: Function = "holding") -> Point:
    return Point(name=name, function=function, address=address, data_type="uint16")


def u32(name: str, address: int, function: Function = "holding") -> Point:
    return Point(name=name, function=function, address=address, data_type="uint32")


def spans(requests: Sequence[ReadRequest]) -> list[tuple[str, int, int]]:
    return [(r.function, r.address, r.count) for r in requests]


def test_contiguous_points_merge() -> None:
    requests = coalesce([u32("a", 0), u32("b", 2), u32("c", 4)])
    assert spans(requests) == [("holding", 0, 6)]
    assert [p.name for p in requests[0].points] == ["a", "b", "c"]


def test_gap_within_max_gap_merges_beyond_splits() -> None:
    # a occupies register 0; b at 9 leaves 8 unused registers (1..8).
    assert spans(coalesce([u16("a", 0), u16("b", 9)], max_gap=8)) == [("holding", 0, 10)]
    assert spans(coalesce([u16("a", 0), u16("b", 10)], max_gap=8)) == [
        ("holding", 0, 1),
        ("holding", 10, 1),
    ]
    assert spans(coalesce([u16("a", 0), u16("b", 1)], max_gap=0)) == [("holding", 0, 2)]
    assert spans(coalesce([u16("a", 0), u16("b", 2)], max_gap=0)) == [
        ("holding", 0, 1),
        ("holding", 2, 1),
    ]


def test_cap_of_125_registers_splits() -> None:
    points = [u32(f"p{i:02d}", 2 * i) for i in range(63)]  # 126 contiguous registers
    requests = coalesce(points)
    assert spans(requests) == [("holding", 0, 124), ("holding", 124, 2)]
    assert all(r.count <= MAX_READ_COUNT for r in requests)


def test_custom_max_count() -> None:
    points = [u16(f"p{i}", i) for i in range(10)]
    assert spans(coalesce(points, max_count=4)) == [
        ("holding", 0, 4),
        ("holding", 4, 4),
        ("holding", 8, 2),
    ]


def test_holding_and_input_never_merge() -> None:
    requests = coalesce([u16("i", 0, "input"), u16("h", 0, "holding"), u16("h2", 1, "holding")])
    assert spans(requests) == [("holding", 0, 2), ("input", 0, 1)]


def test_overlapping_points_share_a_request() -> None:
    energy = u32("energy", 100)
    energy_lo = u16("energy_lo", 101)
    (request,) = coalesce([energy_lo, energy])
    assert (request.address, request.count) == (100, 2)
    assert decode_response(request, [0x0001, 0x0002]) == {"energy": 0x10002, "energy_lo": 2}


def test_wide_point_opens_new_request_at_equal_address() -> None:
    # At address 122 the uint64 cannot fit in the first request (0..125 > 125);
    # it opens the next one and the uint16 at the same address rides along.
    requests = coalesce(
        [
            u16("a", 0),
            u16("n", 122),
            Point(name="w", function="holding", address=122, data_type="uint64"),
        ]
    )
    assert spans(requests) == [("holding", 0, 1), ("holding", 122, 4)]
    assert [p.name for p in requests[1].points] == ["w", "n"]


def test_point_larger_than_max_count_is_an_error() -> None:
    with pytest.raises(ValueError, match="more than max_count"):
        coalesce([Point(name="f", function="input", address=0, data_type="float64")], max_count=3)


def test_coalesce_argument_validation() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        coalesce([u16("a", 0), u16("a", 5, "input")])
    with pytest.raises(ValueError, match="max_gap"):
        coalesce([u16("a", 0)], max_gap=-1)
    with pytest.raises(ValueError, match="max_count"):
        coalesce([u16("a", 0)], max_count=126)
    with pytest.raises(ValueError, match="max_count"):
        coalesce([u16("a", 0)], max_count=0)
    assert coalesce([]) == ()


@st.composite
def point_sets(draw: st.DrawFn, max_address: int = 400) -> list[Point]:
    n = draw(st.integers(0, 40))
    # Names only have to be unique: numbered, they cost no generation time.
    points = []
    for name in (f"p{i}" for i in range(n)):
        data_type = draw(st.sampled_from(DATA_TYPES))
        word_order, byte_order = order_from_code(draw(st.sampled_from(ORDER_CODES)))
        points.append(
            Point(
                name=name,
                function=draw(st.sampled_from(FUNCTIONS)),
                address=draw(st.integers(0, max_address)),
                data_type=data_type,
                word_order=word_order,
                byte_order=byte_order,
            )
        )
    return points


gaps = st.integers(0, 20)
max_counts = st.integers(4, MAX_READ_COUNT)


@given(point_sets(), gaps, max_counts)
def test_every_point_covered_exactly_once(
    points: list[Point], max_gap: int, max_count: int
) -> None:
    requests = coalesce(points, max_gap=max_gap, max_count=max_count)
    covered = [p for r in requests for p in r.points]
    assert sorted(covered, key=lambda p: p.name) == sorted(points, key=lambda p: p.name)
    for r in requests:
        assert 1 <= r.count <= max_count
        # Tight: the request starts at its first point and ends at its last register.
        assert r.address == min(p.address for p in r.points)
        assert r.address + r.count == max(p.end for p in r.points)
        for p in r.points:
            assert p.function == r.function
            assert r.address <= p.address
            assert p.end <= r.address + r.count


@given(point_sets(), gaps, max_counts)
def test_adjacent_requests_could_not_have_merged(
    points: list[Point], max_gap: int, max_count: int
) -> None:
    requests = coalesce(points, max_gap=max_gap, max_count=max_count)
    functions = [r.function for r in requests]
    assert functions == sorted(functions)  # holding before input, each once as a block
    for a, b in itertools.pairwise(requests):
        if a.function != b.function:
            continue
        assert a.address <= b.address
        a_end, b_end = a.address + a.count, b.address + b.count
        assert b.address - a_end > max_gap or max(a_end, b_end) - a.address > max_count


@given(st.data(), point_sets(), gaps)
def test_order_independent(data: st.DataObject, points: list[Point], max_gap: int) -> None:
    shuffled = data.draw(st.permutations(points))
    assert coalesce(shuffled, max_gap=max_gap) == coalesce(points, max_gap=max_gap)


# --- ReadRequest and decode_response ----------------------------------------


def test_decode_response_slices_points() -> None:
    cdab, badc = order_from_code("CDAB"), order_from_code("BADC")
    voltage = Point(name="voltage_v", function="input", address=10, data_type="float32",
                    word_order=cdab[0], byte_order=cdab[1])  # fmt: skip
    energy = Point(name="energy_wh", function="input", address=12, data_type="uint64")
    status = Point(name="status", function="input", address=18, data_type="uint16")
    current = Point(name="current_a", function="input", address=19, data_type="float32",
                    word_order=badc[0], byte_order=badc[1])  # fmt: skip
    (request,) = coalesce([status, energy, current, voltage])
    assert (request.address, request.count) == (10, 11)
    words = [
        *encode(230.5, "float32", "little", "big"),
        *encode(123_456_789_012, "uint64"),
        0xBEEF,  # register 16, unused
        0xBEEF,  # register 17, unused
        0x0004,
        *encode(-1.25, "float32", "big", "little"),
    ]
    assert decode_response(request, words) == {
        "voltage_v": 230.5,
        "energy_wh": 123_456_789_012,
        "status": 4,
        "current_a": -1.25,
    }


def test_decode_response_returns_nan_as_is() -> None:
    (request,) = coalesce([Point(name="pf", function="input", address=0, data_type="float32")])
    assert math.isnan(decode_response(request, [0x7FC0, 0])["pf"])


@pytest.mark.parametrize(
    "words", [[], [1, 2], [1, 2, 3, 4], [1, 2, 0x10000], [1, -1, 2], [1, 2, 3.0], [None, 1, 2]]
)
def test_decode_response_rejects_malformed(words: Sequence[Any]) -> None:
    (request,) = coalesce([u16("a", 0), u16("b", 2)])
    assert request.count == 3
    with pytest.raises(MalformedResponse):
        decode_response(request, words)


@st.composite
def register_images(draw: st.DrawFn) -> list[int]:
    # 410 words drawn as one block of bytes: the same images as a list of 410
    # integers, generated in a fraction of the time.
    raw = draw(st.binary(min_size=820, max_size=820))
    return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, 820, 2)]


@given(point_sets(), register_images(), gaps)
def test_decode_response_agrees_with_decode(
    points: list[Point], image: list[int], max_gap: int
) -> None:
    """Reading a register image through coalesced requests gives the same values as
    decoding each point on its own, overlaps and mixed orders included."""
    got: dict[str, int | float] = {}
    for request in coalesce(points, max_gap=max_gap):
        got.update(
            decode_response(request, image[request.address : request.address + request.count])
        )
    expected = {
        p.name: decode(image[p.address : p.end], p.data_type, p.word_order, p.byte_order)
        for p in points
    }
    assert same_dict(got, expected)


def test_read_request_validation() -> None:
    a = u16("a", 5)
    with pytest.raises(ValueError, match="outside"):
        ReadRequest(function="holding", address=6, count=2, points=(a,))
    with pytest.raises(ValueError, match="outside"):
        ReadRequest(function="holding", address=0, count=5, points=(a,))
    with pytest.raises(ValueError, match="is input"):
        ReadRequest(function="holding", address=0, count=10, points=(u16("i", 0, "input"),))
    with pytest.raises(ValueError, match="count"):
        ReadRequest(function="holding", address=0, count=126, points=(a,))
    with pytest.raises(ValueError, match="at least one"):
        ReadRequest(function="holding", address=0, count=1, points=())
    with pytest.raises(ValueError, match="duplicate"):
        ReadRequest(function="holding", address=0, count=10, points=(a, u16("a", 6)))
    with pytest.raises(ValueError, match="address space"):
        ReadRequest(function="holding", address=0xFFFF, count=2, points=(u16("z", 0xFFFF),))
    # Built by hand (not via coalesce) it still decodes.
    assert decode_response(
        ReadRequest(function="holding", address=4, count=3, points=(a,)), [0, 7, 0]
    ) == {"a": 7}
