"""The JSON Schemas in edged/schemas/ against the payload builders, and end to end.

The schemas are the MQTT contract for consumers; these tests keep them and
the code in step: every payload the builders produce validates, nothing else
does (closed objects, enums from edged.core.flags / edged.core.model), and every
message a real daemon publishes validates (`tests.support.schema`).
"""

from __future__ import annotations

import json
import signal
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edged.app.app import App
from edged.app.poller import DeviceHealth
from edged.config.load import load_settings
from edged.core import flags as flag_table
from edged.core.model import Event, Flag, Interval, Quality, TimeState
from edged.core.payloads import Topics, encode, event_payload, interval_payload
from edged.io.store import OutboxDepth
from edged.sim.faults import Fault
from edged.sim.meter import MeterServer, SimulatedMeter
from tests.support.config import site_config, tcp_device
from tests.support.daemon import Daemon
from tests.support.mqtt import Broker, Collector, collect
from tests.support.schema import (
    SCHEMA_NAMES,
    SchemaViolation,
    load_schema,
    schema_for_topic,
    validate_message,
    validate_messages,
    validate_payload,
)
from tests.support.store import populate, write_cli_config

TOPICS = Topics("edged", "cli-site")


def received(payload: dict[str, Any]) -> dict[str, Any]:
    """What a consumer gets: the payload through its JSON encoding."""
    decoded: dict[str, Any] = json.loads(encode(payload))
    return decoded


def interval_topic(p: dict[str, Any]) -> str:
    return TOPICS.interval(p["device"], p["channel"])


# -- the schema files -----------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_schema_is_valid_draft_2020_12(name: str) -> None:
    import jsonschema  # type: ignore[import-untyped,unused-ignore]

    schema = load_schema(name)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


def test_enums_come_from_the_code() -> None:
    props = load_schema("interval")["properties"]
    assert props["flags"]["items"]["enum"] == [str(f) for f in Flag]
    assert props["quality"]["enum"] == [str(q) for q in Quality]
    assert props["time_state"]["enum"] == [str(t) for t in TimeState]
    codes = {info.iee for info in flag_table.FLAG_TABLE if info.iee is not None}
    assert set(props["iee_status"]["items"]["enum"]) == codes
    status = load_schema("gateway_status")["$defs"]["status"]["properties"]
    assert status["time_state"]["enum"] == [str(t) for t in TimeState]
    from edged.core.time.settings import TimeSource

    assert set(status["time_source"]["enum"]) == {str(s) for s in TimeSource}


def _interval(**changes: Any) -> Interval:
    end = datetime(2026, 11, 21, 0, 15, tzinfo=UTC)
    base = Interval(
        site="cli-site",
        device="unit1",
        channel="energy_import",
        start=end - timedelta(minutes=15),
        end=end,
        duration_s=900.0,
        value=252.576,
        unit="kWh",
        demand=1010.304,
        demand_unit="kW",
        counter_start=1_000_000,
        counter_end=1_001_754,
        flags=frozenset({Flag.DST}),
        time_state=TimeState.SYNCED,
        read_at=end + timedelta(milliseconds=2),
        read_lateness_ms=2.1,
    )
    return replace(base, **changes)


def test_interval_schema_lists_exactly_the_payload_fields() -> None:
    schema = load_schema("interval")
    plain = interval_payload(_interval(), 1)
    assert set(schema["required"]) == set(plain)
    compensation = {"params_hash": "0123456789abcdef", "source_channel": "energy_export",
                    "raw_value": 10.0}  # fmt: skip
    full = interval_payload(
        _interval(original_value=12.5, rolling_demand=990.0, compensation=compensation),
        1,
        store_id="0123456789abcdef" * 2,
    )
    assert set(schema["properties"]) == set(full)
    assert schema["additionalProperties"] is False


# -- payloads built by the code validate ----------------------------------------------


