"""Detecting a step of the system clock made by someone else: the system
clock moved and the monotonic clock did not (pure).
"""

from __future__ import annotations

from dataclasses import dataclass

from edged.core.time.settings import Direction

# -- system clock steps ---------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ClockStep:
    """The system clock jumped by size_s between two observations."""

    size_s: float  # + = the system clock jumped forward
    mono_before_s: float  # last observation before the step
    mono_s: float  # the observation that found it
    system_s: float  # system time at that observation (after the step)

    @property
    def direction(self) -> Direction:
        return Direction.FORWARD if self.size_s > 0 else Direction.BACKWARD


class ClockStepDetector:
    """Finds system clock steps from successive (system, monotonic) readings.

    Between two readings both clocks advance alike unless the system clock was
    set; comparing successive readings (not a fixed baseline) tolerates clocks
    that are slewed differently.
    """

    def __init__(self, threshold_s: float = 0.5) -> None:
        self._threshold_s = threshold_s
        self._last: tuple[float, float] | None = None

    def observe(self, system_s: float, mono_s: float) -> ClockStep | None:
        last = self._last
        if last is not None and mono_s < last[1]:
            return None  # stale reading (out of order); keep the newer baseline
        self._last = (system_s, mono_s)
        if last is None:
            return None
        size_s = (system_s - last[0]) - (mono_s - last[1])
        if abs(size_s) <= self._threshold_s:
            return None
        return ClockStep(size_s=size_s, mono_before_s=last[1], mono_s=mono_s, system_s=system_s)
