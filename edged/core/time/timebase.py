"""Reference time from the system clock and NTP samples (pure; docs/time.md).

Nothing here reads a clock, a socket or the kernel: every method takes the
system time (`system_s`, Unix seconds) and the monotonic time (`mono_s`) it is
about, and returns values. The shell (`edged.io.ntp`) reads the clocks, asks
NTP servers and the kernel, and turns the returned `TimeTransition`s into
events; the interval engine turns them into flags.

    reference_s = system_s + applied_offset_s(mono_s)

except in assumed meter time (AMT, clock found behind the last liveness mark),
where reference_s = mark + 5 s + (mono_s - mono at start-up): the system clock
is known to be wrong, so only the monotonic clock is trusted until something
sets it.

Parts, each usable on its own:

- `NtpModel`: screens NTP samples (unsynchronised servers, long round trips,
  servers that disagree with the majority, spikes against the model) and fits
  offset against monotonic time by least squares (`OffsetFit`: offset_s,
  drift_ppm, predict_offset).
- `OffsetSlewer`: moves the applied offset towards the model at a bounded rate
  (slew), or at once when the gap is at least the step threshold (step).
- `ClockStepDetector`: finds steps of the system clock from successive
  (system, monotonic) observations.
- `Timebase`: the state machine (synced / holdover / assumed, AMT start-up
  rule) that owns the three above.
- `gateway_outage`: the outage window between the last liveness mark and the
  restart, for POWER_FAIL and MISSING.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, tzinfo
from enum import StrEnum

from edged.core.model import Event, Flag, TimeState
from edged.core.schedule import boundaries_between, next_boundary
from edged.core.time.states import (
    INITIAL_TIME_STATE,
    TimeInput,
    next_time_state,
)

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


# -- NTP samples and the offset model ---------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class NtpSample:
    """One NTP exchange, measured against the system clock edged reads."""

    server: str
    mono_s: float  # monotonic time at the middle of the exchange
    offset_s: float  # true time minus system time
    delay_s: float  # round trip minus the server's processing time
    stratum: int
    leap: int = 0  # leap indicator; 3 = alarm, the server is not synchronised

    @property
    def synchronised(self) -> bool:
        # Stratum 0 is a kiss-o'-death or unspecified, 16 is unsynchronised.
        return 1 <= self.stratum <= 15 and self.leap != 3

    def shifted(self, delta_s: float) -> NtpSample:
        return replace(self, offset_s=self.offset_s + delta_s)


class RejectReason(StrEnum):
    BOGUS = "bogus"  # not a finite offset, or a negative round trip
    UNSYNCHRONISED = "unsynchronised"  # stratum 0/16 or leap alarm
    DELAY = "delay"  # round trip too long (absolute, or against the server's recent minimum)
    FALSETICKER = "falseticker"  # disagrees with the median of the round
    NO_MAJORITY = "no_majority"  # the servers of the round do not agree
    SPIKE = "spike"  # disagrees with the model; waiting out the stepout
    DURING_STEP = "during_step"  # the system clock stepped while it was measured


@dataclass(frozen=True, slots=True)
class LinearOffset:
    """offset_s at mono_ref_s, changing by drift_ppm microseconds per second."""

    offset_s: float
    mono_ref_s: float = 0.0
    drift_ppm: float = 0.0

    def predict_offset(self, mono_s: float) -> float:
        return self.offset_s + self.drift_ppm * PPM * (mono_s - self.mono_ref_s)

    def shifted(self, delta_s: float) -> LinearOffset:
        return replace(self, offset_s=self.offset_s + delta_s)


@dataclass(frozen=True, slots=True, kw_only=True)
class OffsetFit:
    """Least-squares line through recent accepted samples.

    drift_ppm is the rate of change of the offset (true minus system): a
    system clock gaining 50 µs per second gives drift_ppm ≈ -50.
    """

    offset_s: float  # fitted offset at mono_ref_s (the samples' mean time)
    mono_ref_s: float
    drift_ppm: float
    samples: int
    span_s: float
    residual_rms_s: float

    def predict_offset(self, mono_s: float) -> float:
        return self.offset_s + self.drift_ppm * PPM * (mono_s - self.mono_ref_s)

    @property
    def line(self) -> LinearOffset:
        return LinearOffset(self.offset_s, self.mono_ref_s, self.drift_ppm)

    def shifted(self, delta_s: float) -> OffsetFit:
        return replace(self, offset_s=self.offset_s + delta_s)


def fit_offset(
    points: Sequence[tuple[float, float]],
    *,
    min_span_s: float = 60.0,
    max_drift_ppm: float = 500.0,
    prior_drift_ppm: float | None = None,
) -> OffsetFit:
    """Fit offset = a + b·(mono - mean mono) to (mono_s, offset_s) points.

    Below `min_span_s` of span the slope cannot be told from noise, so the
    prior drift (from an earlier fit: the oscillator did not change) or zero is
    used and only the level is fitted. The slope is clamped to ±max_drift_ppm.
    """
    if not points:
        raise ValueError("fit_offset needs at least one point")
    n = len(points)
    mono_mean = math.fsum(m for m, _ in points) / n
    offset_mean = math.fsum(o for _, o in points) / n
    span_s = max(m for m, _ in points) - min(m for m, _ in points)
    slope = (prior_drift_ppm or 0.0) * PPM
    if n >= 2 and span_s >= min_span_s and span_s > 0:
        sxx = math.fsum((m - mono_mean) ** 2 for m, _ in points)
        sxy = math.fsum((m - mono_mean) * (o - offset_mean) for m, o in points)
        slope = sxy / sxx
    limit = max_drift_ppm * PPM
    slope = min(max(slope, -limit), limit)
    # With a fixed slope the least-squares line still passes through the mean.
    residuals = [o - (offset_mean + slope * (m - mono_mean)) for m, o in points]
    rms = math.sqrt(math.fsum(r * r for r in residuals) / n)
    return OffsetFit(
        offset_s=offset_mean,
        mono_ref_s=mono_mean,
        drift_ppm=slope / PPM,
        samples=n,
        span_s=span_s,
        residual_rms_s=rms,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundResult:
    """What one poll round did to the model."""

    accepted: tuple[NtpSample, ...]
    rejected: tuple[tuple[NtpSample, RejectReason], ...]
    fit: OffsetFit | None
    reset: bool = False  # history discarded: the offset moved for stepout_rounds rounds


class NtpModel:
    """Outlier filter plus least-squares offset/drift fit over recent samples."""

    def __init__(self, config: TimebaseConfig | None = None) -> None:
        self._config = config or TimebaseConfig()
        self._samples: deque[NtpSample] = deque(maxlen=self._config.max_fit_samples)
        self._delays: dict[str, deque[float]] = {}
        # Spike rounds that agree with one another, waiting for the stepout.
        self._pending: list[tuple[float, tuple[NtpSample, ...]]] = []
        self._fit: OffsetFit | None = None

    @property
    def fit(self) -> OffsetFit | None:
        return self._fit

    @property
    def samples(self) -> tuple[NtpSample, ...]:
        return tuple(self._samples)

    @property
    def offset_s(self) -> float | None:
        return None if self._fit is None else self._fit.offset_s

    @property
    def drift_ppm(self) -> float | None:
        return None if self._fit is None else self._fit.drift_ppm

    def predict_offset(self, mono_s: float) -> float | None:
        return None if self._fit is None else self._fit.predict_offset(mono_s)

    def shift(self, delta_s: float) -> None:
        """Re-express everything against a system clock that stepped by -delta_s."""
        self._samples = deque((s.shifted(delta_s) for s in self._samples), self._samples.maxlen)
        self._pending = [
            (median + delta_s, tuple(s.shifted(delta_s) for s in round_))
            for median, round_ in self._pending
        ]
        if self._fit is not None:
            self._fit = self._fit.shifted(delta_s)

    def screen(
        self, samples: Iterable[NtpSample]
    ) -> tuple[list[NtpSample], list[tuple[NtpSample, RejectReason]]]:
        """Filter one poll round (one sample per server); updates delay history."""
        cfg = self._config
        rejected: list[tuple[NtpSample, RejectReason]] = []
        candidates: list[NtpSample] = []
        for sample in samples:
            if not (math.isfinite(sample.offset_s) and math.isfinite(sample.delay_s)):
                rejected.append((sample, RejectReason.BOGUS))
                continue
            if not sample.synchronised:
                rejected.append((sample, RejectReason.UNSYNCHRONISED))
                continue
            if sample.delay_s < -cfg.delay_margin_s:
                # A clearly negative round trip means a broken server clock.
                rejected.append((sample, RejectReason.BOGUS))
                continue
            history = self._delays.setdefault(sample.server, deque(maxlen=cfg.delay_history))
            history.append(max(sample.delay_s, 0.0))
            limit_s = min(cfg.max_delay_s, min(history) * cfg.delay_factor + cfg.delay_margin_s)
            if sample.delay_s > limit_s:
                rejected.append((sample, RejectReason.DELAY))
                continue
            candidates.append(sample)
        if not candidates:
            return [], rejected
        median = statistics.median(s.offset_s for s in candidates)
        close = [s for s in candidates if abs(s.offset_s - median) <= cfg.server_tolerance_s]
        if 2 * len(close) <= len(candidates):
            # No majority: with two servers a second apart there is no telling
            # which is right, so neither is believed.
            rejected.extend((s, RejectReason.NO_MAJORITY) for s in candidates)
            return [], rejected
        rejected.extend((s, RejectReason.FALSETICKER) for s in candidates if s not in close)
        return close, rejected

    def add_round(self, samples: Iterable[NtpSample], mono_s: float) -> RoundResult:
        """Screen a poll round taken around `mono_s` and refit; returns what happened."""
        cfg = self._config
        accepted, rejected = self.screen(samples)
        self._prune(mono_s)
        reset = False
        if accepted and self._fit is not None and self._samples:
            round_offset = statistics.median(s.offset_s for s in accepted)
            if abs(round_offset - self._fit.predict_offset(mono_s)) > cfg.spike_threshold_s:
                # Keep only earlier spike rounds that agree with this one: a
                # real change of offset persists, popcorn noise does not.
                self._pending = [
                    p for p in self._pending if abs(p[0] - round_offset) <= cfg.spike_threshold_s
                ]
                self._pending.append((round_offset, tuple(accepted)))
                if len(self._pending) < cfg.stepout_rounds:
                    rejected.extend((s, RejectReason.SPIKE) for s in accepted)
                    return RoundResult(accepted=(), rejected=tuple(rejected), fit=self._fit)
                # The offset really moved (the server or the path changed):
                # restart the history from the rounds that agree on it.
                self._samples.clear()
                for _, round_ in self._pending[:-1]:
                    self._samples.extend(round_)
                reset = True
        if not accepted:
            return RoundResult(accepted=(), rejected=tuple(rejected), fit=self._fit)
        self._pending.clear()
        self._samples.extend(accepted)
        self._fit = fit_offset(
            [(s.mono_s, s.offset_s) for s in self._samples],
            min_span_s=cfg.drift_min_span_s,
            max_drift_ppm=cfg.max_drift_ppm,
            prior_drift_ppm=None if self._fit is None else self._fit.drift_ppm,
        )
        return RoundResult(
            accepted=tuple(accepted), rejected=tuple(rejected), fit=self._fit, reset=reset
        )

    def _prune(self, mono_s: float) -> None:
        oldest_s = mono_s - self._config.fit_window_limit_s
        while self._samples and self._samples[0].mono_s < oldest_s:
            self._samples.popleft()


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


class Timebase:
    """Reference time and time state (synced / holdover / assumed).

    The shell must call, with fresh (system_s, mono_s) readings:
    - `start(...)` once, with the last persisted liveness mark;
    - `observe_clock(...)` at least once a second and before each use of
      `reference(...)`: it finds system clock steps and times out confirmation;
    - `observe_ntp(samples, ...)` after each poll round (source ntp);
    - `observe_kernel(status, ...)` periodically (source system).
    Each returns the transitions it caused, in order.
    """

    def __init__(self, config: TimebaseConfig | None = None) -> None:
        self._config = config or TimebaseConfig()
        cfg = self._config
        self._state = INITIAL_TIME_STATE
        self._started = False
        # (reference_s, mono_s) while in assumed meter time; None otherwise.
        self._anchor: tuple[float, float] | None = None
        self._slewer = OffsetSlewer(cfg.step_threshold_s, cfg.slew_rate_ppm)
        self._detector = ClockStepDetector(cfg.clock_step_detect_s)
        self._model = NtpModel(cfg)
        self._last_confirmed_mono: float | None = None
        self._recent_steps: deque[ClockStep] = deque(maxlen=16)
        self._last_round: RoundResult | None = None

    # -- queries ------------------------------------------------------------------------

    @property
    def config(self) -> TimebaseConfig:
        return self._config

    @property
    def state(self) -> TimeState:
        return self._state

    @property
    def assumed_meter_time(self) -> bool:
        return self._anchor is not None

    @property
    def model(self) -> NtpModel:
        return self._model

    @property
    def last_round(self) -> RoundResult | None:
        return self._last_round

    def reference_s(self, system_s: float, mono_s: float) -> float:
        if self._anchor is not None:
            anchor_ref_s, anchor_mono_s = self._anchor
            return anchor_ref_s + (mono_s - anchor_mono_s)
        return system_s + self._slewer.applied_offset(mono_s)

    def reference(self, system_s: float, mono_s: float) -> datetime:
        return _utc(self.reference_s(system_s, mono_s))

    def status(self, system_s: float, mono_s: float) -> TimebaseStatus:
        fit = self._model.fit
        reference_s = self.reference_s(system_s, mono_s)
        return TimebaseStatus(
            source=self._config.source,
            state=self._state,
            reference=_utc(reference_s),
            assumed_meter_time=self._anchor is not None,
            applied_offset_s=reference_s - system_s,
            target_offset_s=None if fit is None else fit.predict_offset(mono_s),
            slew_remaining_s=self._slewer.remaining_s(mono_s),
            drift_ppm=None if fit is None else fit.drift_ppm,
            fit_samples=len(self._model.samples),
            fit_residual_rms_s=None if fit is None else fit.residual_rms_s,
            last_confirmed_age_s=(
                None if self._last_confirmed_mono is None else mono_s - self._last_confirmed_mono
            ),
        )

    # -- inputs -------------------------------------------------------------------------

    def start(
        self,
        system_s: float,
        mono_s: float,
        last_mark: datetime | None,
        *,
        confirmed: bool = False,
    ) -> list[TimeTransition]:
        """Start-up. `last_mark` is the last persisted liveness mark (None on
        first run); `confirmed` is True when a sync source already vouches for
        the system clock (source system with the kernel synchronised)."""
        if self._started:
            raise RuntimeError("Timebase.start called twice")
        self._started = True
        self._detector.observe(system_s, mono_s)
        if confirmed:
            # A confirmed clock behind the mark means the mark was wrong, not the clock.
            self._confirm(mono_s)
            self._move(TimeInput.CONFIRMED_AT_START)
            return []
        if last_mark is None or system_s >= last_mark.timestamp():
            return []
        # Dead RTC battery: the clock is behind a time we know has passed.
        assumed_s = last_mark.timestamp() + self._config.amt_offset_s
        self._anchor = (assumed_s, mono_s)
        return [
            self._transition(
                TransitionKind.AMT_ENTERED,
                Cause.STARTUP,
                system_s,
                mono_s,
                TimeState.ASSUMED,
                adjustment_s=assumed_s - system_s,
                stepped=True,
                message=(
                    f"system clock {_utc(system_s).isoformat()} is behind the last mark "
                    f"{last_mark.isoformat()}; assumed time starts at mark + "
                    f"{self._config.amt_offset_s:g} s"
                ),
            )
        ]

    def observe_clock(self, system_s: float, mono_s: float) -> list[TimeTransition]:
        """A (system, monotonic) reading: step detection and holdover timing."""
        out = self._ensure_started(system_s, mono_s)
        step = self._detector.observe(system_s, mono_s)
        if step is not None:
            out.extend(self._on_system_step(step, system_s, mono_s))
        out.extend(self._check_holdover(system_s, mono_s))
        return out

    def observe_ntp(
        self, samples: Sequence[NtpSample], system_s: float, mono_s: float
    ) -> list[TimeTransition]:
        """One poll round (one sample per answering server), reported at mono_s."""
        if self._config.source is not TimeSource.NTP:
            raise ValueError("observe_ntp needs time.source ntp")
        out = self.observe_clock(system_s, mono_s)
        aligned, dropped = self._align_to_steps(samples)
        result = self._model.add_round(aligned, mono_s)
        if dropped:
            result = replace(result, rejected=result.rejected + tuple(dropped))
        self._last_round = result
        if result.accepted and result.fit is not None:
            out.extend(self._on_fit(result.fit, system_s, mono_s))
        return out

    def observe_kernel(
        self, status: KernelSync, system_s: float, mono_s: float
    ) -> list[TimeTransition]:
        """The kernel's sync status (source system)."""
        out = self.observe_clock(system_s, mono_s)
        previous = self._state
        if status is KernelSync.SYNCED:
            self._confirm(mono_s)
            self._move(TimeInput.KERNEL_SYNCED)
            if self._anchor is not None:
                old_ref_s = self.reference_s(system_s, mono_s)
                self._anchor = None
                self._slewer.retarget(LinearOffset(0.0), mono_s, force_step=True)
                out.append(
                    self._adjusted(
                        Cause.KERNEL, system_s, mono_s, previous, old_ref_s, True, ended_amt=True
                    )
                )
            elif previous is TimeState.ASSUMED:
                # The reference was the system clock all along; assumed time
                # still ends here, so the interval gets TIME_ADJUSTED.
                out.append(
                    self._adjusted(
                        Cause.KERNEL,
                        system_s,
                        mono_s,
                        previous,
                        self.reference_s(system_s, mono_s),
                        False,
                    )
                )
            out.extend(self._state_change(Cause.KERNEL, system_s, mono_s, previous))
        elif status is KernelSync.UNSYNCED and previous is TimeState.SYNCED:
            # An explicit loss of sync is holdover at once, not after the limit.
            self._move(TimeInput.KERNEL_UNSYNCED)
            out.extend(self._state_change(Cause.KERNEL, system_s, mono_s, previous))
        return out

    def _move(self, event: TimeInput) -> None:
        """The one place the time state changes: by the table in states.py."""
        self._state = next_time_state(self._state, event)

    # -- internals -------------------------------------------------------------------------

    def _ensure_started(self, system_s: float, mono_s: float) -> list[TimeTransition]:
        return [] if self._started else self.start(system_s, mono_s, None)

    def _confirm(self, mono_s: float) -> None:
        self._last_confirmed_mono = mono_s

    def _on_system_step(
        self, step: ClockStep, system_s: float, mono_s: float
    ) -> list[TimeTransition]:
        self._recent_steps.append(step)
        previous = self._state
        size = f"{abs(step.size_s):.3f} s {step.direction}"
        if self._anchor is not None:
            # Someone set the clock: assumed time ends and the reference
            # follows the clock (plus the NTP model, should one exist).
            old_ref_s = self.reference_s(system_s, mono_s)
            self._anchor = None
            fit = self._model.fit
            target = LinearOffset(0.0) if fit is None else fit.line
            self._slewer.retarget(target, mono_s, force_step=True)
            return [
                self._adjusted(
                    Cause.SYSTEM_CLOCK_STEP,
                    system_s,
                    mono_s,
                    previous,
                    old_ref_s,
                    True,
                    system_step_s=step.size_s,
                    ended_amt=True,
                )
            ]
        if self._config.source is TimeSource.NTP and self._model.fit is not None:
            # The NTP model knows true time better than whoever set the clock:
            # re-express the model against the new system clock, so the
            # reference does not move.
            self._model.shift(-step.size_s)
            self._slewer.shift(-step.size_s)
            return [
                self._transition(
                    TransitionKind.CLOCK_STEP,
                    Cause.SYSTEM_CLOCK_STEP,
                    system_s,
                    mono_s,
                    previous,
                    system_step_s=step.size_s,
                    message=f"system clock stepped {size}; compensated by the NTP model",
                )
            ]
        # Nothing better to go by: the reference follows the system clock.
        return [
            self._transition(
                TransitionKind.CLOCK_STEP,
                Cause.SYSTEM_CLOCK_STEP,
                system_s,
                mono_s,
                previous,
                adjustment_s=step.size_s,
                stepped=True,
                system_step_s=step.size_s,
                message=f"system clock stepped {size}; reference followed",
            )
        ]

    def _on_fit(self, fit: OffsetFit, system_s: float, mono_s: float) -> list[TimeTransition]:
        previous = self._state
        old_ref_s = self.reference_s(system_s, mono_s)
        out: list[TimeTransition] = []
        ended_amt = self._anchor is not None
        if ended_amt:
            self._anchor = None
            # Continue from where assumed time is; step or slew as usual.
            self._slewer.set_applied(old_ref_s - system_s, mono_s)
        correction = self._slewer.retarget(fit.line, mono_s)
        self._confirm(mono_s)
        self._move(TimeInput.NTP_FIT)
        if previous is TimeState.ASSUMED:
            out.append(
                self._adjusted(
                    Cause.NTP,
                    system_s,
                    mono_s,
                    previous,
                    old_ref_s,
                    correction.stepped,
                    adjustment_s=correction.size_s,
                    ended_amt=ended_amt,
                )
            )
        elif correction.stepped:
            out.append(
                self._transition(
                    TransitionKind.CLOCK_STEP,
                    Cause.NTP,
                    system_s,
                    mono_s,
                    previous,
                    adjustment_s=correction.size_s,
                    stepped=True,
                    message=(
                        f"reference stepped {abs(correction.size_s):.3f} s "
                        f"{correction.direction} to the NTP model"
                    ),
                )
            )
        out.extend(self._state_change(Cause.NTP, system_s, mono_s, previous))
        return out

    def _align_to_steps(
        self, samples: Sequence[NtpSample]
    ) -> tuple[list[NtpSample], list[tuple[NtpSample, RejectReason]]]:
        """Express samples against the current system clock.

        A sample measured before a detected step is shifted by it; one whose
        exchange may overlap the step is dropped (the step fell between t1
        and t4, so its offset and delay are both wrong).
        """
        aligned: list[NtpSample] = []
        dropped: list[tuple[NtpSample, RejectReason]] = []
        for sample in samples:
            half_s = max(sample.delay_s, 0.0) / 2
            begin_s, end_s = sample.mono_s - half_s, sample.mono_s + half_s
            shifted = sample
            ok = True
            for step in self._recent_steps:
                if end_s <= step.mono_before_s:
                    shifted = shifted.shifted(-step.size_s)
                elif begin_s < step.mono_s:
                    ok = False
                    break
            if ok:
                aligned.append(shifted)
            else:
                dropped.append((sample, RejectReason.DURING_STEP))
        return aligned, dropped

    def _check_holdover(self, system_s: float, mono_s: float) -> list[TimeTransition]:
        if self._state is not TimeState.SYNCED or self._last_confirmed_mono is None:
            return []
        age_s = mono_s - self._last_confirmed_mono
        if age_s <= self._config.holdover_limit_s:
            return []
        self._move(TimeInput.SILENCE)
        return self._state_change(
            Cause.SILENCE,
            system_s,
            mono_s,
            TimeState.SYNCED,
            message=f"no time confirmation for {age_s:.0f} s; holdover",
        )

    def _adjusted(
        self,
        cause: Cause,
        system_s: float,
        mono_s: float,
        previous: TimeState,
        old_ref_s: float,
        stepped: bool,
        *,
        adjustment_s: float | None = None,
        system_step_s: float | None = None,
        ended_amt: bool = False,
    ) -> TimeTransition:
        """A TIME_ADJUSTED transition: assumed time ends."""
        if adjustment_s is None:
            adjustment_s = self.reference_s(system_s, mono_s) - old_ref_s
        direction = direction_of(adjustment_s)
        if direction is None:
            change = "reference unchanged"
        else:
            how = "stepped" if stepped else "slewing"
            change = f"reference {how} {abs(adjustment_s):.3f} s {direction}"
        return self._transition(
            TransitionKind.TIME_ADJUSTED,
            cause,
            system_s,
            mono_s,
            previous,
            adjustment_s=adjustment_s,
            stepped=stepped,
            system_step_s=system_step_s,
            message=f"assumed time ended ({cause}); {change}",
            ended_amt=ended_amt,
        )

    def _state_change(
        self,
        cause: Cause,
        system_s: float,
        mono_s: float,
        previous: TimeState,
        *,
        message: str | None = None,
    ) -> list[TimeTransition]:
        if previous is self._state:
            return []
        return [
            self._transition(
                TransitionKind.STATE_CHANGED,
                cause,
                system_s,
                mono_s,
                previous,
                message=message or f"time state {previous} -> {self._state} ({cause})",
            )
        ]

    def _transition(
        self,
        kind: TransitionKind,
        cause: Cause,
        system_s: float,
        mono_s: float,
        previous: TimeState,
        *,
        adjustment_s: float = 0.0,
        stepped: bool = False,
        system_step_s: float | None = None,
        message: str = "",
        ended_amt: bool = False,
    ) -> TimeTransition:
        return TimeTransition(
            kind=kind,
            cause=cause,
            at=self.reference(system_s, mono_s),
            system_at=_utc(system_s),
            mono_s=mono_s,
            state=self._state,
            previous_state=previous,
            adjustment_s=adjustment_s,
            stepped=stepped,
            system_step_s=system_step_s,
            message=message,
            ended_amt=ended_amt,
        )


