"""What changed about reference time, as values: transitions (the events and
flags they become) and the status snapshot (pure).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from edged.core.model import Event, Flag, TimeState
from edged.core.time.settings import Direction, TimeSource, direction_of

# -- the time state machine -------------------------------------------------------------


class TransitionKind(StrEnum):
    AMT_ENTERED = "amt_entered"  # start-up found the clock behind the last mark
    TIME_ADJUSTED = "time_adjusted"  # assumed time ended: reference corrected to true time
    CLOCK_STEP = "clock_step"  # the reference or the system clock stepped
    STATE_CHANGED = "time_state"  # synced / holdover / assumed changed


class Cause(StrEnum):
    STARTUP = "startup"
    NTP = "ntp"
    SYSTEM_CLOCK_STEP = "system_clock_step"
    KERNEL = "kernel"
    SILENCE = "silence"


def _utc(unix_s: float) -> datetime:
    return datetime.fromtimestamp(unix_s, UTC)


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeTransition:
    """Something that changed about reference time, as a value.

    The shell turns it into an `Event` (`to_event`); the interval engine adds
    `flags` to the interval containing `at` (the interval in progress).
    """

    kind: TransitionKind
    cause: Cause
    at: datetime  # reference time just after the transition
    system_at: datetime  # system clock at the same moment
    mono_s: float
    state: TimeState  # after
    previous_state: TimeState
    # Signed change of reference time (+ forward). Applied at once when
    # `stepped`, else slewed in at the slew rate.
    adjustment_s: float = 0.0
    stepped: bool = False
    system_step_s: float | None = None  # the system clock step that caused it, if one did
    message: str = ""
    ended_amt: bool = False  # assumed meter time (mark + 5 s rule) ended here

    @property
    def direction(self) -> Direction | None:
        return direction_of(self.adjustment_s)

    @property
    def flags(self) -> frozenset[Flag]:
        """Flags for the interval in progress when this happened.

        CLOCK_SET_* only when the reference was really set (stepped); a slewed
        correction never moves an interval boundary. TIME_ADJUSTED when assumed
        meter time ends or the reference steps as assumed time ends: the first
        NTP confirmation after an ordinary start, with the clock already right,
        is not a time adjustment and flags nothing (else every restart would
        leave a suspect interval for the MDM to estimate).
        """
        direction = self.direction if self.stepped else None
        set_flag = {
            Direction.FORWARD: frozenset({Flag.CLOCK_SET_FORWARD}),
            Direction.BACKWARD: frozenset({Flag.CLOCK_SET_BACKWARD}),
            None: frozenset[Flag](),
        }[direction]
        if self.kind is TransitionKind.TIME_ADJUSTED:
            if not (self.ended_amt or self.stepped):
                return frozenset()
            return frozenset({Flag.TIME_ADJUSTED}) | set_flag
        if self.kind is TransitionKind.CLOCK_STEP and self.stepped:
            return set_flag
        return frozenset()

    def to_event(self, device: str | None = None) -> Event:
        direction = self.direction
        details: dict[str, object] = {
            "cause": str(self.cause),
            "state": str(self.state),
            "previous_state": str(self.previous_state),
            "system_time": self.system_at.isoformat(),
            "adjustment_s": round(self.adjustment_s, 6),
            "stepped": self.stepped,
            "direction": None if direction is None else str(direction),
        }
        if self.system_step_s is not None:
            details["system_step_s"] = round(self.system_step_s, 6)
        return Event(
            device=device, kind=str(self.kind), at=self.at, message=self.message, details=details
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class TimebaseStatus:
    """Snapshot for the gateway status message."""

    source: TimeSource
    state: TimeState
    reference: datetime
    assumed_meter_time: bool  # AMT: running on mark + 5 s and the monotonic clock
    applied_offset_s: float  # reference minus system, now
    target_offset_s: float | None  # the model's prediction now (NTP with a fit)
    slew_remaining_s: float
    drift_ppm: float | None
    fit_samples: int
    fit_residual_rms_s: float | None
    last_confirmed_age_s: float | None
