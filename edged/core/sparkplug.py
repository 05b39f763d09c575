"""Sparkplug B: what edged's data means in Sparkplug's terms (pure).

Topics, metric names and datatypes, the OPC-style quality code of an interval
record, the 0-255 sequence arithmetic, alias tables and what an incoming
command asks for. No protobuf here: `edged.io.sparkplug_pb` turns these values
into wire bytes, and `edged.io.sparkplug` runs the session (docs/sparkplug.md).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import IntEnum, StrEnum
from typing import Any

from edged.core import flags as flag_table
from edged.core.model import Interval, Quality

NAMESPACE = "spBv1.0"
# The metric a Primary Host (or an operator) writes true to ask for births.
REBIRTH_METRIC = "Node Control/Rebirth"
BD_SEQ_METRIC = "bdSeq"
# Outbox rows of the Sparkplug session are told apart by their topic.
OUTBOX_PREFIX = f"{NAMESPACE}/"
# Format of a Sparkplug outbox row's payload (JSON: the metric, encoded at
# send time because seq, alias and is_historical belong to the session).
ROW_SCHEMA = "edged.sparkplug_row/1"


class DataType(IntEnum):
    """Sparkplug B datatype codes (sparkplug_b.proto, `DataType`)."""

    INT32 = 3
    INT64 = 4
    UINT32 = 7
    UINT64 = 8
    DOUBLE = 10
    BOOLEAN = 11
    STRING = 12
    DATETIME = 13


class MessageType(StrEnum):
    NBIRTH = "NBIRTH"
    NDEATH = "NDEATH"
    NDATA = "NDATA"
    NCMD = "NCMD"
    DBIRTH = "DBIRTH"
    DDEATH = "DDEATH"
    DDATA = "DDATA"
    DCMD = "DCMD"


# OPC DA quality codes as SCADA platforms read a metric's "Quality" property.
QUALITY_GOOD = 192
QUALITY_UNCERTAIN = 64
QUALITY_BAD = 0
OPC_QUALITY: Mapping[Quality, int] = {
    Quality.ACTUAL: QUALITY_GOOD,
    # Measured, but a flag says the number may not be what it seems.
    Quality.SUSPECT: QUALITY_UNCERTAIN,
    # Not measured: a substitute. Usable, never as good as a read.
    Quality.ESTIMATED: QUALITY_UNCERTAIN,
    # No value at all.
    Quality.MISSING: QUALITY_BAD,
}

Value = bool | int | float | str | None


@dataclass(frozen=True, slots=True)
class Property:
    key: str
    datatype: DataType
    value: Value


@dataclass(frozen=True, slots=True, kw_only=True)
class Metric:
    """One metric as edged means it; alias and is_historical are the session's."""

    name: str
    datatype: DataType
    value: Value  # None: is_null on the wire
    timestamp_ms: int | None = None
    properties: tuple[Property, ...] = ()
    alias: int | None = None
    is_historical: bool = False


def next_seq(seq: int) -> int:
    """Sequence numbers run 0..255 and wrap (payload `seq`, and `bdSeq`)."""
    return (seq + 1) % 256


def epoch_ms(at: datetime) -> int:
    """Sparkplug timestamps: milliseconds since 1970 UTC (integral, rounded)."""
    return round(at.timestamp() * 1000)


def topic(group: str, kind: MessageType, node: str, device: str | None = None) -> str:
    base = f"{NAMESPACE}/{group}/{kind}/{node}"
    return base if device is None else f"{base}/{device}"


def state_topic(host_id: str) -> str:
    """Sparkplug 3.0 primary host STATE topic."""
    return f"{NAMESPACE}/STATE/{host_id}"


def host_online(payload: bytes) -> bool | None:
    """A STATE message's `online`, or None if it is not the 3.0 JSON form."""
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    online = data.get("online") if isinstance(data, dict) else None
    return online if isinstance(online, bool) else None


def interval_metric_name(channel: str) -> str:
    return f"interval/{channel}"


def measurement_metric_name(point: str) -> str:
    return f"measurement/{point}"


def interval_metric(record: Interval) -> Metric:
    """An interval record as a metric: value (null when missing), the interval
    end as its timestamp, and edged's quality, flags and identity as properties."""
    quality = flag_table.quality(record.flags)
    flags = flag_table.ordered(record.flags)
    properties = [
        Property("Quality", DataType.INT32, OPC_QUALITY[quality]),
        Property("quality", DataType.STRING, str(quality)),
        Property("flags", DataType.STRING, ",".join(str(f) for f in flags)),
        Property("engUnit", DataType.STRING, record.unit),
        Property("id", DataType.STRING, record.id),
        Property("start", DataType.DATETIME, epoch_ms(record.start)),
        Property("duration_s", DataType.DOUBLE, round(record.duration_s, 3)),
        Property("time_state", DataType.STRING, str(record.time_state)),
    ]
    if record.demand is not None:
        properties.append(Property("demand", DataType.DOUBLE, round(record.demand, 6)))
        properties.append(Property("demand_unit", DataType.STRING, record.demand_unit or ""))
    return Metric(
        name=interval_metric_name(record.channel),
        datatype=DataType.DOUBLE,
        value=None if record.value is None else float(record.value),
        timestamp_ms=epoch_ms(record.end),
        properties=tuple(properties),
    )


def measurement_metrics(values: Mapping[str, float | int | None], at: datetime) -> list[Metric]:
    """Fast-poll values as metrics stamped with the read time (NaN -> null)."""
    at_ms = epoch_ms(at)
    return [
        Metric(
            name=measurement_metric_name(name),
            datatype=DataType.DOUBLE,
            value=None if value is None else float(value),
            timestamp_ms=at_ms,
        )
        for name, value in values.items()
    ]


