"""The interval engine: arithmetic, gaps, flags by rule, validation/estimation."""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edged.config.schema import Device
from edged.core.demand import block_demand
from edged.core.engine.counters import (
    allocate,
    check_delta,
    counter_decimal,
    counter_delta,
    default_max_demand,
)
from edged.core.engine.intervals import (
    baseline,
    baseline_device,
    step_channel,
    step_device,
)
from edged.core.engine.rules import (
    amt_rule_fails,
    device_problems,
    validate_amt_rule,
    zero_fill_amt,
)
from edged.core.engine.state import (
    ChannelState,
    GapRun,
    IntervalContext,
)
from edged.core.flags import iee_status, quality
from edged.core.model import (
    Event,
    Flag,
    Interval,
    Quality,
    Read,
    ReadError,
    ReadErrorKind,
    TimeState,
)
from tests.support.examples import examples

AKL = ZoneInfo("Pacific/Auckland")
T0 = datetime(2026, 11, 21, 0, 0, tzinfo=UTC)
Q = timedelta(minutes=15)
CH = "energy_import"


def make_device(channel: dict[str, Any] | None = None, **overrides: Any) -> Device:
    data: dict[str, Any] = {
        "id": "unit1",
        "interval": "15m",
        "transport": {"type": "tcp", "host": "127.0.0.1"},
        "channels": [{"name": CH, "register": 0, "multiplier": 0.144, **(channel or {})}],
    }
    data.update(overrides)
    return Device.model_validate(data)


def make_ctx(device: Device | None = None, zone: Any = UTC) -> IntervalContext:
    return IntervalContext(site="tekapo-a", device=device or make_device(), zone=zone)


def boundary_read(
    boundary: datetime,
    value: float | None = None,
    *,
    error: ReadError | None = None,
    flags: Iterable[Flag] = (),
    time_state: TimeState = TimeState.SYNCED,
    values: dict[str, float | int] | None = None,
) -> Read:
    if values is None:
        values = {} if value is None else {CH: value}
    if value is None and error is None and not values:
        error = ReadError(ReadErrorKind.TIMEOUT, "no reply")
    return Read(
        device="unit1",
        boundary=boundary,
        read_at=boundary + timedelta(milliseconds=2),
        read_lateness_ms=2.1,
        time_state=time_state,
        values=values,
        error=error,
        flags=frozenset(flags),
    )


def startup_read(at: datetime, value: float | None) -> Read:
    return Read(
        device="unit1",
        boundary=None,
        read_at=at,
        read_lateness_ms=None,
        time_state=TimeState.SYNCED,
        values={} if value is None else {CH: value},
        error=None if value is not None else ReadError(ReadErrorKind.TIMEOUT, "no reply"),
    )


def started(counter: int | float, at: datetime = T0) -> ChannelState:
    """State as if the series had a good read at boundary `at`."""
    return ChannelState(counter=counter, counter_at=at, last_end=at)


def one(
    state: ChannelState | None, read: Read, ctx: IntervalContext | None = None
) -> tuple[ChannelState, Interval, tuple[Event, ...]]:
    ctx = ctx or make_ctx()
    step = step_channel(state, read, ctx.device.channels[0], ctx)
    assert len(step.records) == 1, step.records
    return step.state, step.records[0], step.events


def details_of(event: Event) -> dict[str, Any]:
    """An engine event's per-channel details."""
    channels = event.details["channels"]
    assert isinstance(channels, dict)
    return channels


# --------------------------------------------------------------------------
# Issue 2 behaviour


def test_pmc1_worked_example() -> None:
    """1754 pulses x 0.144 kWh = 252.576 kWh; / 0.25 h = 1010.304 kW (PMC-1 note)."""
    state, record, events = one(started(1_000_000), boundary_read(T0 + Q, 1_001_754))
    assert record.value == 252.576
    assert record.demand == 1010.304
    assert record.demand_unit == "kW"
    assert record.flags == frozenset()
    assert quality(record.flags) is Quality.ACTUAL
    assert (record.counter_start, record.counter_end) == (1_000_000, 1_001_754)
    assert record.duration_s == 900.0
    assert (record.start, record.end) == (T0, T0 + Q)
    assert record.id == "tekapo-a/unit1/energy_import/2026-11-21T00:15:00Z"
    assert events == ()
    assert state == ChannelState(counter=1_001_754, counter_at=T0 + Q, last_end=T0 + Q)


def test_energy_and_demand_are_decimal_exact() -> None:
    assert 3 * 0.144 != 0.432  # float arithmetic would publish 0.43199999999999994
    _, record, _ = one(started(1_000_000), boundary_read(T0 + Q, 1_000_003))
    assert record.value == 0.432
    assert block_demand(252.576, 0.25) == 1010.304
    assert counter_delta(65_000, 500, 65_536).counts == 1036
    assert counter_delta(65_000, 500, 65_536).wrapped


def test_first_interval_after_startup_baseline_is_partial() -> None:
    state = baseline(
        None, startup_read(T0 + Q - timedelta(minutes=5), 1_000_000), make_device().channels[0]
    )
    state, record, _ = one(state, boundary_read(T0 + Q, 1_000_100))
    assert Flag.PARTIAL in record.flags
    assert record.duration_s == 300.0
    assert record.value == 14.4
    # Demand over the 5 minutes it really covers.
    assert record.demand == pytest.approx(14.4 / (300 / 3600))


