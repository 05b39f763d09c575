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

Parts, each usable on its own, each in its own module of this package:

- `ntpfit.NtpModel`: screens NTP samples (unsynchronised servers, long round
  trips, servers that disagree with the majority, spikes against the model)
  and fits offset against monotonic time by least squares (`OffsetFit`:
  offset_s, drift_ppm, predict_offset).
- `slew.OffsetSlewer`: moves the applied offset towards the model at a bounded
  rate (slew), or at once when the gap is at least the step threshold (step).
- `steps.ClockStepDetector`: finds steps of the system clock from successive
  (system, monotonic) observations.
- `Timebase` (here): the state machine (synced / holdover / assumed, AMT
  start-up rule; the transitions themselves are the table in `states`) that
  owns the three above, and reports `transitions.TimeTransition`s.
- `outage.gateway_outage`: the outage window between the last liveness mark
  and the restart, for POWER_FAIL and MISSING.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime

from edged.core.model import TimeState
from edged.core.time.ntpfit import (
    LinearOffset,
    NtpModel,
    NtpSample,
    OffsetFit,
    RejectReason,
    RoundResult,
)
from edged.core.time.settings import KernelSync, TimebaseConfig, TimeSource, direction_of
from edged.core.time.slew import OffsetSlewer
from edged.core.time.states import (
    INITIAL_TIME_STATE,
    TimeInput,
    next_time_state,
)
from edged.core.time.steps import ClockStep, ClockStepDetector
from edged.core.time.transitions import Cause, TimebaseStatus, TimeTransition, TransitionKind, _utc


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