async def test_engine_records_validate(tmp_path: Path) -> None:
    populated = await populate(tmp_path)
    seen_flags: set[str] = set()
    for seq, record in enumerate(populated.records, start=1):
        payload = received(interval_payload(record, seq))
        assert validate_message(interval_topic(payload), payload) == "interval"
        seen_flags.update(payload["flags"])
    assert {"PARTIAL", "LONG", "MISSING", "ROLLOVER", "DST"} <= seen_flags


def test_estimated_record_with_original_value_validates() -> None:
    record = _interval(
        flags=frozenset({Flag.AMT, Flag.ESTIMATED}),
        value=0.0,
        demand=None,
        original_value=42.0,
        time_state=TimeState.ASSUMED,
    )
    payload = received(interval_payload(record, 7, replay=True))
    validate_message(interval_topic(payload), payload)
    assert payload["quality"] == "estimated"


_ident = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,12}", fullmatch=True)
_times = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)
_number = st.floats(allow_nan=False, allow_infinity=False)
_counter = st.one_of(st.none(), st.integers(0, 2**64), _number)


@st.composite
def intervals(draw: st.DrawFn) -> Interval:
    end = draw(_times).replace(microsecond=0)
    duration = draw(st.floats(0, 86_400 * 3, allow_nan=False))
    return Interval(
        site=draw(_ident),
        device=draw(_ident),
        channel=draw(_ident),
        start=end - timedelta(seconds=draw(st.sampled_from([1, 60, 900, 1800, 3600]))),
        end=end,
        duration_s=duration,
        value=draw(st.one_of(st.none(), _number)),
        unit=draw(st.sampled_from(["kWh", "Wh", "kvarh", "m3"])),
        demand=draw(st.one_of(st.none(), _number)),
        demand_unit=draw(st.sampled_from(["kW", "W", "kvar", None])),
        counter_start=draw(_counter),
        counter_end=draw(_counter),
        flags=draw(st.frozensets(st.sampled_from(list(Flag)))),
        time_state=draw(st.sampled_from(list(TimeState))),
        read_at=draw(st.one_of(st.none(), _times)),
        read_lateness_ms=draw(st.one_of(st.none(), _number)),
        original_value=draw(st.one_of(st.none(), _number)),
        rolling_demand=draw(st.one_of(st.none(), _number)),
    )


@given(intervals(), st.integers(1, 2**53), st.booleans())
def test_any_interval_payload_validates(record: Interval, seq: int, replay: bool) -> None:
    payload = received(interval_payload(record, seq, replay=replay))
    topic = Topics("edged/north/island", record.site).interval(record.device, record.channel)
    validate_message(topic, payload)


_scalars = st.none() | st.booleans() | st.integers(-(2**31), 2**31) | _number | st.text(max_size=9)
_json_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


@given(
    st.one_of(st.none(), _ident),
    st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True),
    _times,
    st.text(max_size=40),
    st.dictionaries(st.text(max_size=8), _json_values, max_size=4),
    st.integers(1, 2**53),
)
def test_any_event_payload_validates(
    device: str | None, kind: str, at: datetime, message: str, details: dict[str, Any], seq: int
) -> None:
    event = Event(device=device, kind=kind, at=at, message=message, details=details)
    payload = received(event_payload(event, "cli-site", seq))
    assert validate_message(TOPICS.event(device), payload) == "event"


def _app(tmp_path: Path) -> App:
    config = write_cli_config(tmp_path / "edged.yaml", tmp_path / "edged.db")
    return App(load_settings(config), config)


def test_gateway_status_payloads_validate(tmp_path: Path) -> None:
    app = _app(tmp_path)
    topic = app.topics.gateway_status
    validate_message(topic, received(app.gateway_status("online")), retained=True)
    oldest = datetime.now(UTC) - timedelta(seconds=42)
    payload = received(app.gateway_status("offline", OutboxDepth(3, oldest)))
    validate_message(topic, payload, retained=True)
    assert payload["outbox_depth"] == 3
    empty = received(app.gateway_status("online", OutboxDepth(0, None)))
    validate_message(topic, empty)
    # The last will (edged.app.app.App.run) is the short form.
    will = {
        "schema": "edged.gateway_status/1",
        "site": "cli-site",
        "state": "offline",
        "version": "0.1.0",
    }
    validate_message(topic, will, retained=True)
    with pytest.raises(SchemaViolation):
        validate_message(topic, {**will, "state": "online"})