def test_persisted_counter_wins_over_fresh_baseline_and_down_boundaries_are_missing() -> None:
    persisted = started(1_000_000)
    channels = make_device().channels
    states = baseline_device(
        {CH: persisted}, startup_read(T0 + 3 * Q + timedelta(minutes=7), 2_000_000), channels
    )
    assert states[CH] == persisted
    step = step_device(states, boundary_read(T0 + 4 * Q, 1_000_400), make_ctx())
    ends = [r.end for r in step.records]
    assert ends == [T0 + Q, T0 + 2 * Q, T0 + 3 * Q, T0 + 4 * Q]
    assert all(r.flags == {Flag.MISSING} and r.value is None for r in step.records[:3])
    closing = step.records[3]
    assert closing.value == 57.6  # nothing lost across the restart
    assert Flag.LONG in closing.flags
    assert closing.duration_s == 3600.0


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (ReadError(ReadErrorKind.TIMEOUT, "no reply"), {Flag.MISSING}),
        (ReadError(ReadErrorKind.CONNECTION, "refused"), {Flag.MISSING}),
        (ReadError(ReadErrorKind.EXCEPTION, "illegal address", 2), {Flag.MISSING}),
        (ReadError(ReadErrorKind.EXCEPTION, "busy", 6), {Flag.MISSING}),
        (
            ReadError(ReadErrorKind.EXCEPTION, "server device failure", 4),
            {Flag.MISSING, Flag.DEVICE_ERROR},
        ),
        (ReadError(ReadErrorKind.MALFORMED, "short"), {Flag.MISSING}),
    ],
)
def test_failed_read_is_missing(error: ReadError, expected: set[Flag]) -> None:
    state, record, _ = one(started(1_000_000), boundary_read(T0 + Q, error=error))
    assert record.flags == expected
    assert record.value is None
    assert record.demand is None
    assert quality(record.flags) is Quality.MISSING
    assert state.counter == 1_000_000  # the last good counter is kept
    assert state.last_end == T0 + Q


def test_non_finite_float_register_is_missing_with_device_error() -> None:
    ctx = make_ctx(make_device({"type": "float32", "multiplier": 1.0}))
    _, record, _ = one(started(1000.5), boundary_read(T0 + Q, math.nan), ctx)
    assert record.flags == {Flag.MISSING, Flag.DEVICE_ERROR}


def test_read_without_the_channel_value_is_missing() -> None:
    _, record, _ = one(started(1_000_000), boundary_read(T0 + Q, values={"other": 1}))
    assert record.flags == {Flag.MISSING}


def test_replayed_read_for_a_closed_boundary_changes_nothing() -> None:
    state = started(1_000_000, T0 + Q)
    step = step_channel(state, boundary_read(T0 + Q, 5), make_device().channels[0], make_ctx())
    assert step == (state, (), ())


def test_first_good_read_without_a_counter_is_missing_then_baselines() -> None:
    state, record, _ = one(None, boundary_read(T0 + Q, 1_000_000))
    assert record.flags == {Flag.MISSING}
    assert state.counter == 1_000_000
    assert state.counter_at == T0 + Q
    _, record, _ = one(state, boundary_read(T0 + 2 * Q, 1_001_754))
    assert record.value == 252.576
    assert record.flags == frozenset()


def uint16_ctx(**channel: Any) -> IntervalContext:
    return make_ctx(make_device({"type": "uint16", **channel}))


def test_plausible_wrap_gives_energy_and_rollover() -> None:
    state, record, events = one(started(65_000), boundary_read(T0 + Q, 500), uint16_ctx())
    assert record.value == 149.184
    assert Flag.ROLLOVER in record.flags
    assert quality(record.flags) is Quality.ACTUAL  # information only
    assert events == ()
    assert state.counter == 500


def test_default_max_demand_is_half_the_modulus_per_interval() -> None:
    channel = make_device({"type": "uint16"}).channels[0]
    # 32768 counts x 0.144 kWh / 0.25 h
    assert default_max_demand(channel, 900) == pytest.approx(32_768 * 0.144 * 4)
    assert default_max_demand(make_device({"type": "float32"}).channels[0], 900) is None
    assert (
        default_max_demand(make_device({"type": "uint16", "max_demand": 5.0}).channels[0], 900)
        == 5.0
    )
    # One count below half the modulus forward is a wrap; half or more is not.
    assert check_delta(65_000, 65_000 + 32_767 - 65_536, channel, 900, 900).reset is None
    assert check_delta(65_000, 65_000 + 32_768 - 65_536, channel, 900, 900).reset == "went_back"
    assert check_delta(0, 32_768, channel, 900, 900).reset == "jumped"
    # Not scaled by the span: a meter exchange during an outage is still caught.
    assert check_delta(10_000, 10, channel, 10 * 900, 900).reset == "went_back"


def test_implausible_wrap_is_counter_reset_with_event_and_rebaseline() -> None:
    ctx = uint16_ctx(max_demand=100.0)  # 100 kW x 0.25 h / 0.144 = 173.6 counts
    state, record, events = one(started(65_000), boundary_read(T0 + Q, 500), ctx)
    assert record.value is None
    assert record.demand is None
    assert Flag.COUNTER_RESET in record.flags
    assert Flag.ROLLOVER not in record.flags
    assert (record.counter_start, record.counter_end) == (65_000, 500)
    (event,) = events
    assert event.kind == "counter_reset"
    assert event.device == "unit1"
    assert event.at == T0 + Q
    details = event.details["channels"]
    assert isinstance(details, dict)
    assert details[CH]["reason"] == "went_back"
    assert details[CH]["counter_start"] == 65_000
    # Re-baselined on the new reading: the next interval is normal.
    assert state.counter == 500
    assert state.counter_at == T0 + Q
    _, record, events = one(state, boundary_read(T0 + 2 * Q, 600), ctx)
    assert record.value == 14.4
    assert record.flags == frozenset()
    assert events == ()


def test_wrap_within_max_demand_is_accepted() -> None:
    ctx = uint16_ctx(max_demand=1000.0)  # 1736 counts per interval
    _, record, events = one(started(65_000), boundary_read(T0 + Q, 500), ctx)
    assert record.value == 149.184
    assert Flag.ROLLOVER in record.flags
    assert not events


def test_implausible_jump_upward_is_counter_reset() -> None:
    ctx = make_ctx(make_device({"max_demand": 2000.0}))
    _, record, events = one(started(1_000_000), boundary_read(T0 + Q, 1_010_000), ctx)
    assert Flag.COUNTER_RESET in record.flags
    assert record.value is None
    assert details_of(events[0])[CH]["reason"] == "jumped"


