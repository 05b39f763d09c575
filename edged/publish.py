"""MQTT publisher (aiomqtt): drains the outbox, keeps retained statuses.

An outbox row is deleted only after the broker's PUBACK (aiomqtt's QoS 1
`publish` returns when it arrives), so a broker outage, a dropped connection
or a crash at any point leaves every unacknowledged message in SQLite to be
sent again, oldest first: at-least-once, idempotent by each payload's `id`.

Live data goes first: what was already waiting when a connection came up is
the backlog, drained oldest first beside the live messages at
`mqtt.backlog_rate`, so a long outage neither starves live data nor floods
the broker. Retained statuses are state, not history: only the latest is
kept and it is re-published on every (re)connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aiomqtt
import structlog

from edged.config import Mqtt
from edged.modbus import Backoff
from edged.store import OutboxRow, Store

log = structlog.get_logger("edged.publish")

T = TypeVar("T")

# Messages in flight at once: enough to keep a LAN broker busy, few enough
# that a dropped connection resends little.
PUBLISH_WINDOW = 64
OUTBOX_BATCH = 512
# The backlog's token bucket holds at most this many seconds of its rate.
BACKLOG_BURST_S = 0.5


class CredentialsError(Exception):
    """The configured MQTT password cannot be read (the message says why)."""


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool


def broker_addresses(settings: Mqtt) -> list[BrokerAddress]:
    if not settings.brokers:
        return [BrokerAddress(settings.host, settings.port, settings.tls is not None)]
    addresses = []
    for url in settings.brokers:
        match = re.match(r"^(mqtts?)://([^:/]+)(?::(\d+))?/?$", url)
        assert match is not None  # validated by the config model
        scheme, host, port = match.groups()
        tls = scheme == "mqtts"
        addresses.append(BrokerAddress(host, int(port) if port else (8883 if tls else 1883), tls))
    return addresses


def resolve_password(settings: Mqtt) -> str | None:
    """The password from its file or environment variable; never logged."""
    if settings.password_file is not None:
        try:
            return settings.password_file.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise CredentialsError(
                f"mqtt.password_file {settings.password_file}: {exc.strerror}"
            ) from None
    if settings.password_env is not None:
        value = os.environ.get(settings.password_env)
        if value is None:
            raise CredentialsError(f"mqtt.password_env: ${settings.password_env} is not set")
        return value
    return None


@contextlib.asynccontextmanager
async def _watch_connection(client: aiomqtt.Client) -> AsyncIterator[asyncio.Task[None]]:
    """A task that fails with MqttError when the connection drops.

    aiomqtt fails a QoS 1 publish waiting for its PUBACK only at its timeout
    (10 s), not when the connection drops (a broker that crashed), so live
    data would wait that long for a reconnection. Its message iterator fails
    at once (the publisher subscribes to nothing, so no message arrives)."""

    async def until_dropped() -> None:
        async for _message in client.messages:
            pass

    task = asyncio.create_task(until_dropped())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await task


async def _unless_dropped(work: Awaitable[T], dropped: asyncio.Task[None] | None) -> T:
    """``work``'s result, or MqttError if the connection drops first (``work``
    is then cancelled: rows it did not get acknowledged stay in the outbox)."""
    task = asyncio.ensure_future(work)
    if dropped is None:
        return await task
    try:
        await asyncio.wait((task, dropped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
    if task.cancelled() or not task.done():
        raise aiomqtt.MqttError("connection dropped") from dropped.exception()
    return task.result()


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
        self._password = resolve_password(settings)
        self._brokers = broker_addresses(settings)
        self._broker_index = 0
        self._wake = asyncio.Event()
        self._retained: dict[str, bytes] = {}
        self._retained_dirty: set[str] = set()
        self._stopping = False
        self._backoff = Backoff(first_s=0.2, max_s=10.0)
        self._client_now: aiomqtt.Client | None = None
        self._dropped: asyncio.Task[None] | None = None  # see _watch_connection
        self._fire_and_forget: set[asyncio.Task[None]] = set()

    def wake(self) -> None:
        """Something new is in the outbox."""
        self._wake.set()

    def publish_now(self, topic: str, payload: dict[str, Any]) -> bool:
        """Fire-and-forget QoS 0 (fast-poll measurements): never stored, and
        dropped while disconnected, so they cannot crowd out interval data."""
        client = self._client_now
        if client is None:
            return False
        encoded = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
        task = asyncio.create_task(client.publish(topic, encoded, qos=0))
        self._fire_and_forget.add(task)
        task.add_done_callback(self._fire_and_forget.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return True

    def set_retained(self, topic: str, payload: dict[str, Any]) -> None:
        encoded = json.dumps(payload, separators=(",", ":")).encode()
        if self._retained.get(topic) != encoded:
            self._retained[topic] = encoded
            self._retained_dirty.add(topic)
            self._wake.set()

    async def run(self) -> None:
        while not self._stopping:
            broker = self._brokers[self._broker_index]
            try:
                await self._session(broker)
            except aiomqtt.MqttError as exc:
                self._client_now = None
                if self._stopping:
                    break
                # Fail over: the next broker in the list gets the next attempt.
                self._broker_index = (self._broker_index + 1) % len(self._brokers)
                delay_s = self._backoff.failed()
                log.warning("mqtt disconnected", broker=f"{broker.host}:{broker.port}",
                            error=str(exc), retry_in_s=delay_s)  # fmt: skip
                await self._sleep_or_stop(delay_s)

    async def stop(self, final_retained: dict[str, dict[str, Any]]) -> None:
        """Publish the final statuses (e.g. offline) if connected, then end `run`."""
        for topic, payload in final_retained.items():
            self.set_retained(topic, payload)
        self._stopping = True
        self._wake.set()

    async def _sleep_or_stop(self, delay_s: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=delay_s)

    def _client(self, broker: BrokerAddress) -> aiomqtt.Client:
        settings = self._settings
        tls_params = None
        if broker.tls:
            tls = settings.tls
            tls_params = aiomqtt.TLSParameters(
                ca_certs=str(tls.ca_file) if tls and tls.ca_file else None,
                certfile=str(tls.cert_file) if tls and tls.cert_file else None,
                keyfile=str(tls.key_file) if tls and tls.key_file else None,
            )
        protocol = (
            aiomqtt.ProtocolVersion.V5 if settings.protocol == "5" else aiomqtt.ProtocolVersion.V311
        )
        return aiomqtt.Client(
            broker.host,
            broker.port,
            identifier=self._client_id,
            username=settings.username,
            password=self._password,
            protocol=protocol,
            will=aiomqtt.Will(self._will_topic, self._will_payload, qos=1, retain=True),
            keepalive=int(settings.keepalive),
            timeout=10,
            max_inflight_messages=PUBLISH_WINDOW,
            tls_params=tls_params,
            tls_insecure=bool(settings.tls and settings.tls.insecure) if broker.tls else None,
        )

    async def _session(self, broker: BrokerAddress) -> None:
        loop = asyncio.get_running_loop()
        async with self._client(broker) as client, _watch_connection(client) as dropped:
            self._dropped = dropped
            self._backoff.succeeded()
            log.info("mqtt connected", broker=f"{broker.host}:{broker.port}", tls=broker.tls)
            self._retained_dirty = set(self._retained)  # a new session re-asserts state
            self._client_now = client
            # What is waiting now is backlog; anything committed later is live.
            backlog_end = await self._store.outbox_max_seq()
            backlog_cursor = 0
            live_cursor = backlog_end
            rate = self._settings.backlog_rate
            tokens, refilled_at = 0.0, loop.time()
            while True:
                self._wake.clear()
                await self._publish_retained(client)
                live = await self._store.outbox_batch(OUTBOX_BATCH, after_seq=live_cursor)
                if live:
                    await self._publish_rows(client, live)
                    live_cursor = live[-1].seq
                backlog_pending = backlog_cursor < backlog_end
                if backlog_pending:
                    now = loop.time()
                    tokens = min(rate * BACKLOG_BURST_S, tokens + (now - refilled_at) * rate)
                    refilled_at = now
                    allowed = min(int(tokens), OUTBOX_BATCH)
                    if allowed > 0:
                        rows = await self._store.outbox_batch(
                            allowed, after_seq=backlog_cursor, up_to_seq=backlog_end
                        )
                        if rows:
                            await self._publish_rows(client, rows)
                            backlog_cursor = rows[-1].seq
                            tokens -= len(rows)
                        else:
                            backlog_cursor = backlog_end
                    backlog_pending = backlog_cursor < backlog_end
                if self._stopping:
                    await self._publish_retained(client)
                    self._client_now = None
                    return
                if len(live) == OUTBOX_BATCH:
                    continue
                if backlog_pending:
                    await self._sleep_or_stop(max(0.01, 1.0 / rate))
                else:
                    await self._wake.wait()

    async def _publish_retained(self, client: aiomqtt.Client) -> None:
        while self._retained_dirty:
            topic = self._retained_dirty.pop()
            try:
                await _unless_dropped(
                    client.publish(topic, self._retained[topic], qos=1, retain=True), self._dropped
                )
            except BaseException:
                self._retained_dirty.add(topic)
                raise

    async def _publish_rows(self, client: aiomqtt.Client, rows: Sequence[OutboxRow]) -> None:
        """Publish in windows; delete each row once acknowledged."""
        for start in range(0, len(rows), PUBLISH_WINDOW):
            window = rows[start : start + PUBLISH_WINDOW]
            results = await _unless_dropped(
                asyncio.gather(
                    *(
                        client.publish(r.topic, r.payload, qos=r.qos, retain=r.retain)
                        for r in window
                    ),
                    return_exceptions=True,
                ),
                self._dropped,
            )
            acked = [row.seq for row, result in zip(window, results, strict=True) if result is None]
            await self._store.ack(acked)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
