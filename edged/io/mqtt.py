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

With commands enabled the session also subscribes to the one command topic and
hands each request to the command handler; answers are published QoS 1 as
they come (kept in memory across a reconnect, never stored). Replayed records
are outbox rows under their original seq, below the live cursor: they are
announced with `backlog_added` and drained as backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edged.config.schema import Mqtt
from edged.core.backoff import Backoff
from edged.core.errors import EdgedError
from edged.core.payloads import encode
from edged.io.brokerdiag import explain_connect_error
from edged.io.paho_window import (
    PUBLISH_TIMEOUT_S,
    drive_keepalive_by_deadline,
    publish_qos0,
    send_window,
)
from edged.io.store import OutboxRow, Store

log = structlog.get_logger("edged.io.mqtt")

T = TypeVar("T")

# Messages in flight at once: enough to keep a LAN broker busy, few enough
# that a dropped connection resends little.
PUBLISH_WINDOW = 64
OUTBOX_BATCH = 512
# The backlog's token bucket holds at most this many seconds of its rate.
BACKLOG_BURST_S = 0.5
# Answers to commands waiting for a connection; beyond this the oldest are dropped
# (the requester times out and asks again). While connected they go out a
# window at a time, so a flood of requests is answered, `busy` included.
MAX_PENDING_RESPONSES = 10_000
# Fast-poll measurements as json.dumps(separators=(",", ":"), allow_nan=False)
# encodes them, without building a new encoder for every message.
_MEASUREMENT_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)

# A window of publishes not acknowledged within this ends the session.


class CredentialsError(EdgedError):
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


def default_client_id(settings: Mqtt, site: str) -> str:
    return settings.client_id or f"edged-{site}-{socket.gethostname()}"


def mqtt_client(
    settings: Mqtt,
    broker: BrokerAddress,
    *,
    client_id: str,
    password: str | None,
    will: aiomqtt.Will | None = None,
) -> aiomqtt.Client:
    """A client with the configured protocol, credentials and TLS (the daemon's
    publisher and `edged replay` connect the same way)."""
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
    client = aiomqtt.Client(
        broker.host,
        broker.port,
        identifier=client_id,
        username=settings.username,
        password=password,
        protocol=protocol,
        will=will,
        keepalive=int(settings.keepalive),
        timeout=PUBLISH_TIMEOUT_S,
        max_inflight_messages=PUBLISH_WINDOW,
        tls_params=tls_params,
        tls_insecure=bool(settings.tls and settings.tls.insecure) if broker.tls else None,
        # Each publish goes out at once: Nagle would hold the tail of every
        # window until the broker's delayed ACK (~40 ms), capping a drain.
        socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
    )
    # aiomqtt warns ("There are N pending publish calls") past 10 calls awaiting
    # their acknowledgement; a full publish window is normal here, not a leak.
    client.pending_calls_threshold = 2 * PUBLISH_WINDOW
    # paho's keepalive at its deadlines, not a wake-up every second.
    drive_keepalive_by_deadline(client)
    return client


@dataclass(frozen=True, slots=True, kw_only=True)
class IncomingCommand:
    """A request received on the command topic."""

    topic: str
    payload: bytes
    response_topic: str | None  # MQTT v5 property
    correlation_data: bytes | None  # MQTT v5 property, echoed in the answer


@dataclass(frozen=True, slots=True)
class _Response:
    topic: str
    payload: bytes
    correlation_data: bytes | None


@contextlib.asynccontextmanager
async def _watch_connection(
    client: aiomqtt.Client, on_message: Callable[[aiomqtt.Message], None]
) -> AsyncIterator[asyncio.Task[None]]:
    """The session's one reader of incoming messages (command requests, when
    enabled), as a task that fails with MqttError when the connection drops.

    aiomqtt fails a QoS 1 publish waiting for its PUBACK only at its timeout
    (10 s), not when the connection drops (a broker that crashed), so live
    data would wait that long for a reconnection. Its message iterator fails
    at once."""

    async def until_dropped() -> None:
        async for message in client.messages:
            on_message(message)

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