def test_max_demand_allows_more_energy_over_a_gap() -> None:
    ctx = make_ctx(make_device({"max_demand": 2000.0}))  # 3472 counts per interval
    state = started(1_000_000)
    state, _, _ = one(state, boundary_read(T0 + Q))
    _, record, events = one(state, boundary_read(T0 + 2 * Q, 1_006_000), ctx)
    assert record.value == 864.0
    assert not events


def test_one_count_of_quantisation_is_tolerated() -> None:
    # A start-up read 1 s before the boundary and one pulse (0.144 kWh): 518 kW
    # over 1 s, but one pulse may have been accumulating for a whole interval.
    ctx = make_ctx(make_device({"max_demand": 0.001}))
    state = baseline(None, startup_read(T0 + Q - timedelta(seconds=1), 100), ctx.device.channels[0])
    _, record, events = one(state, boundary_read(T0 + Q, 101), ctx)
    assert record.value == 0.144
    assert not events


def test_decrease_of_a_counter_without_modulus_is_counter_reset() -> None:
    ctx = make_ctx(make_device({"type": "float64", "multiplier": 1.0}))
    _, record, events = one(started(1000.5), boundary_read(T0 + Q, 3.25), ctx)
    assert Flag.COUNTER_RESET in record.flags
    assert record.value is None
    assert events[0].kind == "counter_reset"


def test_ambiguous_number_of_wraps_is_counter_reset() -> None:
    # 16-bit counter, 1 Wh per count, max 10 kW: a wrap is 65.5 kWh, 6.5 h at
    # the maximum. After 8 h down, 0..2 wraps are all plausible.
    ctx = uint16_ctx(max_demand=10.0, multiplier=0.001)
    state = started(1000)
    step = step_channel(state, boundary_read(T0 + 32 * Q, 2000), ctx.device.channels[0], ctx)
    closing = step.records[-1]
    assert Flag.COUNTER_RESET in closing.flags
    assert closing.value is None
    assert details_of(step.events[0])[CH]["reason"] == "ambiguous_wraps"
    # 2 h down: at most 20 kWh = 20 000 counts < one wrap: unambiguous.
    step = step_channel(state, boundary_read(T0 + 8 * Q, 2000), ctx.device.channels[0], ctx)
    assert step.records[-1].value == 1.0
    assert not step.events


def test_resets_of_several_channels_make_one_event() -> None:
    device = make_device(
        channels=[
            {"name": "a", "register": 0, "type": "uint16", "max_demand": 1.0},
            {"name": "b", "register": 2, "type": "uint16", "max_demand": 1.0},
        ]
    )
    ctx = make_ctx(device)
    states = {"a": started(60_000), "b": started(50_000)}
    step = step_device(states, boundary_read(T0 + Q, values={"a": 5, "b": 6}), ctx)
    (event,) = step.events
    assert set(details_of(event)) == {"a", "b"}
    assert all(Flag.COUNTER_RESET in r.flags for r in step.records)


# --------------------------------------------------------------------------
# Float registers


def f32(x: float) -> float:
    return float(struct.unpack("<f", struct.pack("<f", x))[0])


def test_float32_counter_is_read_as_the_decimal_the_meter_meant() -> None:
    assert f32(12345.7) != 12345.7
    assert counter_decimal(f32(12345.7), "float32") == Decimal("12345.7")
    assert counter_decimal(f32(10.0), "float32") == Decimal("10")
    assert counter_decimal(0.1, "float64") == Decimal("0.1")
    assert counter_decimal(12, "uint32") == Decimal(12)
    ctx = make_ctx(make_device({"type": "float32", "multiplier": 1.0}))
    _, record, events = one(started(f32(12345.7)), boundary_read(T0 + Q, f32(12352.1)), ctx)
    assert record.value == 6.4  # not 6.400390625
    assert not events


def test_float32_resolution_limit_is_reported_once() -> None:
    ctx = make_ctx(make_device({"type": "float32", "multiplier": 1.0}))
    # At 10 000 000 kWh float32 resolves 1 kWh: 1 % of a 100 kWh interval.
    state, record, events = one(
        started(f32(10_000_000.0)), boundary_read(T0 + Q, f32(10_000_100.0)), ctx
    )
    assert record.value == 100.0
    (event,) = events
    assert event.kind == "counter_resolution"
    assert details_of(event)[CH]["resolution_counts"] == 1.0
    assert state.coarse
    _, _, events = one(state, boundary_read(T0 + 2 * Q, f32(10_000_200.0)), ctx)
    assert events == ()  # sticky: reported once
    # float64 at the same magnitude is fine.
    ctx64 = make_ctx(make_device({"type": "float64", "multiplier": 1.0}))
    _, _, events = one(started(10_000_000.0), boundary_read(T0 + Q, 10_000_100.0), ctx64)
    assert events == ()


# --------------------------------------------------------------------------
# Gaps


def test_gap_long_mode_missing_then_long_with_true_duration() -> None:
    ctx = make_ctx()
    state = started(1_000_000)
    state, r1, _ = one(state, boundary_read(T0 + Q), ctx)
    state, r2, _ = one(state, boundary_read(T0 + 2 * Q), ctx)
    assert r1.flags == r2.flags == {Flag.MISSING}
    state, r3, _ = one(state, boundary_read(T0 + 3 * Q, 1_000_300), ctx)
    assert r3.value == 43.2
    assert Flag.LONG in r3.flags
    assert r3.duration_s == 2700.0
    assert (r3.start, r3.end) == (T0 + 2 * Q, T0 + 3 * Q)
    assert r3.demand == pytest.approx(57.6)  # average over the gap
    assert (r3.counter_start, r3.counter_end) == (1_000_000, 1_000_300)
    assert quality(r3.flags) is Quality.SUSPECT


