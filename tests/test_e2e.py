"""End to end over loopback: simulator (real Modbus TCP) -> `edged run` (a real
process) -> real mosquitto -> a subscriber. Second-long intervals."""

from __future__ import annotations

import asyncio
import itertools
import signal
import sqlite3
import statistics
from pathlib import Path
from typing import Any

import pytest

from tests.support.config import daemon_config
from tests.support.daemon import Daemon
from tests.support.meters import KWH_PER_COUNT, meter
from tests.support.mqtt import Broker, by_end, collect, intervals
from tests.support.schema import validate_messages

pytestmark = pytest.mark.integration


def assert_consistent_series(records: list[dict[str, Any]]) -> None:
    """Each measured record continues the previous one's counter and is exact."""
    series = sorted(by_end(records).values(), key=lambda r: r["end"])
    previous = None
    for record in series:
        assert record["id"] == f"test-site/unit1/energy_import/{record['end']}"
        if record["value"] is not None:
            counts = record["counter_end"] - record["counter_start"]
            assert record["value"] == pytest.approx(counts * KWH_PER_COUNT, abs=1e-9)
            if previous is not None and previous["value"] is not None:
                assert record["counter_start"] == previous["counter_end"]
        previous = record


async def test_daemon_publishes_consecutive_intervals(
    tmp_path: Path, broker: Broker, ntp_port: int
) -> None:
    async with meter() as (_server, port), collect(broker, "edged/#") as got:
        config = daemon_config(tmp_path, broker.port, port, ntp_port)
        async with Daemon(config, tmp_path) as d:
            await got.wait_for(lambda c: len(intervals(c)) >= 6, 20, "6 intervals")
            assert await d.stop() == 0
    validate_messages(got.messages)  # every message meets its JSON Schema
    records = intervals(got)
    first, rest = records[0], records[1:]
    # start-up: the first interval runs from the baseline read to the boundary.
    # It is PARTIAL unless that read fell within the 1 % tolerance (10 ms)
    # after the previous boundary, as about one start in a hundred does: the
    # daemon's start-up time is not the test's to choose, so the expectation
    # is worked out from when the baseline read was taken (the store has it).
    with sqlite3.connect(tmp_path / "state" / "edged.db") as db:
        ((baseline_at,),) = db.execute("SELECT read_at FROM reads WHERE boundary IS NULL")
    from edged.core.model import parse_iso_utc

    true_s = (parse_iso_utc(first["end"]) - parse_iso_utc(baseline_at)).total_seconds()
    assert 0 < true_s < 1.0
    # duration_s is the real time between the two reads (the boundary read is
    # taken a little after `end`), measured on the monotonic clock.
    between_reads_s = (parse_iso_utc(first["read_at"]) - parse_iso_utc(baseline_at)).total_seconds()
    assert first["duration_s"] == pytest.approx(between_reads_s, abs=0.002)
    assert ("PARTIAL" in first["flags"]) == (true_s < 1.0 - 0.01), (true_s, first)
    assert "PARTIAL" in first["flags"] or first["value"] == pytest.approx(1.0, abs=0.05)
    for record in rest:
        assert record["flags"] in ([], ["DST"]), record
        assert record["quality"] == "actual"
        assert record["duration_s"] == 1.0
        # 1 kWh/s; reads land within a few ms of the boundary
        assert record["value"] == pytest.approx(1.0, abs=0.05)
        assert record["demand"] == pytest.approx(3600.0, rel=0.05)
        assert record["unit"] == "kWh"
        assert record["demand_unit"] == "kW"
        assert record["time_state"] == "synced"
        assert record["read_lateness_ms"] < 50
    assert_consistent_series(records)
    seqs = [r["seq"] for r in records]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)
    ends = [r["end"] for r in records]
    assert ends == sorted(ends)
    assert len(set(ends)) == len(ends)
    status = [p for t, p, _ in got.messages if t == "edged/test-site/gateway/status"]
    assert status[0]["state"] == "online"
    assert status[-1]["state"] == "offline"
    # the clean stop's status counts every boundary read (the baseline too)
    assert status[-1]["reads"] >= len(records) + 1
    assert status[-1]["read_errors"] == 0
    device_status = got.payloads("device/unit1/status")
    assert device_status[-1]["comms"] == "online"
    lateness = sorted(r["read_lateness_ms"] for r in rest)
    print(
        f"read_lateness_ms median={statistics.median(lateness):.2f} "
        f"p99={lateness[int(0.99 * (len(lateness) - 1))]:.2f} max={lateness[-1]:.2f} "
        f"n={len(lateness)}"
    )


async def test_broker_outage_loses_nothing(tmp_path: Path, broker: Broker, ntp_port: int) -> None:
    async with meter() as (_server, port):
        config = daemon_config(tmp_path, broker.port, port, ntp_port)
        async with Daemon(config, tmp_path) as d:
            async with collect(broker, "edged/+/device/+/interval/#") as before:
                await before.wait_for(lambda c: len(intervals(c)) >= 2, 20, "2 intervals")
            broker.stop()
            await asyncio.sleep(4.5)  # several intervals built while the broker is down
            broker.start()
            async with collect(broker, "edged/+/device/+/interval/#") as after:
                await after.wait_for(
                    lambda c: len(intervals(c)) >= 8, 30, "backlog and live intervals"
                )
                assert await d.stop() == 0
    received = by_end(intervals(before) + intervals(after))
    ends = sorted(received)
    # no hole: every boundary from the first to the last received is there
    from edged.core.model import parse_iso_utc

    times = [parse_iso_utc(e) for e in ends]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    assert gaps, ends
    assert all(g == 1.0 for g in gaps), ends
    assert len(ends) >= 8
    # everything built during the outage was measured, not lost
    assert all(received[e]["value"] is not None for e in ends[1:])
    assert_consistent_series(list(received.values()))


async def test_sigterm_and_restart_continue_the_series(
    tmp_path: Path, broker: Broker, ntp_port: int
) -> None:
    async with meter() as (_server, port), collect(broker, "edged/+/device/+/interval/#") as got:
        config = daemon_config(tmp_path, broker.port, port, ntp_port)
        async with Daemon(config, tmp_path) as d:
            await got.wait_for(lambda c: len(intervals(c)) >= 3, 20, "3 intervals")
            assert await d.stop(signal.SIGTERM) == 0
        stopped_after = len(intervals(got))
        await asyncio.sleep(0.3)
        async with Daemon(config, tmp_path) as d:
            await got.wait_for(
                lambda c: len(intervals(c)) >= stopped_after + 4, 20, "intervals after restart"
            )
            assert await d.stop() == 0
    records = by_end(intervals(got))
    ends = sorted(records)
    from edged.core.model import parse_iso_utc

    times = [parse_iso_utc(e) for e in ends]
    assert all((b - a).total_seconds() == 1.0 for a, b in itertools.pairwise(times))
    # After the restart the persisted counter carries on: only the very first
    # interval of the first run is PARTIAL, and energy across the restart is
    # on a record (LONG or MISSING+LONG), never lost.
    partial = [e for e in ends if "PARTIAL" in records[e]["flags"]]
    assert partial == [ends[0]]
    assert_consistent_series(list(records.values()))
    measured = [records[e] for e in ends if records[e]["value"] is not None]
    total_kwh = sum(r["value"] for r in measured[1:])
    counts = measured[-1]["counter_end"] - measured[1]["counter_start"]
    assert total_kwh == pytest.approx(counts * KWH_PER_COUNT, abs=1e-6)
