"""Report-by-exception for fast-poll measurements (pure: times are arguments).

A point with a deadband is published (and stored) only when it has moved by
more than its deadband since the value last reported, or when it has been
silent for `max_silence_s`; a point without one is reported at every poll.
84 branch circuits polled every second then send what changed, not 84 values
a second, while a consumer still hears from every point at least every
`max_silence_s` (so silence means "unchanged", never "lost").

This applies to measurements only. Interval energy is read at boundaries and
never deadbanded: every interval record is built and published.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Deadband:
    """Absolute (in the point's unit) and/or percent of the last reported value;
    a change beyond either is reported. Neither: every value is reported."""

    absolute: float | None = None
    percent: float | None = None

    @property
    def active(self) -> bool:
        return self.absolute is not None or self.percent is not None


@dataclass(frozen=True, slots=True)
class Reported:
    value: float | None  # None: NaN / no value
    at_s: float


def _number(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def moved(band: Deadband, last: float | None, value: float | None) -> bool:
    """Whether `value` differs from the last reported one by more than the band."""
    if not band.active:
        return True  # no deadband: every poll is reported, as without this module
    last, value = _number(last), _number(value)
    if last is None or value is None:
        return last is not value  # appearing or disappearing is news
    delta = abs(value - last)
    if math.isinf(delta):
        return value != last
    if band.absolute is not None and delta > band.absolute:
        return True
    return band.percent is not None and delta > abs(last) * band.percent / 100.0


def report(
    bands: Mapping[str, Deadband],
    last: Mapping[str, Reported],
    values: Mapping[str, float],
    now_s: float,
    max_silence_s: float | None,
) -> tuple[dict[str, float], dict[str, Reported]]:
    """The values to report now (NaN included: a meter's "no value"), and the new
    last-reported state (of the points with a band: the others are reported at
    every poll, so there is nothing to remember about them)."""
    out: dict[str, float] = {}
    state = dict(last)
    for name, value in values.items():
        band = bands.get(name, _NO_BAND)
        # Without a band every poll is reported (what `moved` says first),
        # without asking or remembering: this runs for every point of every
        # fast poll, and the bookkeeping cost more than the decision.
        if band.absolute is None and band.percent is None:
            out[name] = value
            continue
        previous = last.get(name)
        if (
            previous is None
            or moved(band, previous.value, value)
            or (max_silence_s is not None and now_s - previous.at_s >= max_silence_s)
        ):
            out[name] = value
            state[name] = Reported(_number(value), now_s)
    return out, state


_NO_BAND = Deadband()
