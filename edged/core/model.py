"""Values that flow through edged: reads, intervals, events, time states.

Everything here is a frozen dataclass or an enum; nothing does I/O. All
datetimes are timezone-aware UTC.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from types import MappingProxyType


def iso_utc(t: datetime) -> str:
    """UTC ISO-8601 with a Z; milliseconds only when there are any."""
    if t.tzinfo is not UTC:
        t = t.astimezone(UTC)
    elif not t.microsecond:
        # Whole seconds in UTC are boundaries, which every record, row and
        # payload of every meter states several times: remembered.
        return _iso_whole_utc(t)
    # isoformat (C) rather than strftime: several per record, at every boundary.
    # In UTC it ends "+00:00", which becomes the "Z".
    return t.isoformat(timespec="milliseconds" if t.microsecond else "seconds")[:-6] + "Z"


@functools.lru_cache(maxsize=1024)
def _iso_whole_utc(t: datetime) -> str:
    # Only for tzinfo UTC: equal keys are then the same instant (two local
    # times that differ only in `fold` compare equal, and are not).
    return t.isoformat(timespec="seconds")[:-6] + "Z"


def parse_iso_utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


class Flag(StrEnum):
    """Interval quality flags (docs/flags.md). Declaration order is the
    order in which flags are listed in payloads."""

    POWER_FAIL = "POWER_FAIL"
    CLOCK_SET_FORWARD = "CLOCK_SET_FORWARD"
    CLOCK_SET_BACKWARD = "CLOCK_SET_BACKWARD"
    TIME_ADJUSTED = "TIME_ADJUSTED"
    AMT = "AMT"
    CLOCK_ERROR = "CLOCK_ERROR"
    PARTIAL = "PARTIAL"
    LONG = "LONG"
    MISSING = "MISSING"
    ROLLOVER = "ROLLOVER"
    COUNTER_RESET = "COUNTER_RESET"
    SCALE_CHANGED = "SCALE_CHANGED"
    DEVICE_ERROR = "DEVICE_ERROR"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    DST = "DST"
    ESTNEEDED = "ESTNEEDED"
    ESTIMATED = "ESTIMATED"


class Quality(StrEnum):
    ACTUAL = "actual"
    SUSPECT = "suspect"
    ESTIMATED = "estimated"
    MISSING = "missing"


class TimeState(StrEnum):
    """How far the reference clock can be trusted (docs/time.md)."""

    SYNCED = "synced"
    HOLDOVER = "holdover"
    ASSUMED = "assumed"


class ReadErrorKind(StrEnum):
    TIMEOUT = "timeout"
    CONNECTION = "connection"
    EXCEPTION = "exception"  # a Modbus exception response
    MALFORMED = "malformed"  # garbled / truncated / wrong-length reply
    BACKOFF = "backoff"  # device skipped because it is backed off after failures


@dataclass(frozen=True, slots=True)
class ReadError:
    kind: ReadErrorKind
    detail: str
    exception_code: int | None = None


def _frozen_mapping(values: Mapping[str, float | int] | None) -> Mapping[str, float | int]:
    return MappingProxyType(dict(values or {}))


@dataclass(frozen=True, slots=True, kw_only=True)
class Read:
    """One boundary (or start-up baseline) read of a device.

    `values` holds each channel's raw decoded register value in counts, before
    the multiplier is applied; the interval engine owns the arithmetic.
    `boundary` is the interval boundary the read was aimed at, or None for an
    off-boundary read such as the start-up baseline.
    """

    device: str
    boundary: datetime | None
    read_at: datetime
    read_lateness_ms: float | None
    time_state: TimeState
    values: Mapping[str, float | int] = field(default_factory=dict)
    registers: tuple[tuple[int, tuple[int, ...]], ...] = ()  # (start address, words) per request
    error: ReadError | None = None
    flags: frozenset[Flag] = frozenset()  # observed by this read: status bits, meter clock, etc.
    meter_clock_offset_s: float | None = None
    # Channels whose scale register (power of ten) differs from the previous read's:
    # their record is SCALE_CHANGED. Not stored: a restart compares from its first read.
    rescaled: frozenset[str] = frozenset()
    # Monotonic time (s) the request went out, for the real elapsed time
    # between two reads; None when the shell does not know it.
    mono_s: float | None = None
    # The machine's boot (Linux boot_id) that mono_s belongs to; None when the
    # monotonic clock is not the system's (tests) or unknown.
    boot_id: str | None = None
    # Reference-time windows in which the gateway was down (POWER_FAIL on the
    # records, MISSING ones included, whose intervals overlap them).
    outages: tuple[tuple[datetime, datetime], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", _frozen_mapping(self.values))

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True, slots=True, kw_only=True)
class Interval:
    """One interval record of one channel, labelled by its (nominal) end."""

    site: str
    device: str
    channel: str
    start: datetime
    end: datetime
    duration_s: float
    value: float | None
    unit: str
    demand: float | None
    demand_unit: str | None
    counter_start: float | int | None
    counter_end: float | int | None
    flags: frozenset[Flag]
    time_state: TimeState
    read_at: datetime | None
    read_lateness_ms: float | None
    original_value: float | None = None
    rolling_demand: float | None = None
    # On a compensated channel only: what was applied (docs/compensation.md).
    compensation: Mapping[str, object] | None = None

    @property
    def id(self) -> str:

        return f"{self.site}/{self.device}/{self.channel}/{iso_utc(self.end)}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Something an operator or upstream system should know about."""

    device: str | None  # None for gateway-level events
    kind: str  # e.g. "amt_entered", "clock_step", "counter_reset", "config_reload"
    at: datetime
    message: str
    details: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "details", MappingProxyType(dict(self.details)))


@dataclass(frozen=True, slots=True)
class Measurement:
    """One fast poll of a device's instantaneous values: published at QoS 0 and
    kept locally (to backfill a historian) unless the disk budget sheds them.
    A value the meter reported as NaN or infinite is None."""

    device: str
    at: datetime
    values: Mapping[str, float | int | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", MappingProxyType(dict(self.values)))
