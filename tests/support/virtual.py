"""Virtual-meter plans and interval records written by hand for virtual-meter tests."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from edged.config.schema import Device, VirtualMeter
from edged.core.model import Flag, Interval, TimeState
from edged.core.virtual.plan import VirtualMeterPlan, plan_virtual_meter

AKL = ZoneInfo("Pacific/Auckland")
END = datetime(2026, 11, 21, 0, 30, tzinfo=UTC)
Q = timedelta(minutes=15)


def device(
    device_id: str, channels: Iterable[str] = ("energy_export", "energy_import"), **kw: Any
) -> Device:
    return Device.model_validate(
        {
            "id": device_id,
            "interval": kw.pop("interval", "15m"),
            "transport": {"type": "tcp", "host": "127.0.0.1"},
            "channels": [
                {"name": name, "register": 2 * i, "unit": kw.get("unit", "kWh")}
                for i, name in enumerate(channels)
            ],
        }
    )


DEVICES = [device("unit1"), device("unit2"), device("aux", ["energy_import"])]


def meter(
    add: list[str], subtract: list[str] | None = None, name: str = "energy_export"
) -> VirtualMeter:
    return VirtualMeter.model_validate(
        {"id": "station", "channels": [{"name": name, "add": add, "subtract": subtract or []}]}
    )


def rec(
    device_id: str,
    channel: str,
    value: float | None,
    flags: Iterable[Flag] = (),
    *,
    end: datetime = END,
    start: datetime | None = None,
    demand: float | None = None,
    time_state: TimeState = TimeState.SYNCED,
    original_value: float | None = None,
    unit: str = "kWh",
) -> Interval:
    flag_set = frozenset(flags) | ({Flag.MISSING} if value is None else set())
    return Interval(
        site="tekapo-a",
        device=device_id,
        channel=channel,
        start=start or end - Q,
        end=end,
        duration_s=900.0,
        value=value,
        unit=unit,
        # As the engine does: no demand without a value or on assumed time.
        demand=demand
        if demand is not None
        else (None if value is None or Flag.AMT in flag_set else value * 4),
        demand_unit="kW",
        counter_start=None,
        counter_end=None,
        flags=flag_set,
        time_state=time_state,
        read_at=end + timedelta(milliseconds=3),
        read_lateness_ms=3.0,
        original_value=original_value,
        rolling_demand=None,
    )


def station(add: list[str], subtract: list[str] | None = None) -> VirtualMeterPlan:
    return plan_virtual_meter(meter(add, subtract), DEVICES)
