"""Modbus register decoding and request coalescing (pure: no I/O, no asyncio).

Meters expose values as runs of 16-bit registers. Vendors disagree on the order
of the words within a multi-word value and, less often, on the order of the two
bytes within each word; both are configured per point. The conventional labels
name the bytes of a 32-bit value ``A`` (most significant) to ``D``::

    ABCD  word_order=big,    byte_order=big      (Modbus spec, Schneider PM8000 …)
    CDAB  word_order=little, byte_order=big      ("word swapped", many Asian meters)
    BADC  word_order=big,    byte_order=little   ("byte swapped")
    DCBA  word_order=little, byte_order=little   (fully little-endian)

For 64-bit values the same rule applies word-wise: ``little`` word order reverses
all four words.

Float values are returned exactly as the meter sent them, including NaN and
±inf: several meters use NaN to mean "not available", and that is a quality
decision for the caller (it flags the value), not something a decoder should
paper over or turn into an exception.

Everything here is computed once per (data type, word order, byte order) or
once per :class:`Point` / :class:`ReadRequest`, because the poller decodes
hundreds of meters at sub-second rates and the per-call path should be a few
C-level ``struct`` calls.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from decimal import Decimal
from typing import Final, Literal, TypeVar, get_args

from edged.core.errors import EdgedError
from edged.core.model import Flag

__all__ = [
    "MAX_READ_COUNT",
    "ByteOrder",
    "ClockSpec",
    "DataType",
    "Function",
    "MalformedResponse",
    "OrderCode",
    "PlanResult",
    "Point",
    "ReadPlan",
    "ReadRequest",
    "StatusSpec",
    "ValueSpec",
    "WordOrder",
    "apply_plan",
    "build_plan",
    "coalesce",
    "decode",
    "decode_bits",
    "decode_response",
    "encode",
    "m10k",
    "meter_clock_s",
    "order_from_code",
    "register_count",
    "scaled_value",
]

DataType = Literal["uint16", "int16", "uint32", "int32", "uint64", "int64", "float32", "float64"]
WordOrder = Literal["big", "little"]
"""Order of the 16-bit words of a multi-word value; ``big`` = most significant word first."""
ByteOrder = Literal["big", "little"]
"""Order of the two bytes inside each word; ``little`` = bytes swapped."""
Function = Literal["holding", "input"]
"""Modbus function 3 (read holding registers) or 4 (read input registers)."""
OrderCode = Literal["ABCD", "CDAB", "BADC", "DCBA"]

T = TypeVar("T")

# Modbus application protocol v1.1b3, 6.3/6.4: at most 125 registers per read,
# because the reply's byte count field is one byte (250 data bytes + header).
MAX_READ_COUNT: Final = 125
# Register addresses are 16-bit on the wire, so a value cannot extend past 0xFFFF.
_ADDRESS_SPACE: Final = 0x10000

_DATA_TYPES: Final[frozenset[str]] = frozenset(get_args(DataType))
_ORDERS: Final[frozenset[str]] = frozenset(get_args(WordOrder))
_FUNCTIONS: Final[frozenset[str]] = frozenset(get_args(Function))

# struct format character and size in 16-bit words.
_FORMATS: Final[dict[str, tuple[str, int]]] = {
    "uint16": ("H", 1),
    "int16": ("h", 1),
    "uint32": ("I", 2),
    "int32": ("i", 2),
    "uint64": ("Q", 4),
    "int64": ("q", 4),
    "float32": ("f", 2),
    "float64": ("d", 4),
}

_ORDER_CODES: Final[dict[str, tuple[WordOrder, ByteOrder]]] = {
    "ABCD": ("big", "big"),
    "CDAB": ("little", "big"),
    "BADC": ("big", "little"),
    "DCBA": ("little", "little"),
}


class MalformedResponse(EdgedError, ValueError):
    """The register payload cannot be what the request asked for (wrong length,
    a word outside 0..65535). The Modbus shell maps this to a MALFORMED read
    error; it must never crash a poller."""


@dataclass(frozen=True, slots=True, kw_only=True)
class _Codec:
    """Precomputed ``struct`` plan for one (data type, word order, byte order).

    Any of the four orders is two struct calls and no Python-level reshuffling:
    the words are packed with ``words`` (big-endian per word when the word and
    byte orders agree, byte-swapped per word when they differ) and the result is
    read as one value with ``value`` (big-endian for big word order, otherwise
    little-endian, which reverses the whole byte string and therefore both the
    word order and the byte order). The four combinations work out exactly to
    ABCD, CDAB, BADC and DCBA.
    """

    count: int
    words: struct.Struct
    value: struct.Struct
    # True when words must be byte-swapped before ``value`` reads them; lets a
    # ReadRequest pack a response once per variant instead of once per point.
    swapped: bool


def _make_codec(data_type: str, word_order: str, byte_order: str) -> _Codec:
    char, count = _FORMATS[data_type]
    swapped = word_order != byte_order
    return _Codec(
        count=count,
        words=struct.Struct(("<" if swapped else ">") + f"{count}H"),
        value=struct.Struct((">" if word_order == "big" else "<") + char),
        swapped=swapped,
    )


_CODECS: Final[dict[tuple[str, str, str], _Codec]] = {
    (dt, wo, bo): _make_codec(dt, wo, bo)
    for dt in _FORMATS
    for wo in ("big", "little")
    for bo in ("big", "little")
}


def _lookup_codec(data_type: str, word_order: str, byte_order: str) -> _Codec:
    try:
        return _CODECS[(data_type, word_order, byte_order)]
    except KeyError:
        if data_type not in _DATA_TYPES:
            raise ValueError(f"unknown data type {data_type!r}") from None
        raise ValueError(
            f"word_order and byte_order must be 'big' or 'little', "
            f"got {word_order!r}/{byte_order!r}"
        ) from None


def register_count(data_type: DataType) -> int:
    """Number of 16-bit registers a value of ``data_type`` occupies (1, 2 or 4)."""
    try:
        return _FORMATS[data_type][1]
    except KeyError:
        raise ValueError(f"unknown data type {data_type!r}") from None


def order_from_code(code: OrderCode) -> tuple[WordOrder, ByteOrder]:
    """Translate a vendor byte-order label (``ABCD`` …) to (word_order, byte_order)."""
    try:
        return _ORDER_CODES[code]
    except KeyError:
        raise ValueError(
            f"unknown order code {code!r}; expected one of {sorted(_ORDER_CODES)}"
        ) from None


def decode(
    words: Sequence[int],
    data_type: DataType,
    word_order: WordOrder = "big",
    byte_order: ByteOrder = "big",
) -> int | float:
    """Decode one value from its registers.

    Floats come back as sent, NaN and ±inf included (see module docstring).
    Raises :class:`MalformedResponse` (a ``ValueError``) when the number of
    words is wrong or a word is not an integer in 0..65535.
    """
    codec = _lookup_codec(data_type, word_order, byte_order)
    if len(words) != codec.count:
        raise MalformedResponse(f"{data_type} needs {codec.count} registers, got {len(words)}")
    try:
        raw = codec.words.pack(*words)
    except struct.error as exc:
        raise MalformedResponse(f"register value out of range 0..65535 in {words!r}") from exc
    result: int | float = codec.value.unpack(raw)[0]
    return result


def encode(
    value: int | float,
    data_type: DataType,
    word_order: WordOrder = "big",
    byte_order: ByteOrder = "big",
) -> tuple[int, ...]:
    """Registers that :func:`decode` turns back into ``value`` (for simulators and tests).

    float32 rounds to the nearest single-precision value, as a meter would.
    Raises ``ValueError`` when the value does not fit the type (an int out of
    range, a float for an integer type, a float too large for float32).
    """
    codec = _lookup_codec(data_type, word_order, byte_order)
    try:
        raw = codec.value.pack(value)
    except (struct.error, OverflowError) as exc:
        raise ValueError(f"cannot encode {value!r} as {data_type}: {exc}") from exc
    words: tuple[int, ...] = codec.words.unpack(raw)
    return words


def decode_bits(word: int, bit_map: Mapping[int, T]) -> frozenset[T]:
    """Items of ``bit_map`` whose bit (0 = least significant) is set in ``word``.

    ``word`` may be wider than 16 bits (a status decoded as uint32/uint64), but
    not negative: a status decoded as a signed type would make every high bit
    look set, which is a configuration error worth surfacing.
    """
    if word < 0:
        raise ValueError(f"bit field must be non-negative, got {word}; decode it as unsigned")
    if not word:
        return frozenset()
    result = []
    for bit, item in bit_map.items():
        if bit < 0:
            raise ValueError(f"bit index must be non-negative, got {bit}")
        if (word >> bit) & 1:
            result.append(item)
    return frozenset(result)


@dataclass(frozen=True, slots=True, kw_only=True)
class Point:
    """One value to read: where it lives and how it is encoded."""

    name: str
    function: Function
    address: int  # 0-based register address (PDU address, not the 4xxxx label)
    data_type: DataType
    word_order: WordOrder = "big"
    byte_order: ByteOrder = "big"
    _codec: _Codec = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("point name must not be empty")
        if self.function not in _FUNCTIONS:
            raise ValueError(f"point {self.name!r}: unknown function {self.function!r}")
        codec = _lookup_codec(self.data_type, self.word_order, self.byte_order)
        if not 0 <= self.address <= _ADDRESS_SPACE - codec.count:
            raise ValueError(
                f"point {self.name!r}: {self.data_type} at address {self.address} "
                f"does not fit in 0..{_ADDRESS_SPACE - 1}"
            )
        # The dataclass is frozen; this is its own cache, set once at construction.
        object.__setattr__(self, "_codec", codec)

    @property
    def count(self) -> int:
        """Registers this point occupies."""
        return self._codec.count

    @property
    def end(self) -> int:
        """One past the last register of this point."""
        return self.address + self._codec.count


# name, byte offset in the packed response, bound unpack_from, needs swapped buffer
_Slice = tuple[str, int, Callable[[bytes, int], tuple[int | float, ...]], bool]


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadRequest:
    """One Modbus read covering one or more points (which may overlap)."""

    function: Function
    address: int
    count: int  # registers, 1..MAX_READ_COUNT
    points: tuple[Point, ...]
    _plan: tuple[_Slice, ...] = field(init=False, repr=False, compare=False)
    _pack_big: struct.Struct = field(init=False, repr=False, compare=False)
    _pack_swapped: struct.Struct | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.function not in _FUNCTIONS:
            raise ValueError(f"unknown function {self.function!r}")
        if not 1 <= self.count <= MAX_READ_COUNT:
            raise ValueError(f"count must be 1..{MAX_READ_COUNT}, got {self.count}")
        if not 0 <= self.address <= _ADDRESS_SPACE - self.count:
            raise ValueError(f"request {self.address}+{self.count} exceeds the address space")
        if not self.points:
            raise ValueError("a read request must cover at least one point")
        end = self.address + self.count
        names: set[str] = set()
        plan: list[_Slice] = []
        for p in self.points:
            if p.function != self.function:
                raise ValueError(f"point {p.name!r} is {p.function}, request is {self.function}")
            if p.address < self.address or p.end > end:
                raise ValueError(
                    f"point {p.name!r} ({p.address}..{p.end - 1}) lies outside "
                    f"request {self.address}..{end - 1}"
                )
            if p.name in names:
                raise ValueError(f"duplicate point name {p.name!r}")
            names.add(p.name)
            codec = p._codec
            plan.append(
                (p.name, 2 * (p.address - self.address), codec.value.unpack_from, codec.swapped)
            )
        any_swapped = any(s[3] for s in plan)
        object.__setattr__(self, "_plan", tuple(plan))
        object.__setattr__(self, "_pack_big", struct.Struct(f">{self.count}H"))
        object.__setattr__(
            self, "_pack_swapped", struct.Struct(f"<{self.count}H") if any_swapped else None
        )


def _sort_key(p: Point) -> tuple[int, int, str]:
    # Larger points first at equal addresses, so when a request has to be split
    # the wide value opens the new request and the narrow ones ride along,
    # instead of stretching the previous request. The name makes it total.
    return (p.address, -p.count, p.name)


def coalesce(
    points: Sequence[Point], max_gap: int = 8, max_count: int = MAX_READ_COUNT
) -> tuple[ReadRequest, ...]:
    """Merge points into few Modbus reads.

    Points are grouped by function (holding before input), sorted by address and
    packed greedily: a point joins the open request when the unused registers
    between the request's end and the point are at most ``max_gap`` and the
    request stays within ``max_count`` registers; otherwise it opens a new one.
    Reading a few unused registers is cheaper than another round trip (on RTU at
    9600 Bd eight extra registers add ~17 ms, while each extra request adds its
    own frames, inter-frame silences and the meter's turnaround), but some
    meters answer reads spanning unmapped registers with an exception, so the
    gap is configurable (0 = contiguous only).

    The result depends only on the set of points, not their input order.
    Raises ``ValueError`` for duplicate names (responses are keyed by name) or
    a point wider than ``max_count``.
    """
    if max_gap < 0:
        raise ValueError(f"max_gap must be >= 0, got {max_gap}")
    if not 1 <= max_count <= MAX_READ_COUNT:
        raise ValueError(f"max_count must be 1..{MAX_READ_COUNT}, got {max_count}")
    seen: set[str] = set()
    for p in points:
        if p.name in seen:
            raise ValueError(f"duplicate point name {p.name!r}")
        seen.add(p.name)
        if p.count > max_count:
            raise ValueError(
                f"point {p.name!r} needs {p.count} registers, more than max_count={max_count}"
            )

    requests: list[ReadRequest] = []
    for function in ("holding", "input"):
        group = sorted((p for p in points if p.function == function), key=_sort_key)
        if not group:
            continue
        start = group[0].address
        end = group[0].end
        members = [group[0]]
        for p in group[1:]:
            new_end = max(end, p.end)
            # p.address - end is negative for overlapping points: always a join
            # as long as the span allows it.
            if p.address - end <= max_gap and new_end - start <= max_count:
                members.append(p)
                end = new_end
            else:
                requests.append(
                    ReadRequest(
                        function=function, address=start, count=end - start, points=tuple(members)
                    )
                )
                start, end, members = p.address, p.end, [p]
        requests.append(
            ReadRequest(function=function, address=start, count=end - start, points=tuple(members))
        )
    return tuple(requests)


def decode_response(request: ReadRequest, words: Sequence[int]) -> dict[str, int | float]:
    """Decode every point of ``request`` from the registers of its response.

    Raises :class:`MalformedResponse` when ``words`` is not exactly
    ``request.count`` integers in 0..65535. Float NaN/±inf are returned as-is.
    """
    if len(words) != request.count:
        raise MalformedResponse(
            f"{request.function} read at {request.address} asked for {request.count} "
            f"registers, got {len(words)}"
        )
    try:
        # Packing validates every word (range and integer type) in C as a side effect.
        big = request._pack_big.pack(*words)
    except struct.error as exc:
        raise MalformedResponse(
            f"{request.function} read at {request.address}: register value out of range "
            f"0..65535 ({exc})"
        ) from exc
    swapped = request._pack_swapped.pack(*words) if request._pack_swapped is not None else big
    return {
        name: unpack_from(swapped if needs_swap else big, offset)[0]
        for name, offset, unpack_from, needs_swap in request._plan
    }


# ----------------------------------------------------------------------------
# Read plans: a device's register map as requests plus pure post-processing.
#
# Added for bus scheduling. A plan is built once per device; each read
# is then `decode_response` per request (above) and `apply_plan` (below), all
# pure, so the arithmetic that turns registers into billing values is tested
# without sockets.


@dataclass(frozen=True, slots=True, kw_only=True)
class ValueSpec:
    """How one output value is computed from the decoded points of a read.

    ``value = m10k(raw) x 10**sf x scale + offset``, where ``sf`` is the decoded
    value of ``sf_point`` (SunSpec ``sunssf``; ``-32768`` means "not
    implemented" and makes the value absent). Integers stay exact integers when
    no factor applies, so energy counters keep integer arithmetic; factors are
    applied through the decimal ``repr`` so 1754 x 0.1 is 175.4, not
    175.40000000000001.
    """

    name: str
    point: str
    scale: float = 1.0
    offset: float = 0.0
    sf_point: str | None = None
    m10k: bool = False
    not_implemented: int | None = None  # raw value meaning "not implemented" (SunSpec)


@dataclass(frozen=True, slots=True)
class StatusSpec:
    """A status word (decoded point ``point``, unsigned) and its bit -> flag map."""

    point: str
    bits: Mapping[int, Flag]


ClockFormat = Literal["epoch", "ymdhms", "datetime4"]
_CLOCK_POINTS: Final[dict[str, int]] = {"epoch": 1, "ymdhms": 6, "datetime4": 4}


@dataclass(frozen=True, slots=True, kw_only=True)
class ClockSpec:
    """The meter clock: ``epoch`` (one point, seconds since 1970 UTC), ``ymdhms``
    (six points: year, month, day, hour, minute, second in ``zone``) or
    ``datetime4`` (four words of IEC 60870-5-4 packed time, Schneider
    PowerLogic "DATETIME": year-2000 | month<<8 + day | hour<<8 + minute | ms)."""

    format: ClockFormat
    points: tuple[str, ...]
    zone: tzinfo = UTC
    tolerance_s: float = 10.0

    def __post_init__(self) -> None:
        if len(self.points) != _CLOCK_POINTS.get(self.format, -1):
            raise ValueError(f"clock format {self.format!r} needs {_CLOCK_POINTS.get(self.format)}"
                             f" points, got {len(self.points)}")  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadPlan:
    """A device's read: ``requests`` must all succeed; ``optional`` requests
    (status, clock) are read after them and their failure only loses what
    they carry, never the energy values."""

    requests: tuple[ReadRequest, ...]
    optional: tuple[ReadRequest, ...]
    values: tuple[ValueSpec, ...]
    status: tuple[StatusSpec, ...] = ()
    clock: ClockSpec | None = None

    @property
    def transactions(self) -> int:
        return len(self.requests) + len(self.optional)


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanResult:
    values: dict[str, int | float]
    flags: frozenset[Flag]
    meter_clock_s: float | None
    meter_clock_offset_s: float | None
    problems: tuple[str, ...]
    # The power-of-ten exponent each scale-registered value was read with, so a
    # caller can tell when the meter changed it between two reads.
    scale_factors: Mapping[str, int] = field(default_factory=dict)


def build_plan(
    points: Sequence[Point],
    values: Sequence[ValueSpec],
    *,
    optional_points: Sequence[Point] = (),
    status: Sequence[StatusSpec] = (),
    clock: ClockSpec | None = None,
    max_gap: int = 8,
) -> ReadPlan:
    """Coalesce ``points`` (required) and ``optional_points`` separately.

    Points may be shared (several values scaled by one scale-factor register)
    but names must be unique within each group; a point needed by both groups
    belongs in ``points``. Raises ``ValueError`` for a value, status or clock
    naming a point that is not read.
    """
    required = coalesce(points, max_gap)
    optional = coalesce(optional_points, max_gap) if optional_points else ()
    known = {p.name for p in points}
    known_optional = {p.name for p in optional_points}
    for spec in values:
        for name in (spec.point, spec.sf_point):
            if name is not None and name not in known:
                raise ValueError(f"value {spec.name!r} needs point {name!r}, which is not read")
    for name in [s.point for s in status] + list(clock.points if clock else ()):
        if name not in known and name not in known_optional:
            raise ValueError(f"status/clock point {name!r} is not read")
    return ReadPlan(
        requests=required,
        optional=optional,
        values=tuple(values),
        status=tuple(status),
        clock=clock,
    )


def m10k(value: int | float, signed: bool) -> int | float:
    """ION "M10K" 32-bit formats: the high register counts ten-thousands,
    the low register the rest (value = high x 10000 + low), each register
    signed for the signed format. ``value`` is the 32-bit decode of the pair."""
    if not isinstance(value, int):
        return value
    high, low = (value >> 16), value & 0xFFFF
    if signed:
        low = low - 0x10000 if low >= 0x8000 else low
    return high * 10_000 + low


def m10k_valid(value: int, signed: bool) -> bool:
    """Whether a 32-bit decode is a valid M10K pair: the low register holds the
    value modulus 10000 with the sign of the high register (ION protocol
    document, "32-bit Modulus-10000 Format"). ION 8650 meters were seen
    publishing low words above 9999 in M10K registers: such a pair is no
    number, and recording it as one would bill a wrong value."""
    high, low = (value >> 16), value & 0xFFFF
    if signed and low >= 0x8000:
        low -= 0x10000
    return 0 <= low <= 9_999 if high >= 0 else -9_999 <= low <= 0


def _times(value: int | float, factor: float) -> int | float:
    if factor == 1.0:
        return value
    if isinstance(value, int):
        return float(Decimal(value) * Decimal(repr(factor)))
    return value * factor


def scaled_value(spec: ValueSpec, decoded: Mapping[str, int | float]) -> int | float | None:
    """One value of a plan from the decoded points (None: the meter says n/a: the
    raw value is ``not_implemented`` or the scale factor is -32768, or the
    registers are no valid M10K pair)."""
    raw = decoded[spec.point]
    if spec.not_implemented is not None and raw == spec.not_implemented:
        return None
    if spec.m10k:
        # Valid M10K pairs share one sign, so a negative decode means the signed format.
        if isinstance(raw, int) and not m10k_valid(raw, signed=raw < 0):
            return None
        raw = m10k(raw, signed=raw < 0)
    if spec.sf_point is not None:
        sf = decoded[spec.sf_point]
        if not isinstance(sf, int) or sf == -32768 or not -20 <= sf <= 20:
            return None
        if isinstance(raw, int):
            raw = raw * 10**sf if sf >= 0 else float(Decimal(raw).scaleb(sf))
        elif math.isfinite(raw):
            # Exactly (decimal): 0.1 x 10**-1 is 0.01, not 0.010000000000000002.
            raw = float(Decimal(repr(raw)).scaleb(sf))
    value = _times(raw, spec.scale)
    if spec.offset:
        if isinstance(value, int):
            return float(Decimal(value) + Decimal(repr(spec.offset)))
        return value + spec.offset
    return value


def meter_clock_s(
    clock: ClockSpec, decoded: Mapping[str, int | float], reference_s: float | None = None
) -> float:
    """Epoch seconds of the meter clock; ValueError if the registers are no date.

    A local time the zone repeats (the hour at the end of DST) has two
    readings; the one nearer `reference_s` is the meter's (the
    first reading made a right clock look 3600 s off through that hour).
    """
    words = [decoded[p] for p in clock.points]
    if clock.format == "epoch":
        return float(words[0])
    ints = [int(w) for w in words]
    if clock.format == "ymdhms":
        year, month, day, hour, minute, second = ints
        microsecond = 0
    else:  # datetime4
        year = ints[0] & 0x7F
        month, day = (ints[1] >> 8) & 0x0F, ints[1] & 0x1F
        hour, minute = (ints[2] >> 8) & 0x1F, ints[2] & 0x3F
        second, microsecond = divmod((ints[3] & 0xFFFF) * 1000, 1_000_000)
    if year < 100:
        year += 2000
    local = datetime(year, month, day, hour, minute, second, microsecond,
                     tzinfo=clock.zone)  # fmt: skip
    first, second_reading = local.timestamp(), local.replace(fold=1).timestamp()
    if reference_s is not None and abs(second_reading - reference_s) < abs(first - reference_s):
        return second_reading
    return first


def apply_plan(
    plan: ReadPlan, decoded: Mapping[str, int | float], reference_s: float | None = None
) -> PlanResult:
    """Values, status flags and meter clock of one successful read.

    ``reference_s`` is the reference (epoch) time the read was taken at; with a
    clock in the plan, the meter clock offset is measured against it and an
    offset beyond the tolerance adds CLOCK_ERROR. Status or clock points
    missing from ``decoded`` (their optional request failed) are reported in
    ``problems`` and contribute nothing.
    """
    values: dict[str, int | float] = {}
    problems: list[str] = []
    scale_factors: dict[str, int] = {}
    for spec in plan.values:
        value = scaled_value(spec, decoded)
        if value is None:
            problems.append(f"{spec.name}: not implemented or invalid (value or scale factor)")
            continue
        values[spec.name] = value
        if spec.sf_point is not None:
            scale_factors[spec.name] = int(decoded[spec.sf_point])
    flags: set[Flag] = set()
    for status in plan.status:
        word = decoded.get(status.point)
        if word is None:
            problems.append(f"status {status.point} not read")
        elif isinstance(word, int) and word >= 0:
            flags.update(decode_bits(word, status.bits))
    clock_s = offset_s = None
    clock = plan.clock
    if clock is not None:
        if all(p in decoded for p in clock.points):
            try:
                clock_s = meter_clock_s(clock, decoded, reference_s)
            except (ValueError, OverflowError, OSError) as exc:
                problems.append(f"meter clock unreadable: {exc}")
                flags.add(Flag.CLOCK_ERROR)
        else:
            problems.append("meter clock not read")
        if clock_s is not None and reference_s is not None:
            offset_s = clock_s - reference_s
            if abs(offset_s) > clock.tolerance_s:
                flags.add(Flag.CLOCK_ERROR)
    return PlanResult(
        values=values,
        flags=frozenset(flags),
        meter_clock_s=clock_s,
        meter_clock_offset_s=offset_s,
        problems=tuple(problems),
        scale_factors=scale_factors,
    )