def test_long_record_carries_the_flags_of_the_gap() -> None:
    ctx = make_ctx()
    state = started(1_000_000)
    state, _, _ = one(
        state, boundary_read(T0 + Q, time_state=TimeState.ASSUMED, flags={Flag.POWER_FAIL}), ctx
    )
    _, r, _ = one(state, boundary_read(T0 + 2 * Q, 1_000_100), ctx)
    assert {Flag.LONG, Flag.AMT, Flag.POWER_FAIL} <= r.flags
    assert r.demand is None  # part of its span was on assumed time


def prorate_ctx(**overrides: Any) -> IntervalContext:
    return make_ctx(make_device(gaps="prorate", **overrides))


def test_gap_prorate_reemits_estimates_with_the_same_ids() -> None:
    ctx = prorate_ctx()
    state = started(1_000_000)
    state, missing1, _ = one(state, boundary_read(T0 + Q), ctx)
    state, missing2, _ = one(
        state,
        boundary_read(T0 + 2 * Q, error=ReadError(ReadErrorKind.EXCEPTION, "failure", 4)),
        ctx,
    )
    assert missing2.flags == {Flag.MISSING, Flag.DEVICE_ERROR}
    step = step_channel(state, boundary_read(T0 + 3 * Q, 1_000_301), ctx.device.channels[0], ctx)
    records = step.records
    assert [r.id for r in records] == [
        missing1.id,
        missing2.id,
        f"tekapo-a/unit1/{CH}/2026-11-21T00:45:00Z",
    ]
    assert all(Flag.ESTIMATED in r.flags and Flag.MISSING not in r.flags for r in records)
    assert all(quality(r.flags) is Quality.ESTIMATED for r in records)
    assert Flag.DEVICE_ERROR in records[1].flags  # the MISSING record's flags are kept
    # Whole pulses, adding up exactly.
    assert [r.value for r in records] == [
        14.4,
        14.544,  # 101 x 0.144; cumulative rounding: 100.33 -> 100, 200.67 -> 201, 301
        14.4,
    ]
    assert [r.duration_s for r in records] == [900.0, 900.0, 900.0]
    assert [(r.counter_start, r.counter_end) for r in records] == [
        (1_000_000, None),
        (None, None),
        (None, 1_000_301),
    ]
    assert step.state.gap == ()


def test_gap_prorate_after_the_daemon_was_down_emits_only_estimates() -> None:
    ctx = prorate_ctx(channels=[{"name": CH, "register": 0, "type": "uint16", "multiplier": 1.0}])
    step = step_channel(
        started(65_000), boundary_read(T0 + 4 * Q, 464), ctx.device.channels[0], ctx
    )
    assert [r.end for r in step.records] == [T0 + Q, T0 + 2 * Q, T0 + 3 * Q, T0 + 4 * Q]
    assert [r.value for r in step.records] == [250.0, 250.0, 250.0, 250.0]
    assert Flag.ROLLOVER in step.records[-1].flags
    assert all(Flag.ESTIMATED in r.flags for r in step.records)


def test_gap_prorate_by_time_from_a_startup_baseline() -> None:
    ctx = prorate_ctx(channels=[{"name": CH, "register": 0, "multiplier": 1.0}])
    state = baseline(None, startup_read(T0 + Q - timedelta(minutes=5), 0), ctx.device.channels[0])
    state, _, _ = one(state, boundary_read(T0 + Q), ctx)
    step = step_channel(state, boundary_read(T0 + 2 * Q, 400), ctx.device.channels[0], ctx)
    first, closing = step.records
    assert (first.value, closing.value) == (100.0, 300.0)  # 5 min : 15 min
    assert Flag.PARTIAL in first.flags
    assert first.duration_s == 300.0


def test_allocate_is_exact_and_in_whole_units() -> None:
    shares = allocate(Decimal(1754), [1, 1, 1])
    assert shares == [Decimal(585), Decimal(584), Decimal(585)]
    assert sum(shares) == 1754
    assert sum(allocate(Decimal("10.5"), [3, 7, 11], -3)) == Decimal("10.5")
    assert allocate(Decimal(0), [5, 5]) == [0, 0]
    with pytest.raises(ValueError, match="positive"):
        allocate(Decimal(1), [0])


# --------------------------------------------------------------------------
# Flags by rule


READ_FLAGS = [
    Flag.POWER_FAIL,
    Flag.CLOCK_SET_FORWARD,
    Flag.CLOCK_SET_BACKWARD,
    Flag.TIME_ADJUSTED,
    Flag.CLOCK_ERROR,
    Flag.DEVICE_ERROR,
]


@pytest.mark.parametrize("flag", READ_FLAGS)
def test_flags_on_the_read_go_on_the_interval_it_closes(flag: Flag) -> None:
    state, record, _ = one(started(1_000_000), boundary_read(T0 + Q, 1_001_754, flags={flag}))
    assert record.flags == {flag}
    assert record.value == 252.576
    assert quality(record.flags) is Quality.SUSPECT
    _, record, _ = one(state, boundary_read(T0 + 2 * Q, 1_001_800))
    assert record.flags == frozenset()  # and only on that one


@pytest.mark.parametrize("flag", READ_FLAGS)
def test_flags_on_a_failed_read_go_on_its_missing_record(flag: Flag) -> None:
    _, record, _ = one(started(1_000_000), boundary_read(T0 + Q, flags={flag}))
    assert record.flags == {Flag.MISSING, flag}


def test_assumed_time_gives_amt_and_no_demand() -> None:
    _, record, _ = one(
        started(1_000_000), boundary_read(T0 + Q, 1_001_754, time_state=TimeState.ASSUMED)
    )
    assert record.flags == {Flag.AMT}
    assert record.value == 252.576
    assert record.demand is None
    assert record.time_state is TimeState.ASSUMED
    assert quality(record.flags) is Quality.SUSPECT


def test_holdover_is_not_amt() -> None:
    _, record, _ = one(
        started(1_000_000), boundary_read(T0 + Q, 1_001_754, time_state=TimeState.HOLDOVER)
    )
    assert record.flags == frozenset()
    assert record.demand == 1010.304


