"""Report by exception for fast-poll measurements (edged.core.deadband), and in
the daemon: only moved values are published, intervals stay complete."""

from __future__ import annotations

import asyncio
import itertools
import math
from pathlib import Path
from typing import Any

import pytest

from edged.config.schema import MeasurementPoint, Measurements
from edged.core.deadband import Deadband, Reported, moved, report
from edged.sim.meter import CounterPoint, MeterServer, SimulatedMeter, StaticPoint
from tests.support.config import site_config, tcp_device
from tests.support.daemon import Daemon
from tests.support.meters import KWH_PER_COUNT, LOAD_KW
from tests.support.mqtt import Broker, collect, intervals
from tests.support.schema import validate_messages


def test_absolute_and_percent_bands() -> None:
    assert not moved(Deadband(absolute=5.0), 100.0, 105.0)  # exactly the band: not beyond
    assert moved(Deadband(absolute=5.0), 100.0, 105.5)
    assert moved(Deadband(absolute=5.0), 100.0, 94.0)
    assert not moved(Deadband(percent=2.0), 200.0, 203.9)  # 2 % of 200 = 4
    assert moved(Deadband(percent=2.0), 200.0, 204.5)
    assert moved(Deadband(percent=2.0), -200.0, -195.5)  # of the magnitude
    # Both: beyond either one.
    assert moved(Deadband(absolute=10.0, percent=1.0), 100.0, 101.5)
    assert not moved(Deadband(absolute=10.0, percent=50.0), 100.0, 109.0)
    # No band: every value.
    assert moved(Deadband(), 100.0, 100.0)
    # A value appearing or vanishing (NaN from the meter) is news; NaN to NaN is not.
    assert moved(Deadband(absolute=1.0), None, 3.0)
    assert moved(Deadband(absolute=1.0), 3.0, math.nan)
    assert not moved(Deadband(absolute=1.0), None, math.nan)
    # Without a band even a repeated NaN is reported (every poll, as always).
    assert moved(Deadband(), None, math.nan)


def test_report_publishes_what_moved_and_what_was_silent_too_long() -> None:
    bands = {"kw": Deadband(absolute=5.0), "v": Deadband(percent=1.0)}
    last: dict[str, Reported] = {}
    out, last = report(bands, last, {"kw": 100.0, "v": 230.0, "hz": 50.0}, 0.0, 10.0)
    assert out == {"kw": 100.0, "v": 230.0, "hz": 50.0}  # first poll: everything
    out, last = report(bands, last, {"kw": 104.0, "v": 231.0, "hz": 50.0}, 1.0, 10.0)
    assert out == {"hz": 50.0}  # no band on hz: always
    out, last = report(bands, last, {"kw": 106.0, "v": 232.0, "hz": 50.0}, 2.0, 10.0)
    assert out == {"kw": 106.0, "hz": 50.0}  # 2 V is not beyond 1 % of 230 (2.3 V)
    out, last = report(bands, last, {"kw": 106.0, "v": 232.5}, 2.0, 10.0)
    assert out == {"v": 232.5}
    # The band is measured from the last *reported* value (106), not the last polled.
    out, last = report(bands, last, {"kw": 110.0, "v": 232.5}, 3.0, 10.0)
    assert out == {}
    out, last = report(bands, last, {"kw": 111.5, "v": 232.5}, 4.0, 10.0)
    assert out == {"kw": 111.5}
    # Silent for max_silence (10 s since v was last reported at 2 s): reported anyway.
    out, last = report(bands, last, {"kw": 111.5, "v": 232.5}, 12.0, 10.0)
    assert out == {"v": 232.5}
    out, _ = report(bands, last, {"kw": 111.5, "v": 232.5}, 100.0, None)
    assert out == {}


def test_config_keys() -> None:
    m = Measurements.model_validate(
        {"every": "1s", "max_silence": "5m",
         "points": [{"name": "kw", "register": 4, "deadband": 0.5, "deadband_percent": 2}]}
    )  # fmt: skip
    assert m.max_silence == 300.0
    assert (m.points[0].deadband, m.points[0].deadband_percent) == (0.5, 2.0)
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        MeasurementPoint.model_validate({"name": "kw", "register": 4, "deadband": -1})


@pytest.mark.integration
async def test_daemon_publishes_only_moved_values_and_every_interval(
    tmp_path: Path, broker: Broker, ntp_port: int
) -> None:
    sim = SimulatedMeter(
        [
            CounterPoint(address=0, kwh_per_count=KWH_PER_COUNT, load_kw=LOAD_KW,
                         initial_counts=10_000),
            StaticPoint(name="kw", address=20, value=500),
        ]
    )  # fmt: skip
    async with MeterServer({1: sim}) as server, collect(broker, "edged/#") as got:
        port = await server.start_tcp()
        measurements = {
            "every": "100ms",
            "points": [{"name": "kw", "register": 20, "type": "uint16", "deadband": 5}],
        }
        config = site_config(
            tmp_path,
            devices=[tcp_device("unit1", port, measurements=measurements)],
            mqtt_port=broker.port,
            ntp_port=ntp_port,
        )

        def kw(c: Any) -> list[float]:
            return [p["values"]["kw"] for p in c.payloads("/measurement") if "kw" in p["values"]]

        async with Daemon(config, tmp_path) as d:
            await got.wait_for(lambda c: kw(c) == [500], 20, "the first value")
            await asyncio.sleep(1.0)  # ten polls of an unchanged value
            sim.set_static("kw", 503)  # inside the band
            await asyncio.sleep(1.0)
            sim.set_static("kw", 506)  # beyond it (from 500)
            await got.wait_for(lambda c: kw(c) == [500, 506], 10, "the moved value")
            await got.wait_for(lambda c: len(intervals(c)) >= 4, 20, "4 intervals")
            await got.wait_for(
                lambda c: any(p.get("measurements", {}).get("polled", 0) >= 20
                              for p in c.payloads("/gateway/status")),
                10, "a status with the counts",
            )  # fmt: skip
            assert await d.stop() == 0
    validate_messages(got.messages)
    assert kw(got) == [500, 506]
    statuses = [p for p in got.payloads("/gateway/status") if "measurements" in p]
    counts = statuses[-1]["measurements"]
    assert counts["polled"] >= 20
    assert counts["published"] == 2
    assert counts["stored"] == 2
    assert any(s["measurements"].get("polled_per_s", 0) > 0 for s in statuses)
    # Intervals are never deadbanded: one per boundary, consecutive, the
    # counter carried from one to the next.
    series = sorted({r["end"]: r for r in intervals(got)}.values(), key=lambda r: r["end"])
    for before, after in itertools.pairwise(series):
        assert after["counter_start"] == before["counter_end"]
