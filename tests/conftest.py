"""Shared fixtures: a real mosquitto on a free loopback port, an MQTT collector."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from edged.sim.broker import Mosquitto, free_port, mosquitto_path

MOSQUITTO = mosquitto_path()
Broker = Mosquitto


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    if MOSQUITTO is None:
        pytest.fail("mosquitto is not installed (apt-get install -y mosquitto)")
    b = Mosquitto(free_port(), tmp_path)
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
async def ntp_port() -> AsyncIterator[int]:
    """A local NTP server in agreement with the system clock."""
    from edged.sim.ntp import NtpServer

    async with NtpServer(offset_s=0.0) as server:
        yield await server.start("127.0.0.1", 0)


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
