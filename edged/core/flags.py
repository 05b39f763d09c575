"""The flag vocabulary and its mappings to other standards (docs/flags.md).

This table is the one source for payloads (`iee_status`, `quality`) and for
docs/flags.md, which a test regenerates and compares.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from edged.core.model import Flag, Quality


@dataclass(frozen=True, slots=True)
class FlagInfo:
    flag: Flag
    meaning: str
    iee: str | None  # Itron IEE reading status code
    c1219: str | None  # ANSI C12.19 table 64 interval status
    dlms: str | None  # DLMS/COSEM profile status bit
    iec61968_9: str | None  # IEC 61968-9 reading quality code
    nem12: str | None  # NEM12 reason code


FLAG_TABLE: tuple[FlagInfo, ...] = (
    FlagInfo(Flag.POWER_FAIL, "gateway or meter lost power within the interval",
             "POWER", "0x20", "bit 7 PDN", "1.2.32", "79"),
    FlagInfo(Flag.CLOCK_SET_FORWARD, "reference clock stepped forward within it",
             "TIMERESET", "0x40", "bit 5 CAD", "1.4.64", "89"),
    FlagInfo(Flag.CLOCK_SET_BACKWARD, "reference clock stepped backward within it",
             "CLOCK", "0x80", "bit 5 CAD", "1.4.128", "89"),
    FlagInfo(Flag.TIME_ADJUSTED, "the interval in which assumed time ended",
             "TIME ADJUSTED", None, None, "1.4.9", "89"),
    FlagInfo(Flag.AMT, "built on assumed (unsynchronised) time",
             "AMT", None, "bit 1 CIV", "1.1.9", "86"),
    FlagInfo(Flag.CLOCK_ERROR, "meter clock outside tolerance",
             "TIMERESET", None, None, "1.1.9", "86"),
    FlagInfo(Flag.PARTIAL, "shorter than nominal (start-up, step, late first read)",
             "IRREGULAR", "2", None, "1.4.2", "80"),
    FlagInfo(Flag.LONG, "longer than nominal",
             "IRREGULAR", "3", None, "1.4.3", "81"),
    FlagInfo(Flag.MISSING, "no read at this boundary",
             None, "4", None, "1.5.259", "85"),
    FlagInfo(Flag.ROLLOVER, "counter wrapped (information)",
             None, "1", None, "1.4.1", "95"),
    FlagInfo(Flag.COUNTER_RESET, "counter went back implausibly",
             None, None, None, "1.4.8", "87"),
    FlagInfo(Flag.SCALE_CHANGED, "the meter changed the channel's scale factor within it",
             None, None, None, None, None),
    FlagInfo(Flag.DEVICE_ERROR, "meter reported a fault / exception",
             "IOBOARD", None, "bit 0 ERR, bit 2 DNV", "1.1.x", "82"),
    FlagInfo(Flag.OUT_OF_RANGE, "value beyond configured limits",
             None, None, None, "1.5.256", "96"),
    FlagInfo(Flag.DST, "interval in daylight-saving time (information)",
             None, "0x10", "bit 3", "1.4.16", None),
    FlagInfo(Flag.ESTNEEDED, "validation failed; estimate before billing",
             "ESTNEEDED", None, None, None, None),
    FlagInfo(Flag.ESTIMATED, "value replaced by estimation",
             "EST", None, None, "cat. 8", "E/S/F"),
)  # fmt: skip

FLAG_INFO: dict[Flag, FlagInfo] = {info.flag: info for info in FLAG_TABLE}

# Flags that say something about the interval without casting doubt on its value.
INFORMATIONAL_FLAGS: frozenset[Flag] = frozenset({Flag.DST, Flag.ROLLOVER})

# The status codes the Itron AMT validation rule looks for (Itron AMT note,
# "User-defined validation rule").
AMT_RULE_IEE_CODES: frozenset[str] = frozenset(
    {"CLOCK", "IOBOARD", "IRREGULAR", "POWER", "TIMERESET"}
)


def ordered(flags: Iterable[Flag]) -> list[Flag]:
    """Flags in the canonical (declaration) order, without duplicates."""
    present = set(flags)
    return [flag for flag in Flag if flag in present]


def iee_status(flags: Iterable[Flag]) -> list[str]:
    """Itron IEE reading status codes for a flag set, de-duplicated, in flag order."""
    codes: list[str] = []
    for flag in ordered(flags):
        code = FLAG_INFO[flag].iee
        if code is not None and code not in codes:
            codes.append(code)
    return codes


def quality(flags: Iterable[Flag]) -> Quality:
    """Summarise a flag set: missing > estimated > suspect > actual."""
    present = set(flags)
    if Flag.MISSING in present:
        return Quality.MISSING
    if Flag.ESTIMATED in present:
        return Quality.ESTIMATED
    if present - INFORMATIONAL_FLAGS:
        return Quality.SUSPECT
    return Quality.ACTUAL