@pytest.mark.parametrize(
    ("end_utc", "dst"),
    [
        # Spring forward 2026-09-27 02:00 NZST -> 03:00 NZDT (14:00Z).
        (datetime(2026, 9, 26, 14, 0, tzinfo=UTC), False),  # 01:45-02:00 NZST
        (datetime(2026, 9, 26, 14, 15, tzinfo=UTC), True),  # 03:00-03:15 NZDT
        # Fall back 2026-04-05 03:00 NZDT -> 02:00 NZST (14:00Z).
        (datetime(2026, 4, 4, 14, 0, tzinfo=UTC), True),  # 02:45-03:00 NZDT
        (datetime(2026, 4, 4, 14, 15, tzinfo=UTC), False),  # 02:00-02:15 NZST
        (datetime(2026, 7, 1, 0, 0, tzinfo=UTC), False),
        (datetime(2026, 1, 1, 0, 0, tzinfo=UTC), True),
    ],
)
def test_dst_flag_when_the_interval_lies_in_daylight_time(end_utc: datetime, dst: bool) -> None:
    ctx = make_ctx(zone=AKL)
    _, record, _ = one(started(1_000_000, end_utc - Q), boundary_read(end_utc, 1_000_010), ctx)
    assert (Flag.DST in record.flags) is dst
    assert quality(record.flags) is Quality.ACTUAL  # information only


def test_tolerance_scales_down_for_second_long_intervals() -> None:
    device = make_device(interval="1s")
    ctx = make_ctx(device)
    channel = device.channels[0]
    state = baseline(None, startup_read(T0 + timedelta(milliseconds=400), 100), channel)
    step = step_channel(state, boundary_read(T0 + timedelta(seconds=1), 101), channel, ctx)
    assert step.records[0].flags == {Flag.PARTIAL}
    state = baseline(None, startup_read(T0 + timedelta(milliseconds=5), 100), channel)
    step = step_channel(state, boundary_read(T0 + timedelta(seconds=1), 101), channel, ctx)
    assert step.records[0].flags == frozenset()


def test_late_read_within_tolerance_is_regular_and_beyond_is_partial_or_long() -> None:
    channel = make_device().channels[0]
    state = baseline(None, startup_read(T0 + timedelta(milliseconds=900), 1_000_000), channel)
    _, record, _ = one(state, boundary_read(T0 + Q, 1_000_001))
    assert record.flags == frozenset()
    state = baseline(None, startup_read(T0 + timedelta(seconds=2), 1_000_000), channel)
    _, record, _ = one(state, boundary_read(T0 + Q, 1_000_001))
    assert record.flags == {Flag.PARTIAL}
    # A counter taken 2 s before the last record's boundary (that record had
    # no energy, e.g. a MISSING one) makes the next record 2 s long.
    state = ChannelState(counter=1_000_000, counter_at=T0 - timedelta(seconds=2), last_end=T0)
    _, record, _ = one(state, boundary_read(T0 + Q, 1_000_001))
    assert record.flags == {Flag.LONG}
    assert record.duration_s == 902.0


@pytest.mark.parametrize(
    ("limits", "counts", "flagged"),
    [
        ({"max": 200.0}, 1754, True),
        ({"max": 300.0}, 1754, False),
        ({"min": 300.0}, 1754, True),
        ({"min": 0.0, "max": 300.0}, 0, False),
    ],
)
def test_out_of_range(limits: dict[str, float], counts: int, flagged: bool) -> None:
    ctx = make_ctx(make_device({"limits": limits}))
    _, record, _ = one(started(1_000_000), boundary_read(T0 + Q, 1_000_000 + counts), ctx)
    assert (Flag.OUT_OF_RANGE in record.flags) is flagged
    if flagged:
        assert quality(record.flags) is Quality.SUSPECT


def test_out_of_range_judges_a_long_record_per_nominal_interval() -> None:
    ctx = make_ctx(make_device({"limits": {"max": 300.0}}))
    state, _, _ = one(started(1_000_000), boundary_read(T0 + Q), ctx)
    _, record, _ = one(state, boundary_read(T0 + 2 * Q, 1_003_000), ctx)  # 432 kWh over 2 intervals
    assert Flag.OUT_OF_RANGE not in record.flags
    _, record, _ = one(state, boundary_read(T0 + 2 * Q, 1_004_500), ctx)  # 648 kWh
    assert Flag.OUT_OF_RANGE in record.flags


# Every flag of the table, produced by its rule through the engine.
def _scenario(
    read: Read, state: ChannelState | None = None, **device: Any
) -> Callable[[], frozenset[Flag]]:
    def run() -> frozenset[Flag]:
        ctx = make_ctx(make_device(**device), zone=AKL)
        step = step_channel(state or started(1_000_000), read, ctx.device.channels[0], ctx)
        return frozenset().union(*(r.flags for r in step.records))

    return run


WINTER = datetime(2026, 7, 1, 0, 0, tzinfo=UTC)
SUMMER = T0
FLAG_SCENARIOS: dict[Flag, Callable[[], frozenset[Flag]]] = {
    **{
        flag: _scenario(
            boundary_read(WINTER + Q, 1_000_001, flags={flag}), started(1_000_000, WINTER)
        )
        for flag in READ_FLAGS
    },
    Flag.AMT: _scenario(
        boundary_read(WINTER + Q, 1_000_001, time_state=TimeState.ASSUMED),
        started(1_000_000, WINTER),
    ),
    Flag.PARTIAL: _scenario(
        boundary_read(WINTER + Q, 1_000_001),
        ChannelState(counter=1_000_000, counter_at=WINTER + Q / 2),
    ),
    Flag.LONG: _scenario(boundary_read(WINTER + 2 * Q, 1_000_001), started(1_000_000, WINTER)),
    Flag.MISSING: _scenario(boundary_read(WINTER + Q), started(1_000_000, WINTER)),
    Flag.ROLLOVER: _scenario(
        boundary_read(WINTER + Q, 5), started(65_530, WINTER), channel={"type": "uint16"}
    ),
    Flag.COUNTER_RESET: _scenario(boundary_read(WINTER + Q, 5), started(1_000_000, WINTER)),
    Flag.SCALE_CHANGED: _scenario(
        replace(boundary_read(WINTER + Q, 1_000_001), rescaled=frozenset({CH})),
        started(1_000_000, WINTER),
    ),
    Flag.OUT_OF_RANGE: _scenario(
        boundary_read(WINTER + Q, 1_000_001),
        started(1_000_000, WINTER),
        channel={"limits": {"min": 1.0}},
    ),
    Flag.DST: _scenario(boundary_read(SUMMER + Q, 1_000_001), started(1_000_000, SUMMER)),
    Flag.ESTNEEDED: _scenario(
        boundary_read(WINTER + Q, 1_000_001, flags={Flag.POWER_FAIL}),
        started(1_000_000, WINTER),
        validation="amt_rule",
    ),
    Flag.ESTIMATED: _scenario(
        boundary_read(WINTER + 2 * Q, 1_000_001), started(1_000_000, WINTER), gaps="prorate"
    ),
}


