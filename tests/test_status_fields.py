"""The gateway status's fields, built from values (edged/app/status.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from edged.app.housekeeping import DiskAlarm, DiskStatus
from edged.app.poller import DeviceHealth
from edged.app.status import device_fields, disk_fields, outbox_fields
from edged.io.store import OutboxDepth, OutboxMessage, Store

# NTP found the gateway's clock 55 minutes slow: reference time is far from
# the system clock the rows used to be stamped with.
SYSTEM_NOW = datetime(2026, 12, 6, 3, 0, 0, tzinfo=UTC)
REFERENCE_NOW = SYSTEM_NOW + timedelta(minutes=55)


def test_outbox_age_is_measured_on_the_reference_clock() -> None:
    oldest = REFERENCE_NOW - timedelta(seconds=42)

    fields = outbox_fields(OutboxDepth(count=3, oldest=oldest), REFERENCE_NOW)
    assert fields == {"outbox_depth": 3, "outbox_oldest_age_s": 42.0}


def test_outbox_fields_before_the_first_measurement() -> None:
    assert outbox_fields(None, REFERENCE_NOW) == {
        "outbox_depth": None,
        "outbox_oldest_age_s": None,
    }


async def test_a_store_on_the_reference_clock_gives_a_true_outbox_age_whatever_the_offset(
    tmp_path: Path,
) -> None:
    # The store and the status read one clock: a message queued 10 s ago is
    # 10 s old, not 55 minutes and 10 s (the offset between the two clocks).
    now = [REFERENCE_NOW]
    store = await Store.open(tmp_path / "edged.db", now=lambda: now[0])
    try:
        await store.commit_boundary([], [], {}, [(1, OutboxMessage(topic="t", payload=b"{}"))])
        now[0] += timedelta(seconds=10)
        depth = await store.outbox_depth()
    finally:
        await store.close()
    assert outbox_fields(depth, now[0]) == {"outbox_depth": 1, "outbox_oldest_age_s": 10.0}


def test_device_fields_count_online_devices_reads_and_errors() -> None:
    online = DeviceHealth(reads=5, errors=1, consecutive_errors=0)
    offline = DeviceHealth(reads=2, errors=3, consecutive_errors=3)
    never = DeviceHealth()
    assert device_fields([online, offline, never], configured=4) == {
        "devices": 4,
        "devices_online": 1,
        "reads": 7,
        "read_errors": 4,
    }


def test_disk_fields_unknown_until_the_housekeeper_runs_then_its_figures() -> None:
    assert disk_fields(None, 2_000_000_000) == {
        "disk_used_bytes": None,
        "disk_free_bytes": None,
        "disk_budget_bytes": 2_000_000_000,
        "disk_alarm": None,
        "storage_shedding": [],
    }
    disk = DiskStatus(
        used_bytes=1_900_000_000,
        free_bytes=10_000,
        budget_bytes=2_000_000_000,
        alarm=DiskAlarm.FREE_SPACE,
        shedding=("measurements",),
    )
    assert disk_fields(disk, 2_000_000_000) == {
        "disk_used_bytes": 1_900_000_000,
        "disk_free_bytes": 10_000,
        "disk_budget_bytes": 2_000_000_000,
        "disk_alarm": "free_space",
        "storage_shedding": ["measurements"],
    }