# MQTT 5 reason codes a PUBACK may carry (MQTT 5.0, 3.4.2.1).
PUBACK_REASONS = {
    0x80: "unspecified error",
    0x83: "implementation specific error",
    0x87: "not authorized",
    0x90: "topic name invalid",
    0x91: "packet identifier in use",
    0x97: "quota exceeded",
    0x99: "payload format invalid",
}


@dataclass(frozen=True, slots=True)
class Refusal:
    """Publishes the broker refused: how many in this batch, the first one's
    topic and reason code."""

    count: int
    topic: str
    reason_code: int

    @property
    def reason(self) -> str:
        return PUBACK_REASONS.get(self.reason_code, f"reason code 0x{self.reason_code:02x}")


class Refusals:
    """Counters for the gateway status."""

    def __init__(self) -> None:
        self.total = 0
        self.refusing = False  # the last attempt at the refused rows failed
        self.last: Refusal | None = None

    def note(self, refused: Sequence[tuple[str, int]]) -> Refusal:
        topic, code = refused[0]
        self.total += len(refused)
        self.refusing = True
        self.last = Refusal(count=len(refused), topic=topic, reason_code=code)
        return self.last

    def status(self) -> dict[str, Any]:
        last = self.last
        return {
            "refused_total": self.total,
            "refusing": self.refusing,
            "last_reason_code": last.reason_code if last else None,
            "last_reason": last.reason if last else None,
            "last_topic": last.topic if last else None,
        }


