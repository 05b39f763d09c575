"""Sparkplug B mapping (edged.core.sparkplug) and wire encoding (edged.io.sparkplug_pb).

Expected values are written by hand: epoch milliseconds counted on paper,
protobuf bytes assembled from the field numbers of the published .proto, and
what edged encodes is read back with Google's protobuf runtime and code
generated from that .proto (tests/sparkplug_decoder.py), never with edged's
own decoder."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from edged.core.model import Flag, Interval, TimeState
from edged.core.sparkplug import (
    DataType,
    DeviceSpec,
    MessageType,
    Metric,
    NodeFigures,
    Property,
    alias_table,
    death_metrics,
    decide_command,
    device_birth_metrics,
    epoch_ms,
    host_online,
    host_state,
    interval_metric,
    measurement_metrics,
    newer_state,
    next_seq,
    node_birth_metrics,
    parse_row,
    row_payload,
    state_topic,
    topic,
)
from edged.io.sparkplug_pb import decode_metrics, decode_payload, encode_payload
from tests import sparkplug_decoder as spb

END = datetime(2026, 11, 21, 0, 15, tzinfo=UTC)
# 2026-01-01 is 56 * 365 + 14 leap days = 20454 days after 1970-01-01; 21 Nov is
# day 304 + 20 of 2026: 20778 days = 1_795_219_200 s, plus 15 minutes.
END_MS = 1_795_220_100_000
START_MS = END_MS - 900_000


def record(flags: frozenset[Flag] = frozenset(), value: float | None = 252.576) -> Interval:
    return Interval(
        site="tekapo-a",
        device="unit1",
        channel="energy_import",
        start=datetime(2026, 11, 21, 0, 0, tzinfo=UTC),
        end=END,
        duration_s=900.0,
        value=value,
        unit="kWh",
        demand=None if value is None else 1010.304,
        demand_unit="kW",
        counter_start=1_000_000,
        counter_end=1_001_754,
        flags=flags,
        time_state=TimeState.SYNCED,
        read_at=END,
        read_lateness_ms=2.1,
    )


def test_seq_and_bdseq_run_0_to_255_and_wrap() -> None:
    assert next_seq(0) == 1
    assert next_seq(254) == 255
    assert next_seq(255) == 0


def test_topics() -> None:
    assert topic("g1", MessageType.NBIRTH, "tekapo-a") == "spBv1.0/g1/NBIRTH/tekapo-a"
    assert topic("g1", MessageType.DDATA, "tekapo-a", "unit1") == "spBv1.0/g1/DDATA/tekapo-a/unit1"
    assert state_topic("scada") == "spBv1.0/STATE/scada"


def test_epoch_ms() -> None:
    assert epoch_ms(END) == END_MS
    assert epoch_ms(datetime(1970, 1, 1, 0, 0, 1, 500_000, tzinfo=UTC)) == 1500


@pytest.mark.parametrize(
    ("flags", "code", "quality"),
    [
        (frozenset(), 192, "actual"),
        (frozenset({Flag.DST, Flag.ROLLOVER}), 192, "actual"),  # information only
        (frozenset({Flag.PARTIAL}), 64, "suspect"),
        (frozenset({Flag.AMT, Flag.ESTIMATED}), 64, "estimated"),
        (frozenset({Flag.MISSING}), 0, "missing"),
    ],
)
def test_interval_quality_as_opc_code(flags: frozenset[Flag], code: int, quality: str) -> None:
    metric = interval_metric(record(flags))
    props = {p.key: p for p in metric.properties}
    assert props["Quality"] == Property("Quality", DataType.INT32, code)
    assert props["quality"].value == quality


def test_interval_metric() -> None:
    metric = interval_metric(record(frozenset({Flag.PARTIAL, Flag.AMT})))
    assert metric.name == "interval/energy_import"
    assert metric.datatype is DataType.DOUBLE
    assert metric.value == 252.576
    assert metric.timestamp_ms == END_MS
    props = {p.key: (p.datatype, p.value) for p in metric.properties}
    assert props["engUnit"] == (DataType.STRING, "kWh")
    assert props["flags"] == (DataType.STRING, "AMT,PARTIAL")  # edged's flag order
    assert props["id"] == (DataType.STRING, "tekapo-a/unit1/energy_import/2026-11-21T00:15:00Z")
    assert props["start"] == (DataType.DATETIME, START_MS)
    assert props["duration_s"] == (DataType.DOUBLE, 900.0)
    assert props["demand"] == (DataType.DOUBLE, 1010.304)
    assert props["demand_unit"] == (DataType.STRING, "kW")


def test_missing_interval_is_null() -> None:
    metric = interval_metric(record(frozenset({Flag.MISSING}), value=None))
    assert metric.value is None
    assert "demand" not in {p.key for p in metric.properties}


def test_measurements_stamped_at_read_time() -> None:
    at = datetime(1970, 1, 1, 0, 0, 2, tzinfo=UTC)
    assert measurement_metrics({"kw": 12, "v": None}, at) == [
        Metric(name="measurement/kw", datatype=DataType.DOUBLE, value=12.0, timestamp_ms=2000),
        Metric(name="measurement/v", datatype=DataType.DOUBLE, value=None, timestamp_ms=2000),
    ]


def test_outbox_row_round_trip() -> None:
    metric = interval_metric(record(frozenset({Flag.PARTIAL})))
    row = parse_row(row_payload("unit1", metric))
    assert row is not None
    assert row.device == "unit1"
    assert row.metric == metric
    assert parse_row(b'{"schema": "edged.interval/1"}') is None
    assert parse_row(b"\x00") is None


FIGURES = NodeFigures(
    version="0.1.0",
    time_state="synced",
    ntp_offset_s=0.0012,
    outbox_depth=3,
    disk_used_bytes=4096,
    disk_free_bytes=None,
    disk_alarm=None,
)


def test_node_birth_and_death_name_the_same_bdseq() -> None:
    birth = node_birth_metrics(7, FIGURES, 1000)
    assert [(m.name, m.datatype, m.value) for m in birth] == [
        ("bdSeq", DataType.INT64, 7),
        ("Node Control/Rebirth", DataType.BOOLEAN, False),
        ("Properties/version", DataType.STRING, "0.1.0"),
        ("time/state", DataType.STRING, "synced"),
        ("time/ntp_offset_s", DataType.DOUBLE, 0.0012),
        ("outbox/depth", DataType.UINT64, 3),
        ("disk/used_bytes", DataType.UINT64, 4096),
        ("disk/free_bytes", DataType.UINT64, None),
        ("disk/alarm", DataType.STRING, ""),
    ]
    assert [(m.name, m.datatype, m.value) for m in death_metrics(7)] == [
        ("bdSeq", DataType.INT64, 7)
    ]


def test_device_birth_declares_every_metric_with_its_unit() -> None:
    spec = DeviceSpec(id="unit1", channels=(("energy_import", "kWh"),), points=(("kw", "kW"),))
    last = {
        "interval/energy_import": Metric(
            name="interval/energy_import", datatype=DataType.DOUBLE, value=1.5, timestamp_ms=5
        )
    }
    births = device_birth_metrics(spec, last, 9)
    assert births == [
        Metric(
            name="interval/energy_import",
            datatype=DataType.DOUBLE,
            value=1.5,
            timestamp_ms=5,
            properties=(Property("engUnit", DataType.STRING, "kWh"),),
        ),
        Metric(
            name="measurement/kw",
            datatype=DataType.DOUBLE,
            value=None,
            timestamp_ms=9,
            properties=(Property("engUnit", DataType.STRING, "kW"),),
        ),
    ]


def test_aliases_unique_across_the_node() -> None:
    table = alias_table(["bdSeq", "x"], [("a", ["interval/e"]), ("b", ["interval/e", "m"])])
    assert table == {
        (None, "bdSeq"): 1,
        (None, "x"): 2,
        ("a", "interval/e"): 3,
        ("b", "interval/e"): 4,
        ("b", "m"): 5,
    }


def test_only_node_rebirth_is_obeyed() -> None:
    rebirth = decide_command(MessageType.NCMD, [("Node Control/Rebirth", True)])
    assert rebirth.rebirth
    assert rebirth.refused == ()
    assert not decide_command(MessageType.NCMD, [("Node Control/Rebirth", False)]).rebirth
    other = decide_command(MessageType.NCMD, [("Node Control/Reboot", True)])
    assert not other.rebirth
    assert other.refused == ("Node Control/Reboot",)
    device = decide_command(MessageType.DCMD, [("Node Control/Rebirth", True), (None, 3)])
    assert not device.rebirth
    assert device.refused == ("Node Control/Rebirth", "(alias only)")


def test_stale_host_state_is_ignored() -> None:
    assert host_state(b'{"online": true, "timestamp": 1700}') == (True, 1700)
    assert host_state(b'{"online": "yes", "timestamp": 1700}') is None
    assert host_state(b'{"online": true, "timestamp": true}') is None
    assert newer_state(None, (False, 5))
    assert newer_state((False, 5), (True, 5))  # same instant: the later message wins
    assert newer_state((True, 5), (False, 6))
    assert not newer_state((True, 6), (False, 5))


def test_host_state() -> None:
    assert host_online(b'{"online": true, "timestamp": 1}') is True
    assert host_online(b'{"online": false, "timestamp": 1}') is False
    assert host_online(b"ONLINE") is None  # Sparkplug 2.2 plain text: not understood
    assert host_online(b"[1]") is None


# -- the wire ------------------------------------------------------------------


def test_encoding_by_hand() -> None:
    metric = Metric(name="a", datatype=DataType.BOOLEAN, value=True)
    # Payload.timestamp (1, varint) = 1; metrics (2, bytes): name (1) "a",
    # datatype (4) = 11, boolean_value (14) = 1; seq (3, varint) = 0.
    expected = bytes.fromhex("0801" + "1207" + "0a0161" + "200b" + "7001" + "1800")
    assert encode_payload([metric], timestamp_ms=1, seq=0, with_datatypes=True) == expected


def test_data_messages_carry_alias_without_name_or_datatype() -> None:
    metric = Metric(name="a", datatype=DataType.DOUBLE, value=0.5, alias=300, timestamp_ms=2)
    # alias (2) 300 = varint ac 02; timestamp (3) = 2; double_value (13, fixed64)
    # 0.5 = 0x3fe0000000000000 little-endian.
    metric_bytes = bytes.fromhex("10ac02" + "1802" + "69" + "000000000000e03f")
    expected = bytes.fromhex("0805" + "12" + f"{len(metric_bytes):02x}") + metric_bytes
    expected += bytes.fromhex("18ff01")  # seq 255
    assert encode_payload([metric], timestamp_ms=5, seq=255, with_datatypes=False) == expected


def test_independent_decoder_reads_what_edged_writes() -> None:
    metric = interval_metric(record(frozenset({Flag.PARTIAL})))
    encoded = encode_payload(
        [metric, *node_birth_metrics(200, FIGURES, 77)],
        timestamp_ms=END_MS,
        seq=42,
        with_datatypes=True,
    )
    payload = spb.decode(encoded)
    assert payload.timestamp == END_MS
    assert payload.seq == 42
    interval, bd_seq, rebirth, version, state, offset, depth, used, free, alarm = payload.metrics
    assert interval.name == "interval/energy_import"
    assert interval.datatype == 10
    assert interval.double_value == 252.576
    assert interval.timestamp == END_MS
    assert not interval.is_historical
    props = spb.properties(interval)
    assert props["Quality"] == (3, 64)
    assert props["quality"] == (12, "suspect")
    assert props["flags"] == (12, "PARTIAL")
    assert props["start"] == (13, START_MS)
    assert props["duration_s"] == (10, 900.0)
    assert (bd_seq.name, bd_seq.datatype, bd_seq.long_value) == ("bdSeq", 4, 200)
    assert (rebirth.datatype, rebirth.boolean_value) == (11, False)
    assert rebirth.HasField("boolean_value")
    assert (version.datatype, version.string_value) == (12, "0.1.0")
    assert state.string_value == "synced"
    assert offset.double_value == 0.0012
    assert (depth.datatype, depth.long_value) == (8, 3)
    assert used.long_value == 4096
    assert free.is_null
    assert free.WhichOneof("value") is None
    assert alarm.string_value == ""


def test_negative_and_historical_values() -> None:
    metrics = [
        Metric(name="i", datatype=DataType.INT32, value=-2, is_historical=True),
        Metric(name="l", datatype=DataType.INT64, value=-3),
    ]
    payload = spb.decode(encode_payload(metrics, timestamp_ms=0, seq=None, with_datatypes=True))
    assert not payload.HasField("seq")
    i, long_ = payload.metrics
    assert i.is_historical
    # Sparkplug sends signed integers in the unsigned fields, two's complement.
    assert i.int_value == 2**32 - 2
    assert long_.long_value == 2**64 - 3


def test_commands_written_by_a_host_are_read() -> None:
    encoded = spb.command(
        [("Node Control/Rebirth", spb.BOOLEAN, True), ("x", spb.DOUBLE, 1.25)], 1234
    )
    received = decode_metrics(encoded)
    assert [(m.name, m.value) for m in received] == [("Node Control/Rebirth", True), ("x", 1.25)]


def test_decoder_reads_seq_timestamps_and_properties_written_by_protobuf() -> None:
    pb = spb.generated()
    payload = pb.Payload(timestamp=1, seq=17)
    metric = payload.metrics.add(alias=12, timestamp=END_MS, is_historical=True)
    metric.double_value = 2.5
    metric.properties.keys.extend(["Quality", "engUnit"])
    metric.properties.values.add(type=3, int_value=64)
    metric.properties.values.add(type=12, string_value="kWh")
    decoded = decode_payload(payload.SerializeToString())
    assert decoded.seq == 17
    (got,) = decoded.metrics
    assert (got.name, got.alias, got.value, got.timestamp_ms) == (None, 12, 2.5, END_MS)
    assert got.is_historical
    assert got.properties == (("Quality", 64), ("engUnit", "kWh"))


async def test_sparkplug_rows_share_the_commit_and_only_their_session_sees_them(
    tmp_path: Path,
) -> None:
    """The recorder's tap queues a Sparkplug row per record in the record's own
    transaction, after its JSON row; each publisher's batch holds only its rows."""
    from edged.app.poller import Recorder, outbox_pending
    from edged.core.payloads import Topics
    from edged.io.store import OutboxMessage, Store

    store = await Store.open(tmp_path / "edged.db")
    try:

        def tap(records: Sequence[Interval]) -> list[OutboxMessage]:
            return [
                OutboxMessage(
                    topic="spBv1.0/g/DDATA/tekapo-a/unit1",
                    payload=row_payload("unit1", interval_metric(r)),
                )
                for r in records
            ]

        recorder = Recorder(store, on_committed=lambda: None, tap=tap)
        running = asyncio.create_task(recorder.run())
        topics = Topics("edged", "tekapo-a")
        recorder.submit(outbox_pending(store, topics, "tekapo-a", [record()], []))
        await recorder.flush()
        await recorder.close()
        await running
        json_rows = await store.outbox_batch(10)
        sparkplug_rows = await store.outbox_batch(10, sparkplug=True)
        assert [(r.seq, r.topic) for r in json_rows] == [
            (1, "edged/tekapo-a/device/unit1/interval/energy_import")
        ]
        assert [(r.seq, r.topic) for r in sparkplug_rows] == [(2, "spBv1.0/g/DDATA/tekapo-a/unit1")]
        row = parse_row(sparkplug_rows[0].payload)
        assert row is not None
        assert row.metric.value == 252.576
        assert row.metric.timestamp_ms == END_MS
        assert (await store.outbox_depth()).count == 2
        # Sparkplug switched off: its rows go, the JSON record stays.
        assert await store.drop_sparkplug_rows() == 1
        assert [r.seq for r in await store.outbox_batch(10)] == [1]
        assert await store.outbox_batch(10, sparkplug=True) == []
    finally:
        await store.close()


