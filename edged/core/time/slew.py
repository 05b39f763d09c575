"""Applying a correction to the reference: slewed at a bounded rate, or
stepped when it is too large to slew (pure).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edged.core.time.ntpfit import LinearOffset
from edged.core.time.settings import PPM, Direction, direction_of

# -- applying the offset: slew or step ----------------------------------------------


@dataclass(frozen=True, slots=True)
class OffsetCorrection:
    """A change of the reference offset: a step (at once) or a slew (gradual)."""

    size_s: float  # new target minus applied offset: + moves reference time forward
    stepped: bool
    mono_s: float

    @property
    def direction(self) -> Direction | None:
        return direction_of(self.size_s)


class OffsetSlewer:
    """The offset actually applied to system time, following a target line.

    applied(mono) = target(mono) + residual(mono), where the residual (what is
    still to be slewed in) shrinks towards zero at slew_rate_ppm. Because a new
    target only changes the residual, the applied offset is continuous except
    at a step, and reference time runs at (1 ± drift ± slew rate), never
    backwards.
    """

    def __init__(
        self,
        step_threshold_s: float = 0.5,
        slew_rate_ppm: float = 500.0,
        target: LinearOffset | None = None,
    ) -> None:
        self._step_threshold_s = step_threshold_s
        self._rate = slew_rate_ppm * PPM
        self._target = target or LinearOffset(0.0)
        self._residual_s = 0.0
        self._residual_mono_s = 0.0

    @property
    def target(self) -> LinearOffset:
        return self._target

    def remaining_s(self, mono_s: float) -> float:
        """Part of the last correction not slewed in yet at mono_s."""
        elapsed_s = max(0.0, mono_s - self._residual_mono_s)
        left_s = abs(self._residual_s) - self._rate * elapsed_s
        return math.copysign(left_s, self._residual_s) if left_s > 0 else 0.0

    def applied_offset(self, mono_s: float) -> float:
        return self._target.predict_offset(mono_s) + self.remaining_s(mono_s)

    def retarget(
        self, target: LinearOffset, mono_s: float, *, force_step: bool = False
    ) -> OffsetCorrection:
        """Follow a new target from mono_s: slew below the step threshold, else step."""
        size_s = target.predict_offset(mono_s) - self.applied_offset(mono_s)
        stepped = force_step or abs(size_s) >= self._step_threshold_s
        self._target = target
        # Slewing keeps the applied offset where it is now and lets the
        # residual decay; a step drops the residual.
        self._residual_s = 0.0 if stepped else -size_s
        self._residual_mono_s = mono_s
        return OffsetCorrection(size_s, stepped, mono_s)

    def set_applied(self, applied_s: float, mono_s: float) -> None:
        """Make the applied offset applied_s at mono_s (leaving assumed time)."""
        self._residual_s = applied_s - self._target.predict_offset(mono_s)
        self._residual_mono_s = mono_s

    def shift(self, delta_s: float) -> None:
        """Move target and applied offset together (system clock stepped by -delta_s)."""
        self._target = self._target.shifted(delta_s)
