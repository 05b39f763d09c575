"""Replay: stored interval records sent again, marked `replay: true`, for an
upstream system that lost data (docs/mqtt.md#replay).

Two ways in, one payload: `edged replay` (operator, CLI) publishes the records
straight from a read-only view of the store, and the MQTT command (when
`mqtt.commands.enabled`) queues them in the daemon's outbox. Either way a
replayed record is the stored payload with `replay: true` (`payloads.replay_copy`):
same `id`, same `seq`.

The daemon's path: a request is parsed and checked here (pure), the matching
records are read from the store a page at a time and committed to the outbox
through the recorder under their original seqs (durable, at-least-once), the
publisher drains them as backlog behind live data, and the requester gets
`accepted` once they are queued and `done` once the broker has acknowledged
every one of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from typing import Any

import aiomqtt
import structlog

from edged.app.poller import Pending, Recorder
from edged.config.schema import Settings
from edged.core.compensation.record import channels_of
from edged.core.errors import EdgedError
from edged.core.export import TimeArgumentError, parse_range
from edged.core.payloads import Topics, command_response_payload, encode, replay_copy
from edged.io.brokerdiag import explain_connect_error
from edged.io.mqtt import (
    PUBLISH_WINDOW,
    BrokerAddress,
    IncomingCommand,
    Publisher,
    broker_addresses,
    mqtt_client,
)
from edged.io.paho_window import send_window
from edged.io.queries import IntervalQuery
from edged.io.store import OutboxMessage, Store

log = structlog.get_logger("edged.app.replay")

COMMAND = "replay"
REQUEST_FIELDS = frozenset({"request_id", "from", "to", "device", "channel"})
MAX_REQUEST_ID_CHARS = 128
# Records read and committed per recorder transaction while queueing a replay.
PAGE = 1000
# Requests waiting while one is being queued; more are refused as busy.
MAX_WAITING_REQUESTS = 16


# -- requests (pure) ------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplayRequest:
    request_id: str
    start: datetime  # records whose end lies in (start, end]
    end: datetime
    devices: tuple[str, ...] = ()  # empty: all
    channels: tuple[str, ...] = ()

    @property
    def query(self) -> IntervalQuery:
        return IntervalQuery(
            start=self.start, end=self.end, devices=self.devices, channels=self.channels
        )


class RequestError(EdgedError, ValueError):
    """A request that is refused; the message says why, for the requester."""

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


def known_channels(settings: Settings) -> dict[str, frozenset[str]]:
    """Device id -> its channel names, virtual meters included."""
    known = {d.id: frozenset(channels_of(d)) for d in settings.devices}
    for vm in settings.virtual_meters:
        known[vm.id] = frozenset(c.name for c in vm.channels)
    return known


def _names(value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
        raise ValueError(f"{key!r} must be a name or a non-empty list of names")
    return tuple(dict.fromkeys(items))


def parse_request(
    payload: bytes, zone: tzinfo, now: datetime, known: Mapping[str, frozenset[str]]
) -> ReplayRequest:
    """A replay request (edged/schemas/replay_request.json) -> what to replay.

    Times are read as by `edged replay` (ISO-8601, or local dates and times in the
    site zone, or relative to `now`). Unknown devices and channels are refused, so
    a typo is answered instead of replaying nothing."""
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise RequestError(f"not a JSON object: {exc}") from None
    except RecursionError:
        raise RequestError("not a JSON object: nested too deeply") from None
    if not isinstance(data, dict):
        raise RequestError("not a JSON object")
    request_id = data.get("request_id")
    if not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_REQUEST_ID_CHARS:
        raise RequestError(f"'request_id' must be a string of 1 to {MAX_REQUEST_ID_CHARS} chars")
    try:
        unknown = sorted(set(data) - REQUEST_FIELDS)
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown))}")
        for key in ("from", "to"):
            if not isinstance(data.get(key), str):
                raise ValueError(f"{key!r} is required: a time such as 2026-11-21T00:00Z")
        start, end = parse_range(data["from"], data["to"], zone, now, ("'from'", "'to'"))
        devices = _names(data.get("device"), "device")
        channels = _names(data.get("channel"), "channel")
    except (ValueError, OverflowError, TimeArgumentError) as exc:
        raise RequestError(str(exc), request_id) from None
    for device in devices:
        if device not in known:
            raise RequestError(f"unknown device {device!r}", request_id)
    selected = [known[d] for d in devices] if devices else list(known.values())
    offered = frozenset().union(*selected)
    for channel in channels:
        if channel not in offered:
            raise RequestError(f"unknown channel {channel!r}", request_id)
    return ReplayRequest(
        request_id=request_id, start=start, end=end, devices=devices, channels=channels
    )


def response_topic_for(requested: str | None, topics: Topics) -> str:
    """Where to answer: the request's MQTT v5 response topic, or the default.

    A requester may not aim answers into edged's own topic tree (they would land
    among interval records or statuses): under `{prefix}/` only the response
    topics `{prefix}/{site}/gateway/response/...` are allowed."""
    default = topics.response(COMMAND)
    if requested is None:
        return default
    if any(c in requested for c in "+#\0") or not requested:
        raise RequestError(f"response topic {requested!r} is not a topic name")
    own = topics.prefix + "/"
    allowed = topics.response("")
    if requested.startswith(own) and not requested.startswith(allowed):
        raise RequestError(
            f"response topic {requested!r} is inside {own}#; use one outside it or under {allowed}"
        )
    return requested


# -- the daemon's command handler -----------------------------------------------------


@dataclass(slots=True, kw_only=True)
class _Replay:
    request: ReplayRequest
    topic: str
    correlation: bytes | None
    unacked: set[int] = field(default_factory=set)
    count: int = 0
    queued: bool = False  # every page committed, `accepted` sent


class ReplayCommands:
    """Answers replay requests from MQTT and queues the records in the outbox."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        recorder: Recorder,
        publisher: Publisher,
        topics: Topics,
        now: Callable[[], datetime],
    ) -> None:
        self._settings = settings
        self._store = store
        self._recorder = recorder
        self._publisher = publisher
        self._topics = topics
        self._now = now
        self._known = known_channels(settings)
        self._max_intervals = settings.mqtt.commands.max_intervals
        self._waiting: asyncio.Queue[IncomingCommand] = asyncio.Queue(MAX_WAITING_REQUESTS)
        self._replays: list[_Replay] = []

    @property
    def topic(self) -> str:
        return self._topics.command(COMMAND)

    def use_settings(self, settings: Settings) -> None:
        """After a reload: requests may name the devices and channels now configured."""
        self._settings = settings
        self._known = known_channels(settings)

    def receive(self, command: IncomingCommand) -> None:
        """From the publisher's session: queue the request (never blocks)."""
        try:
            self._waiting.put_nowait(command)
        except asyncio.QueueFull:
            self._refuse(command, RequestError("busy: too many replay requests waiting"))

    def acked(self, seqs: Sequence[int]) -> None:
        """From the publisher: these outbox rows were acknowledged by the broker."""
        for replay in self._replays:
            replay.unacked.difference_update(seqs)
        self._finish_done()

    async def run(self) -> None:
        while True:
            command = await self._waiting.get()
            try:
                await self._handle(command)
            except RequestError as exc:
                self._refuse(command, exc)
            except Exception:
                # A bug must not end command handling, nor the daemon.
                log.exception("replay request failed")
                self._refuse(command, RequestError("internal error; see the gateway log"))

    def _answer(
        self, topic: str, correlation: bytes | None, request_id: str | None, status: str, **kw: Any
    ) -> None:
        payload = command_response_payload(self._settings.site, COMMAND, request_id, status, **kw)
        self._publisher.respond(topic, payload, correlation)

    def _refuse(self, command: IncomingCommand, exc: RequestError) -> None:
        request_id = exc.request_id
        if request_id is None:
            with contextlib.suppress(Exception):
                request_id = _request_id_of(command.payload)
        try:
            topic = response_topic_for(command.response_topic, self._topics)
        except RequestError:
            topic = self._topics.response(COMMAND)
        log.warning("replay request refused", request_id=request_id, error=str(exc))
        self._answer(topic, command.correlation_data, request_id, "error", error=str(exc))

    async def _handle(self, command: IncomingCommand) -> None:
        request = parse_request(command.payload, self._settings.zone, self._now(), self._known)
        try:
            topic = response_topic_for(command.response_topic, self._topics)
        except RequestError as exc:
            raise RequestError(str(exc), request.request_id) from None
        query = request.query
        count = await self._store.count_intervals(query)
        in_flight = sum(len(r.unacked) for r in self._replays)
        if count + in_flight > self._max_intervals:
            busy = f" (+ {in_flight} replayed records still being sent)" if in_flight else ""
            raise RequestError(
                f"range holds {count} intervals{busy}, more than "
                f"mqtt.commands.max_intervals ({self._max_intervals}); ask for a shorter range",
                request.request_id,
            )
        replay = _Replay(request=request, topic=topic, correlation=command.correlation_data)
        self._replays.append(replay)
        log.info("replay requested", request_id=request.request_id, intervals=count,
                 start=request.start.isoformat(), end=request.end.isoformat())  # fmt: skip
        limit = self._max_intervals - in_flight
        after_rowid = 0
        while replay.count < limit:
            rows = await self._store.interval_payloads(
                query, after_rowid, min(PAGE, limit - replay.count)
            )
            if not rows:
                break
            after_rowid = rows[-1][0]
            await self._queue([json.loads(text) for _rowid, text in rows], replay)
        replay.queued = True
        self._answer(topic, replay.correlation, request.request_id, "accepted",
                     count=replay.count, start=request.start, end=request.end)  # fmt: skip
        self._finish_done()

    async def _queue(self, stored: Sequence[dict[str, Any]], replay: _Replay) -> None:
        """Commit one page of copies to the outbox and wait until it is durable."""
        messages = [
            (p["seq"], OutboxMessage(topic=self._topics.interval(p["device"], p["channel"]),
                                     payload=encode(replay_copy(p))))
            for p in stored
        ]  # fmt: skip
        seqs = [seq for seq, _ in messages]
        # Tracked before the commit: the broker may acknowledge them before we resume.
        replay.unacked.update(seqs)
        committed = asyncio.Event()
        self._recorder.submit(
            Pending(
                replays=messages,
                after_commit=[lambda: self._publisher.backlog_added(min(seqs)), committed.set],
            )
        )
        await committed.wait()
        replay.count += len(messages)

    def _finish_done(self) -> None:
        for replay in [r for r in self._replays if r.queued and not r.unacked]:
            self._replays.remove(replay)
            request = replay.request
            log.info("replay done", request_id=request.request_id, intervals=replay.count)
            self._answer(replay.topic, replay.correlation, request.request_id, "done",
                         count=replay.count, start=request.start, end=request.end)  # fmt: skip


