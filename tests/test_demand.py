"""Block, rolling and billing-period peak demand."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from edged.config.schema import Device
from edged.core.demand import (
    BillingPeriod,
    Peak,
    PeakState,
    RollingEntry,
    RollingSpec,
    billing_period,
    block_demand,
    peak_event,
    push_rolling,
    rolling_spec,
    update_peak,
    update_peaks,
    usable_for_demand,
)
from edged.core.engine.intervals import step_channel
from edged.core.engine.state import (
    ChannelState,
    IntervalContext,
)
from edged.core.model import Flag, Interval, Read, TimeState

AKL = ZoneInfo("Pacific/Auckland")
T0 = datetime(2026, 11, 21, 0, 0, tzinfo=UTC)
Q = timedelta(minutes=15)


def make_device(**overrides: Any) -> Device:
    data: dict[str, Any] = {
        "id": "unit1",
        "interval": "15m",
        "transport": {"type": "tcp", "host": "127.0.0.1"},
        "channels": [{"name": "energy_import", "register": 0, "multiplier": 0.144}],
    }
    data.update(overrides)
    return Device.model_validate(data)


def record(
    end: datetime,
    value: float | None,
    flags: Iterable[Flag] = (),
    *,
    channel: str = "energy_import",
    rolling: float | None = None,
) -> Interval:
    flag_set = frozenset(flags)
    return Interval(
        site="tekapo-a",
        device="unit1",
        channel=channel,
        start=end - Q,
        end=end,
        duration_s=900.0,
        value=value,
        unit="kWh",
        demand=None if value is None or Flag.AMT in flag_set else value * 4,
        demand_unit="kW",
        counter_start=None,
        counter_end=None,
        flags=flag_set,
        time_state=TimeState.ASSUMED if Flag.AMT in flag_set else TimeState.SYNCED,
        read_at=end,
        read_lateness_ms=1.0,
        rolling_demand=rolling,
    )


# --------------------------------------------------------------------------
# Block demand


def test_block_demand_pmc1() -> None:
    assert block_demand(252.576, 0.25) == 1010.304
    assert block_demand(Decimal("252.576"), Decimal("0.25")) == 1010.304


def test_block_demand_through_the_engine_and_amt_suspends_it() -> None:
    ctx = IntervalContext("tekapo-a", make_device(), UTC)
    channel = ctx.device.channels[0]
    state = ChannelState(counter=1_000_000, counter_at=T0, last_end=T0)

    def read(time_state: TimeState) -> Read:
        return Read(
            device="unit1",
            boundary=T0 + Q,
            read_at=T0 + Q,
            read_lateness_ms=0.0,
            time_state=time_state,
            values={"energy_import": 1_001_754},
        )

    (synced,) = step_channel(state, read(TimeState.SYNCED), channel, ctx).records
    (amt,) = step_channel(state, read(TimeState.ASSUMED), channel, ctx).records
    assert synced.demand == 1010.304
    assert amt.demand is None
    assert amt.value == 252.576


# --------------------------------------------------------------------------
# Rolling demand


def test_rolling_spec() -> None:
    assert rolling_spec(make_device()) is None
    spec = rolling_spec(make_device(demand={"window": "30m", "subintervals": 2}))
    assert spec == RollingSpec(subintervals=2, window_s=1800)
    with pytest.raises(ValueError, match="not 2 x 900s"):
        rolling_spec(make_device(demand={"window": "20m", "subintervals": 2}))


def test_rolling_demand_over_two_subintervals() -> None:
    spec = RollingSpec(2, 1800)
    window, first = push_rolling((), record(T0 + Q, 252.576), spec)
    assert first is None  # the window is not full yet
    window, second = push_rolling(window, record(T0 + 2 * Q, 100.0), spec)
    assert second == pytest.approx(float(Decimal("352.576") / Decimal("0.5")))
    assert second == 705.152
    assert [e.end for e in window] == [T0 + 2 * Q]  # keeps subintervals - 1


def test_rolling_demand_over_three_subintervals() -> None:
    spec = RollingSpec(3, 2700)
    window: tuple[RollingEntry, ...] = ()
    values = [10.0, 20.0, 30.0, 40.0]
    results = []
    for i, v in enumerate(values, start=1):
        window, rolling = push_rolling(window, record(T0 + i * Q, v), spec)
        results.append(rolling)
    assert results == [None, None, 80.0, 120.0]  # 60 kWh / 0.75 h, 90 kWh / 0.75 h


def test_single_subinterval_rolling_equals_block() -> None:
    _, rolling = push_rolling((), record(T0 + Q, 252.576), RollingSpec(1, 900))
    assert rolling == 1010.304


@pytest.mark.parametrize(
    "bad",
    [
        record(T0 + Q, None, {Flag.MISSING}),
        record(T0 + Q, 50.0, {Flag.AMT}),
        record(T0 + Q, 50.0, {Flag.PARTIAL}),
        record(T0 + Q, 50.0, {Flag.OUT_OF_RANGE}),
        record(T0 + Q, 50.0, {Flag.ESTIMATED}),
        record(T0 + Q, 50.0, {Flag.POWER_FAIL}),
    ],
)
def test_rolling_demand_is_null_when_any_input_is_not_actual(bad: Interval) -> None:
    spec = RollingSpec(2, 1800)
    window, _ = push_rolling((), bad, spec)
    window, rolling = push_rolling(window, record(T0 + 2 * Q, 100.0), spec)
    assert rolling is None
    # ... and when the current interval is the bad one.
    window, _ = push_rolling((), record(T0, 100.0), spec)
    shifted = record(T0 + Q, bad.value, bad.flags)
    _, rolling = push_rolling(window, shifted, spec)
    assert rolling is None


def test_rolling_demand_allows_information_flags() -> None:
    spec = RollingSpec(2, 1800)
    window, _ = push_rolling((), record(T0 + Q, 10.0, {Flag.DST}), spec)
    _, rolling = push_rolling(window, record(T0 + 2 * Q, 10.0, {Flag.ROLLOVER}), spec)
    assert rolling == 40.0


def test_rolling_demand_needs_contiguous_inputs() -> None:
    spec = RollingSpec(2, 1800)
    window, _ = push_rolling((), record(T0 + Q, 10.0), spec)
    _, rolling = push_rolling(window, record(T0 + 3 * Q, 10.0), spec)  # T0+2Q lost
    assert rolling is None


def test_reemitted_record_replaces_its_window_entry() -> None:
    spec = RollingSpec(3, 2700)
    window, _ = push_rolling((), record(T0 + Q, 10.0), spec)
    window, _ = push_rolling(window, record(T0 + 2 * Q, None, {Flag.MISSING}), spec)
    window, _ = push_rolling(window, record(T0 + Q, 12.0, {Flag.ESTIMATED}), spec)
    assert [(e.end, e.energy) for e in window] == [(T0 + Q, None), (T0 + 2 * Q, None)]


def test_rolling_demand_through_the_engine() -> None:
    device = make_device(demand={"window": "30m", "subintervals": 2})
    ctx = IntervalContext("tekapo-a", device, UTC)
    channel = device.channels[0]
    state = ChannelState(counter=1_000_000, counter_at=T0, last_end=T0)
    rolling = []
    for i, counter in enumerate([1_001_754, 1_003_508, 1_003_508], start=1):
        read = Read(
            device="unit1",
            boundary=T0 + i * Q,
            read_at=T0 + i * Q,
            read_lateness_ms=0.0,
            time_state=TimeState.SYNCED,
            values={"energy_import": counter},
        )
        step = step_channel(state, read, channel, ctx)
        state = step.state
        rolling.append(step.records[0].rolling_demand)
    assert rolling == [None, 1010.304, 505.152]
    # The window survives a restart through the persisted state.
    restored = ChannelState.from_json(state.to_json())
    read = Read(
        device="unit1",
        boundary=T0 + 4 * Q,
        read_at=T0 + 4 * Q,
        read_lateness_ms=0.0,
        time_state=TimeState.SYNCED,
        values={"energy_import": 1_005_262},
    )
    (next_record,) = step_channel(restored, read, channel, ctx).records
    assert next_record.rolling_demand == 505.152


# --------------------------------------------------------------------------
# Billing periods


def test_calendar_month_in_auckland() -> None:
    # 1 December 2026 00:00 NZDT is 30 November 11:00 UTC.
    december = datetime(2026, 11, 30, 11, 0, tzinfo=UTC)
    assert billing_period(december, AKL) == BillingPeriod(
        datetime(2026, 11, 30, 11, 0, tzinfo=UTC), datetime(2026, 12, 31, 11, 0, tzinfo=UTC)
    )
    just_before = december - timedelta(microseconds=1)
    assert billing_period(just_before, AKL) == BillingPeriod(
        datetime(2026, 10, 31, 11, 0, tzinfo=UTC), december
    )


def test_reset_day_across_the_dst_change_in_auckland() -> None:
    # Period 15 March 00:00 NZDT (14 Mar 11:00Z) .. 15 April 00:00 NZST (14 Apr 12:00Z):
    # NZ daylight time ends on 5 April 2026, so the period is 31 days + 1 hour.
    inside = datetime(2026, 4, 10, 0, 0, tzinfo=UTC)
    period = billing_period(inside, AKL, reset_day=15)
    assert period.start == datetime(2026, 3, 14, 11, 0, tzinfo=UTC)
    assert period.end == datetime(2026, 4, 14, 12, 0, tzinfo=UTC)
    assert period.end - period.start == timedelta(days=31, hours=1)
    # On the reset day before local midnight: still the old period.
    assert billing_period(datetime(2026, 4, 14, 11, 59, tzinfo=UTC), AKL, 15) == period
    assert billing_period(period.end, AKL, 15).start == period.end


def test_year_wrap_and_invalid_reset_day() -> None:
    period = billing_period(datetime(2027, 1, 3, tzinfo=UTC), UTC, reset_day=5)
    assert period == BillingPeriod(
        datetime(2026, 12, 5, tzinfo=UTC), datetime(2027, 1, 5, tzinfo=UTC)
    )
    with pytest.raises(ValueError, match=r"1\.\.28"):
        billing_period(T0, UTC, reset_day=29)


# --------------------------------------------------------------------------
# Peak demand


def test_peak_demand_with_its_timestamp() -> None:
    state = None
    for i, value in enumerate([100.0, 252.576, 200.0], start=1):
        state, closed = update_peak(state, record(T0 + i * Q, value), AKL)
        assert closed is None
    assert state is not None
    assert state.block == Peak(1010.304, T0 + Q, T0 + 2 * Q)
    assert state.period_start == datetime(2026, 10, 31, 11, 0, tzinfo=UTC)


def test_peak_excludes_amt_suspect_estimated_and_missing_intervals() -> None:
    state, _ = update_peak(None, record(T0 + Q, 10.0), AKL)
    for flags in ({Flag.AMT}, {Flag.PARTIAL}, {Flag.LONG}, {Flag.TIME_ADJUSTED}, {Flag.ESTIMATED}):
        state, _ = update_peak(state, record(T0 + 2 * Q, 999.0, flags), AKL)
    state, _ = update_peak(state, record(T0 + 3 * Q, None, {Flag.MISSING}), AKL)
    assert state.block == Peak(40.0, T0, T0 + Q)
    assert usable_for_demand(record(T0, 1.0, {Flag.DST, Flag.ROLLOVER}))
    assert not usable_for_demand(record(T0, 1.0, {Flag.AMT}))


def test_peak_tie_keeps_the_earlier_interval() -> None:
    state, _ = update_peak(None, record(T0 + Q, 10.0), AKL)
    state, _ = update_peak(state, record(T0 + 2 * Q, 10.0), AKL)
    assert state.block is not None
    assert state.block.end == T0 + Q


def test_peak_resets_at_the_month_boundary_in_auckland() -> None:
    december = datetime(2026, 11, 30, 11, 0, tzinfo=UTC)  # 1 Dec 00:00 NZDT
    state, _ = update_peak(None, record(december - Q, 300.0), AKL)  # 23:45-00:00: November
    assert state.period_end == december
    state, closed = update_peak(state, record(december + Q, 50.0), AKL)  # 00:00-00:15
    assert closed is not None
    assert closed.block == Peak(1200.0, december - 2 * Q, december - Q)
    assert (closed.period_start, closed.period_end) == (
        datetime(2026, 10, 31, 11, 0, tzinfo=UTC),
        december,
    )
    assert state.period_start == december
    assert state.block == Peak(200.0, december, december + Q)


def test_peak_resets_on_the_billing_reset_day() -> None:
    reset = datetime(2026, 4, 14, 12, 0, tzinfo=UTC)  # 15 April 00:00 NZST
    state, _ = update_peak(None, record(reset, 300.0), AKL, reset_day=15)
    state, closed = update_peak(state, record(reset + Q, None, {Flag.MISSING}), AKL, 15)
    assert closed is not None
    assert closed.block is not None
    assert closed.block.demand == 1200.0
    assert state.block is None  # a MISSING record opens the period but sets no peak
    # A late record for the closed period does not reopen it.
    late, again = update_peak(state, record(reset - Q, 999.0), AKL, 15)
    assert late == state
    assert again is None


def test_rolling_peak_is_tracked_beside_block_peak() -> None:
    state, _ = update_peak(None, record(T0 + Q, 10.0, rolling=30.0), AKL)
    state, _ = update_peak(state, record(T0 + 2 * Q, 5.0, rolling=35.0), AKL)
    assert state.block == Peak(40.0, T0, T0 + Q)
    assert state.rolling == Peak(35.0, T0 + Q, T0 + 2 * Q)


def test_peak_state_json_round_trip() -> None:
    state = PeakState(
        period_start=datetime(2026, 10, 31, 11, 0, tzinfo=UTC),
        period_end=datetime(2026, 11, 30, 11, 0, tzinfo=UTC),
        block=Peak(1010.304, T0, T0 + Q),
        rolling=None,
    )
    assert PeakState.from_json(state.to_json()) == state
    assert PeakState.from_json(PeakState().to_json()) == PeakState()
    with pytest.raises(ValueError, match="version 1"):
        PeakState.from_json("[]")


def test_update_peaks_and_one_event_per_device() -> None:
    december = datetime(2026, 11, 30, 11, 0, tzinfo=UTC)
    records = [
        record(december, 10.0, channel="import"),
        record(december, 20.0, channel="export"),
    ]
    states, closed = update_peaks({}, records, AKL)
    assert closed == {}
    states, closed = update_peaks(
        states,
        [record(december + Q, 1.0, channel="import"), record(december + Q, 1.0, channel="export")],
        AKL,
    )
    assert set(closed) == {"import", "export"}
    event = peak_event("unit1", closed, {"import": "kW", "export": "kW"})
    assert event.kind == "billing_period_closed"
    assert event.at == december
    channels = event.details["channels"]
    assert isinstance(channels, dict)
    assert channels["export"]["peak"]["demand"] == 80.0
    assert channels["import"]["demand_unit"] == "kW"
    with pytest.raises(ValueError, match="no closed"):
        peak_event("unit1", {}, {})