def test_every_flag_has_a_rule_scenario() -> None:
    assert set(FLAG_SCENARIOS) == set(Flag)


@pytest.mark.parametrize("flag", list(Flag))
def test_flag_is_produced_by_its_rule(flag: Flag) -> None:
    flags = FLAG_SCENARIOS[flag]()
    assert flag in flags
    if flag is not Flag.DST:
        assert Flag.DST not in flags  # the scenario isolates the rule


# --------------------------------------------------------------------------
# Quality


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (set(), Quality.ACTUAL),
        ({Flag.DST}, Quality.ACTUAL),
        ({Flag.ROLLOVER, Flag.DST}, Quality.ACTUAL),
        *[
            ({f}, Quality.SUSPECT)
            for f in Flag
            if f not in {Flag.DST, Flag.ROLLOVER, Flag.MISSING, Flag.ESTIMATED}
        ],
        ({Flag.MISSING}, Quality.MISSING),
        ({Flag.MISSING, Flag.DEVICE_ERROR}, Quality.MISSING),
        ({Flag.MISSING, Flag.AMT, Flag.ESTNEEDED}, Quality.MISSING),
        ({Flag.ESTIMATED}, Quality.ESTIMATED),
        ({Flag.ESTIMATED, Flag.AMT, Flag.LONG}, Quality.ESTIMATED),
    ],
)
def test_quality_derivation(flags: set[Flag], expected: Quality) -> None:
    assert quality(flags) is expected


def test_counter_reset_record_has_no_value_but_quality_says_suspect() -> None:
    """Recorded disagreement (see issue note): flags.quality() has only the
    flags to go on, and a COUNTER_RESET record has value null."""
    _, record, _ = one(started(1_000_000), boundary_read(T0 + Q, 5))
    assert record.value is None
    assert quality(record.flags) is Quality.SUSPECT


# --------------------------------------------------------------------------
# Validation (Itron AMT rule) and zero-fill estimation


@pytest.mark.parametrize(
    ("flag", "code"),
    [
        (Flag.CLOCK_SET_BACKWARD, "CLOCK"),
        (Flag.DEVICE_ERROR, "IOBOARD"),
        (Flag.PARTIAL, "IRREGULAR"),
        (Flag.LONG, "IRREGULAR"),
        (Flag.POWER_FAIL, "POWER"),
        (Flag.CLOCK_SET_FORWARD, "TIMERESET"),
        (Flag.CLOCK_ERROR, "TIMERESET"),
    ],
)
def test_amt_rule_fires_on_each_status_code(flag: Flag, code: str) -> None:
    assert code in iee_status({flag})
    assert amt_rule_fails({flag})
    assert amt_rule_fails({flag, Flag.AMT, Flag.ESTNEEDED})  # still needs estimation
    assert not amt_rule_fails({flag, Flag.AMT})  # AMT already, estimated/accepted: passes


@pytest.mark.parametrize(
    "flags",
    [
        set(),
        {Flag.AMT},
        {Flag.DST, Flag.ROLLOVER},
        {Flag.TIME_ADJUSTED},
        {Flag.OUT_OF_RANGE},
        {Flag.MISSING},
    ],
)
def test_amt_rule_ignores_intervals_without_the_codes(flags: set[Flag]) -> None:
    assert not amt_rule_fails(flags)


def valued(flags: Iterable[Flag], value: float | None = 10.0, **kw: Any) -> Interval:
    return Interval(
        site="s",
        device="d",
        channel="c",
        start=T0,
        end=T0 + Q,
        duration_s=900.0,
        value=value,
        unit="kWh",
        demand=None if value is None else value * 4,
        demand_unit="kW",
        counter_start=None,
        counter_end=None,
        flags=frozenset(flags),
        time_state=TimeState.SYNCED,
        read_at=None,
        read_lateness_ms=None,
        **kw,
    )


def test_validation_marks_amt_and_estneeded_and_suspends_demand() -> None:
    record = validate_amt_rule(valued({Flag.POWER_FAIL}))
    assert record.flags == {Flag.POWER_FAIL, Flag.AMT, Flag.ESTNEEDED}
    assert record.demand is None
    assert record.value == 10.0
    assert validate_amt_rule(record) == record  # idempotent
    untouched = valued({Flag.DST})
    assert validate_amt_rule(untouched) is untouched


def test_zero_fill_replaces_amt_values_and_keeps_the_original() -> None:
    record = zero_fill_amt(validate_amt_rule(valued({Flag.POWER_FAIL})))
    assert record.value == 0.0
    assert record.original_value == 10.0
    assert record.flags == {Flag.POWER_FAIL, Flag.AMT, Flag.ESTIMATED}  # ESTNEEDED satisfied
    assert quality(record.flags) is Quality.ESTIMATED
    # Re-validating an estimated AMT interval passes (the formula's second branch).
    assert validate_amt_rule(record) == record
    assert zero_fill_amt(record) == record  # not re-estimated


