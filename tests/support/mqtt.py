"""An MQTT collector on the real broker, and views of what it received."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edged.core.model import parse_iso_utc
from edged.sim.broker import Mosquitto

Broker = Mosquitto


@dataclass
class Collector:
    """Subscribes to a topic filter and keeps every message it receives."""

    messages: list[tuple[str, dict[str, Any], bool]] = field(default_factory=list)
    _event: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, message: aiomqtt.Message) -> None:
        payload = json.loads(bytes(message.payload))
        self.messages.append((message.topic.value, payload, bool(message.retain)))
        self._event.set()

    def payloads(self, topic_part: str = "") -> list[dict[str, Any]]:
        return [p for t, p, _ in self.messages if topic_part in t]

    async def wait_for(
        self, predicate: Callable[[Collector], bool], timeout_s: float, what: str = "condition"
    ) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not predicate(self):
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
            self._event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), remaining)


@contextlib.asynccontextmanager
async def collect(broker: Broker, topic_filter: str = "#") -> AsyncIterator[Collector]:
    collector = Collector()

    async def receive(client: aiomqtt.Client) -> None:
        async for message in client.messages:
            collector.add(message)

    async with aiomqtt.Client(broker.host, broker.port, identifier=f"test-{id(collector)}") as c:
        await c.subscribe(topic_filter, qos=1)
        task = asyncio.create_task(receive(c))
        try:
            yield collector
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def intervals(collector: Collector) -> list[dict[str, Any]]:
    return collector.payloads("/interval/")


def by_end(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Latest record per interval end (consumers de-duplicate by id)."""
    return {r["end"]: r for r in records}


def series(got: Collector, device: str, channel: str) -> list[dict[str, Any]]:
    """One channel's records, latest per end, in time order."""
    records = [r for r in intervals(got) if r["device"] == device and r["channel"] == channel]
    return sorted(by_end(records).values(), key=lambda r: r["end"])


def events(got: Collector, kind: str) -> list[dict[str, Any]]:
    return [p for p in got.payloads("/gateway/event") if p["kind"] == kind]


def gateway_status(got: Collector) -> list[dict[str, Any]]:
    return [p for t, p, _ in got.messages if t.endswith("/gateway/status")]


def assert_unbroken(records: Sequence[dict[str, Any]], what: str) -> None:
    """Consecutive 1 s intervals, each continuing the previous counter, with no
    MISSING, PARTIAL or LONG after the first record."""
    assert len(records) >= 2, what
    ends = [parse_iso_utc(r["end"]) for r in records]
    gaps = {(b - a).total_seconds() for a, b in itertools.pairwise(ends)}
    assert gaps == {1.0}, (what, [r["end"] for r in records])
    for previous, record in itertools.pairwise(records):
        assert not {"MISSING", "PARTIAL", "LONG"} & set(record["flags"]), (what, record)
        assert record["counter_start"] == previous["counter_end"], (what, record)


@dataclass
class Requester:
    """An upstream system: publishes requests and keeps the answers it receives."""

    client: aiomqtt.Client
    answers: list[tuple[str, dict[str, Any], bytes | None]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def send(
        self,
        topic: str,
        payload: bytes | dict[str, Any],
        *,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        retain: bool = False,
    ) -> None:
        properties = None
        if response_topic is not None:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.ResponseTopic = response_topic
            if correlation is not None:
                properties.CorrelationData = correlation
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        await self.client.publish(topic, data, qos=1, retain=retain, properties=properties)

    def of(self, request_id: str | None) -> list[dict[str, Any]]:
        return [p for _t, p, _c in self.answers if p["request_id"] == request_id]

    async def wait_for(self, request_id: str | None, status: str, timeout_s: float = 10) -> None:
        async with asyncio.timeout(timeout_s):
            while not any(p["status"] == status for p in self.of(request_id)):
                self.arrived.clear()
                await self.arrived.wait()


@contextlib.asynccontextmanager
async def requester(broker: Broker, *answers_on: str, v5: bool = False) -> AsyncIterator[Requester]:
    protocol = aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311
    async with aiomqtt.Client(
        broker.host, broker.port, identifier="upstream", protocol=protocol
    ) as client:
        req = Requester(client)
        for topic_filter in answers_on:
            await client.subscribe(topic_filter, qos=1)

        async def receive() -> None:
            async for message in client.messages:
                props = message.properties
                correlation = getattr(props, "CorrelationData", None) if props else None
                payload = json.loads(bytes(message.payload))
                req.answers.append((message.topic.value, payload, correlation))
                req.arrived.set()

        task = asyncio.create_task(receive())
        try:
            yield req
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
