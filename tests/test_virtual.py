"""Virtual meters: per-interval sums and differences across devices."""

from __future__ import annotations

from datetime import timedelta

import pytest

from edged.config.schema import (
    VirtualMeter,
)
from edged.core.flags import quality
from edged.core.model import Flag, Interval, Quality, TimeState
from edged.core.virtual.plan import (
    VirtualInput,
    VirtualMeterError,
    VirtualMeterPlan,
    combine,
    combine_meter,
    plan_virtual_meter,
    resolve_ref,
)
from tests.support.virtual import AKL, DEVICES, END, Q, device, meter, rec, station


def total(plan: VirtualMeterPlan, inputs: dict[str, Interval | None]) -> Interval:
    return combine(plan, plan.channels[0], site="tekapo-a", end=END, zone=AKL, inputs=inputs)


def test_plan_resolves_inputs() -> None:
    plan = station(["unit1.energy_export", "unit2.energy_export"], ["aux.energy_import"])
    assert plan.meter_id == "station"
    assert plan.interval_s == 900
    assert plan.channels[0].inputs == (
        VirtualInput(ref="unit1.energy_export", device="unit1", channel="energy_export", sign=1),
        VirtualInput(ref="unit2.energy_export", device="unit2", channel="energy_export", sign=1),
        VirtualInput(ref="aux.energy_import", device="aux", channel="energy_import", sign=-1),
    )


def test_refs_with_dots_in_ids_resolve_unambiguously() -> None:
    devices = [device("site.unit1", ["a.b"]), device("site", ["unit1.x"])]
    assert resolve_ref("site.unit1.a.b", devices) == ("site.unit1", "a.b")
    assert resolve_ref("site.unit1.x", devices) == ("site", "unit1.x")
    ambiguous = [device("a.b", ["c"]), device("a", ["b.c"])]
    with pytest.raises(VirtualMeterError, match="ambiguous"):
        resolve_ref("a.b.c", ambiguous)


def test_plan_reports_every_problem() -> None:
    devices = [*DEVICES, device("unit3", interval="30m"), device("wh", unit="Wh")]
    bad = meter(
        ["unit1.energy_export", "nope.energy_export", "unit3.energy_export", "wh.energy_export"]
    )
    with pytest.raises(VirtualMeterError) as info:
        plan_virtual_meter(bad, devices)
    message = str(info.value)
    assert "'nope.energy_export' names no configured" in message
    assert "must share the interval length" in message
    assert "1800s: unit3.energy_export" in message
    assert "wh.energy_export is in Wh, not kWh" in message


def test_sum() -> None:
    plan = station(["unit1.energy_export", "unit2.energy_export"])
    result = total(
        plan,
        {
            "unit1.energy_export": rec("unit1", "energy_export", 252.576),
            "unit2.energy_export": rec("unit2", "energy_export", 100.2),
        },
    )
    assert result.value == 352.776  # decimal, not 352.77599999999995
    assert result.demand == 1411.104
    assert result.device == "station"
    assert result.channel == "energy_export"
    assert (result.start, result.end) == (END - Q, END)
    assert result.id == "tekapo-a/station/energy_export/2026-11-21T00:30:00Z"
    assert result.flags == frozenset()
    assert quality(result.flags) is Quality.ACTUAL
    assert result.counter_start is None
    assert result.counter_end is None
    assert result.read_at == END + timedelta(milliseconds=3)


def test_difference() -> None:
    plan = station(["unit1.energy_export", "unit2.energy_export"], ["aux.energy_import"])
    result = total(
        plan,
        {
            "unit1.energy_export": rec("unit1", "energy_export", 252.576),
            "unit2.energy_export": rec("unit2", "energy_export", 100.2),
            "aux.energy_import": rec("aux", "energy_import", 2.776),
        },
    )
    assert result.value == 350.0
    assert result.demand == 1400.0


@pytest.mark.parametrize(
    "unit2",
    [
        None,  # no record for this end
        rec("unit2", "energy_export", None),  # a MISSING record
        rec("unit2", "energy_export", None, {Flag.COUNTER_RESET}),  # no value
    ],
)
def test_missing_input_makes_the_virtual_interval_missing(unit2: Interval | None) -> None:
    plan = station(["unit1.energy_export", "unit2.energy_export"])
    inputs: dict[str, Interval | None] = {
        "unit1.energy_export": rec("unit1", "energy_export", 252.576)
    }
    if unit2 is not None:
        inputs["unit2.energy_export"] = unit2
    result = total(plan, inputs)
    assert result.value is None
    assert result.demand is None
    assert Flag.MISSING in result.flags
    assert quality(result.flags) is Quality.MISSING