def test_zero_fill_does_not_correct_the_time_adjusted_interval() -> None:
    record = validate_amt_rule(valued({Flag.TIME_ADJUSTED, Flag.CLOCK_SET_FORWARD}))
    assert {Flag.AMT, Flag.ESTNEEDED} <= record.flags
    assert zero_fill_amt(record) == record  # keeps its value and ESTNEEDED


def test_zero_fill_leaves_missing_and_non_amt_intervals() -> None:
    missing = valued({Flag.AMT, Flag.MISSING}, value=None)
    assert zero_fill_amt(missing) == missing
    plain = valued({Flag.POWER_FAIL})
    assert zero_fill_amt(plain) == plain


def test_validation_and_estimation_through_the_engine() -> None:
    ctx = make_ctx(make_device(validation="amt_rule", estimation="zero_fill_amt"))
    state = started(1_000_000)
    # AMT from assumed time: zero-filled (no ESTNEEDED: the rule passes it).
    state, amt, _ = one(state, boundary_read(T0 + Q, 1_001_754, time_state=TimeState.ASSUMED), ctx)
    assert amt.value == 0.0
    assert amt.original_value == 252.576
    assert amt.flags == {Flag.AMT, Flag.ESTIMATED}
    # The interval in which assumed time ended: flagged by the rule, not zero-filled.
    state, adjusted, _ = one(
        state,
        boundary_read(T0 + 2 * Q, 1_003_508, flags={Flag.TIME_ADJUSTED, Flag.CLOCK_SET_BACKWARD}),
        ctx,
    )
    assert adjusted.value == 252.576
    assert adjusted.original_value is None
    assert {Flag.AMT, Flag.ESTNEEDED, Flag.TIME_ADJUSTED} <= adjusted.flags
    assert adjusted.demand is None
    # A clean interval is untouched.
    _, clean, _ = one(state, boundary_read(T0 + 3 * Q, 1_005_262), ctx)
    assert clean.flags == frozenset()
    assert clean.value == 252.576
    assert clean.demand == 1010.304


def test_validation_is_off_by_default() -> None:
    _, record, _ = one(
        started(1_000_000), boundary_read(T0 + Q, 1_001_754, flags={Flag.POWER_FAIL})
    )
    assert record.flags == {Flag.POWER_FAIL}


# --------------------------------------------------------------------------
# State persistence and config checks


def test_channel_state_json_round_trip() -> None:
    from edged.core.demand import RollingEntry

    state = ChannelState(
        counter=2**64 - 1,
        counter_at=T0,
        last_end=T0 + 2 * Q,
        gap=(
            GapRun(
                first=T0 + Q,
                last=T0 + Q,
                flags=frozenset({Flag.DEVICE_ERROR}),
                time_state=TimeState.SYNCED,
            ),
            GapRun(
                first=T0 + 2 * Q, last=T0 + 2 * Q, flags=frozenset(), time_state=TimeState.ASSUMED
            ),
        ),
        rolling=(RollingEntry(T0 + Q, T0 + 2 * Q, None), RollingEntry(T0, T0 + Q, 252.576)),
        coarse=True,
    )
    assert ChannelState.from_json(state.to_json()) == state
    floaty = ChannelState(counter=12345.7001953125, counter_at=T0 + timedelta(microseconds=7))
    assert ChannelState.from_json(floaty.to_json()) == floaty
    assert ChannelState.from_json(ChannelState().to_json()) == ChannelState()
    with pytest.raises(ValueError, match="version 1"):
        ChannelState.from_json('{"v": 2}')


def test_device_problems() -> None:
    assert device_problems(make_device()) == []
    bad = make_device({"limits": {"min": 5, "max": 1}}, demand={"window": "20m", "subintervals": 2})
    problems = device_problems(bad)
    assert len(problems) == 2
    assert "window" in problems[0]
    assert "min > max" in problems[1]


# --------------------------------------------------------------------------
# Conservation of energy (property)


@dataclass
class Sim:
    """A meter whose true (unwrapped) counter the test knows."""

    kind: str
    modulus: int | None
    true: int = 0  # unwrapped counts (milli-units for the float register)
    first: int | None = None
    last: int | None = None
    records: dict[str, Interval] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)

    def register(self, true: int) -> int | float:
        if self.kind == "float64":
            return true / 1000
        assert self.modulus is not None
        return true % self.modulus

    def good(self, true: int) -> None:
        if self.first is None:
            self.first = true
        self.last = true


KINDS: dict[str, tuple[dict[str, Any], int | None, int]] = {
    # kind: (channel config, modulus, max increment per interval)
    "uint16": ({"type": "uint16"}, 65_536, 700),
    "small_rollover": ({"type": "uint32", "rollover": 1000}, 1000, 80),
    # 2000: the allowance over the longest span (2 x 80 counts x ~6.5 intervals)
    # stays under one modulus, so wraps are never ambiguous.
    "small_rollover_max_demand": ({"type": "uint32", "rollover": 2000}, 2000, 80),
    "float64": ({"type": "float64"}, None, 100_000),
}
OUTCOMES = ["ok", "ok", "ok", "timeout", "exception4", "down", "restart", "assumed"]
MAX_RUN_WITHOUT_GOOD_READ = 5


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(sorted(KINDS)))
    _, modulus, max_increment = KINDS[kind]
    steps = draw(
        st.lists(
            st.tuples(st.integers(0, max_increment), st.sampled_from(OUTCOMES)),
            min_size=1,
            max_size=40,
        )
    )
    # Bound the gaps so the span between good reads stays within M/2 (the
    # default plausibility rule): beyond that, wraps are unknowable by design.
    bounded: list[tuple[int, str]] = []
    run = 0
    for increment, outcome in steps:
        if outcome in ("timeout", "exception4", "down"):
            run += 1
            if run > MAX_RUN_WITHOUT_GOOD_READ:
                outcome, run = "ok", 0
        else:
            run = 0
        bounded.append((increment, outcome))
    return {
        "kind": kind,
        "gaps": draw(st.sampled_from(["long", "prorate"])),
        "multiplier": draw(st.sampled_from([0.144, 1.0, 0.5, 0.001, 2.5])),
        "start": draw(st.integers(0, (modulus or 10**9) - 1)),
        "startup_ok": draw(st.booleans()),
        "validation": draw(st.sampled_from(["none", "amt_rule"])),
        "estimation": draw(st.sampled_from(["none", "zero_fill_amt"])),
        "zone": draw(st.sampled_from(["UTC", "Pacific/Auckland", "Asia/Kathmandu"])),
        "steps": bounded,
    }


