"""Shared fixtures: a real mosquitto on a free loopback port, an MQTT collector."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Broker:
    """A mosquitto process that tests may stop and start again on the same port."""

    port: int
    workdir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def start(self) -> None:
        assert MOSQUITTO is not None
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "max_queued_messages 100000\n"
            f"log_dest file {self.workdir / 'mosquitto.log'}\n"
        )
        self.process = subprocess.Popen(
            [MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), 0.2),
            ):
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.process.returncode}")
            time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    if MOSQUITTO is None:
        pytest.fail("mosquitto is not installed (apt-get install -y mosquitto)")
    b = Broker(free_port(), tmp_path)
    b.start()
    try:
        yield b
    finally:
        b.stop()


@dataclass
class Collector:
    """Subscribes to a topic filter and keeps every message it receives."""

    messages: list[tuple[str, dict[str, Any], bool]] = field(default_factory=list)
    _event: asyncio.Event = field(default_factory=asyncio.Event)

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
            payload = json.loads(bytes(message.payload))
            collector.messages.append((message.topic.value, payload, bool(message.retain)))
            collector._event.set()

    async with aiomqtt.Client(broker.host, broker.port, identifier=f"test-{id(collector)}") as c:
        await c.subscribe(topic_filter, qos=1)
        task = asyncio.create_task(receive(c))
        try:
            yield collector
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