def test_sparkplug_config(tmp_path: Path) -> None:
    from edged.config.load import ConfigError, load_settings
    from tests.support.config import GOOD, write

    settings = load_settings(write(tmp_path, GOOD))
    assert not settings.sparkplug.enabled  # off unless asked for
    assert settings.sparkplug.group_id == "edged"
    assert settings.sparkplug.edge_node_id is None  # the site
    on = GOOD + "sparkplug: {enabled: true, group_id: substations, primary_host_id: scada}\n"
    sparkplug = load_settings(write(tmp_path, on)).sparkplug
    assert (sparkplug.enabled, sparkplug.group_id, sparkplug.primary_host_id) == (
        True,
        "substations",
        "scada",
    )
    with pytest.raises(ConfigError) as bad_group:
        load_settings(write(tmp_path, GOOD + "sparkplug: {enabled: true, group_id: a/b}\n"))
    assert "sparkplug.group_id" in str(bad_group.value.problems[0])
    clash = GOOD.replace("  topic_prefix: edged\n", "  topic_prefix: edged\n  client_id: gw1\n")
    clash += "sparkplug: {enabled: true, client_id: gw1}\n"
    with pytest.raises(ConfigError) as same_id:
        load_settings(write(tmp_path, clash))
    assert "must differ from mqtt.client_id" in str(same_id.value.problems[0])
    with pytest.raises(ConfigError) as nowhere:
        load_settings(write(tmp_path, GOOD + "sparkplug: {json_data: false}\n"))
    assert "needs sparkplug.enabled" in str(nowhere.value.problems[0])


