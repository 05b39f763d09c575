"""The engine's per-channel state and its values: what is carried from one
boundary to the next (and persisted), and what a step returns (pure).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import TYPE_CHECKING, NamedTuple

from edged.core.demand import RollingEntry
from edged.core.model import Event, Flag, Interval, TimeState

if TYPE_CHECKING:  # only annotations: the engine loads no pydantic at run time
    from edged.config.schema import (
        Device,
    )


Counter = int | float


# --------------------------------------------------------------------------
# State


@dataclass(frozen=True, slots=True, kw_only=True)
class GapRun:
    """Consecutive MISSING records since the last good counter that share flags.

    Kept so that prorated estimates re-emitted for those boundaries carry the
    flags the MISSING records had (AMT, DEVICE_ERROR, ...), and so a LONG
    record closing the gap carries them too. Runs keep the state small however
    long the outage; boundaries not covered (e.g. state from before an
    upgrade) get the flags implied by the closing read's time state.
    """

    first: datetime
    last: datetime
    flags: frozenset[Flag]  # without MISSING and DST (recomputed per boundary)
    time_state: TimeState


@dataclass(frozen=True, slots=True, kw_only=True)
class ChannelState:
    counter: int | float | None = None  # last good raw counter value (counts)
    counter_at: datetime | None = None  # boundary (or baseline read time) of that counter
    last_end: datetime | None = None  # end of the last record emitted
    gap: tuple[GapRun, ...] = ()  # MISSING records since counter_at
    rolling: tuple[RollingEntry, ...] = ()  # last intervals for rolling demand
    coarse: bool = False  # counter_resolution already reported
    # Monotonic time of the read that gave `counter`, and the boot it was
    # taken in (`Read.boot_id`): the monotonic clock runs across restarts of
    # edged but restarts with the machine. Persisted only with a boot id.
    counter_mono: float | None = None
    counter_boot: str | None = None
    # The last records were built on assumed time (AMT): the next record on
    # confirmed time is the one in which assumed time ended (TIME_ADJUSTED).
    assumed: bool = False
    # Flags of reads for boundaries already closed (the reference went back
    # behind the last record): they go on the next record emitted, so a time
    # event is never lost with a read that closes nothing.
    carry: frozenset[Flag] = frozenset()

    def to_json(self) -> str:
        """The whole state as JSON text, for the shell to persist."""
        return json.dumps(
            {
                "v": 1,
                # As text: JSON numbers would round 64-bit counters above 2**53.
                "counter": None if self.counter is None else repr(self.counter),
                "counter_at": _iso(self.counter_at),
                "last_end": _iso(self.last_end),
                "gap": [
                    [
                        _iso(r.first),
                        _iso(r.last),
                        sorted(str(f) for f in r.flags),
                        str(r.time_state),
                    ]
                    for r in self.gap
                ],
                "rolling": [[_iso(e.start), _iso(e.end), e.energy] for e in self.rolling],
                "coarse": self.coarse,
                "assumed": self.assumed,
                "carry": sorted(str(f) for f in self.carry),
                **(
                    {"mono": self.counter_mono, "boot": self.counter_boot}
                    if self.counter_boot is not None and self.counter_mono is not None
                    else {}
                ),
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> ChannelState:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("v") != 1:
            raise ValueError("not a ChannelState (version 1) document")
        counter = data.get("counter")
        return cls(
            counter=None if counter is None else parse_counter(str(counter)),
            counter_at=_parse_time(data.get("counter_at")),
            last_end=_parse_time(data.get("last_end")),
            gap=tuple(
                GapRun(
                    first=_require_time(first),
                    last=_require_time(last),
                    flags=frozenset(Flag(f) for f in flags),
                    time_state=TimeState(ts),
                )
                for first, last, flags, ts in data.get("gap", [])
            ),
            rolling=tuple(
                RollingEntry(
                    _require_time(start), _require_time(end), None if e is None else float(e)
                )
                for start, end, e in data.get("rolling", [])
            ),
            coarse=bool(data.get("coarse", False)),
            assumed=bool(data.get("assumed", False)),
            carry=frozenset(Flag(f) for f in data.get("carry", [])),
            counter_mono=None if data.get("mono") is None else float(data["mono"]),
            counter_boot=None if data.get("boot") is None else str(data["boot"]),
        )


def parse_counter(text: str) -> int | float:
    """Inverse of ``repr`` for a stored counter (int stays int, float stays float)."""
    return float(text) if any(c in text for c in ".eEn") else int(text)


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.astimezone(UTC).isoformat()


def _parse_time(text: object) -> datetime | None:
    if text is None:
        return None
    if not isinstance(text, str):
        raise ValueError(f"expected an ISO timestamp, got {text!r}")
    return datetime.fromisoformat(text).astimezone(UTC)


def _require_time(text: object) -> datetime:
    t = _parse_time(text)
    if t is None:
        raise ValueError("missing timestamp")
    return t


@dataclass(frozen=True, slots=True)
class IntervalContext:
    site: str
    device: Device
    zone: tzinfo


class ChannelStep(NamedTuple):
    state: ChannelState
    records: tuple[Interval, ...]
    events: tuple[Event, ...]


class DeviceStep(NamedTuple):
    states: dict[str, ChannelState]
    records: tuple[Interval, ...]
    events: tuple[Event, ...]
