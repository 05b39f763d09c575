"""Fault tests on loopback: the daemon SIGKILLed at random points and restarted."""

from __future__ import annotations

import asyncio
import itertools
import random
import signal
import sqlite3
from pathlib import Path

import pytest

from edged.payloads import parse_iso_utc
from tests.conftest import Broker, collect
from tests.test_e2e import Daemon, by_end, intervals, meter, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KILL_CYCLES = 20


def stored_interval_ids(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {row[0] for row in conn.execute("SELECT id FROM intervals")}


async def test_sigkill_at_random_points_loses_no_interval(
    tmp_path: Path, broker: Broker, ntp_port: int
) -> None:
    rng = random.Random(20261121)
    async with meter() as (_server, port), collect(broker, "edged/+/device/+/interval/#") as got:
        config = write_config(tmp_path, broker, port, ntp_port)
        d = Daemon(config, tmp_path / "edged.log")
        for _cycle in range(KILL_CYCLES):
            await d.start()
            # Kill anywhere: during start-up, reads, commits or publishes.
            await asyncio.sleep(rng.uniform(0.3, 2.6))
            await d.stop(signal.SIGKILL)
        seen_before_last_start = len(intervals(got))
        await d.start()
        await got.wait_for(
            lambda c: len(intervals(c)) >= seen_before_last_start + 3, 30, "the last run to publish"
        )
        built = stored_interval_ids(tmp_path / "state" / "edged.db")
        await got.wait_for(
            lambda c: built <= {p["id"] for p in intervals(c)}, 30, "every stored interval"
        )
        assert await d.stop() == 0
    built = stored_interval_ids(tmp_path / "state" / "edged.db")
    delivered = by_end(intervals(got))
    assert built <= {r["id"] for r in delivered.values()}
    # The series has no hole: consecutive ends are one interval apart, and every
    # record is either measured or explicitly MISSING.
    times = sorted(parse_iso_utc(e) for e in delivered)
    steps = {(b - a).total_seconds() for a, b in itertools.pairwise(times)}
    assert steps == {1.0}
    for record in delivered.values():
        assert (record["value"] is None) == ("MISSING" in record["flags"]), record
    # Energy is conserved across every kill: measured values add up to the
    # counter difference between the first and last measured record.
    measured = sorted((r for r in delivered.values() if r["value"] is not None),
                      key=lambda r: r["end"])  # fmt: skip
    total = sum(r["value"] for r in measured[1:])
    counts = measured[-1]["counter_end"] - measured[1]["counter_start"]
    assert total == pytest.approx(counts * 0.001, abs=1e-6)
