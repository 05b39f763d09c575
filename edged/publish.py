"""MQTT publisher (aiomqtt): drains the outbox, keeps retained statuses.

An outbox row is deleted only after the broker's PUBACK (aiomqtt's QoS 1
`publish` returns when it arrives), so a broker outage, a dropped connection
or a crash at any point leaves every unacknowledged message in SQLite to be
sent again, oldest first: at-least-once, idempotent by each payload's `id`.
Retained statuses are state, not history: only the latest is kept and it is
re-published on every (re)connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

import aiomqtt
import structlog

from edged.config import Mqtt
from edged.modbus import Backoff
from edged.store import OutboxRow, Store

log = structlog.get_logger("edged.publish")

# Messages in flight at once while draining: enough to keep a loopback or LAN
# broker busy, small enough that a dropped connection resends little.
PUBLISH_WINDOW = 64
OUTBOX_BATCH = 512


class Publisher:
    def __init__(
        self,
        settings: Mqtt,
        store: Store,
        client_id: str,
        will_topic: str,
        will_payload: bytes,
    ) -> None:
        self._settings = settings
        self._store = store
        self._client_id = client_id
        self._will_topic = will_topic
        self._will_payload = will_payload
        self._wake = asyncio.Event()
        self._retained: dict[str, bytes] = {}
        self._retained_dirty: set[str] = set()
        self._stopping = False
        self._backoff = Backoff(first_s=0.2, max_s=10.0)
        self.connected = False
        self.published_count = 0
        self.on_connection_change: Callable[[bool], None] | None = None

    def wake(self) -> None:
        """Something new is in the outbox."""
        self._wake.set()

    def set_retained(self, topic: str, payload: dict[str, Any]) -> None:
        encoded = json.dumps(payload, separators=(",", ":")).encode()
        if self._retained.get(topic) != encoded:
            self._retained[topic] = encoded
            self._retained_dirty.add(topic)
            self._wake.set()

    async def run(self) -> None:
        while not self._stopping:
            try:
                await self._session()
            except aiomqtt.MqttError as exc:
                self._set_connected(False)
                if self._stopping:
                    break
                delay_s = self._backoff.failed()
                log.warning("mqtt disconnected", error=str(exc), retry_in_s=delay_s)
                await self._sleep_or_stop(delay_s)

    async def stop(self, final_retained: dict[str, dict[str, Any]]) -> None:
        """Publish the final statuses (e.g. offline) if connected, then end `run`."""
        for topic, payload in final_retained.items():
            self.set_retained(topic, payload)
        self._stopping = True
        self._wake.set()

    def _set_connected(self, connected: bool) -> None:
        if connected != self.connected:
            self.connected = connected
            if self.on_connection_change is not None:
                self.on_connection_change(connected)

    async def _sleep_or_stop(self, delay_s: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=delay_s)

    async def _session(self) -> None:
        settings = self._settings
        will = aiomqtt.Will(self._will_topic, self._will_payload, qos=1, retain=True)
        async with aiomqtt.Client(
            settings.host,
            settings.port,
            identifier=self._client_id,
            will=will,
            keepalive=int(settings.keepalive),
            timeout=10,
            max_inflight_messages=PUBLISH_WINDOW,
        ) as client:
            self._backoff.succeeded()
            log.info("mqtt connected", host=settings.host, port=settings.port)
            self._retained_dirty = set(self._retained)  # a new session re-asserts state
            self._set_connected(True)
            while True:
                self._wake.clear()
                await self._publish_retained(client)
                drained_all = await self._drain(client)
                if self._stopping:
                    await self._publish_retained(client)
                    return
                if drained_all:
                    await self._wake.wait()

    async def _publish_retained(self, client: aiomqtt.Client) -> None:
        while self._retained_dirty:
            topic = self._retained_dirty.pop()
            try:
                await client.publish(topic, self._retained[topic], qos=1, retain=True)
            except BaseException:
                self._retained_dirty.add(topic)
                raise

    async def _drain(self, client: aiomqtt.Client) -> bool:
        """Publish a batch from the outbox; True when the outbox is empty."""
        rows = await self._store.outbox_batch(OUTBOX_BATCH)
        for start in range(0, len(rows), PUBLISH_WINDOW):
            window = rows[start : start + PUBLISH_WINDOW]
            results = await asyncio.gather(
                *(self._publish_row(client, row) for row in window), return_exceptions=True
            )
            acked = [row.seq for row, result in zip(window, results, strict=True) if result is None]
            await self._store.ack(acked)
            self.published_count += len(acked)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        return len(rows) < OUTBOX_BATCH

    @staticmethod
    async def _publish_row(client: aiomqtt.Client, row: OutboxRow) -> None:
        await client.publish(row.topic, row.payload, qos=row.qos, retain=row.retain)