def test_device_status_payloads_validate(tmp_path: Path) -> None:
    app = _app(tmp_path)
    topic = app.topics.device_status("unit1")
    healths = [
        DeviceHealth(),
        DeviceHealth(last_good_read=datetime.now(UTC), reads=5),
        DeviceHealth(
            last_good_read=datetime.now(UTC),
            last_error="timeout: no response",
            consecutive_errors=2,
            reads=9,
            errors=2,
        ),
    ]
    comms = []
    for health in healths:
        payload = received(app._device_status("unit1", health))
        validate_message(topic, payload, retained=True)
        comms.append(payload["comms"])
    assert comms == ["unknown", "online", "offline"]


def test_peak_payloads_validate() -> None:
    from edged.core.demand import Peak, PeakState
    from edged.core.payloads import peak_payload

    start = datetime(2026, 11, 1, 0, 0, tzinfo=UTC)
    best = Peak(1010.304, start, start + timedelta(minutes=15))
    states = [
        PeakState(),
        PeakState(
            period_start=start, period_end=start + timedelta(days=30), block=best, rolling=None
        ),
        PeakState(
            period_start=start,
            period_end=start + timedelta(days=30),
            block=best,
            rolling=Peak(990.5, start, start + timedelta(minutes=30)),
        ),
    ]
    topic = TOPICS.peak("unit1", "energy_import")
    for state in states:
        payload = received(peak_payload("cli-site", "unit1", "energy_import", "kW", state))
        assert validate_message(topic, payload, retained=True) == "peak"


# -- and nothing else does ------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"extra": 1}, "Additional properties"),
        ({"flags": ["POWER_OUTAGE"]}, "flags/0"),
        ({"flags": ["DST", "DST"]}, "non-unique"),
        ({"quality": "good"}, "quality"),
        ({"time_state": "unknown"}, "time_state"),
        ({"schema": "edged.interval/2"}, "schema"),
        ({"end": "2026-11-21T13:15:00+13:00"}, "end"),
        ({"read_at": "2026-11-21T00:15:61Z"}, "read_at"),
        ({"seq": 0}, "seq"),
        ({"value": "252.576"}, "value"),
        ({"rolling_demand": None}, "rolling_demand"),
    ],
)
def test_interval_schema_rejects(change: dict[str, Any], where: str) -> None:
    payload = {**received(interval_payload(_interval(), 1)), **change}
    with pytest.raises(SchemaViolation, match=where):
        validate_payload("interval", payload)


def test_missing_field_is_rejected() -> None:
    payload = received(interval_payload(_interval(), 1))
    del payload["counter_end"]
    with pytest.raises(SchemaViolation, match="'counter_end' is a required property"):
        validate_payload("interval", payload)


def test_payload_must_agree_with_its_topic() -> None:
    payload = received(interval_payload(_interval(), 1))
    with pytest.raises(SchemaViolation, match="device 'unit1' is not the topic's 'unit2'"):
        validate_message(TOPICS.interval("unit2", "energy_import"), payload)
    with pytest.raises(SchemaViolation, match="id"):
        validate_message(interval_topic(payload), {**payload, "id": "x/y/z/2026-11-21T00:00:00Z"})
    with pytest.raises(SchemaViolation, match="never retained"):
        validate_message(interval_topic(payload), payload, retained=True)
    event = received(
        event_payload(
            Event(device="unit1", kind="clock_step", at=datetime.now(UTC), message="m"),
            "cli-site",
            1,
        )
    )
    with pytest.raises(SchemaViolation, match="gateway event must have device null"):
        validate_message(TOPICS.event(None), {**event, "id": event["id"]})


