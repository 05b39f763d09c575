"""Issue 13: every observation as a named regression test.

Observations 1-5 run edged's time path in the deterministic world of
tests/timesim.py (virtual true, system and monotonic clocks; a meter counting
1754 counts per true second, multiplier 0.144 kWh: 252.576 kWh per true
second, 909 273.6 kW). Expected figures are worked out by hand in the
comments, never by calling the code under test.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from edged.core.flags import quality
from edged.core.model import Flag, Interval, Quality
from tests.timesim import Meter, World, make_device, utc

T0 = 1_795_000_000.0  # on a whole second, so 1 s .. 1 h boundaries line up with it
TRUE_KW = 909_273.6  # 1754 counts/s x 0.144 kWh x 3600 s/h
ONE_COUNT = 0.144


def world_1s(**kwargs: object) -> World:
    return World([(make_device(), Meter(rate=1754, origin_s=T0 - 0.25))], **kwargs)  # type: ignore[arg-type]


def stepped_record(world: World, flag: Flag) -> Interval:
    """The one record carrying `flag` (exactly one must)."""
    found = [r for r in world.channel_records() if flag in r.flags]
    assert len(found) == 1, [(r.end, sorted(r.flags)) for r in world.channel_records()]
    return found[0]


def assert_no_phantom_peak(world: World, true_kw: float = TRUE_KW, slack_kw: float = 0.0) -> None:
    peak = world.peak()
    assert peak is not None
    assert peak <= true_kw + slack_kw, f"peak {peak} kW against a true {true_kw} kW"


def test_obs1_backward_step_3s_is_flagged_not_actual() -> None:
    world = world_1s()
    world.at(T0 + 10.2, lambda: world.set_ntp(err_s=-3.0))  # the NTP source steps back 3 s
    world.run_until(T0 + 25)
    step = [t for t in world.transitions if t.kind == "clock_step"]
    assert len(step) == 1
    assert step[0].adjustment_s == pytest.approx(-3.0)
    record = stepped_record(world, Flag.CLOCK_SET_BACKWARD)
    # 1 s of nominal interval, but 3 s + 1 s of real time between its reads:
    assert record.duration_s == pytest.approx(4.0, abs=1e-6)
    # 4 s x 1754 counts = 7016 counts x 0.144 = 1010.304 kWh (one count either way).
    assert record.value == pytest.approx(1010.304, abs=ONE_COUNT)
    # Demand over the real 4 s: 1010.304 kWh / (4/3600 h) = 909 273.6 kW, not 4x.
    assert record.demand == pytest.approx(TRUE_KW, rel=2e-4)
    assert Flag.LONG in record.flags
    assert quality(record.flags) is not Quality.ACTUAL
    assert_no_phantom_peak(world, slack_kw=ONE_COUNT * 3600)
    # No id twice.
    ids = [r.id for r in world.channel_records()]
    assert len(ids) == len(set(ids))


def test_obs2_restart_behind_mark_then_backward_correction_is_time_adjusted() -> None:
    world = world_1s()
    world.run_until(T0 + 10)
    world.set_ntp(silent=True)
    # Down 2 s without a clean stop; the RTC comes back 30 s behind.
    world.restart(2.0, clean=False, sys_err_after_s=-30.0)
    assert world.transitions[-1].kind == "amt_entered"
    world.at(world.true_s + 6.0, lambda: world.set_ntp(silent=False))
    world.run_until(T0 + 40)
    adjusted = [t for t in world.transitions if t.kind == "time_adjusted"]
    assert adjusted
    assert adjusted[-1].stepped
    assert adjusted[-1].adjustment_s < 0
    record = stepped_record(world, Flag.TIME_ADJUSTED)
    assert Flag.CLOCK_SET_BACKWARD in record.flags
    assert Flag.LONG in record.flags
    assert quality(record.flags) is not Quality.ACTUAL
    # Whatever it spans, it says so: real duration, demand over it.
    assert record.duration_s > 1.0 + 1.0
    assert record.value is not None
    assert record.value == pytest.approx(252.576 * record.duration_s, abs=ONE_COUNT)
    # Records on assumed time before it are AMT, without demand.
    amt = [r for r in world.channel_records() if Flag.AMT in r.flags]
    assert amt
    assert all(r.demand is None for r in amt)
    assert_no_phantom_peak(world, slack_kw=ONE_COUNT * 3600)


def test_obs3_forward_step_read_belongs_to_the_boundary_the_clock_jumped_to() -> None:
    world = world_1s()
    world.at(T0 + 10.2, lambda: world.set_ntp(err_s=5.0))
    world.run_until(T0 + 25)
    record = stepped_record(world, Flag.CLOCK_SET_FORWARD)
    assert record.read_at is not None
    # Read after its end by less than one interval: it is the read of that boundary.
    assert timedelta(0) <= record.read_at - record.end < timedelta(seconds=1)
    # The boundaries jumped over are MISSING, and there are four or five of them
    # (a 5 s step from inside an interval lands inside another one).
    records = world.channel_records()
    i = records.index(record)
    before = records[:i]
    jumped = [r for r in before if Flag.MISSING in r.flags]
    assert len(jumped) in (4, 5)
    assert all(r.end > before[0].end for r in jumped)
    # The record closing the step spans less than a second of real time.
    assert record.duration_s < 1.0
    assert quality(record.flags) is not Quality.ACTUAL
    assert_no_phantom_peak(world, slack_kw=ONE_COUNT * 3600)


def test_obs4_backward_15s_soon_after_a_boundary_no_triple_peak() -> None:
    # 10 s intervals, 5184 kW: 10 counts/s x 0.144 kWh = 1.44 kWh/s.
    device = make_device(interval_s=10)
    world = World([(device, Meter(rate=10, origin_s=T0 - 0.25))])
    # Polls at .37 past each true second; the 3rd round that sees the new
    # offset steps the reference, 1.37 s after a boundary.
    world.at(T0 + 18.0, lambda: world.set_ntp(err_s=-15.0))
    world.run_until(T0 + 80)
    step = next(t for t in world.transitions if t.kind == "clock_step")
    reads = [f for f in world.reads if f.boundary is not None and f.mono_s < step.mono_s]
    assert step.mono_s - reads[-1].mono_s < 3.0  # accepted less than 3 s after a boundary
    record = stepped_record(world, Flag.CLOCK_SET_BACKWARD)
    # 10 s nominal + 15 s the reference went back = 25 s real: 250 counts = 36.0 kWh.
    assert record.duration_s == pytest.approx(25.0, abs=1e-6)
    assert record.value == pytest.approx(36.0, abs=ONE_COUNT)
    assert record.demand == pytest.approx(5184.0, abs=ONE_COUNT * 3600 / 25)
    assert quality(record.flags) is not Quality.ACTUAL
    assert_no_phantom_peak(world, true_kw=5184.0, slack_kw=ONE_COUNT * 360)


def test_obs5_assumed_time_ended_by_slew_is_time_adjusted() -> None:
    # A clock that was right (0.2 s off: slewed, not stepped); NTP silent for
    # 27 s after start; 5 s intervals: five or six AMT records first.
    device = make_device(interval_s=5)
    world = World(
        [(device, Meter(rate=1754, origin_s=T0 - 0.25))],
        ntp_silent=True,
        confirmed_before_start=False,
        sys_err_s=0.2,
    )
    world.at(T0 + 27.0, lambda: world.set_ntp(silent=False))
    world.run_until(T0 + 60)
    adjusted = [t for t in world.transitions if t.kind == "time_adjusted"]
    assert len(adjusted) == 1
    assert not adjusted[0].stepped
    records = world.channel_records()
    amt = [r for r in records if Flag.AMT in r.flags]
    assert len(amt) in (5, 6)
    first_after = records[len(amt)]
    assert Flag.AMT not in first_after.flags
    assert Flag.TIME_ADJUSTED in first_after.flags
    assert quality(first_after.flags) is not Quality.ACTUAL
    # Only one record says assumed time ended.
    assert sum(Flag.TIME_ADJUSTED in r.flags for r in records) == 1
    peak_state = world.pollers[0].peaks["energy_import"].block
    assert peak_state is not None
    assert peak_state.end > first_after.end


def test_obs7_float32_register_below_resolution_is_flagged_and_kept_out_of_peaks() -> None:
    # A float32 kWh register just under 2**24 resolves 1 kWh; 0.5 kWh per 5 s
    # interval (360 kW) reads as 0, 1, 0, 1, ... kWh.
    device = make_device(interval_s=5, multiplier=1.0, type_="float32")
    meter = Meter(rate=0.1, origin_s=T0 - 0.25, start=16_777_000.0, float32=True)
    world = World([(device, meter)])
    world.run_until(T0 + 60)
    valued = [r for r in world.channel_records() if r.value is not None]
    assert {r.value for r in valued} <= {0.0, 1.0}
    assert len(valued) >= 10
    for record in valued:
        assert Flag.ESTNEEDED in record.flags, record
        assert quality(record.flags) is not Quality.ACTUAL
    # No 720 kW phantom (1 kWh in 5 s): nothing here may feed a peak.
    assert world.peak() is None
    # The sum still telescopes: first counter to last counter.
    assert sum(r.value or 0.0 for r in valued) == valued[-1].counter_end - valued[0].counter_start  # type: ignore[operator]


def test_obs8_local_meter_clock_through_the_repeated_dst_hour_is_not_clock_error() -> None:
    from datetime import UTC, datetime
    from zoneinfo import ZoneInfo

    from edged.core.registers import ClockSpec, ReadPlan, apply_plan

    points = ("y", "mo", "d", "h", "mi", "s")
    clock = ClockSpec(
        format="ymdhms", points=points, zone=ZoneInfo("Pacific/Auckland"), tolerance_s=10.0
    )
    plan = ReadPlan(requests=(), optional=(), values=(), clock=clock)
    # NZ daylight time ends 2026-04-05 03:00 NZDT -> 02:00 NZST: 02:30 local
    # happens twice, at 13:30Z (NZDT, +13) and at 14:30Z (NZST, +12).
    local = dict(zip(points, (2026, 4, 5, 2, 30, 0), strict=True))
    for utc_time in (
        datetime(2026, 4, 4, 13, 30, tzinfo=UTC),
        datetime(2026, 4, 4, 14, 30, tzinfo=UTC),
    ):
        result = apply_plan(plan, local, reference_s=utc_time.timestamp() + 1.0)
        assert result.meter_clock_offset_s == pytest.approx(-1.0)
        assert Flag.CLOCK_ERROR not in result.flags


def test_obs9a_missing_records_inside_an_unclean_outage_carry_power_fail() -> None:
    world = world_1s()
    world.run_until(T0 + 10.5)
    mark = world.last_mark
    assert mark is not None
    world.restart(5.0, clean=False, reboot=True, confirmed=True)
    world.run_until(T0 + 25)
    records = world.channel_records()
    # The mark was at 10 s; the gateway came back at 15.5 s: the boundaries
    # 11..15 were nobody's to read.
    assert abs(mark - utc(T0 + 10)) < timedelta(milliseconds=1)
    inside = [r for r in records if utc(T0 + 10) < r.end <= utc(T0 + 15)]
    assert [r.end for r in inside] == [utc(T0 + s) for s in (11, 12, 13, 14, 15)]
    for record in inside:
        assert Flag.MISSING in record.flags
        assert Flag.POWER_FAIL in record.flags, record
    closing = records[records.index(inside[-1]) + 1]
    assert Flag.LONG in closing.flags
    assert Flag.POWER_FAIL in closing.flags
    # Energy across the outage is kept: 16 s from the counter at 10 s... to 16 s: 6 s.
    assert closing.value == pytest.approx(6 * 252.576, abs=ONE_COUNT)


def test_obs9b_16bit_counter_one_missed_read_keeps_its_energy() -> None:
    from datetime import UTC, datetime

    from edged.core.engine.intervals import step_channel
    from edged.core.engine.state import (
        ChannelState,
        IntervalContext,
    )
    from edged.core.model import Read, TimeState

    device = make_device(interval_s=900, multiplier=0.001, type_="uint16")
    channel = device.channels[0]
    ctx = IntervalContext("sim", device, UTC)
    t0 = datetime(2026, 11, 21, tzinfo=UTC)
    state = ChannelState(counter=10_000, counter_at=t0, last_end=t0)
    # 20 000 Wh per quarter hour; the 00:15 read was missed: +40 000 counts by 00:30.
    read = Read(
        device="unit1",
        boundary=t0 + timedelta(minutes=30),
        read_at=t0 + timedelta(minutes=30),
        read_lateness_ms=0.0,
        time_state=TimeState.SYNCED,
        values={"energy_import": 50_000},
    )
    step = step_channel(state, read, channel, ctx)
    assert [r.value for r in step.records] == [None, 40.0]
    assert Flag.COUNTER_RESET not in step.records[-1].flags
    assert Flag.LONG in step.records[-1].flags
    assert step.events == ()


def test_obs9d_billing_period_closed_times_end_in_z() -> None:
    from datetime import UTC, datetime

    from edged.core.demand import Peak, PeakState, peak_event

    start = datetime(2026, 11, 1, tzinfo=UTC)
    end = datetime(2026, 12, 1, tzinfo=UTC)
    peak = Peak(1010.304, start, start + timedelta(minutes=15))
    event = peak_event(
        "unit1",
        {"energy_import": PeakState(period_start=start, period_end=end, block=peak, rolling=None)},
        {},
    )
    details = event.details["channels"]["energy_import"]  # type: ignore[index]
    assert details["period_start"] == "2026-11-01T00:00:00Z"
    assert details["period_end"] == "2026-12-01T00:00:00Z"
    assert details["peak"]["end"] == "2026-11-01T00:15:00Z"


STATION = [
    {
        "id": "station",
        "channels": [
            {"name": "total", "add": ["u1.energy_import", "u2.energy_import"]},
            {"name": "net", "add": ["u1.energy_import"], "subtract": ["u2.energy_import"]},
        ],
    }
]


def station_world(gaps: str = "long", interval_s: int = 5) -> tuple[World, Meter]:
    # u1: 60 counts/s x 0.144 = 8.64 kWh/s, 43.2 kWh per 5 s;
    # u2: 30 counts/s: 4.32 kWh/s, 21.6 kWh per 5 s.
    u2_meter = Meter(rate=30, origin_s=T0 - 0.25)
    world = World(
        [
            (make_device("u1", interval_s, gaps=gaps), Meter(rate=60, origin_s=T0 - 0.25)),
            (make_device("u2", interval_s, gaps=gaps), u2_meter),
        ],
        virtual_meters=STATION,
    )
    return world, u2_meter


def test_obs6_virtual_meter_long_record_covers_the_whole_span_of_its_inputs() -> None:
    world, u2 = station_world()
    # u2 offline for the reads at 15, 20 and 25 s; back for the one at 30 s.
    world.at(T0 + 12.5, lambda: setattr(u2, "offline", True))
    world.at(T0 + 27.5, lambda: setattr(u2, "offline", False))
    world.run_until(T0 + 41)
    total = {r.end: r for r in world.virtual_records if r.channel == "total"}
    net = {r.end: r for r in world.virtual_records if r.channel == "net"}
    base = world.virtual_records[0].end - timedelta(seconds=5)  # T0

    def at(s: int) -> datetime:
        return base + timedelta(seconds=s)

    for s in (15, 20, 25):
        assert total[at(s)].value is None
        assert Flag.MISSING in total[at(s)].flags
    closing = total[at(30)]
    # u1's four records (4 x 43.2 = 172.8) + u2's LONG (20 s x 4.32 = 86.4).
    assert closing.value == pytest.approx(259.2)
    assert Flag.LONG in closing.flags
    assert closing.duration_s == pytest.approx(20.0)
    # 259.2 kWh over 20 s: 46 656 kW.
    assert closing.demand == pytest.approx(46_656.0)
    assert net[at(30)].value == pytest.approx(172.8 - 86.4)
    # Over the whole run the station total is the sum of its inputs.
    u1 = sum(r.value or 0.0 for r in world.channel_records("u1") if r.end >= at(10))
    u2_sum = sum(r.value or 0.0 for r in world.channel_records("u2") if r.end >= at(10))
    station = sum(r.value or 0.0 for r in total.values() if r.end >= at(10))
    assert station == pytest.approx(u1 + u2_sum)
    # Each id once.
    ids = [r.id for r in world.virtual_records]
    assert len(ids) == len(set(ids))


def test_obs6_prorate_gap_over_64_intervals_is_recombined_whole() -> None:
    world, u2 = station_world(gaps="prorate", interval_s=1)
    world.at(T0 + 5.5, lambda: setattr(u2, "offline", True))
    world.at(T0 + 5.5 + 100, lambda: setattr(u2, "offline", False))
    world.run_until(T0 + 110)
    last: dict[datetime, Interval] = {}
    for record in world.virtual_records:
        if record.channel == "total":
            last[record.end] = record  # consumers keep the last record per id
    missing = [end for end, r in last.items() if r.value is None]
    assert missing == []
    # 1 s of u1 (8.64) + 1 s of u2 (4.32) per end, give or take a count's rounding.
    assert sum(r.value or 0.0 for r in last.values()) == pytest.approx(
        len(last) * 12.96, abs=2 * ONE_COUNT * len(last) ** 0.5 + 1
    )


# -- counterexamples the simulation found (tests/test_time_simulation.py) -----------


def _engine() -> tuple[object, object]:
    from datetime import UTC

    from edged.core.engine.state import IntervalContext

    device = make_device(interval_s=900)
    return device.channels[0], IntervalContext("sim", device, UTC)


def test_sim1_counter_taken_after_the_boundary_never_gives_a_negative_duration() -> None:
    from datetime import UTC, datetime

    from edged.core.engine.intervals import step_channel
    from edged.core.engine.state import ChannelState
    from edged.core.model import Read, TimeState

    channel, ctx = _engine()
    t = datetime(2026, 11, 18, 12, 0, tzinfo=UTC)
    # A start-up read at 12:20 (reference), then, after a restart on a clock
    # 30 days behind and someone setting it, the next boundary read is 12:15.
    state = ChannelState(counter=1_000_000, counter_at=t + timedelta(minutes=20))
    read = Read(
        device="unit1",
        boundary=t + timedelta(minutes=15),
        read_at=t + timedelta(minutes=15),
        read_lateness_ms=0.0,
        time_state=TimeState.SYNCED,
        values={"energy_import": 1_001_754},
    )
    step = step_channel(state, read, channel, ctx)  # type: ignore[arg-type]
    record = step.records[-1]
    assert record.duration_s == 0.0  # was -300.0
    assert record.value == pytest.approx(252.576)
    assert Flag.CLOCK_SET_BACKWARD in record.flags
    assert record.demand is None
    assert quality(record.flags) is not Quality.ACTUAL


def test_sim2_time_flags_of_a_read_for_a_closed_boundary_go_on_the_next_record() -> None:
    from datetime import UTC, datetime

    from edged.core.engine.intervals import step_channel
    from edged.core.engine.state import ChannelState
    from edged.core.model import Read, TimeState

    channel, ctx = _engine()
    t = datetime(2026, 11, 18, 12, 0, tzinfo=UTC)
    state = ChannelState(counter=1_000_000, counter_at=t, last_end=t)
    # The reference went back behind the last record: the 11:45 read closes
    # nothing, but assumed time ended in it (TIME_ADJUSTED + CLOCK_SET_FORWARD).
    flagged = Read(
        device="unit1",
        boundary=t - timedelta(minutes=15),
        read_at=t - timedelta(minutes=15),
        read_lateness_ms=0.0,
        time_state=TimeState.SYNCED,
        values={"energy_import": 1_000_500},
        flags=frozenset({Flag.TIME_ADJUSTED, Flag.CLOCK_SET_FORWARD}),
    )
    step = step_channel(state, flagged, channel, ctx)  # type: ignore[arg-type]
    assert step.records == ()
    later = Read(
        device="unit1",
        boundary=t + timedelta(minutes=15),
        read_at=t + timedelta(minutes=15),
        read_lateness_ms=0.0,
        time_state=TimeState.SYNCED,
        values={"energy_import": 1_001_754},
    )
    record = step_channel(step.state, later, channel, ctx).records[-1]  # type: ignore[arg-type]
    assert {Flag.TIME_ADJUSTED, Flag.CLOCK_SET_FORWARD} <= record.flags
    assert quality(record.flags) is not Quality.ACTUAL


def test_sim3_a_regular_record_reports_its_nominal_length() -> None:
    from datetime import UTC, datetime

    from edged.core.engine.intervals import step_channel
    from edged.core.engine.state import ChannelState
    from edged.core.model import Read, TimeState

    channel, ctx = _engine()
    t = datetime(2026, 11, 18, 12, 0, tzinfo=UTC)
    # A start-up read 1 microsecond after 12:00: the 12:15 record is 899.999999 s
    # by the reference, within tolerance: nominal, unflagged, 900 s.
    state = ChannelState(counter=1_000_000, counter_at=t + timedelta(microseconds=1))
    read = Read(
        device="unit1",
        boundary=t + timedelta(minutes=15),
        read_at=t + timedelta(minutes=15),
        read_lateness_ms=0.0,
        time_state=TimeState.SYNCED,
        values={"energy_import": 1_001_754},
    )
    record = step_channel(state, read, channel, ctx).records[-1]  # type: ignore[arg-type]
    assert record.flags == frozenset()
    assert record.duration_s == 900.0
    assert record.demand == pytest.approx(1010.304)


def test_sim4_clean_restart_on_the_same_boot_after_the_reference_went_back_is_flagged() -> None:
    # 10 s intervals, 10 counts/s x 0.144 = 1.44 kWh/s (5184 kW). edged stops
    # cleanly after the 30 s read; while it is down the NTP source goes 15 s
    # back; it starts again 1.5 s later on the same boot, synced at once.
    device = make_device(interval_s=10)
    world = World([(device, Meter(rate=10, origin_s=T0 - 0.25))])
    world.run_until(T0 + 30.5)
    world.set_ntp(err_s=-15.0)
    world.restart(1.0, clean=True, reboot=False, confirmed=True)
    world.run_until(T0 + 90)
    records = world.channel_records()
    # The 40 s boundary is reached at true 55 s: 25 s after the 30 s read.
    closing = next(r for r in records if r.end == utc(T0 + 40))
    assert closing.duration_s == pytest.approx(25.0, abs=0.01)
    assert closing.value == pytest.approx(36.0, abs=ONE_COUNT)  # 250 counts
    assert Flag.LONG in closing.flags
    assert quality(closing.flags) is not Quality.ACTUAL
    assert_no_phantom_peak(world, true_kw=5184.0, slack_kw=ONE_COUNT * 360)
