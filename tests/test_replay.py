"""Replay: `edged replay` (CLI, straight to the broker) and the MQTT replay command
of the daemon (through the outbox), against a real mosquitto and real SQLite.

What is checked: a replayed record is the stored record with `replay: true` (same
id, same seq), exactly the records of the range/device/channel asked for; the
daemon answers accepted/done (or error, and keeps running), drains replays as
backlog behind live data, ignores commands unless enabled, ignores other topics
and retained requests.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml

from edged.app.poller import Recorder, outbox_pending
from edged.app.replay import (
    ReplayCommands,
    RequestError,
    known_channels,
    parse_request,
    response_topic_for,
)
from edged.config.load import load_settings
from edged.core.model import (
    Flag,
    Interval,
    TimeState,
    iso_utc,
    parse_iso_utc,
)
from edged.core.payloads import (
    Topics,
    command_response_payload,
)
from edged.io.mqtt import Publisher
from edged.io.queries import IntervalQuery, connect_readonly, iter_interval_payloads
from edged.io.store import OutboxMessage, Store
from edged.sim.broker import free_port
from tests.support.config import site_config, tcp_device, write_settings
from tests.support.daemon import Daemon
from tests.support.meters import meter
from tests.support.mqtt import Broker, Collector, collect, requester
from tests.support.schema import (
    SchemaViolation,
    validate_message,
    validate_messages,
    validate_payload,
)
from tests.support.store import Populated, edged, populate

NZ = ZoneInfo("Pacific/Auckland")
NOW = datetime(2026, 11, 21, 3, 0, tzinfo=UTC)
KNOWN = {"unit1": frozenset({"energy_import", "energy_export"}), "vm": frozenset({"total"})}
TOPICS = Topics("edged", "s1")


# -- requests (pure) ------------------------------------------------------------------


def request(**fields: Any) -> bytes:
    fields = {"request_id": "r1", "from": "2026-11-21", "to": "2026-11-22", **fields}
    return json.dumps(fields).encode()


def test_a_request_reads_times_like_the_cli() -> None:
    parsed = parse_request(request(device="unit1"), NZ, NOW, KNOWN)
    # local dates in the site zone (NZDT, +13:00)
    assert parsed.start == datetime(2026, 11, 20, 11, 0, tzinfo=UTC)
    assert parsed.end == datetime(2026, 11, 21, 11, 0, tzinfo=UTC)
    assert parsed.devices == ("unit1",)
    assert parsed.channels == ()
    parsed = parse_request(
        request(**{"from": "-2h", "to": "now"}, channel=["total"], device=["vm"]), NZ, NOW, KNOWN
    )
    assert (parsed.start, parsed.end) == (NOW - timedelta(hours=2), NOW)
    assert (parsed.devices, parsed.channels) == (("vm",), ("total",))
    validate_payload("replay_request", json.loads(request(device=["unit1"], channel="total")))


@pytest.mark.parametrize(
    ("payload", "message", "request_id"),
    [
        (b"{not json", "not a JSON object", None),
        (b"\xff\xfe", "not a JSON object", None),
        (b"[1, 2]", "not a JSON object", None),
        (json.dumps({"from": "now", "to": "now"}).encode(), "'request_id' must be", None),
        (request(request_id=""), "'request_id' must be", None),
        (request(request_id="x" * 129), "'request_id' must be", None),
        (request(force=True), "unknown field(s) 'force'", "r1"),
        (request(to=None), "'to' is required", "r1"),
        (request(to="tomorrow-ish"), "is not a time edged understands", "r1"),
        (request(to="2026-09-27 02:30"), "does not exist in Pacific/Auckland", "r1"),
        (request(to="2026-11-20"), "'from' must be before 'to'", "r1"),
        (request(device="unit9"), "unknown device 'unit9'", "r1"),
        (request(device=[]), "'device' must be a name or a non-empty list", "r1"),
        (request(device="unit1", channel="total"), "unknown channel 'total'", "r1"),
    ],
)
def test_malformed_requests_are_refused(
    payload: bytes, message: str, request_id: str | None
) -> None:
    with pytest.raises(RequestError) as caught:
        parse_request(payload, NZ, NOW, KNOWN)
    assert message in str(caught.value)
    assert caught.value.request_id == request_id


@pytest.mark.parametrize(
    "payload",
    [request(request_id=""), request(force=True), request(to=None), request(device=[])],
)
def test_the_request_schema_refuses_what_the_gateway_refuses(payload: bytes) -> None:
    with pytest.raises(SchemaViolation):
        validate_payload("replay_request", json.loads(payload))


def test_response_topics() -> None:
    assert response_topic_for(None, TOPICS) == "edged/s1/gateway/response/replay"
    assert response_topic_for("billing/replies/42", TOPICS) == "billing/replies/42"
    assert response_topic_for("edged/s1/gateway/response/mdm", TOPICS).endswith("/mdm")
    for refused in (
        "edged/s1/device/unit1/interval/energy_import",  # among the records
        "edged/s1/gateway/status",
        "edged/other-site/gateway/response/replay",
        "edged/s1/gateway/command/replay",  # would be a request to itself
        "billing/+/replies",
    ):
        with pytest.raises(RequestError):
            response_topic_for(refused, TOPICS)


def test_responses_validate() -> None:
    start, end = NOW - timedelta(hours=1), NOW
    topic = TOPICS.response("replay")
    for payload in (
        command_response_payload("s1", "replay", "r1", "accepted", count=4, start=start, end=end),
        command_response_payload("s1", "replay", "r1", "done", count=0, start=start, end=end),
        command_response_payload("s1", "replay", None, "error", error="not a JSON object"),
    ):
        assert validate_message(topic, json.loads(json.dumps(payload))) == "command_response"
    with pytest.raises(SchemaViolation):  # an error says why
        validate_payload("command_response", command_response_payload("s1", "replay", "r", "error"))
    with pytest.raises(SchemaViolation):  # a success has a count
        validate_payload("command_response", command_response_payload("s1", "replay", "r", "done"))


def test_known_channels_include_virtual_meters(tmp_path: Path) -> None:
    config = tmp_path / "edged.yaml"
    config.write_text(
        "site: s1\ndevices:\n  - id: unit1\n    transport: {type: tcp, host: 127.0.0.1}\n"
        "    channels: [{name: energy_import, register: 0}]\n"
        "virtual_meters:\n  - id: vm\n    channels: [{name: total, add: [unit1.energy_import]}]\n"
    )
    assert known_channels(load_settings(config)) == {
        "unit1": frozenset({"energy_import"}),
        "vm": frozenset({"total"}),
    }


# -- the store: replays under their original seq --------------------------------------


def record(end: datetime, device: str = "unit1", value: float = 1.5) -> Interval:
    return Interval(
        site="s1",
        device=device,
        channel="energy_import",
        start=end - timedelta(minutes=15),
        end=end,
        duration_s=900.0,
        value=value,
        unit="kWh",
        demand=value * 4,
        demand_unit="kW",
        counter_start=1000,
        counter_end=1000 + int(value * 1000),
        flags=frozenset({Flag.DST}),
        time_state=TimeState.SYNCED,
        read_at=end + timedelta(milliseconds=2),
        read_lateness_ms=2.0,
    )


async def test_a_replay_of_an_unsent_record_is_not_queued_twice(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "edged.db")
    try:
        pending = outbox_pending(store, TOPICS, "s1", [record(NOW), record(NOW, "unit2")], [])
        await store.commit_boundary([], pending.intervals, {}, pending.messages)
        (sent_seq, _), (unsent_seq, unsent) = pending.messages
        await store.ack([sent_seq])
        copies = [
            (seq, OutboxMessage(topic=m.topic, payload=b'{"copy":true}'))
            for seq, m in pending.messages
        ]
        await store.commit_boundary([], [], {}, [], replays=copies)
        rows = await store.outbox_batch(10)
        assert [(r.seq, r.payload) for r in rows] == [
            (sent_seq, b'{"copy":true}'),  # sent before: queued again under its seq
            (unsent_seq, unsent.payload),  # still waiting: sent once, as it is
        ]
        assert await store.outbox_last_seq() == unsent_seq
        query = IntervalQuery(start=NOW - timedelta(hours=1), end=NOW, devices=("unit2",))
        assert await store.count_intervals(query) == 1
        [(_rowid, text)] = await store.interval_payloads(query, 0, 10)
        assert json.loads(text)["seq"] == unsent_seq
    finally:
        await store.close()


# -- the command, in process: copies drain as backlog behind live data ---------------


def replays(got: Collector) -> list[dict[str, Any]]:
    return [p for p in got.payloads("/interval/") if p["replay"]]


def live(got: Collector) -> list[dict[str, Any]]:
    return [p for p in got.payloads("/interval/") if not p["replay"]]


@pytest.mark.integration
async def test_replay_copies_drain_as_backlog_behind_live_data(
    tmp_path: Path, broker: Broker
) -> None:
    """A restart with everything sent (empty outbox), then two requests: the copies
    go out as backlog at `backlog_rate`, and a live record overtakes them."""
    config = write_settings(
        tmp_path / "edged.yaml",
        {
            "site": "s1",
            "timezone": "Pacific/Auckland",
            "storage": {"path": str(tmp_path / "edged.db")},
            "mqtt": {"host": "127.0.0.1", "port": broker.port, "protocol": "5",
                     "backlog_rate": 20, "commands": {"enabled": True, "max_intervals": 100}},
            "devices": [{"id": "unit1", "transport": {"type": "tcp", "host": "127.0.0.1"},
                         "channels": [{"name": "energy_import", "register": 0}]}],
        },
    )  # fmt: skip
    settings = load_settings(config)
    store = await Store.open(settings.storage.path)
    ends = [NOW + timedelta(minutes=15 * i) for i in range(21)]
    # Sent and acknowledged before this "restart": the outbox is empty.
    earlier = outbox_pending(store, TOPICS, "s1", [record(e) for e in ends[:20]], [])
    await store.commit_boundary([], earlier.intervals, {}, earlier.messages)
    await store.ack(seq for seq, _m in earlier.messages)
    stored = {json.loads(p)["id"]: json.loads(p) for _r, p in earlier.intervals}
    publisher = Publisher(settings.mqtt, store, "edged-s1", TOPICS.gateway_status, b"{}")
    recorder = Recorder(store, on_committed=publisher.wake)
    commands = ReplayCommands(
        settings, store, recorder, publisher, TOPICS, lambda: datetime.now(UTC)
    )
    publisher.accept_commands(commands.topic, commands.receive, commands.acked)
    tasks = [asyncio.create_task(t) for t in (recorder.run(), publisher.run(), commands.run())]
    try:
        async with (
            collect(broker, "edged/s1/device/+/interval/#") as got,
            requester(broker, "replies/#", "edged/s1/gateway/response/#", v5=True) as upstream,
        ):
            # ends[5] .. ends[19]: 15 records
            await upstream.send(
                commands.topic,
                {"request_id": "r1", "from": iso_utc(ends[4]), "to": iso_utc(ends[19])},
                response_topic="replies/s1",
                correlation=b"corr-1",
            )
            await upstream.wait_for("r1", "accepted")
            # live data goes out at once, beside the replay (15 at 20/s)
            recorder.submit(outbox_pending(store, TOPICS, "s1", [record(ends[20], value=9.0)], []))
            await upstream.wait_for("r1", "done")
            # A second request once the backlog drained: ends[0] .. ends[2]
            await upstream.send(
                commands.topic,
                {"request_id": "r2", "from": iso_utc(ends[0] - timedelta(minutes=15)),
                 "to": iso_utc(ends[2])},
            )  # fmt: skip
            await upstream.wait_for("r2", "done")
            await got.wait_for(lambda c: len(replays(c)) == 18, 5, "18 replayed records")
            assert (await store.outbox_depth()).count == 0
    finally:
        await publisher.stop({})
        await asyncio.wait_for(tasks[1], 5)
        await recorder.close()
        await tasks[0]
        tasks[2].cancel()
        await store.close()
    copies = replays(got)
    assert [c["id"] for c in copies] == [
        f"s1/unit1/energy_import/{iso_utc(e)}" for e in [*ends[5:20], *ends[0:3]]
    ]
    for copy in copies:
        assert copy == {**stored[copy["id"]], "replay": True}  # same id, same seq
    position = {p["id"]: i for i, (_t, p, _r) in enumerate(got.messages)}
    assert position[f"s1/unit1/energy_import/{iso_utc(ends[20])}"] < position[copies[14]["id"]], (
        "live data waited behind the replay"
    )
    answers = [(t, p["request_id"], p["status"], p["count"], c) for t, p, c in upstream.answers]
    assert answers == [
        ("replies/s1", "r1", "accepted", 15, b"corr-1"),
        ("replies/s1", "r1", "done", 15, b"corr-1"),
        ("edged/s1/gateway/response/replay", "r2", "accepted", 3, None),
        ("edged/s1/gateway/response/replay", "r2", "done", 3, None),
    ]
    for _t, payload, _c in upstream.answers:
        validate_payload("command_response", payload)
    assert upstream.of("r1")[0]["from"] == iso_utc(ends[4])
    assert upstream.of("r1")[0]["to"] == iso_utc(ends[19])


# -- the command in a running daemon ----------------------------------------------------

SITE = "replay-site"


def daemon_config(
    tmp_path: Path, broker: Broker, modbus_port: int, commands: dict[str, Any] | None
) -> Path:
    """unit1 on the simulator; `commands` is the mqtt.commands section, if any."""
    return site_config(
        tmp_path,
        devices=[tcp_device("unit1", modbus_port)],
        mqtt_port=broker.port,
        site=SITE,
        mqtt={"topic_prefix": None, "commands": commands},
        status_every=None,
    )


@pytest.mark.integration
async def test_daemon_answers_replay_requests(tmp_path: Path, broker: Broker) -> None:
    topics = Topics("edged", SITE)
    command = topics.command("replay")
    async with (
        meter() as (_server, port),
        collect(broker, f"edged/{SITE}/device/+/interval/#") as got,
        requester(broker, f"edged/{SITE}/gateway/response/#") as upstream,
    ):
        # A retained request would replay at every reconnect: it is ignored.
        stale = {"request_id": "stale", "from": "-1h", "to": "now"}
        await upstream.send(command, stale, retain=True)
        enabled = {"enabled": True, "max_intervals": 2}
        async with Daemon(daemon_config(tmp_path, broker, port, enabled), tmp_path) as d:
            await got.wait_for(lambda c: len(live(c)) >= 3, 20, "3 intervals")
            first, second = live(got)[:2]
            start = iso_utc(parse_iso_utc(first["end"]) - timedelta(seconds=1))
            await upstream.send(command, {"request_id": "r1", "from": start, "to": second["end"]})
            await upstream.wait_for("r1", "done")
            await got.wait_for(lambda c: len(replays(c)) >= 2, 5, "2 replayed records")
            bad: list[bytes | dict[str, Any]] = [
                b"{not json",
                {"request_id": "r-time", "from": "tomorrow-ish", "to": "now"},
                {"request_id": "r-device", "from": "-1h", "to": "now", "device": "unit9"},
                {"request_id": "r-big", "from": "-1h", "to": "now"},  # > max_intervals
            ]
            for payload in bad:
                await upstream.send(command, payload)
            for topic in (f"{command}/extra", topics.command("other")):
                await upstream.send(topic, {"request_id": "r-other", "from": "-1h", "to": "now"})
            await upstream.wait_for("r-big", "error")
            seen = len(live(got))
            await got.wait_for(lambda c: len(live(c)) >= seen + 1, 5, "polling goes on")
            assert d.process is not None
            assert d.process.returncode is None  # still running
            assert await d.stop() == 0
    assert [(p["status"], p["count"]) for p in upstream.of("r1")] == [("accepted", 2), ("done", 2)]
    assert upstream.of("r1")[0]["from"] == start
    assert upstream.of("r1")[0]["to"] == second["end"]
    copies = replays(got)
    assert [c["id"] for c in copies] == [first["id"], second["id"]]
    assert copies == [{**first, "replay": True}, {**second, "replay": True}]
    errors = {
        p["request_id"]: p["error"] for _t, p, _c in upstream.answers if p["status"] == "error"
    }
    assert "not a JSON object" in errors[None]
    assert "is not a time edged understands" in errors["r-time"]
    assert "unknown device 'unit9'" in errors["r-device"]
    assert "more than mqtt.commands.max_intervals (2)" in errors["r-big"]
    assert upstream.of("stale") == []
    assert upstream.of("r-other") == []
    validate_messages(got.messages)
    validate_messages([(t, p, False) for t, p, _c in upstream.answers])


@pytest.mark.integration
async def test_commands_are_off_by_default(tmp_path: Path, broker: Broker) -> None:
    topics = Topics("edged", SITE)
    async with (
        meter() as (_server, port),
        collect(broker, f"edged/{SITE}/device/+/interval/#") as got,
        requester(broker, f"edged/{SITE}/gateway/response/#") as upstream,
    ):
        config = daemon_config(tmp_path, broker, port, None)
        assert load_settings(config).mqtt.commands.enabled is False
        async with Daemon(config, tmp_path) as d:
            await got.wait_for(lambda c: len(live(c)) >= 1, 20, "an interval")
            request = {"request_id": "r-off", "from": "-1h", "to": "now"}
            await upstream.send(topics.command("replay"), request)
            seen = len(live(got))
            await got.wait_for(lambda c: len(live(c)) >= seen + 2, 10, "2 more intervals")
            assert await d.stop() == 0
    assert upstream.answers == []
    assert replays(got) == []
    assert "accepting commands" not in (tmp_path / "edged.log").read_text()


# -- edged replay -----------------------------------------------------------------------


@pytest.fixture
async def populated(tmp_path: Path) -> Populated:
    return await populate(tmp_path)


def with_broker(populated: Populated, port: int) -> Path:
    settings = yaml.safe_load(populated.config.read_text())
    settings["mqtt"] = {"host": "127.0.0.1", "port": port}
    return write_settings(populated.config.with_name("replay.yaml"), settings)


def stored_in(db: Path, query: IntervalQuery) -> list[dict[str, Any]]:
    conn = connect_readonly(db)
    try:
        return list(iter_interval_payloads(conn, query))
    finally:
        conn.close()


@pytest.mark.integration
async def test_cli_replays_exactly_the_stored_range(populated: Populated, broker: Broker) -> None:
    config = with_broker(populated, broker.port)
    # The local day 2026-09-27 (it starts in NZST and moves to NZDT at 02:00)
    query = IntervalQuery(
        start=datetime(2026, 9, 26, 12, 0, tzinfo=UTC),
        end=datetime(2026, 9, 26, 15, 0, tzinfo=UTC),  # 2026-09-27 04:00 NZDT
        devices=("unit1",),
        channels=("energy_import",),
    )
    expected = stored_in(populated.db, query)
    assert len(expected) >= 8
    async with collect(broker, "edged/cli-site/device/+/interval/#") as got:
        result = await asyncio.to_thread(
            edged, "replay", "-c", str(config), "--from", "2026-09-27",
            "--to", "2026-09-27 04:00", "--device", "unit1", "--channel", "energy_import",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        await got.wait_for(lambda c: len(c.messages) >= len(expected), 10, "the records")
        await asyncio.sleep(0.3)  # nothing else follows
    assert f"published {len(expected)} interval(s) of unit1 (energy_import)" in result.stdout
    assert "every one acknowledged" in result.stdout
    assert result.stderr == ""  # quiet when all is well (no library warnings either)
    assert got.payloads() == [{**p, "replay": True} for p in expected]
    for topic, payload, _r in got.messages:
        assert topic == f"edged/cli-site/device/unit1/interval/{payload['channel']}"
    validate_messages(got.messages)
    # every device and channel, only counted
    everything = stored_in(populated.db, IntervalQuery(start=query.start, end=query.end))
    dry = edged("replay", "-c", str(config), "--from", "2026-09-27", "--to",
                "2026-09-27 04:00", "--dry-run", check=True)  # fmt: skip
    assert f"would replay {len(everything)} interval(s) of all devices" in dry.stdout
    assert len(everything) > len(expected)


@pytest.mark.integration
def test_cli_replay_failures(populated: Populated) -> None:
    config = with_broker(populated, free_port())  # nothing listens there
    for args, code, message in [
        (("--from", "2026-09-27", "--to", "2026-09-28"), 1, "cannot connect to the MQTT broker"),
        (("--from", "2027-01-01", "--to", "2027-01-02"), 1, "nothing to replay"),
        (("--from", "2026-09-27"), 2, "the following arguments are required: --to"),
    ]:
        result = edged("replay", "-c", str(config), *args)
        assert result.returncode == code, (args, result.stdout + result.stderr)
        assert message in result.stderr, args
        assert result.stdout == ""
