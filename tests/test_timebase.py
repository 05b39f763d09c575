"""Tests for edged.core.time.timebase: NTP model, slew/step, step detection, time states, AMT.

Everything runs on simulated time: a `SimClocks` holds true time and derives
the system and monotonic readings from it, so drift, steps and restarts are
exact and nothing waits.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edged.core.model import Flag, TimeState
from edged.core.schedule import next_boundary
from edged.core.time.ntpfit import (
    LinearOffset,
    NtpModel,
    NtpSample,
    RejectReason,
    fit_offset,
)
from edged.core.time.outage import gateway_outage
from edged.core.time.settings import (
    Direction,
    KernelSync,
    TimebaseConfig,
    TimeSource,
)
from edged.core.time.slew import OffsetSlewer
from edged.core.time.steps import ClockStepDetector
from edged.core.time.timebase import Timebase
from edged.core.time.transitions import (
    Cause,
    TimeTransition,
    TransitionKind,
)

T0 = datetime(2026, 11, 21, 0, 7, 30, tzinfo=UTC)
QUARTER_S = 900


@dataclass
class SimClocks:
    """True time advances by `advance`; the system clock runs `rate_ppm` fast
    (so does the monotonic clock: same oscillator) and can be stepped."""

    true_s: float = T0.timestamp()
    system_error_s: float = 0.0  # system minus true
    mono_s: float = 5000.0
    rate_ppm: float = 0.0

    def advance(self, seconds: float) -> None:
        self.true_s += seconds
        self.mono_s += seconds * (1 + self.rate_ppm * 1e-6)
        self.system_error_s += seconds * self.rate_ppm * 1e-6

    @property
    def system_s(self) -> float:
        return self.true_s + self.system_error_s

    def step_system(self, size_s: float) -> None:
        self.system_error_s += size_s

    def sample(
        self,
        server: str = "a",
        *,
        error_s: float = 0.0,
        delay_s: float = 0.02,
        stratum: int = 2,
        leap: int = 0,
    ) -> NtpSample:
        return NtpSample(
            server=server,
            mono_s=self.mono_s,
            offset_s=-self.system_error_s + error_s,
            delay_s=delay_s,
            stratum=stratum,
            leap=leap,
        )

    def ntp(self, tb: Timebase, *samples: NtpSample) -> list[TimeTransition]:
        return tb.observe_ntp(list(samples), self.system_s, self.mono_s)

    def observe(self, tb: Timebase) -> list[TimeTransition]:
        return tb.observe_clock(self.system_s, self.mono_s)

    def reference_error_s(self, tb: Timebase) -> float:
        return tb.reference_s(self.system_s, self.mono_s) - self.true_s


def state(tb: Timebase) -> TimeState:
    # A function, not the property, so mypy does not narrow it across calls.
    return tb.state


def kinds(transitions: list[TimeTransition]) -> list[TransitionKind]:
    return [t.kind for t in transitions]


def synced_timebase(clocks: SimClocks, config: TimebaseConfig | None = None) -> Timebase:
    tb = Timebase(config or TimebaseConfig())
    tb.start(clocks.system_s, clocks.mono_s, None)
    clocks.ntp(tb, clocks.sample("a"), clocks.sample("b"), clocks.sample("c"))
    assert state(tb) is TimeState.SYNCED
    return tb


# -- AMT start-up rule ------------------------------------------------------------------


def test_restart_behind_last_mark_enters_assumed_time_then_ntp_adjusts_forward() -> None:
    mark = T0
    # Dead RTC battery: the gateway boots at 2000-01-01; true time is 20 min after the mark.
    clocks = SimClocks(true_s=(mark + timedelta(minutes=20)).timestamp())
    clocks.system_error_s = datetime(2000, 1, 1, tzinfo=UTC).timestamp() - clocks.true_s
    tb = Timebase()

    started = tb.start(clocks.system_s, clocks.mono_s, mark)

    assert kinds(started) == [TransitionKind.AMT_ENTERED]
    assert started[0].at == mark + timedelta(seconds=5)
    assert started[0].state is TimeState.ASSUMED
    assert started[0].to_event().kind == "amt_entered"
    assert started[0].flags == frozenset()
    assert state(tb) is TimeState.ASSUMED
    assert tb.assumed_meter_time
    assert tb.reference(clocks.system_s, clocks.mono_s) == mark + timedelta(seconds=5)

    # Assumed time advances on the monotonic clock.
    for _ in range(30):
        clocks.advance(1.0)
        assert clocks.observe(tb) == []
    assert tb.reference(clocks.system_s, clocks.mono_s) == mark + timedelta(seconds=35)

    # NTP answers (NTP configured but not yet answering: still assumed).
    assert clocks.ntp(tb) == []
    assert state(tb) is TimeState.ASSUMED
    transitions = clocks.ntp(tb, clocks.sample("a"), clocks.sample("b"))

    assert kinds(transitions) == [TransitionKind.TIME_ADJUSTED, TransitionKind.STATE_CHANGED]
    adjusted = transitions[0]
    expected_s = clocks.true_s - (mark.timestamp() + 35)
    assert adjusted.adjustment_s == pytest.approx(expected_s, abs=1e-6)
    assert adjusted.direction is Direction.FORWARD
    assert adjusted.stepped
    assert adjusted.cause is Cause.NTP
    assert adjusted.flags == {Flag.TIME_ADJUSTED, Flag.CLOCK_SET_FORWARD}
    assert adjusted.state is TimeState.SYNCED
    assert adjusted.previous_state is TimeState.ASSUMED
    event = adjusted.to_event()
    assert event.kind == "time_adjusted"
    assert event.details["direction"] == "forward"
    assert state(tb) is TimeState.SYNCED
    assert not tb.assumed_meter_time
    # Reference time now follows the true clock.
    assert abs(clocks.reference_error_s(tb)) < 1e-6
    clocks.advance(10.0)
    clocks.observe(tb)
    assert abs(clocks.reference_error_s(tb)) < 1e-6


def test_assumed_time_ahead_of_truth_is_adjusted_backward() -> None:
    mark = T0
    # The outage was only 1 s: mark + 5 s is ahead of true time.
    clocks = SimClocks(true_s=mark.timestamp() + 1.0, system_error_s=-3600.0)
    tb = Timebase()
    tb.start(clocks.system_s, clocks.mono_s, mark)
    clocks.advance(2.0)

    transitions = clocks.ntp(tb, clocks.sample())

    adjusted = transitions[0]
    assert adjusted.kind is TransitionKind.TIME_ADJUSTED
    assert adjusted.adjustment_s == pytest.approx(-4.0, abs=1e-6)
    assert adjusted.direction is Direction.BACKWARD
    assert adjusted.flags == {Flag.TIME_ADJUSTED, Flag.CLOCK_SET_BACKWARD}
    assert abs(clocks.reference_error_s(tb)) < 1e-6


def test_assumed_time_ends_when_the_system_clock_is_set() -> None:
    mark = T0
    clocks = SimClocks(true_s=mark.timestamp() + 600, system_error_s=-86400.0)
    tb = Timebase()
    tb.start(clocks.system_s, clocks.mono_s, mark)
    clocks.advance(1.0)
    clocks.observe(tb)

    clocks.step_system(86400.0)  # chrony (or an operator) sets the clock
    clocks.advance(1.0)
    transitions = clocks.observe(tb)

    assert kinds(transitions) == [TransitionKind.TIME_ADJUSTED]
    adjusted = transitions[0]
    assert adjusted.cause is Cause.SYSTEM_CLOCK_STEP
    assert adjusted.system_step_s == pytest.approx(86400.0)
    assert adjusted.adjustment_s == pytest.approx(602 - 7.0, abs=1e-6)
    assert adjusted.flags == {Flag.TIME_ADJUSTED, Flag.CLOCK_SET_FORWARD}
    assert not tb.assumed_meter_time
    assert abs(clocks.reference_error_s(tb)) < 1e-6
    # A set clock is not a confirmation: with NTP configured it stays assumed
    # (never silently trusted) until NTP answers.
    assert state(tb) is TimeState.ASSUMED


def test_clock_ahead_of_mark_is_not_assumed_time() -> None:
    clocks = SimClocks()
    tb = Timebase()
    assert tb.start(clocks.system_s, clocks.mono_s, T0 - timedelta(seconds=30)) == []
    assert state(tb) is TimeState.ASSUMED
    assert not tb.assumed_meter_time
    assert abs(clocks.reference_error_s(tb)) == 0


def test_start_twice_is_an_error() -> None:
    tb = Timebase()
    tb.start(1.0, 1.0, None)
    with pytest.raises(RuntimeError):
        tb.start(1.0, 1.0, None)


# -- system clock steps -------------------------------------------------------------------


def test_step_detector_reports_size_and_direction() -> None:
    detector = ClockStepDetector(threshold_s=0.5)
    assert detector.observe(1000.0, 10.0) is None
    assert detector.observe(1001.0004, 11.0) is None  # slew-sized difference
    step = detector.observe(1032.0004, 12.0)
    assert step is not None
    assert step.size_s == pytest.approx(30.0)
    assert step.direction is Direction.FORWARD
    assert (step.mono_before_s, step.mono_s) == (11.0, 12.0)
    back = detector.observe(1013.0004, 13.0)
    assert back is not None
    assert back.size_s == pytest.approx(-20.0)
    assert back.direction is Direction.BACKWARD
    assert detector.observe(1014.0004, 14.0) is None
    assert detector.observe(999.0, 13.5) is None  # out-of-order reading is ignored


@pytest.mark.parametrize(
    ("size_s", "flag"), [(42.0, Flag.CLOCK_SET_FORWARD), (-42.0, Flag.CLOCK_SET_BACKWARD)]
)
def test_system_source_follows_a_step_mid_interval(size_s: float, flag: Flag) -> None:
    clocks = SimClocks()
    tb = Timebase(TimebaseConfig(source=TimeSource.SYSTEM))
    tb.start(clocks.system_s, clocks.mono_s, None, confirmed=True)
    assert state(tb) is TimeState.SYNCED
    for _ in range(5):
        clocks.advance(1.0)
        assert clocks.observe(tb) == []

    clocks.advance(0.3)
    clocks.step_system(size_s)
    clocks.advance(0.7)
    transitions = clocks.observe(tb)  # the very next observation finds it

    assert kinds(transitions) == [TransitionKind.CLOCK_STEP]
    step = transitions[0]
    assert step.stepped
    assert step.adjustment_s == pytest.approx(size_s)
    assert step.system_step_s == pytest.approx(size_s)
    assert step.flags == {flag}
    assert step.to_event().kind == "clock_step"
    assert step.at == tb.reference(clocks.system_s, clocks.mono_s)
    # The kernel's clock is the reference here: it moved with it.
    assert clocks.reference_error_s(tb) == pytest.approx(size_s)


@pytest.mark.parametrize("size_s", [3600.0, -7.5, 0.2])
def test_ntp_source_compensates_a_system_step(size_s: float) -> None:
    clocks = SimClocks()
    tb = synced_timebase(clocks)
    clocks.advance(1.0)
    clocks.observe(tb)
    before_s = tb.reference_s(clocks.system_s, clocks.mono_s)

    clocks.step_system(size_s)
    clocks.advance(1.0)
    transitions = clocks.observe(tb)

    assert kinds(transitions) == [TransitionKind.CLOCK_STEP]
    assert not transitions[0].stepped
    assert transitions[0].adjustment_s == 0.0
    assert transitions[0].system_step_s == pytest.approx(size_s)
    assert transitions[0].flags == frozenset()
    after_s = tb.reference_s(clocks.system_s, clocks.mono_s)
    assert after_s - before_s == pytest.approx(1.0, abs=1e-6)
    assert abs(clocks.reference_error_s(tb)) < 1e-6
    # Later samples (against the stepped system clock) agree with the model.
    clocks.advance(64.0)
    assert clocks.observe(tb) == []
    assert clocks.ntp(tb, clocks.sample("a"), clocks.sample("b")) == []
    assert abs(clocks.reference_error_s(tb)) < 1e-6


def test_samples_measured_across_a_step_are_aligned_or_dropped() -> None:
    clocks = SimClocks()
    tb = synced_timebase(clocks)
    clocks.advance(30.0)
    early = clocks.sample("a")  # taken before the step
    clocks.advance(0.5)
    clocks.observe(tb)  # the last observation before the step
    clocks.advance(0.2)
    straddling = NtpSample(
        server="b", mono_s=clocks.mono_s, offset_s=99.0, delay_s=0.4, stratum=2
    )  # exchange spans the step
    clocks.step_system(10.0)
    clocks.advance(0.3)
    clocks.observe(tb)  # finds the step
    clocks.advance(0.5)
    late = clocks.sample("c")

    assert clocks.ntp(tb, early, straddling, late) == []
    round_ = tb.last_round
    assert round_ is not None
    assert {s.server for s in round_.accepted} == {"a", "c"}
    assert all(s.offset_s == pytest.approx(-10.0) for s in round_.accepted)
    assert [(s.server, r) for s, r in round_.rejected] == [("b", RejectReason.DURING_STEP)]
    assert abs(clocks.reference_error_s(tb)) < 1e-6


def test_assumed_ntp_without_fit_follows_a_step() -> None:
    clocks = SimClocks()
    tb = Timebase()
    tb.start(clocks.system_s, clocks.mono_s, None)
    clocks.advance(1.0)
    clocks.step_system(-2.0)
    transitions = clocks.observe(tb)
    assert kinds(transitions) == [TransitionKind.CLOCK_STEP]
    assert transitions[0].stepped
    assert transitions[0].flags == {Flag.CLOCK_SET_BACKWARD}
    assert state(tb) is TimeState.ASSUMED


# -- slew and step ------------------------------------------------------------------------


def test_slewer_steps_at_or_beyond_threshold_and_reports_it() -> None:
    slewer = OffsetSlewer(step_threshold_s=0.5, slew_rate_ppm=500)
    correction = slewer.retarget(LinearOffset(-2.25), 100.0)
    assert correction.stepped
    assert correction.size_s == pytest.approx(-2.25)
    assert correction.direction is Direction.BACKWARD
    assert slewer.applied_offset(100.0) == pytest.approx(-2.25)
    assert slewer.retarget(LinearOffset(-1.75), 101.0).stepped  # exactly the threshold


def test_slew_below_threshold_never_steps_and_reference_never_runs_backwards() -> None:
    clocks = SimClocks(system_error_s=0.3)  # system clock 0.3 s fast, unconfirmed
    tb = Timebase()
    tb.start(clocks.system_s, clocks.mono_s, None)
    transitions = clocks.ntp(tb, clocks.sample("a"), clocks.sample("b"))

    assert kinds(transitions) == [TransitionKind.TIME_ADJUSTED, TransitionKind.STATE_CHANGED]
    adjusted = transitions[0]
    assert not adjusted.stepped
    assert adjusted.adjustment_s == pytest.approx(-0.3)
    # A slewed first confirmation after an ordinary start sets no clock and
    # ends no AMT: it must not mark the interval suspect ("slew leaves no flag").
    assert adjusted.flags == frozenset()

    rate = tb.config.slew_rate_ppm * 1e-6
    previous_ref = tb.reference_s(clocks.system_s, clocks.mono_s)
    previous_mono = clocks.mono_s
    for second in range(1, 1000):
        clocks.advance(1.0)
        step_transitions = [t for t in clocks.observe(tb) if t.kind is TransitionKind.CLOCK_STEP]
        if second % 64 == 0:
            step_transitions += [
                t
                for t in clocks.ntp(tb, clocks.sample("a"), clocks.sample("b"))
                if t.kind is TransitionKind.CLOCK_STEP
            ]
        assert step_transitions == []
        ref = tb.reference_s(clocks.system_s, clocks.mono_s)
        advance = ref - previous_ref
        elapsed = clocks.mono_s - previous_mono
        assert advance >= 0
        # 1e-6: float resolution of Unix seconds around 1.8e9
        assert abs(advance - elapsed) <= rate * elapsed + 1e-6
        previous_ref, previous_mono = ref, clocks.mono_s
    # 0.3 s at 500 ppm takes 600 s.
    assert abs(clocks.reference_error_s(tb)) < 1e-6


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(0.01, 200.0),  # seconds until the next retarget
            st.floats(-0.49, 0.49),  # new target level, relative to the current one
            st.floats(-100.0, 100.0),  # new target drift (ppm)
        ),
        min_size=1,
        max_size=30,
    )
)
def test_slewed_reference_is_continuous_and_non_decreasing(
    moves: list[tuple[float, float, float]],
) -> None:
    slewer = OffsetSlewer(step_threshold_s=0.5, slew_rate_ppm=500)
    mono = 0.0
    rate = 500e-6
    for wait_s, level_s, drift_ppm in moves:
        # Walk to the next retarget in small steps: reference = mono + applied.
        drift_now = slewer.target.drift_ppm
        for i in range(1, 5):
            a = mono + wait_s * (i - 1) / 4
            b = mono + wait_s * i / 4
            delta = (b + slewer.applied_offset(b)) - (a + slewer.applied_offset(a))
            assert delta >= 0
            assert abs(delta - (b - a)) <= (rate + abs(drift_now) * 1e-6) * (b - a) + 1e-9
        mono += wait_s
        current = slewer.applied_offset(mono)
        target = LinearOffset(current + level_s, mono, drift_ppm)
        correction = slewer.retarget(target, mono)
        assert not correction.stepped
        assert slewer.applied_offset(mono) == pytest.approx(current, abs=1e-12)


# -- drift tracking over a day --------------------------------------------------------------


def test_24h_of_50ppm_drift_stays_within_5ms_and_keeps_every_boundary() -> None:
    rng = random.Random(20261121)
    clocks = SimClocks(true_s=T0.timestamp(), rate_ppm=50.0)
    tb = Timebase(TimebaseConfig(poll_s=64))
    tb.start(clocks.system_s, clocks.mono_s, None)

    def round_() -> list[TimeTransition]:
        return clocks.ntp(
            tb,
            *(
                clocks.sample(
                    name,
                    error_s=rng.gauss(0, 0.0003),
                    delay_s=0.02 + abs(rng.gauss(0, 0.002)),
                )
                for name in ("a", "b", "c")
            ),
        )

    transitions = round_()
    fired: list[datetime] = []
    fire_errors: list[float] = []
    pending = next_boundary(tb.reference(clocks.system_s, clocks.mono_s), QUARTER_S, UTC)
    worst_s = 0.0
    previous_ref = tb.reference_s(clocks.system_s, clocks.mono_s)
    for second in range(1, 24 * 3600 + 1):
        clocks.advance(1.0)
        transitions += clocks.observe(tb)
        if second % 64 == 0:
            transitions += round_()
        ref = tb.reference_s(clocks.system_s, clocks.mono_s)
        assert ref > previous_ref
        previous_ref = ref
        worst_s = max(worst_s, abs(ref - clocks.true_s))
        if ref >= pending.timestamp():
            # A poller woken at this boundary asks for the next one from reference time.
            fired.append(pending)
            fire_errors.append(clocks.true_s - pending.timestamp())
            pending = next_boundary(tb.reference(clocks.system_s, clocks.mono_s), QUARTER_S, UTC)

    assert worst_s < 0.005
    assert state(tb) is TimeState.SYNCED
    fit = tb.model.fit
    assert fit is not None
    assert fit.drift_ppm == pytest.approx(-50.0, abs=2.0)
    # Only the start-up adjustment (tiny, slewed); no step, no holdover.
    assert kinds(transitions) == [TransitionKind.TIME_ADJUSTED, TransitionKind.STATE_CHANGED]
    assert not transitions[0].stepped
    # Every quarter hour exactly once, in order.
    first = datetime(2026, 11, 21, 0, 15, tzinfo=UTC)
    assert fired == [first + timedelta(seconds=QUARTER_S * i) for i in range(96)]
    assert all(-0.005 < e < 1.005 for e in fire_errors)  # observed at 1 s steps


# -- outlier rejection ----------------------------------------------------------------------


def test_a_server_3s_off_is_a_falseticker() -> None:
    clocks = SimClocks()
    tb = Timebase()
    tb.start(clocks.system_s, clocks.mono_s, None)
    clocks.ntp(tb, clocks.sample("a"), clocks.sample("b"), clocks.sample("c", error_s=3.0))
    round_ = tb.last_round
    assert round_ is not None
    assert {s.server for s in round_.accepted} == {"a", "b"}
    assert [(s.server, r) for s, r in round_.rejected] == [("c", RejectReason.FALSETICKER)]
    assert abs(clocks.reference_error_s(tb)) < 1e-6


def test_two_disagreeing_servers_have_no_majority() -> None:
    clocks = SimClocks()
    tb = Timebase()
    tb.start(clocks.system_s, clocks.mono_s, None)
    assert clocks.ntp(tb, clocks.sample("a"), clocks.sample("b", error_s=3.0)) == []
    round_ = tb.last_round
    assert round_ is not None
    assert round_.accepted == ()
    assert {r for _, r in round_.rejected} == {RejectReason.NO_MAJORITY}
    assert state(tb) is TimeState.ASSUMED


def test_a_sample_with_huge_delay_is_rejected() -> None:
    model = NtpModel()
    for i in range(4):
        model.add_round(
            [NtpSample(server="a", mono_s=64.0 * i, offset_s=0.0, delay_s=0.020, stratum=2)],
            64.0 * i,
        )
    result = model.add_round(
        [NtpSample(server="a", mono_s=256.0, offset_s=0.4, delay_s=0.800, stratum=2)], 256.0
    )
    assert result.accepted == ()
    assert [r for _, r in result.rejected] == [RejectReason.DELAY]
    assert model.predict_offset(256.0) == pytest.approx(0.0)
    # Absolute limit even on the first sample from a server.
    first = model.add_round(
        [NtpSample(server="z", mono_s=300.0, offset_s=0.0, delay_s=1.5, stratum=2)], 300.0
    )
    assert [r for _, r in first.rejected] == [RejectReason.DELAY]


@pytest.mark.parametrize(
    ("stratum", "leap", "delay_s", "offset_s", "reason"),
    [
        (16, 0, 0.02, 0.0, RejectReason.UNSYNCHRONISED),
        (0, 0, 0.02, 0.0, RejectReason.UNSYNCHRONISED),
        (2, 3, 0.02, 0.0, RejectReason.UNSYNCHRONISED),
        (2, 0, -0.5, 0.0, RejectReason.BOGUS),
        (2, 0, 0.02, float("nan"), RejectReason.BOGUS),
    ],
)
def test_unsynchronised_and_bogus_samples_are_rejected(
    stratum: int, leap: int, delay_s: float, offset_s: float, reason: RejectReason
) -> None:
    result = NtpModel().add_round(
        [
            NtpSample(
                server="a",
                mono_s=0.0,
                offset_s=offset_s,
                delay_s=delay_s,
                stratum=stratum,
                leap=leap,
            )
        ],
        0.0,
    )
    assert result.accepted == ()
    assert [r for _, r in result.rejected] == [reason]
    assert result.fit is None


def test_a_spike_is_ignored_but_a_persistent_change_is_followed() -> None:
    clocks = SimClocks()
    tb = synced_timebase(clocks)
    for _ in range(3):
        clocks.advance(64.0)
        clocks.ntp(tb, clocks.sample("a"))
    # One round 0.3 s off: a spike, not believed.
    clocks.advance(64.0)
    assert clocks.ntp(tb, clocks.sample("a", error_s=0.3)) == []
    round_ = tb.last_round
    assert round_ is not None
    assert [r for _, r in round_.rejected] == [RejectReason.SPIKE]
    assert abs(clocks.reference_error_s(tb)) < 1e-6
    # The server's time really moves by 2 s: followed after the stepout, as a step.
    transitions: list[TimeTransition] = []
    for _ in range(3):
        clocks.advance(64.0)
        transitions += clocks.ntp(tb, clocks.sample("a", error_s=2.0))
    assert kinds(transitions) == [TransitionKind.CLOCK_STEP]
    assert transitions[0].stepped
    assert transitions[0].adjustment_s == pytest.approx(2.0, abs=1e-3)
    assert transitions[0].flags == {Flag.CLOCK_SET_FORWARD}
    assert tb.last_round is not None
    assert tb.last_round.reset


# -- fit --------------------------------------------------------------------------------------


def test_fit_recovers_offset_and_drift() -> None:
    points = [(m, 0.25 - 30e-6 * m) for m in range(0, 1024, 64)]
    fit = fit_offset(points, min_span_s=60)
    assert fit.drift_ppm == pytest.approx(-30.0)
    assert fit.predict_offset(2000.0) == pytest.approx(0.25 - 30e-6 * 2000)
    assert fit.residual_rms_s == pytest.approx(0.0, abs=1e-12)
    # Too short a span: only the level, with the prior drift.
    short = fit_offset([(0.0, 0.1), (1.0, 0.2)], min_span_s=60, prior_drift_ppm=7.0)
    assert short.drift_ppm == 7.0
    assert short.predict_offset(0.5) == pytest.approx(0.15)
    # Slopes beyond what a crystal can do are clamped.
    steep = fit_offset([(0.0, 0.0), (100.0, 1.0)], min_span_s=60, max_drift_ppm=500)
    assert steep.drift_ppm == pytest.approx(500.0)
    with pytest.raises(ValueError, match="at least one point"):
        fit_offset([])


# -- holdover and silence ---------------------------------------------------------------------


def test_holdover_after_silence_then_back_to_synced() -> None:
    clocks = SimClocks(rate_ppm=20.0)
    config = TimebaseConfig(poll_s=64)
    tb = synced_timebase(clocks, config)
    for _ in range(3):
        clocks.advance(64.0)
        clocks.ntp(tb, clocks.sample("a"), clocks.sample("b"))
    assert config.holdover_limit_s == 256

    transitions: list[TimeTransition] = []
    for second in range(1, 251):
        clocks.advance(1.0)
        transitions += clocks.observe(tb)
        if second % 64 == 0:
            transitions += clocks.ntp(tb)  # nobody answers
    assert transitions == []
    assert state(tb) is TimeState.SYNCED
    clocks.advance(7.0)
    transitions = clocks.observe(tb)
    assert kinds(transitions) == [TransitionKind.STATE_CHANGED]
    assert transitions[0].state is TimeState.HOLDOVER
    assert transitions[0].cause is Cause.SILENCE
    assert transitions[0].flags == frozenset()
    # The model keeps predicting the drift through holdover.
    assert abs(clocks.reference_error_s(tb)) < 1e-3

    transitions = clocks.ntp(tb, clocks.sample("a"), clocks.sample("b"))
    assert kinds(transitions) == [TransitionKind.STATE_CHANGED]
    assert transitions[0].previous_state is TimeState.HOLDOVER
    assert state(tb) is TimeState.SYNCED


def test_ntp_never_answering_stays_assumed() -> None:
    clocks = SimClocks()
    tb = Timebase(TimebaseConfig(poll_s=64))
    tb.start(clocks.system_s, clocks.mono_s, None)
    for second in range(1, 4 * 3600):
        clocks.advance(1.0)
        assert clocks.observe(tb) == []
        if second % 64 == 0:
            # Silence, or servers that answer but are not synchronised themselves.
            samples = [] if second % 128 else [clocks.sample("a", stratum=16)]
            assert clocks.ntp(tb, *samples) == []
    assert state(tb) is TimeState.ASSUMED
    status = tb.status(clocks.system_s, clocks.mono_s)
    assert status.last_confirmed_age_s is None
    assert status.target_offset_s is None
    assert status.applied_offset_s == 0.0


# -- source system: the kernel's word ---------------------------------------------------------


def test_kernel_sync_confirms_and_loss_is_holdover() -> None:
    clocks = SimClocks()
    tb = Timebase(TimebaseConfig(source=TimeSource.SYSTEM))
    tb.start(clocks.system_s, clocks.mono_s, None)
    assert state(tb) is TimeState.ASSUMED
    assert tb.observe_kernel(KernelSync.UNKNOWN, clocks.system_s, clocks.mono_s) == []
    assert tb.observe_kernel(KernelSync.UNSYNCED, clocks.system_s, clocks.mono_s) == []

    clocks.advance(1.0)
    transitions = tb.observe_kernel(KernelSync.SYNCED, clocks.system_s, clocks.mono_s)
    assert kinds(transitions) == [TransitionKind.TIME_ADJUSTED, TransitionKind.STATE_CHANGED]
    assert transitions[0].adjustment_s == 0.0
    # Confirming a clock that was right all along adjusts nothing.
    assert transitions[0].flags == frozenset()
    assert state(tb) is TimeState.SYNCED

    clocks.advance(1.0)
    assert tb.observe_kernel(KernelSync.SYNCED, clocks.system_s, clocks.mono_s) == []
    transitions = tb.observe_kernel(KernelSync.UNSYNCED, clocks.system_s, clocks.mono_s)
    assert kinds(transitions) == [TransitionKind.STATE_CHANGED]
    assert state(tb) is TimeState.HOLDOVER
    with pytest.raises(ValueError, match="source ntp"):
        tb.observe_ntp([], clocks.system_s, clocks.mono_s)


def test_kernel_sync_ends_assumed_meter_time() -> None:
    clocks = SimClocks(true_s=T0.timestamp() + 100, system_error_s=-1e6)
    tb = Timebase(TimebaseConfig(source=TimeSource.SYSTEM))
    assert kinds(tb.start(clocks.system_s, clocks.mono_s, T0)) == [TransitionKind.AMT_ENTERED]
    clocks.advance(1.0)
    # chrony has slewed... no: synced without a step means the clock is right as it is.
    clocks.system_error_s = 0.0
    clocks.observe(tb)  # sees the step first
    assert not tb.assumed_meter_time
    transitions = tb.observe_kernel(KernelSync.SYNCED, clocks.system_s, clocks.mono_s)
    assert kinds(transitions) == [TransitionKind.TIME_ADJUSTED, TransitionKind.STATE_CHANGED]
    assert state(tb) is TimeState.SYNCED
    assert clocks.reference_error_s(tb) == 0.0


def test_kernel_synced_at_start_trusts_the_clock_over_the_mark() -> None:
    clocks = SimClocks()
    tb = Timebase(TimebaseConfig(source=TimeSource.SYSTEM))
    mark = T0 + timedelta(hours=1)  # a mark from the future: the old clock was wrong
    assert tb.start(clocks.system_s, clocks.mono_s, mark, confirmed=True) == []
    assert state(tb) is TimeState.SYNCED
    assert not tb.assumed_meter_time


# -- gateway outage ---------------------------------------------------------------------------


def test_outage_window_flags_power_fail_and_missing() -> None:
    mark = datetime(2026, 11, 21, 0, 7, 30, tzinfo=UTC)
    restart = datetime(2026, 11, 21, 0, 50, 10, tzinfo=UTC)
    outage = gateway_outage(mark, restart)
    assert outage is not None
    assert not outage.end_assumed
    assert outage.duration_s == pytest.approx(42 * 60 + 40)
    assert outage.missed_boundaries(QUARTER_S, UTC) == (
        datetime(2026, 11, 21, 0, 15, tzinfo=UTC),
        datetime(2026, 11, 21, 0, 30, tzinfo=UTC),
        datetime(2026, 11, 21, 0, 45, tzinfo=UTC),
    )
    assert outage.power_fail_intervals(QUARTER_S, UTC) == (
        datetime(2026, 11, 21, 0, 15, tzinfo=UTC),
        datetime(2026, 11, 21, 0, 30, tzinfo=UTC),
        datetime(2026, 11, 21, 0, 45, tzinfo=UTC),
        datetime(2026, 11, 21, 1, 0, tzinfo=UTC),
    )
    # A short outage inside one interval: POWER_FAIL there, nothing missing.
    short = gateway_outage(mark, mark + timedelta(seconds=20))
    assert short is not None
    assert short.missed_boundaries(QUARTER_S, UTC) == ()
    assert short.power_fail_intervals(QUARTER_S, UTC) == (
        datetime(2026, 11, 21, 0, 15, tzinfo=UTC),
    )
    # Restart exactly on a boundary: the interval starting there was not down.
    on_boundary = gateway_outage(mark, datetime(2026, 11, 21, 0, 30, tzinfo=UTC))
    assert on_boundary is not None
    assert on_boundary.power_fail_intervals(QUARTER_S, UTC)[-1] == datetime(
        2026, 11, 21, 0, 30, tzinfo=UTC
    )


def test_outage_with_clock_behind_mark_ends_at_assumed_time() -> None:
    mark = datetime(2026, 11, 21, 0, 14, 58, tzinfo=UTC)
    outage = gateway_outage(mark, datetime(2000, 1, 1, tzinfo=UTC))
    assert outage is not None
    assert outage.end_assumed
    assert outage.end == mark + timedelta(seconds=5)
    assert outage.missed_boundaries(QUARTER_S, UTC) == (datetime(2026, 11, 21, 0, 15, tzinfo=UTC),)
    assert gateway_outage(None, mark) is None


# -- config -------------------------------------------------------------------------------------


def test_config_defaults_and_validation() -> None:
    config = TimebaseConfig()
    assert config.holdover_limit_s == 256.0
    assert config.fit_window_limit_s == 1024.0
    assert TimebaseConfig(poll_s=16, holdover_after_s=30).holdover_limit_s == 30
    for bad in (
        {"poll_s": 0},
        {"step_threshold_s": -1},
        {"slew_rate_ppm": 2e6},
        {"stepout_rounds": 0},
        {"holdover_after_s": 0},
    ):
        with pytest.raises(ValueError, match="must be"):
            TimebaseConfig(**bad)


def test_amt_ending_with_a_slewed_correction_is_time_adjusted_without_clock_set() -> None:
    # The system clock is 65.2 s slow and 60 s behind the last mark, so
    # assumed time (mark + 5 s) is within the step threshold of true time:
    # the correction is slewed, yet AMT ends here.
    clocks = SimClocks(system_error_s=-65.2)
    mark = datetime.fromtimestamp(clocks.system_s + 60.0, UTC)
    tb = Timebase()
    start = tb.start(clocks.system_s, clocks.mono_s, mark)
    assert TransitionKind.AMT_ENTERED in [t.kind for t in start]
    assert tb.assumed_meter_time
    transitions = clocks.ntp(tb, clocks.sample("a"), clocks.sample("b"))
    adjusted = [t for t in transitions if t.kind is TransitionKind.TIME_ADJUSTED]
    assert len(adjusted) == 1
    assert adjusted[0].ended_amt
    assert not adjusted[0].stepped
    assert adjusted[0].flags == {Flag.TIME_ADJUSTED}