def _channel_config(kind: str, multiplier: float) -> dict[str, Any]:
    config, modulus, max_increment = KINDS[kind]
    channel = {**config, "multiplier": multiplier}
    if kind == "small_rollover_max_demand":
        # Twice the largest per-interval increment: a start-up read 7 min
        # before a boundary may be followed by a whole interval's increment.
        assert modulus is not None
        channel["max_demand"] = 2 * max_increment * multiplier * 4
    return channel


def _simulate(scenario: dict[str, Any]) -> Sim:
    kind = scenario["kind"]
    device = make_device(
        _channel_config(kind, scenario["multiplier"]),
        gaps=scenario["gaps"],
        validation=scenario["validation"],
        estimation=scenario["estimation"],
        demand={"window": "30m", "subintervals": 2},
    )
    ctx = make_ctx(device, ZoneInfo(scenario["zone"]))
    channel = device.channels[0]
    sim = Sim(kind, KINDS[kind][1], true=scenario["start"])
    base = datetime(2026, 4, 4, 13, 0, tzinfo=UTC)  # spans the Auckland DST change
    state: ChannelState | None = None
    if scenario["startup_ok"]:
        state = baseline(
            None, startup_read(base - timedelta(minutes=7), sim.register(sim.true)), channel
        )
        sim.good(sim.true)

    def publish(step_records: Sequence[Interval], events: Sequence[Event]) -> None:
        for record in step_records:
            sim.records[record.id] = record  # the last record per id wins
        sim.events.extend(events)

    for i, (increment, outcome) in enumerate(scenario["steps"]):
        boundary = base + i * Q
        if outcome == "restart":
            # Persisted state survives; the start-up read is taken mid-interval.
            state = ChannelState.from_json(state.to_json()) if state else None
            midway = sim.true + increment // 2
            startup = startup_read(boundary - timedelta(minutes=7), sim.register(midway))
            was_empty = state is None or state.counter is None
            state = baseline(state, startup, channel)
            if was_empty:
                sim.good(midway)
        sim.true += increment
        if outcome == "down":
            continue
        if outcome in ("timeout", "exception4"):
            error = ReadError(ReadErrorKind.TIMEOUT, "no reply")
            if outcome == "exception4":
                error = ReadError(ReadErrorKind.EXCEPTION, "failure", 4)
            read = boundary_read(boundary, error=error)
        else:
            time_state = TimeState.ASSUMED if outcome == "assumed" else TimeState.SYNCED
            read = boundary_read(boundary, sim.register(sim.true), time_state=time_state)
            sim.good(sim.true)
        step = step_channel(state, read, channel, ctx)
        state = step.state
        publish(step.records, step.events)
    return sim


def _expected_total(sim: Sim, multiplier: float) -> Decimal:
    if sim.first is None or sim.last is None:
        return Decimal(0)
    counts = Decimal(sim.last - sim.first)
    if sim.kind == "float64":
        counts /= 1000
    return counts * Decimal(repr(multiplier))


@settings(max_examples=examples(1000), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
@example(  # down before the first counter, then a start-up baseline: MISSING kept
    {
        "kind": "float64",
        "gaps": "long",
        "multiplier": 0.144,
        "start": 0,
        "startup_ok": False,
        "validation": "none",
        "estimation": "none",
        "zone": "UTC",
        "steps": [(0, "timeout"), (0, "down"), (0, "restart")],
    }
)
def test_energy_is_conserved_across_wraps_gaps_and_prorating(scenario: dict[str, Any]) -> None:
    sim = _simulate(scenario)
    published = Decimal(0)
    for record in sim.records.values():
        # Zero-fill keeps the measured energy in original_value.
        value = record.original_value if record.original_value is not None else record.value
        if value is not None:
            published += Decimal(repr(value))
    assert published == _expected_total(sim, scenario["multiplier"])
    assert not sim.events, sim.events  # no resets, no resolution warnings
    assert not any(Flag.COUNTER_RESET in r.flags for r in sim.records.values())
    # One record per boundary, no holes, from the first to the last.
    ends = sorted(r.end for r in sim.records.values())
    assert all(b - a == Q for a, b in itertools.pairwise(ends))
    if scenario["gaps"] == "prorate" and scenario["validation"] == "none":
        # Every energy-bearing gap was filled: a MISSING record survives only
        # before the first counter or after the last good read.
        last_good = max((r.end for r in sim.records.values() if r.value is not None), default=None)
        first_good = min((r.end for r in sim.records.values() if r.value is not None), default=None)
        for record in sim.records.values():
            if Flag.MISSING in record.flags and first_good is not None and last_good is not None:
                assert not first_good < record.end < last_good


def test_conservation_example_with_restart_and_prorate() -> None:
    scenario = {
        "kind": "small_rollover",
        "gaps": "prorate",
        "multiplier": 0.144,
        "start": 990,
        "startup_ok": True,
        "validation": "none",
        "estimation": "none",
        "zone": "Pacific/Auckland",
        "steps": [
            (20, "ok"),
            (30, "timeout"),
            (40, "down"),
            (50, "restart"),
            (60, "ok"),
            (70, "exception4"),
            (5, "ok"),
        ],
    }
    sim = _simulate(scenario)
    total = sum(Decimal(repr(r.value)) for r in sim.records.values() if r.value is not None)
    assert total == Decimal(275) * Decimal("0.144")
    assert any(Flag.ROLLOVER in r.flags for r in sim.records.values())


def test_replace_keeps_records_frozen() -> None:
    record = valued(set())
    with pytest.raises(AttributeError):
        record.value = 1.0  # type: ignore[misc]
    assert replace(record, value=1.0).value == 1.0