def _request_id_of(payload: bytes) -> str | None:
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    value = data.get("request_id") if isinstance(data, dict) else None
    return value if isinstance(value, str) and len(value) <= MAX_REQUEST_ID_CHARS else None


# -- `edged replay`: straight to the broker -------------------------------------------


class ReplayError(EdgedError):
    """The broker could not be reached or the connection was lost (message says which)."""


async def publish_stored(
    settings: Settings,
    payloads: Iterable[dict[str, Any]],
    *,
    client_id: str,
    password: str | None,
    on_published: Callable[[int], None] = lambda n: None,
) -> tuple[BrokerAddress, int]:
    """Publish replay copies of stored payloads at QoS 1 to the first broker that
    answers (the configured failover order); returns it and how many the broker
    acknowledged. Every message is acknowledged before this returns."""
    topics = Topics(settings.mqtt.topic_prefix, settings.site)
    failures: list[str] = []
    for broker in broker_addresses(settings.mqtt):
        client = mqtt_client(settings.mqtt, broker, client_id=client_id, password=password)
        try:
            await client.__aenter__()
        except aiomqtt.MqttError as exc:
            address = f"{broker.host}:{broker.port}"
            refused = explain_connect_error(exc, settings.mqtt, address)
            failures.append(refused or f"{address}: {exc}")
            continue
        sent = 0
        try:
            for window in _windows(payloads, PUBLISH_WINDOW):
                messages = [
                    (topics.interval(p["device"], p["channel"]), encode(replay_copy(p)), 1, False)
                    for p in window
                ]
                acked, error = await send_window(client, messages)
                count = sum(acked)
                sent += count
                on_published(count)
                if error is not None:
                    raise ReplayError(
                        f"connection to {broker.host}:{broker.port} lost after {sent} "
                        f"acknowledged: {error}"
                    )
        finally:
            with contextlib.suppress(Exception):
                await client.__aexit__(None, None, None)
        return broker, sent
    raise ReplayError("cannot connect to the MQTT broker: " + "; ".join(failures))


def _windows(items: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    window: list[dict[str, Any]] = []
    for item in items:
        window.append(item)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window
