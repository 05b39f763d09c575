"""The store stamps rows with the reference clock it is given, not system time,
so the gateway status's outbox age is measured on one timeline."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from edged.io.clock import SystemClock
from edged.io.store import OutboxMessage, Store

# A reference clock an hour and a bit ahead of the system clock: NTP corrected
# a gateway whose RTC was badly wrong.
REFERENCE = datetime(2031, 5, 17, 9, 30, 0, tzinfo=UTC)


async def test_outbox_rows_are_stamped_with_the_reference_clock(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "edged.db", now=lambda: REFERENCE)
    try:
        await store.commit_boundary(
            [], [], {}, [(1, OutboxMessage(topic="edged/s/x", payload=b"{}"))]
        )
        depth = await store.outbox_depth()
    finally:
        await store.close()
    assert depth.count == 1
    assert depth.oldest == REFERENCE


def test_system_clock_reads_the_system_clock_it_is_given() -> None:
    # The demo hands the daemon a system clock reset by a dead RTC battery.
    dead_battery = SystemClock(system_now=lambda: 86_400.0)
    assert dead_battery.now() == datetime(1970, 1, 2, tzinfo=UTC)
    assert dead_battery.now() - datetime(1970, 1, 1, tzinfo=UTC) == timedelta(days=1)