async def test_sparkplug_instead_of_json_rows_take_the_records_seqs(tmp_path: Path) -> None:
    """json_data false: each record's outbox row is its Sparkplug row, under the
    seq its stored payload names (so "unsent" still finds it); events stay JSON."""
    from edged.app.poller import Recorder, outbox_pending
    from edged.core.model import Event
    from edged.core.payloads import Topics
    from edged.io.store import OutboxMessage, Store

    store = await Store.open(tmp_path / "edged.db")
    try:

        def tap(records: Sequence[Interval]) -> list[OutboxMessage]:
            return [
                OutboxMessage(
                    topic=f"spBv1.0/g/DDATA/n/{r.device}",
                    payload=row_payload(r.device, interval_metric(r)),
                )
                for r in records
            ]

        recorder = Recorder(store, on_committed=lambda: None, tap=tap, tap_replaces=True)
        running = asyncio.create_task(recorder.run())
        event = Event(device=None, kind="test", at=END, message="m")
        later = record(value=1.0)
        pending = outbox_pending(
            store, Topics("edged", "tekapo-a"), "tekapo-a", [record(), later], [event]
        )
        recorder.submit(pending)
        await recorder.flush()
        await recorder.close()
        await running
        sparkplug_rows = await store.outbox_batch(10, sparkplug=True)
        assert [(r.seq, r.topic) for r in sparkplug_rows] == [
            (1, "spBv1.0/g/DDATA/n/unit1"),
            (2, "spBv1.0/g/DDATA/n/unit1"),
        ]
        values = [row.metric.value for r in sparkplug_rows if (row := parse_row(r.payload))]
        assert values == [252.576, 1.0]
        assert [(r.seq, r.topic) for r in await store.outbox_batch(10)] == [
            (3, "edged/tekapo-a/gateway/event")
        ]
    finally:
        await store.close()
