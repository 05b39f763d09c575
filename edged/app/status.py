"""Pure builders of the gateway status payload's fields.

The App gathers the live objects (clock, store, housekeeper, pollers); what
the payload says about them is decided here, from values, so it can be
tested without a daemon. Every age is measured on the reference clock: rows
are stamped with it too (Store), so an NTP offset cancels out.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from edged.app.housekeeping import DiskStatus
from edged.app.poller import DeviceHealth
from edged.core.time.transitions import TimebaseStatus
from edged.io.store import OutboxDepth


def outbox_fields(outbox: OutboxDepth | None, now: datetime) -> dict[str, Any]:
    """Depth and age of the oldest unsent message, both None before the first
    measurement. `now` is reference time, as the rows' stamps are."""
    oldest_s = None
    if outbox is not None and outbox.oldest is not None:
        oldest_s = round((now - outbox.oldest).total_seconds(), 1)
    return {
        "outbox_depth": outbox.count if outbox is not None else None,
        "outbox_oldest_age_s": oldest_s,
    }


def device_fields(health: Iterable[DeviceHealth], configured: int) -> dict[str, Any]:
    healths = list(health)
    return {
        "devices": configured,
        "devices_online": sum(1 for h in healths if h.comms == "online"),
        "reads": sum(h.reads for h in healths),
        "read_errors": sum(h.errors for h in healths),
    }


def disk_fields(disk: DiskStatus | None, budget_bytes: int) -> dict[str, Any]:
    """The store's disk figures; unknown (None) until the housekeeper runs."""
    if disk is None:
        return {
            "disk_used_bytes": None,
            "disk_free_bytes": None,
            "disk_budget_bytes": budget_bytes,
            "disk_alarm": None,
            "storage_shedding": [],
        }
    return {
        "disk_used_bytes": disk.used_bytes,
        "disk_free_bytes": disk.free_bytes,
        "disk_budget_bytes": disk.budget_bytes,
        "disk_alarm": None if disk.alarm is None else str(disk.alarm),
        "storage_shedding": list(disk.shedding),
    }


def time_fields(status: TimebaseStatus | None) -> dict[str, Any]:
    """The reference clock's figures; absent until the reference exists."""
    if status is None:
        return {}
    return {
        "time_source": str(status.source),
        "assumed_meter_time": status.assumed_meter_time,
        "ntp_offset_s": round(status.applied_offset_s, 6),
        "drift_ppm": None if status.drift_ppm is None else round(status.drift_ppm, 3),
        "last_sync_age_s": None
        if status.last_confirmed_age_s is None
        else round(status.last_confirmed_age_s, 1),
    }