# -- outbox rows ---------------------------------------------------------------


def row_payload(device: str, metric: Metric) -> bytes:
    """A metric as an outbox row (JSON): encoded with its seq when sent."""
    return json.dumps(
        {
            "schema": ROW_SCHEMA,
            "device": device,
            "name": metric.name,
            "datatype": int(metric.datatype),
            "value": metric.value,
            "timestamp_ms": metric.timestamp_ms,
            "properties": [[p.key, int(p.datatype), p.value] for p in metric.properties],
        },
        separators=(",", ":"),
        allow_nan=False,
    ).encode()


@dataclass(frozen=True, slots=True)
class Row:
    device: str
    metric: Metric


def parse_row(payload: bytes) -> Row | None:
    """An outbox row back as a metric; None when it is not one (logged by the caller)."""
    try:
        data: Any = json.loads(payload)
        if data.get("schema") != ROW_SCHEMA:
            return None
        metric = Metric(
            name=str(data["name"]),
            datatype=DataType(int(data["datatype"])),
            value=data["value"],
            timestamp_ms=None if data["timestamp_ms"] is None else int(data["timestamp_ms"]),
            properties=tuple(
                Property(str(key), DataType(int(dt)), value)
                for key, dt, value in data["properties"]
            ),
        )
        return Row(device=str(data["device"]), metric=metric)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


# -- births ------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeFigures:
    """The gateway's figures published as node metrics (NBIRTH, then NDATA on change)."""

    version: str
    time_state: str
    ntp_offset_s: float | None
    outbox_depth: int | None
    disk_used_bytes: int | None
    disk_free_bytes: int | None
    disk_alarm: str | None


def node_metrics(figures: NodeFigures, at_ms: int) -> list[Metric]:
    """The node's own metrics (without bdSeq and the rebirth control)."""

    def metric(name: str, datatype: DataType, value: Value) -> Metric:
        return Metric(name=name, datatype=datatype, value=value, timestamp_ms=at_ms)

    return [
        metric("Properties/version", DataType.STRING, figures.version),
        metric("time/state", DataType.STRING, figures.time_state),
        metric("time/ntp_offset_s", DataType.DOUBLE, figures.ntp_offset_s),
        metric("outbox/depth", DataType.UINT64, figures.outbox_depth),
        metric("disk/used_bytes", DataType.UINT64, figures.disk_used_bytes),
        metric("disk/free_bytes", DataType.UINT64, figures.disk_free_bytes),
        metric("disk/alarm", DataType.STRING, figures.disk_alarm or ""),
    ]


def node_birth_metrics(bd_seq: int, figures: NodeFigures, at_ms: int) -> list[Metric]:
    """NBIRTH: bdSeq (matching the will's NDEATH), the rebirth control, the figures."""
    return [
        Metric(name=BD_SEQ_METRIC, datatype=DataType.INT64, value=bd_seq, timestamp_ms=at_ms),
        Metric(name=REBIRTH_METRIC, datatype=DataType.BOOLEAN, value=False, timestamp_ms=at_ms),
        *node_metrics(figures, at_ms),
    ]


def death_metrics(bd_seq: int) -> list[Metric]:
    """NDEATH (the will): only bdSeq, so a host can tell which session died."""
    return [Metric(name=BD_SEQ_METRIC, datatype=DataType.INT64, value=bd_seq)]


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceSpec:
    """A Sparkplug device: its interval channels and fast-poll points with units."""

    id: str
    channels: tuple[tuple[str, str], ...]  # (channel, unit)
    points: tuple[tuple[str, str], ...] = ()  # (measurement point, unit)


def device_birth_metrics(spec: DeviceSpec, last: Mapping[str, Metric], at_ms: int) -> list[Metric]:
    """DBIRTH: every metric the device will send, with its datatype and unit;
    the value is the last one sent in this process, or null."""
    metrics = []
    names = [(interval_metric_name(c), u) for c, u in spec.channels]
    names += [(measurement_metric_name(p), u) for p, u in spec.points]
    for name, unit in names:
        seen = last.get(name)
        metrics.append(
            Metric(
                name=name,
                datatype=DataType.DOUBLE,
                value=seen.value if seen is not None else None,
                timestamp_ms=seen.timestamp_ms if seen is not None else at_ms,
                properties=(Property("engUnit", DataType.STRING, unit),),
            )
        )
    return metrics


def alias_table(
    node_names: Sequence[str], devices: Iterable[tuple[str, Sequence[str]]]
) -> dict[tuple[str | None, str], int]:
    """Aliases unique across the edge node (node metrics, then each device's),
    counting from 1 in birth order; (None, name) for node metrics."""
    table: dict[tuple[str | None, str], int] = {}
    for name in node_names:
        table[(None, name)] = len(table) + 1
    for device, names in devices:
        for name in names:
            table[(device, name)] = len(table) + 1
    return table


# -- commands ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommandDecision:
    rebirth: bool
    refused: tuple[str, ...] = field(default=())  # metric names refused


def decide_command(
    kind: MessageType, metrics: Sequence[tuple[str | None, Value]]
) -> CommandDecision:
    """What an NCMD/DCMD asks edged to do: rebirth only on NCMD `Node Control/Rebirth`
    = true; edged writes nothing to meters, so everything else is refused."""
    rebirth = False
    refused = []
    for name, value in metrics:
        if kind is MessageType.NCMD and name == REBIRTH_METRIC and value is True:
            rebirth = True
        else:
            refused.append(name if name is not None else "(alias only)")
    return CommandDecision(rebirth=rebirth, refused=tuple(refused))
