"""The time base's settings and small vocabularies: source, direction of a
correction, kernel sync status (pure).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

PPM = 1e-6


class TimeSource(StrEnum):
    """`time.source`: who confirms the time."""

    NTP = "ntp"  # edged's own NTP model; the system clock is only a counter
    SYSTEM = "system"  # the kernel's sync status (chrony, GPS or PTP discipline the clock)


class Direction(StrEnum):
    FORWARD = "forward"
    BACKWARD = "backward"


def direction_of(size_s: float) -> Direction | None:
    if size_s > 0:
        return Direction.FORWARD
    if size_s < 0:
        return Direction.BACKWARD
    return None


class KernelSync(StrEnum):
    """What adjtimex(2) says about the system clock."""

    SYNCED = "synced"
    UNSYNCED = "unsynced"
    UNKNOWN = "unknown"  # not Linux, or the call failed: neither confirms nor denies


@dataclass(frozen=True, slots=True, kw_only=True)
class TimebaseConfig:
    """Tuning of the time model. Defaults follow ntpd/chrony practice.

    Config keys (`time.*`) map one to one: source, ntp_poll -> poll_s,
    step_threshold -> step_threshold_s, slew_rate -> slew_rate_ppm,
    clock_step_detect -> clock_step_detect_s, holdover_after -> holdover_after_s.
    """

    source: TimeSource = TimeSource.NTP
    poll_s: float = 64.0
    # Gap between model and applied offset from which the reference steps
    # instead of slewing (ntpd uses 0.128 s, chrony's makestep 1 s).
    step_threshold_s: float = 0.5
    # 500 ppm is the kernel's and ntpd's maximum slew: half a millisecond per
    # second, so a 0.4 s correction takes 800 s but the reference never jumps.
    slew_rate_ppm: float = 500.0
    # System-clock steps are found by comparing how far the system and the
    # monotonic clocks advanced. On Linux both are slewed together and only a
    # step separates them, so this can sit far below step_threshold_s: small
    # steps (ntpd steps from 0.128 s) are then compensated, not passed on.
    clock_step_detect_s: float = 0.05
    # Confirmation older than this turns synced into holdover; None = 4 polls.
    holdover_after_s: float | None = None
    # The meter-industry AMT rule: after an outage with the clock found behind
    # the last record, time restarts at that record plus this.
    amt_offset_s: float = 5.0
    # Round trips longer than this bound the offset error beyond any use.
    max_delay_s: float = 1.0
    # A sample is rejected when its round trip exceeds delay_factor times the
    # server's shortest recent round trip plus delay_margin_s: queueing makes
    # the path asymmetric and the offset error is up to half the excess.
    delay_factor: float = 3.0
    delay_margin_s: float = 0.005
    delay_history: int = 8
    # A server further than this from the median of a poll round is a
    # falseticker; if no majority of servers agrees, the round is rejected.
    server_tolerance_s: float = 0.1
    # A round further than this from the model's prediction is a spike, and
    # ignored unless stepout_rounds consecutive rounds agree on the new offset.
    spike_threshold_s: float = 0.1
    stepout_rounds: int = 3
    # Least-squares window; None = 16 polls. Long enough to average noise,
    # short enough to follow temperature-driven frequency changes.
    fit_window_s: float | None = None
    max_fit_samples: int = 64
    # The drift (slope) is only estimated from samples spanning this long; a
    # slope from a short span is mostly noise (1 ms over 1 s is 1000 ppm).
    drift_min_span_s: float = 60.0
    # Crystal oscillators are within a few tens of ppm; the kernel will not
    # correct more than 500 ppm, so a larger slope is noise, not drift.
    max_drift_ppm: float = 500.0

    def __post_init__(self) -> None:
        positive = {
            "poll_s": self.poll_s,
            "step_threshold_s": self.step_threshold_s,
            "slew_rate_ppm": self.slew_rate_ppm,
            "clock_step_detect_s": self.clock_step_detect_s,
            "max_delay_s": self.max_delay_s,
            "delay_factor": self.delay_factor,
            "server_tolerance_s": self.server_tolerance_s,
            "spike_threshold_s": self.spike_threshold_s,
            "max_drift_ppm": self.max_drift_ppm,
            "holdover_limit_s": self.holdover_limit_s,
            "fit_window_limit_s": self.fit_window_limit_s,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if self.slew_rate_ppm >= 1e6:
            raise ValueError("slew_rate_ppm must be below 1e6 or the reference could run backwards")
        if self.amt_offset_s < 0 or self.delay_margin_s < 0 or self.drift_min_span_s < 0:
            raise ValueError("amt_offset_s, delay_margin_s and drift_min_span_s must be >= 0")
        if self.delay_history < 1 or self.stepout_rounds < 1 or self.max_fit_samples < 1:
            raise ValueError("delay_history, stepout_rounds and max_fit_samples must be >= 1")

    @property
    def holdover_limit_s(self) -> float:
        return self.holdover_after_s if self.holdover_after_s is not None else 4 * self.poll_s

    @property
    def fit_window_limit_s(self) -> float:
        return self.fit_window_s if self.fit_window_s is not None else 16 * self.poll_s
