"""The flag vocabulary and its mappings to other standards (docs/flags.md).

This table is the one source for payloads (`iee_status`, `quality`) and for
docs/flags.md, which a test regenerates and compares.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from edged.core.model import Flag, Quality


@dataclass(frozen=True, slots=True, kw_only=True)
class FlagInfo:
    flag: Flag
    meaning: str
    iee: str | None  # Itron IEE reading status code
    c1219: str | None  # ANSI C12.19 table 64 interval status
    dlms: str | None  # DLMS/COSEM profile status bit
    iec61968_9: str | None  # IEC 61968-9 reading quality code
    nem12: str | None  # NEM12 reason code


FLAG_TABLE: tuple[FlagInfo, ...] = (
    FlagInfo(flag=Flag.POWER_FAIL, meaning="gateway or meter lost power within the interval",
             iee="POWER", c1219="0x20", dlms="bit 7 PDN", iec61968_9="1.2.32", nem12="79"),
    FlagInfo(flag=Flag.CLOCK_SET_FORWARD, meaning="reference clock stepped forward within it",
             iee="TIMERESET", c1219="0x40", dlms="bit 5 CAD", iec61968_9="1.4.64", nem12="89"),
    FlagInfo(flag=Flag.CLOCK_SET_BACKWARD, meaning="reference clock stepped backward within it",
             iee="CLOCK", c1219="0x80", dlms="bit 5 CAD", iec61968_9="1.4.128", nem12="89"),
    FlagInfo(flag=Flag.TIME_ADJUSTED, meaning="the interval in which assumed time ended",
             iee="TIME ADJUSTED", c1219=None, dlms=None, iec61968_9="1.4.9", nem12="89"),
    FlagInfo(flag=Flag.AMT, meaning="built on assumed (unsynchronised) time",
             iee="AMT", c1219=None, dlms="bit 1 CIV", iec61968_9="1.1.9", nem12="86"),
    FlagInfo(flag=Flag.CLOCK_ERROR, meaning="meter clock outside tolerance",
             iee="TIMERESET", c1219=None, dlms=None, iec61968_9="1.1.9", nem12="86"),
    FlagInfo(flag=Flag.PARTIAL, meaning="shorter than nominal (start-up, step, late first read)",
             iee="IRREGULAR", c1219="2", dlms=None, iec61968_9="1.4.2", nem12="80"),
    FlagInfo(flag=Flag.LONG, meaning="longer than nominal",
             iee="IRREGULAR", c1219="3", dlms=None, iec61968_9="1.4.3", nem12="81"),
    FlagInfo(flag=Flag.MISSING, meaning="no read at this boundary",
             iee=None, c1219="4", dlms=None, iec61968_9="1.5.259", nem12="85"),
    FlagInfo(flag=Flag.ROLLOVER, meaning="counter wrapped (information)",
             iee=None, c1219="1", dlms=None, iec61968_9="1.4.1", nem12="95"),
    FlagInfo(flag=Flag.COUNTER_RESET, meaning="counter went back implausibly",
             iee=None, c1219=None, dlms=None, iec61968_9="1.4.8", nem12="87"),
    FlagInfo(flag=Flag.SCALE_CHANGED,
             meaning="the meter changed the channel's scale factor within it",
             iee=None, c1219=None, dlms=None, iec61968_9=None, nem12=None),
    FlagInfo(flag=Flag.DEVICE_ERROR, meaning="meter reported a fault / exception",
             iee="IOBOARD", c1219=None, dlms="bit 0 ERR, bit 2 DNV", iec61968_9="1.1.x",
             nem12="82"),
    FlagInfo(flag=Flag.OUT_OF_RANGE, meaning="value beyond configured limits",
             iee=None, c1219=None, dlms=None, iec61968_9="1.5.256", nem12="96"),
    FlagInfo(flag=Flag.DST, meaning="interval in daylight-saving time (information)",
             iee=None, c1219="0x10", dlms="bit 3", iec61968_9="1.4.16", nem12=None),
    FlagInfo(flag=Flag.ESTNEEDED, meaning="validation failed; estimate before billing",
             iee="ESTNEEDED", c1219=None, dlms=None, iec61968_9=None, nem12=None),
    FlagInfo(flag=Flag.ESTIMATED, meaning="value replaced by estimation",
             iee="EST", c1219=None, dlms=None, iec61968_9="cat. 8", nem12="E/S/F"),
)  # fmt: skip

FLAG_INFO: dict[Flag, FlagInfo] = {info.flag: info for info in FLAG_TABLE}

# Flags that say something about the interval without casting doubt on its value.
INFORMATIONAL_FLAGS: frozenset[Flag] = frozenset({Flag.DST, Flag.ROLLOVER})

# The status codes the Itron AMT validation rule looks for (Itron AMT note,
# "User-defined validation rule").
AMT_RULE_IEE_CODES: frozenset[str] = frozenset(
    {"CLOCK", "IOBOARD", "IRREGULAR", "POWER", "TIMERESET"}
)


# Iterating the enum class runs a generator through its member map each time
# (a tenth of a boundary's CPU, three times per record): once, here.
_DECLARED: tuple[Flag, ...] = tuple(Flag)


def ordered(flags: Iterable[Flag]) -> list[Flag]:
    """Flags in the canonical (declaration) order, without duplicates."""
    present = set(flags)
    if not present:
        return []
    return [flag for flag in _DECLARED if flag in present]


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
