"""Fault tests on loopback: the daemon SIGKILLed at random points and restarted;
the broker SIGKILLed with messages in flight and restarted empty."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import random
import signal
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiomqtt
import pytest

from edged.core.model import parse_iso_utc
from tests.support.config import daemon_config
from tests.support.daemon import Daemon
from tests.support.meters import meter
from tests.support.mqtt import Broker, Collector, by_end, collect, intervals
from tests.support.schema import validate_messages

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KILL_CYCLES = 20


def stored_interval_ids(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {row[0] for row in conn.execute("SELECT id FROM intervals")}


def outbox_interval_ids(db: Path) -> set[str]:
    """Ids of the interval records the daemon has not had a PUBACK for."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT payload FROM outbox WHERE topic LIKE '%/interval/%'")
        return {json.loads(payload)["id"] for (payload,) in rows}


async def test_sigkill_at_random_points_loses_no_interval(
    tmp_path: Path, broker: Broker, ntp_port: int
) -> None:
    rng = random.Random(20261121)
    async with meter() as (_server, port), collect(broker, "edged/+/device/+/interval/#") as got:
        config = daemon_config(tmp_path, broker.port, port, ntp_port)
        async with Daemon(config, tmp_path, autostart=False) as d:
            for _cycle in range(KILL_CYCLES):
                await d.start(wait_ready=False)
                # Kill anywhere: during start-up, reads, commits or publishes.
                await asyncio.sleep(rng.uniform(0.3, 2.6))
                await d.stop(signal.SIGKILL)
            seen_before_last_start = len(intervals(got))
            await d.start()
            # Measured records: on a loaded machine the first read after the
            # restart may close a run of MISSING boundaries all at once.
            await got.wait_for(
                lambda c: (
                    sum(p["value"] is not None for p in intervals(c)[seen_before_last_start:]) >= 3
                ),
                30,
                "the last run to publish measured intervals",
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


UNITS = tuple(range(1, 7))  # six meters: a burst of six intervals each second
MQTT_PUBLISH = 3  # control packet type (high nibble of the first byte)


async def mqtt_packets(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """Whole MQTT control packets off a byte stream, until it ends."""
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        while True:
            packet = await reader.readexactly(1)
            length, scale = 0, 1
            while True:  # remaining length: a base-128 varint
                byte = await reader.readexactly(1)
                packet += byte
                length += (byte[0] & 0x7F) * scale
                scale *= 128
                if not byte[0] & 0x80:
                    break
            yield packet + await reader.readexactly(length)


def interval_publish_id(packet: bytes) -> str | None:
    """The record id of an MQTT 3.1.1 PUBLISH to an interval topic, else None."""
    if packet[0] >> 4 != MQTT_PUBLISH:
        return None
    at = 1
    while packet[at] & 0x80:
        at += 1
    at += 1
    topic_bytes = int.from_bytes(packet[at : at + 2], "big")
    topic = packet[at + 2 : at + 2 + topic_bytes].decode()
    if "/interval/" not in topic:
        return None
    qos = (packet[0] >> 1) & 3
    record: dict[str, str] = json.loads(packet[at + 2 + topic_bytes + (2 if qos else 0) :])
    return record["id"]


class InFlightTrap:
    """The daemon's way to the broker: a TCP relay that can put interval
    messages in flight and keep the daemon out.

    Armed, it stops forwarding the daemon's bytes at the next interval
    PUBLISH: that publish and everything after it was sent by the daemon and
    never reaches the broker, so it is in flight (sent, never acknowledged)
    by construction; `swallowed` has the ids of those records. Shut, it
    refuses connections, as a dead broker's port does. The relay is not part
    of the fault: it only decides which moment the kill hits."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.port = 0
        self.armed = False
        self.swallowed: list[str] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    def shut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[int]:
        await self.open()
        try:
            yield self.port
        finally:
            self.shut()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.broker.host, self.broker.port)
        except OSError:
            writer.close()
            return
        pumps = {
            asyncio.create_task(self._to_broker(reader, up_writer)),
            asyncio.create_task(self._to_daemon(up_reader, writer)),
        }
        self._tasks |= pumps
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            self._tasks -= pumps
            writer.close()
            up_writer.close()

    async def _to_broker(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        swallowing = False
        async for packet in mqtt_packets(reader):
            record_id = interval_publish_id(packet)
            if self.armed and record_id is not None:
                self.armed, swallowing = False, True
            if swallowing:
                if record_id is not None:
                    self.swallowed.append(record_id)
                continue
            writer.write(packet)
            await writer.drain()

    async def _to_daemon(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


class Follower:
    """A consumer that outlives its broker: it reconnects and subscribes again
    (a clean session; a broker restarted without persistence knows nobody)."""

    def __init__(self, broker: Broker, topic_filter: str) -> None:
        self.broker = broker
        self.topic_filter = topic_filter
        self.got = Collector()
        self.subscriptions = 0  # SUBACKs received so far

    async def run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    self.broker.host, self.broker.port, identifier="fault-consumer"
                ) as client:
                    await client.subscribe(self.topic_filter, qos=1)
                    self.subscriptions += 1
                    async for message in client.messages:
                        self.got.add(message)
            except aiomqtt.MqttError:
                await asyncio.sleep(0.05)


def whole_bursts(got: Collector) -> list[str]:
    """Interval ends received from every unit."""
    counts = collections.Counter(p["end"] for p in intervals(got))
    return sorted(end for end, n in counts.items() if n >= len(UNITS))


async def until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.05)


async def test_broker_killed_with_messages_in_flight_loses_no_interval(
    tmp_path: Path, broker: Broker, ntp_port: int
) -> None:
    """Issue 6: the broker dies (SIGKILL, persistence off) while interval
    messages are sent but not acknowledged, and comes back empty on the same
    port. Every interval the daemon built reaches the consumer at least once:
    the outbox keeps each row until its PUBACK and sends it again."""
    db = tmp_path / "state" / "edged.db"
    follower = Follower(broker, "edged/+/device/+/interval/#")
    got = follower.got
    trap = InFlightTrap(broker)
    consumer = asyncio.create_task(follower.run())
    try:
        await until(lambda: follower.subscriptions == 1, 10, "the consumer to subscribe")
        async with meter(UNITS) as (_server, port), trap.serving() as trap_port:
            # The daemon reaches the broker through the trap.
            config = daemon_config(tmp_path, trap_port, port, ntp_port, units=UNITS)
            async with Daemon(config, tmp_path) as d:
                await got.wait_for(lambda c: len(whole_bursts(c)) >= 3, 30, "a steady stream")
                trap.armed = True
                await until(lambda: bool(trap.swallowed), 10, "interval messages in flight")
                await asyncio.sleep(0.3)  # the rest of the publish window
                in_flight = set(trap.swallowed)
                trap.shut()
                await asyncio.to_thread(broker.kill)
                await asyncio.sleep(1.5)  # more intervals built while there is no broker

                # With persistence off the restarted broker drops whatever is
                # published before a subscriber is back, so the consumer
                # subscribes before the daemon may connect again. Everything
                # received from here on was published after the restart.
                await asyncio.to_thread(broker.start)
                await until(lambda: follower.subscriptions == 2, 10, "the consumer's return")
                resumed_at = len(got.messages)
                await trap.open()
                reopened_s = asyncio.get_running_loop().time()

                def delivered() -> set[str]:
                    return {p["id"] for p in intervals(got)}

                await got.wait_for(
                    lambda c: in_flight <= {p["id"] for p in intervals(c)[resumed_at:]},
                    30,
                    "the records in flight to be sent again",
                )
                # The daemon noticed the dropped connection at once and has been
                # retrying since; not only at aiomqtt's 10 s publish timeout.
                resent_after_s = asyncio.get_running_loop().time() - reopened_s
                assert resent_after_s < 6, resent_after_s

                await got.wait_for(
                    lambda c: (
                        stored_interval_ids(db) <= delivered() and len(whole_bursts(c)) >= 3 + 4
                    ),
                    40,
                    "every built interval, and live ones after the restart",
                )
                await until(lambda: not outbox_interval_ids(db), 10, "the outbox to empty")
                assert await d.stop() == 0
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)

    records = intervals(got)
    # What was in flight when the broker died was sent again after the restart.
    assert in_flight
    assert in_flight <= {p["id"] for p in records[resumed_at:]}
    # Every interval built is delivered, or (built in the last instants before
    # the stop) still in the outbox for the next start; duplicates are allowed.
    built = stored_interval_ids(db)
    assert built <= delivered() | outbox_interval_ids(db)
    # Each meter's series has no hole: one record per second, measured or MISSING.
    for unit in UNITS:
        mine = by_end([r for r in records if r["device"] == f"unit{unit}"])
        times = sorted(parse_iso_utc(e) for e in mine)
        assert {(b - a).total_seconds() for a, b in itertools.pairwise(times)} == {1.0}
        for record in mine.values():
            assert (record["value"] is None) == ("MISSING" in record["flags"]), record
    validate_messages(got.messages)
    repeats = collections.Counter(p["id"] for p in records)
    print(
        f"{len(built)} intervals built, {len(in_flight)} in flight at the kill, "
        f"{sum(n > 1 for n in repeats.values())} delivered more than once, "
        f"resent {resent_after_s:.2f} s after the broker was back"
    )