@pytest.mark.parametrize(
    ("topic", "name"),
    [
        ("edged/s/gateway/status", "gateway_status"),
        ("edged/s/gateway/event", "event"),
        ("a/b/c/s/device/d/status", "device_status"),
        ("edged/s/device/d/event", "event"),
        ("edged/s/device/d/interval/energy_import", "interval"),
        ("edged/s/device/d/peak/energy_import", "peak"),
        ("edged/s/gateway/response/replay", "command_response"),
    ],
)
def test_topic_to_schema(topic: str, name: str) -> None:
    assert schema_for_topic(topic)[0] == name


def test_topic_without_schema_is_an_error() -> None:
    with pytest.raises(SchemaViolation, match="no schema for topic"):
        schema_for_topic("edged/s/device/d/unknown")


# -- end to end -----------------------------------------------------------------------

KWH_PER_COUNT = 0.001


def write_config(tmp_path: Path, broker: Broker, modbus_port: int) -> Path:
    return site_config(
        tmp_path,
        devices=[
            tcp_device("unit1", modbus_port, timeout="300ms"),
            tcp_device("unit2", modbus_port, unit=2, timeout="300ms", profile="pmc-1"),
        ],
        mqtt_port=broker.port,
        site="schema-site",
        mqtt={"topic_prefix": "edged/test", "keepalive": "5s"},
    )


def _states(got: Collector, topic_part: str) -> list[str]:
    return [str(p.get("state", p.get("comms"))) for t, p, _ in got.messages if topic_part in t]


@pytest.mark.integration
async def test_every_message_of_a_running_daemon_validates(tmp_path: Path, broker: Broker) -> None:
    """Intervals (regular, and MISSING across a meter outage), device online and
    offline, events, gateway online, the last will after SIGKILL, and the offline
    status of a clean stop."""
    meters = {
        1: SimulatedMeter.pmc1(load_kw=3600.0, kwh_per_count=KWH_PER_COUNT, initial_counts=10_000),
        2: SimulatedMeter.pmc1(load_kw=1000.0, kwh_per_count=0.144, initial_counts=1_000_000),
    }
    async with MeterServer(meters) as server, collect(broker, "edged/test/#") as got:
        config = write_config(tmp_path, broker, await server.start_tcp("127.0.0.1", 0))
        async with Daemon(config, tmp_path) as first:
            await got.wait_for(lambda c: len(c.payloads("/interval/")) >= 4, 20, "intervals")
            meters[2].set_fault(Fault.silent(), for_s=2.5)  # unit2 goes quiet
            await got.wait_for(lambda c: "offline" in _states(c, "unit2/status"), 10, "offline")
            await got.wait_for(
                lambda c: _states(c, "unit2/status")[-1] == "online", 15, "unit2 back online"
            )
            await first.stop(signal.SIGKILL)  # the broker publishes the last will
        await got.wait_for(
            lambda c: any(len(p) == 4 for p in c.payloads("gateway/status")), 10, "last will"
        )
        before_restart = len(got.payloads("/interval/"))
        async with Daemon(config, tmp_path) as second:
            await got.wait_for(
                lambda c: len(c.payloads("/interval/")) >= before_restart + 4, 20, "restart"
            )
            assert await second.stop(signal.SIGTERM) == 0
        await got.wait_for(
            lambda c: _states(c, "gateway/status")[-1] == "offline", 10, "offline status"
        )
    counts = validate_messages(got.messages)
    assert set(counts) >= {"interval", "gateway_status", "device_status"}, counts
    flags = {f for p in got.payloads("/interval/") for f in p["flags"]}
    assert "MISSING" in flags, flags  # unit2's outage
    gateway = got.payloads("gateway/status")
    assert any(len(p) == 4 and p["state"] == "offline" for p in gateway)  # the will
    assert gateway[-1]["state"] == "offline"
    assert "uptime_s" in gateway[-1]  # the full status of a clean stop
    print(f"validated {sum(counts.values())} messages: {counts}")
