"""Topic names and JSON payloads: the MQTT contract in one place (pure)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from edged.core import flags as flag_table
from edged.core.demand import Peak, PeakState
from edged.core.model import Event, Interval, iso_utc

INTERVAL_SCHEMA = "edged.interval/1"
EVENT_SCHEMA = "edged.event/1"
GATEWAY_STATUS_SCHEMA = "edged.gateway_status/1"
DEVICE_STATUS_SCHEMA = "edged.device_status/1"
PEAK_SCHEMA = "edged.peak/1"
MEASUREMENT_SCHEMA = "edged.measurement/1"
COMMAND_RESPONSE_SCHEMA = "edged.command_response/1"


class Topics:
    def __init__(self, prefix: str, site: str) -> None:
        self.prefix = prefix
        self.base = f"{prefix}/{site}"

    @property
    def gateway_status(self) -> str:
        return f"{self.base}/gateway/status"

    def device_status(self, device: str) -> str:
        return f"{self.base}/device/{device}/status"

    def interval(self, device: str, channel: str) -> str:
        return f"{self.base}/device/{device}/interval/{channel}"

    def event(self, device: str | None) -> str:
        return (
            f"{self.base}/gateway/event" if device is None else f"{self.base}/device/{device}/event"
        )

    def peak(self, device: str, channel: str) -> str:
        return f"{self.base}/device/{device}/peak/{channel}"

    def measurement(self, device: str) -> str:
        return f"{self.base}/device/{device}/measurement"

    def command(self, name: str) -> str:
        """Where requests for a command arrive (subscribed only when enabled)."""
        return f"{self.base}/gateway/command/{name}"

    def response(self, name: str) -> str:
        """Where a command is answered when the request names no response topic.
        Outside `gateway/command/#`, so a subscriber to the commands never sees answers
        as requests (and edged never receives its own answers)."""
        return f"{self.base}/gateway/response/{name}"


def _round(value: float | None, places: int = 6) -> float | None:
    return None if value is None else round(value, places)


def interval_payload(
    interval: Interval, seq: int, *, replay: bool = False, store_id: str | None = None
) -> dict[str, Any]:
    """The record as published. `seq` counts per store: with `store_id` (the
    store's random identity) a consumer tells a new store from a rewind."""
    flags = flag_table.ordered(interval.flags)
    payload: dict[str, Any] = {
        "schema": INTERVAL_SCHEMA,
        "id": interval.id,
        "site": interval.site,
        "device": interval.device,
        "channel": interval.channel,
        "start": iso_utc(interval.start),
        "end": iso_utc(interval.end),
        "duration_s": round(interval.duration_s, 3),
        "value": interval.value,
        "unit": interval.unit,
        "demand": _round(interval.demand),
        "demand_unit": interval.demand_unit,
        "counter_start": interval.counter_start,
        "counter_end": interval.counter_end,
        "flags": [str(f) for f in flags],
        "iee_status": flag_table.iee_status(flags),
        "quality": str(flag_table.quality(flags)),
        "time_state": str(interval.time_state),
        "read_at": iso_utc(interval.read_at) if interval.read_at else None,
        "read_lateness_ms": _round(interval.read_lateness_ms, 3),
        "seq": seq,
        "replay": replay,
    }
    if store_id is not None:
        payload["store_id"] = store_id
    if interval.original_value is not None:
        payload["original_value"] = interval.original_value
    if interval.rolling_demand is not None:
        payload["rolling_demand"] = _round(interval.rolling_demand)
    if interval.compensation is not None:
        payload["compensation"] = dict(interval.compensation)
    return payload


def replay_copy(stored: Mapping[str, Any]) -> dict[str, Any]:
    """A stored interval payload re-sent on request: the same record (same `id`,
    same `seq`, so consumers de-duplicate it and keep the newest version of an id
    by `seq` as before) marked `replay: true`."""
    return {**stored, "replay": True}


def command_response_payload(
    site: str,
    command: str,
    request_id: str | None,
    status: str,
    *,
    count: int | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """An answer to a command request: accepted, done, or error (with why)."""
    return {
        "schema": COMMAND_RESPONSE_SCHEMA,
        "site": site,
        "command": command,
        "request_id": request_id,
        "status": status,
        "count": count,
        "from": iso_utc(start) if start is not None else None,
        "to": iso_utc(end) if end is not None else None,
        "error": error,
    }


def event_payload(event: Event, site: str, seq: int, store_id: str | None = None) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "schema": EVENT_SCHEMA,
        "id": f"{site}/{event.device or 'gateway'}/{event.kind}/{iso_utc(event.at)}",
        "site": site,
        "device": event.device,
        "kind": event.kind,
        "at": iso_utc(event.at),
        "message": event.message,
        "details": dict(event.details),
        "seq": seq,
    }
    if store_id is not None:
        payload["store_id"] = store_id
    return payload


def peak_payload(
    site: str, device: str, channel: str, demand_unit: str | None, peak: PeakState
) -> dict[str, Any]:
    """Retained peak demand of the current billing period (AMT/suspect excluded)."""

    def one(p: Peak | None) -> dict[str, Any] | None:
        if p is None:
            return None
        return {"demand": _round(p.demand), "start": iso_utc(p.start), "end": iso_utc(p.end)}

    return {
        "schema": PEAK_SCHEMA,
        "site": site,
        "device": device,
        "channel": channel,
        "period_start": iso_utc(peak.period_start) if peak.period_start else None,
        "period_end": iso_utc(peak.period_end) if peak.period_end else None,
        "demand_unit": demand_unit,
        "peak": one(peak.block),
        "rolling_peak": one(peak.rolling),
    }


def measurement_payload(
    site: str,
    device: str,
    at: datetime,
    values: Mapping[str, float | int],
    units: Mapping[str, str],
) -> dict[str, Any]:
    """Fast-poll values; a NaN or infinite register value is sent as null."""
    clean = {
        name: (None if isinstance(v, float) and not math.isfinite(v) else v)
        for name, v in values.items()
    }
    return {
        "schema": MEASUREMENT_SCHEMA,
        "site": site,
        "device": device,
        "at": iso_utc(at),
        "values": clean,
        "units": dict(units),
    }


# json.dumps with any option builds a new encoder per call; the same options,
# built once, give the same bytes.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def encode(payload: Mapping[str, Any]) -> bytes:
    return _ENCODER.encode(payload).encode()