# -- gateway outage -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outage:
    """The gateway was down from `start` (last liveness mark) to `end` (restart).

    The mark is written every few seconds, so the true start is up to that
    resolution later; a boundary just after the mark may still have been read
    (the shell checks the store before marking it MISSING).
    """

    start: datetime
    end: datetime
    end_assumed: bool  # the clock was behind the mark: end is mark + AMT offset, a guess

    @property
    def duration_s(self) -> float:
        return (self.end - self.start).total_seconds()

    def missed_boundaries(self, interval_s: int, zone: tzinfo) -> tuple[datetime, ...]:
        """Boundaries nobody was up to read (MISSING), start < b < end."""
        return tuple(boundaries_between(self.start, self.end, interval_s, zone))

    def power_fail_intervals(self, interval_s: int, zone: tzinfo) -> tuple[datetime, ...]:
        """Ends (labels) of the intervals [b_prev, b) overlapping [start, end): POWER_FAIL."""
        labels: list[datetime] = []
        b = next_boundary(self.start, interval_s, zone)
        while True:
            labels.append(b)
            if b >= self.end:
                return tuple(labels)
            b = next_boundary(b, interval_s, zone)


def gateway_outage(
    last_mark: datetime | None, restart_system_time: datetime, *, amt_offset_s: float = 5.0
) -> Outage | None:
    """The outage between the last liveness mark and a restart.

    Pass the raw system clock at restart (not the reference, which in assumed
    time is already mark + 5 s). None on a first run (no mark).
    """
    if last_mark is None:
        return None
    if restart_system_time <= last_mark:
        return Outage(last_mark, _utc(last_mark.timestamp() + amt_offset_s), end_assumed=True)
    return Outage(last_mark, restart_system_time, end_assumed=False)