def test_all_inputs_absent() -> None:
    plan = station(["unit1.energy_export"])
    result = total(plan, {})
    assert result.value is None
    assert result.flags == {Flag.MISSING}
    assert result.duration_s == 900.0
    assert result.read_at is None


def test_flags_are_the_union_of_the_inputs() -> None:
    plan = station(["unit1.energy_export", "unit2.energy_export"])
    result = total(
        plan,
        {
            "unit1.energy_export": rec("unit1", "energy_export", 10.0, {Flag.ROLLOVER, Flag.DST}),
            "unit2.energy_export": rec(
                "unit2", "energy_export", 20.0, {Flag.AMT, Flag.DST}, time_state=TimeState.ASSUMED
            ),
        },
    )
    assert result.flags == {Flag.ROLLOVER, Flag.DST, Flag.AMT}
    assert result.value == 30.0
    assert result.demand is None  # an AMT input has no demand
    assert result.time_state is TimeState.ASSUMED  # the least trusted input
    assert quality(result.flags) is Quality.SUSPECT


def test_flags_of_a_missing_input_record_are_kept() -> None:
    plan = station(["unit1.energy_export", "unit2.energy_export"])
    result = total(
        plan,
        {
            "unit1.energy_export": rec("unit1", "energy_export", 10.0, {Flag.POWER_FAIL}),
            "unit2.energy_export": rec("unit2", "energy_export", None, {Flag.DEVICE_ERROR}),
        },
    )
    assert result.flags == {Flag.POWER_FAIL, Flag.DEVICE_ERROR, Flag.MISSING}


def test_estimated_inputs_keep_the_original_total() -> None:
    plan = station(["unit1.energy_export", "unit2.energy_export"])
    result = total(
        plan,
        {
            "unit1.energy_export": rec(
                "unit1", "energy_export", 0.0, {Flag.AMT, Flag.ESTIMATED}, original_value=12.5
            ),
            "unit2.energy_export": rec("unit2", "energy_export", 20.0),
        },
    )
    assert result.value == 20.0
    assert result.original_value == 32.5
    assert quality(result.flags) is Quality.ESTIMATED


def test_inputs_must_share_the_interval_length() -> None:
    plan = station(["unit1.energy_export", "unit2.energy_export"])
    with pytest.raises(ValueError, match="must share the 900s interval"):
        total(
            plan,
            {
                "unit1.energy_export": rec("unit1", "energy_export", 10.0),
                "unit2.energy_export": rec("unit2", "energy_export", 20.0, start=END - 2 * Q),
            },
        )
    with pytest.raises(ValueError, match="not 2026-11-21 00:30"):
        total(plan, {"unit1.energy_export": rec("unit1", "energy_export", 1.0, end=END + Q)})
    with pytest.raises(ValueError, match="in Wh, not kWh"):
        total(plan, {"unit1.energy_export": rec("unit1", "energy_export", 1.0, unit="Wh")})


def test_combine_meter_from_records_by_device_and_channel() -> None:
    vm = VirtualMeter.model_validate(
        {
            "id": "station",
            "channels": [
                {"name": "export", "add": ["unit1.energy_export", "unit2.energy_export"]},
                {
                    "name": "net",
                    "add": ["unit1.energy_export"],
                    "subtract": ["unit1.energy_import"],
                },
            ],
        }
    )
    plan = plan_virtual_meter(vm, DEVICES)
    records = {
        ("unit1", "energy_export"): rec("unit1", "energy_export", 30.0),
        ("unit1", "energy_import"): rec("unit1", "energy_import", 45.5),
        ("unit2", "energy_export"): rec("unit2", "energy_export", 12.0),
    }
    export, net = combine_meter(plan, site="tekapo-a", end=END, zone=AKL, records=records)
    assert (export.channel, export.value) == ("export", 42.0)
    assert (net.channel, net.value) == ("net", -15.5)  # net import is negative export
