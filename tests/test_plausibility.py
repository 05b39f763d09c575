"""A physical plausibility limit from the site's rating (issue 20, defect 1):
garbage read as a counter and the meter's recovery afterwards are
COUNTER_RESETs with an event, never `actual` energy."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from edged.config.schema import Device
from edged.core.engine.intervals import step_channel
from edged.core.engine.state import (
    ChannelState,
    IntervalContext,
)
from edged.core.flags import quality
from edged.core.model import Flag, Quality, Read, TimeState

T0 = datetime(2026, 11, 21, 0, 0, tzinfo=UTC)
Q = timedelta(minutes=15)
CH = "energy_import"


def device(**overrides: Any) -> Device:
    data: dict[str, Any] = {
        "id": "unit1",
        "interval": "15m",
        "transport": {"type": "tcp", "host": "127.0.0.1"},
        "channels": [{"name": CH, "register": 0, "multiplier": 0.144}],
    }
    data.update(overrides)
    return Device.model_validate(data)


def read(at: datetime, value: int) -> Read:
    return Read(
        device="unit1",
        boundary=at,
        read_at=at + timedelta(milliseconds=2),
        read_lateness_ms=2.0,
        time_state=TimeState.SYNCED,
        values={CH: value},
        error=None,
    )


def test_rating_gives_the_default_limit() -> None:
    # 1000 kVA x 1.5 (default margin) = 1500 kW
    assert device(rated_power_kva=1000).channels[0].plausible_demand == 1500.0
    # 3 x 63.5 V x 6 A = 1143 VA secondary, x CT 200 x VT 100 = 22 860 kVA, x 2
    rated = device(
        meter_rating={"voltage_ln_v": 63.5, "current_max_a": 6, "phases": 3},
        ct_ratio=200,
        vt_ratio=100,
        plausibility_margin=2,
    )
    assert rated.channels[0].plausible_demand == pytest.approx(45_720.0)
    # a Wh channel: the same power in W
    wh = device(rated_power_kva=10, channels=[{"name": CH, "register": 0, "unit": "Wh"}]).channels[
        0
    ]
    assert wh.plausible_demand == 15_000.0
    # configured max_demand wins
    explicit = device(
        rated_power_kva=1000,
        channels=[{"name": CH, "register": 0, "max_demand": 99.0}],
    )
    assert explicit.channels[0].plausible_demand == 99.0
    assert device().channels[0].plausible_demand is None


def test_garbage_then_recovery_is_never_actual() -> None:
    """The probe's sequence: a good counter, 0xDEADBEEF read as the counter,
    then the meter's real counter again a boundary later."""
    ctx = IntervalContext(site="s", device=device(rated_power_kva=1000), zone=UTC)
    channel = ctx.device.channels[0]
    state = ChannelState(counter=100_000, counter_at=T0, last_end=T0)
    # 1500 kW x 0.25 h / 0.144 kWh = 2604 counts allowed per interval
    garbage = step_channel(state, read(T0 + Q, 0xDEADBEEF), channel, ctx)
    recovered = step_channel(garbage.state, read(T0 + 2 * Q, 101_000), channel, ctx)
    for step in (garbage, recovered):
        (record,) = step.records
        assert Flag.COUNTER_RESET in record.flags
        assert record.value is None
        assert quality(record.flags) is not Quality.ACTUAL
        (event,) = step.events
        assert event.kind == "counter_reset"
    # and an ordinary interval after that is energy again: 1000 counts x 0.144
    normal = step_channel(recovered.state, read(T0 + 3 * Q, 102_000), channel, ctx)
    (record,) = normal.records
    assert record.value == pytest.approx(144.0)
    assert record.flags == frozenset()


def test_rating_rejects_a_wrap_the_modulus_default_accepts() -> None:
    """Without a rating a uint32 wrap of 560 million kWh passes as ROLLOVER
    (half the modulus per interval); with one it is a COUNTER_RESET."""
    start, end = 0xDEADBEEF, 100_000  # forward distance 2**32 - 0xDEADBEEF + 100000
    unrated = IntervalContext(site="s", device=device(), zone=UTC)
    step = step_channel(
        ChannelState(counter=start, counter_at=T0, last_end=T0),
        read(T0 + Q, end),
        unrated.device.channels[0],
        unrated,
    )
    assert Flag.ROLLOVER in step.records[0].flags  # the documented fallback
    rated = IntervalContext(site="s", device=device(rated_power_kva=1000), zone=UTC)
    step = step_channel(
        ChannelState(counter=start, counter_at=T0, last_end=T0),
        read(T0 + Q, end),
        rated.device.channels[0],
        rated,
    )
    assert Flag.COUNTER_RESET in step.records[0].flags
    assert step.records[0].value is None