class _Deletes:
    """Deletes of acknowledged outbox rows, one at a time, in the background:
    seqs acknowledged while one runs go together into the next."""

    def __init__(self, delete: Callable[[Sequence[int]], Awaitable[None]]) -> None:
        self._delete = delete
        self._queued: list[int] = []
        self._task: asyncio.Task[None] | None = None

    def add(self, seqs: Sequence[int]) -> None:
        self._queued += seqs
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            seqs, self._queued = self._queued, []
            # Called even with none: it also retries rows whose delete failed.
            await self._delete(seqs)
            if not self._queued:
                return

    async def done(self) -> None:
        """Until every delete added is done (not cancelled with the caller)."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)
        if self._task is not None:
            self._task.result()


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
        self._command_topic: str | None = None
        self._on_command: Callable[[IncomingCommand], None] | None = None
        self._on_acked: Callable[[Sequence[int]], None] | None = None
        self._responses: list[_Response] = []
        # Lowest seq of replayed rows queued since the session last looked.
        self._backlog_from: int | None = None
        # Refusals (MQTT 5 PUBACK with a failure reason code): the rows stay
        # in the outbox and are retried after a growing pause.
        self.refusals = Refusals()
        self._refusal_backoff = Backoff(first_s=1.0, max_s=300.0)
        self._on_refused: Callable[[Refusal], None] | None = None
        # Acknowledged seqs whose outbox delete failed (the store refused writes).
        self._undeleted: set[int] = set()
        # Why the last session ended or never started (for a person reading it).
        self.last_error: str | None = None

    def accept_commands(
        self,
        topic: str,
        on_command: Callable[[IncomingCommand], None],
        on_acked: Callable[[Sequence[int]], None],
    ) -> None:
        """Subscribe to `topic` (only that topic) in every session and hand its
        requests to `on_command`; `on_acked` learns which outbox seqs the broker
        has acknowledged."""
        self._command_topic = topic
        self._on_command = on_command
        self._on_acked = on_acked

    def respond(self, topic: str, payload: dict[str, Any], correlation_data: bytes | None) -> None:
        """Answer a command (QoS 1, not retained, not stored), in the order asked."""
        self._responses.append(_Response(topic, encode(payload), correlation_data))
        del self._responses[:-MAX_PENDING_RESPONSES]
        self._wake.set()

    def on_refused(self, callback: Callable[[Refusal], None]) -> None:
        """`callback` hears of the first refusal after messages went through
        (one report per episode, not one per retry)."""
        self._on_refused = callback

    def backlog_added(self, first_seq: int) -> None:
        """Rows from `first_seq` on were committed below the live cursor (replays):
        drain them as backlog."""
        if self._backlog_from is None or first_seq < self._backlog_from:
            self._backlog_from = first_seq
        self._wake.set()

    def wake(self) -> None:
        """Something new is in the outbox."""
        self._wake.set()

    def publish_now(self, topic: str, payload: dict[str, Any]) -> bool:
        """Fire-and-forget QoS 0 (fast-poll measurements): never queued in the
        outbox, and dropped while disconnected, so they cannot crowd out
        interval data (the recorder keeps its own copy in the store)."""
        client = self._client_now
        if client is None:
            return False
        encoded = _MEASUREMENT_ENCODER.encode(payload).encode()
        # Straight to paho: aiomqtt's publish() waits for paho's on_publish,
        # which a fire-and-forget QoS 0 message needs no task for (a task per
        # measurement was the largest cost of fast polling, bench/fastpoll.py).
        return publish_qos0(client, topic, encoded)

    def set_retained(self, topic: str, payload: dict[str, Any]) -> None:
        encoded = encode(payload)
        if self._retained.get(topic) != encoded:
            self._retained[topic] = encoded
            self._retained_dirty.add(topic)
            self._wake.set()

    async def run(self) -> None:
        while not self._stopping:
            broker = self._brokers[self._broker_index]
            try:
                await self._session(broker)
            except (aiomqtt.MqttError, sqlite3.Error) as exc:  # sqlite3: the store failing
                self._client_now = None
                if self._stopping:
                    break
                # Fail over: the next broker in the list gets the next attempt.
                self._broker_index = (self._broker_index + 1) % len(self._brokers)
                delay_s = self._backoff.failed()
                address = f"{broker.host}:{broker.port}"
                refused = explain_connect_error(exc, self._settings, address)
                self.last_error = refused or str(exc)
                if refused is not None:
                    # Retrying cannot help until someone fixes the config or the broker.
                    log.error("mqtt connection refused", broker=address, error=refused,
                              retry_in_s=delay_s)  # fmt: skip
                else:
                    log.warning("mqtt disconnected", broker=address,
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
        return mqtt_client(
            self._settings,
            broker,
            client_id=self._client_id,
            password=self._password,
            will=aiomqtt.Will(self._will_topic, self._will_payload, qos=1, retain=True),
        )

    async def _session(self, broker: BrokerAddress) -> None:
        async with (
            self._client(broker) as client,
            _watch_connection(client, self._take_message) as dropped,
        ):
            self._dropped = dropped
            self._backoff.succeeded()
            log.info("mqtt connected", broker=f"{broker.host}:{broker.port}", tls=broker.tls)
            self._retained_dirty = set(self._retained)  # a new session re-asserts state
            self._client_now = client
            await self._subscribe_commands(client)
            await self._drain(client)

    async def _drain(self, client: aiomqtt.Client) -> None:
        loop = asyncio.get_running_loop()
        # What is committed now is backlog; anything committed later is live.
        # (The last seq ever committed, not the highest still waiting: a replay
        # queued later under an older seq must not count as live.)
        self._backlog_from = None
        backlog_end = await self._store.outbox_last_seq()
        backlog_cursor = 0
        live_cursor = backlog_end
        rate = self._settings.backlog_rate
        tokens, refilled_at = 0.0, loop.time()
        retry_from: int | None = None  # lowest refused seq, retried at retry_at
        retry_at = 0.0
        while True:
            self._wake.clear()
            await self._publish_retained(client)
            await self._publish_responses(client)
            if retry_from is not None and loop.time() >= retry_at:
                # Refused rows are still in the outbox: go over them again.
                if retry_from <= backlog_end:
                    backlog_cursor = min(backlog_cursor, retry_from - 1)
                else:
                    live_cursor = min(live_cursor, retry_from - 1)
                retry_from = None
            refused: list[int] = []
            if self._backlog_from is not None:
                # Replays were queued: everything below the live cursor still in
                # the outbox is backlog again (what was sent is gone from it).
                backlog_cursor = min(backlog_cursor, self._backlog_from - 1)
                backlog_end = max(backlog_end, live_cursor)
                self._backlog_from = None
            live = await self._store.outbox_batch(OUTBOX_BATCH, after_seq=live_cursor)
            if self._undeleted:
                if live:
                    live_cursor = live[-1].seq
                live = [row for row in live if row.seq not in self._undeleted]
            if live:
                refused += await self._publish_rows(client, live)
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
                        backlog_cursor = rows[-1].seq
                        rows = [r for r in rows if r.seq not in self._undeleted]
                        refused += await self._publish_rows(client, rows)
                        tokens -= len(rows)
                    else:
                        backlog_cursor = backlog_end
                backlog_pending = backlog_cursor < backlog_end
            if refused:
                first = min(refused)
                retry_from = first if retry_from is None else min(retry_from, first)
                retry_at = loop.time() + self._refusal_backoff.failed()
            elif retry_from is None and self.refusals.refusing:
                self.refusals.refusing = False  # everything went through again
                self._refusal_backoff.succeeded()
                log.info("mqtt publishes accepted again")
            if self._stopping:
                await self._publish_retained(client)
                self._client_now = None
                return
            if len(live) == OUTBOX_BATCH:
                continue
            if retry_from is not None and not backlog_pending:
                await self._sleep_or_stop(max(0.0, retry_at - loop.time()))
                continue
            if backlog_pending:
                # Until the bucket holds a full batch again (new live data
                # wakes it sooner); a fixed pause per batch cost a fast
                # drain a tenth of its rate.
                cap = rate * BACKLOG_BURST_S
                available = min(cap, tokens + (loop.time() - refilled_at) * rate)
                await self._sleep_or_stop(max(0.0, (min(OUTBOX_BATCH, cap) - available) / rate))
            else:
                await self._wake.wait()

    async def _publish_retained(self, client: aiomqtt.Client) -> None:
        """Every changed retained status, PUBLISH_WINDOW in flight at a time."""
        later: set[str] = set()  # refused: tried again at the next wake-up
        try:
            while self._retained_dirty:
                count = min(PUBLISH_WINDOW, len(self._retained_dirty))
                topics = [self._retained_dirty.pop() for _ in range(count)]
                refused: dict[int, int] = {}
                try:
                    acked, error = await _unless_dropped(
                        send_window(
                            client, [(t, self._retained[t], 1, True) for t in topics], refused
                        ),
                        self._dropped,
                    )
                except BaseException:
                    self._retained_dirty.update(topics)
                    raise
                if refused:
                    later.update(topics[i] for i in refused)
                    self._refused([(topics[i], code) for i, code in refused.items()])
                self._retained_dirty.update(
                    t
                    for i, (t, ok) in enumerate(zip(topics, acked, strict=True))
                    if not ok and i not in refused
                )
                if error is not None:
                    raise error
        finally:
            self._retained_dirty |= later

    async def _publish_rows(self, client: aiomqtt.Client, rows: Sequence[OutboxRow]) -> list[int]:
        """Publish in windows; delete each row once acknowledged. Returns the
        seqs the broker refused (kept in the outbox).

        Acknowledged rows are deleted beside the publishing, never in its way:
        a delete (an fsync, behind the recorder's commit when one holds the
        store) used to hold the next window back at a busy boundary. Deletes
        acknowledged meanwhile are merged into the next; all are done before
        this returns."""
        deleting = _Deletes(self._acked)
        refused_seqs: list[int] = []
        try:
            for start in range(0, len(rows), PUBLISH_WINDOW):
                window = rows[start : start + PUBLISH_WINDOW]
                refused: dict[int, int] = {}
                acked, error = await _unless_dropped(
                    send_window(
                        client, [(r.topic, r.payload, r.qos, r.retain) for r in window], refused
                    ),
                    self._dropped,
                )
                deleting.add([row.seq for row, ok in zip(window, acked, strict=True) if ok])
                if refused:
                    refused_seqs += [window[i].seq for i in refused]
                    self._refused([(window[i].topic, code) for i, code in refused.items()])
                if error is not None:
                    raise error
        finally:
            # Even when the session ends: acknowledged rows are not resent.
            await deleting.done()
        return refused_seqs

    def _refused(self, refused: Sequence[tuple[str, int]]) -> None:
        first = not self.refusals.refusing
        report = self.refusals.note(refused)
        if first:
            log.warning("mqtt broker refused publishes; kept in the outbox and retried",
                        count=report.count, reason_code=report.reason_code,
                        reason=report.reason, topic=report.topic)  # fmt: skip
            if self._on_refused is not None:
                self._on_refused(report)

    async def _acked(self, seqs: Sequence[int]) -> None:
        # Rows whose delete failed before (a full or read-only disk) are
        # deleted with these; until then they are not sent again.
        todo = sorted(self._undeleted | set(seqs))
        try:
            await self._store.ack(todo)
        except (sqlite3.Error, OSError) as exc:
            if not self._undeleted:
                log.error("cannot delete acknowledged outbox rows; retried with the next",
                          error=str(exc), rows=len(todo))  # fmt: skip
            self._undeleted.update(todo)
        else:
            self._undeleted.clear()
        if self._on_acked is not None and seqs:
            self._on_acked(seqs)

    async def _publish_responses(self, client: aiomqtt.Client) -> None:
        while self._responses:
            window = self._responses[:PUBLISH_WINDOW]
            properties: list[Properties | None] = []
            for response in window:
                props = None
                if response.correlation_data is not None and self._settings.protocol == "5":
                    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                    props.CorrelationData = response.correlation_data
                properties.append(props)
            acked, error = await _unless_dropped(
                send_window(
                    client, [(r.topic, r.payload, 1, False) for r in window], None, properties
                ),
                self._dropped,
            )
            # Only once sent: a dropped connection leaves the rest for the next
            # session; a refused answer is not retried (the requester asks again).
            sent = {id(r) for r, ok in zip(window, acked, strict=True) if ok}
            done = {id(r) for r in window} if error is None else sent
            self._responses = [r for r in self._responses if id(r) not in done]
            if error is not None:
                raise error

    async def _subscribe_commands(self, client: aiomqtt.Client) -> None:
        topic = self._command_topic
        if topic is None:
            return
        await client.subscribe(topic, qos=1)
        log.info("accepting commands", topic=topic)

    def _take_message(self, message: aiomqtt.Message) -> None:
        if self._command_topic is None:
            log.warning("message received without a subscription", topic=message.topic.value)
            return
        self._take_command(self._command_topic, message)

    def _take_command(self, topic: str, message: aiomqtt.Message) -> None:
        if message.topic.value != topic or self._on_command is None:
            log.warning("message on an unexpected topic ignored", topic=message.topic.value)
            return
        if message.retain:
            # A retained request would be replayed at every reconnect: refuse it.
            log.warning("retained command ignored; clear it on the broker", topic=topic)
            return
        props = message.properties
        response_topic = getattr(props, "ResponseTopic", None) if props else None
        correlation = getattr(props, "CorrelationData", None) if props else None
        payload = message.payload  # bytes as received; typed loosely by aiomqtt
        command = IncomingCommand(
            topic=topic,
            payload=bytes(payload) if isinstance(payload, bytes | bytearray) else b"",
            response_topic=str(response_topic) if response_topic else None,
            correlation_data=bytes(correlation) if correlation is not None else None,
        )
        try:
            self._on_command(command)
        except Exception:
            log.exception("command handler failed", topic=topic)
