"""Fault descriptions shared by the meter simulator and scenario files."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class FaultKind(StrEnum):
    SILENT = "silent"  # the unit receives requests and never answers
    DELAY = "delay"  # answers, but only after delay_s
    EXCEPTION = "exception"  # answers with Modbus exception `code`
    GARBAGE = "garbage"  # answers with random bytes (as many as the real reply)
    TRUNCATED = "truncated"  # answers with the first half of the real reply
    SPLIT = "split"  # real reply written in `pieces` parts, `pause_s` apart
    OFFLINE = "offline"  # the unit is gone: handled like an unknown unit id


@dataclass(frozen=True, kw_only=True)
class Fault:
    kind: FaultKind
    delay_s: float = 0.0  # DELAY
    code: int = 4  # EXCEPTION; 4 = server device failure
    pieces: int = 3  # SPLIT
    pause_s: float = 0.02  # SPLIT

    def __post_init__(self) -> None:
        if self.delay_s < 0:
            raise ValueError("delay_s must not be negative")
        if not 1 <= self.code <= 255:
            raise ValueError("exception code must be 1..255")
        if self.pieces < 2:
            raise ValueError("a split reply needs at least 2 pieces")
        if self.pause_s < 0:
            raise ValueError("pause_s must not be negative")

    @classmethod
    def silent(cls) -> Fault:
        return cls(kind=FaultKind.SILENT)

    @classmethod
    def delay(cls, delay_s: float) -> Fault:
        return cls(kind=FaultKind.DELAY, delay_s=delay_s)

    @classmethod
    def exception(cls, code: int = 4) -> Fault:
        return cls(kind=FaultKind.EXCEPTION, code=code)

    @classmethod
    def garbage(cls) -> Fault:
        return cls(kind=FaultKind.GARBAGE)

    @classmethod
    def truncated(cls) -> Fault:
        return cls(kind=FaultKind.TRUNCATED)

    @classmethod
    def split(cls, pieces: int = 3, pause_s: float = 0.02) -> Fault:
        return cls(kind=FaultKind.SPLIT, pieces=pieces, pause_s=pause_s)

    @classmethod
    def offline(cls) -> Fault:
        return cls(kind=FaultKind.OFFLINE)
