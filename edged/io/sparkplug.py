"""Sparkplug B edge node session (docs/sparkplug.md): births, deaths, data, commands.

The session is its own MQTT connection, beside the JSON publisher's, because
its last will must be the NDEATH whose bdSeq matches the NBIRTH it sends. On
every connection: bdSeq + 1 (persisted), will = NDEATH(bdSeq); subscribe to
NCMD/DCMD (and the primary host's STATE, when one is configured, holding every
birth back until it says online); NBIRTH with seq 0, a DBIRTH per device that
is not offline; then the outbox.

Interval metrics are outbox rows like the JSON records (committed in the same
transaction, QoS 1, deleted on PUBACK) under `spBv1.0/...` topics that only
this session drains. A row holds the metric, not wire bytes: seq, aliases and
`is_historical` belong to the session that sends it, so it is encoded then.
What was already waiting when the session was born is sent with
`is_historical` (store and forward). Fast-poll measurements go out at once
as QoS 0 DDATA, or not at all, as on the JSON topics.

Every message edged sends on this session goes through paho's publish in the
order of the seq it carries (no await between numbering and queueing), so a
host sees seq 0..255 without a gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime

import aiomqtt
import structlog

from edged.config.schema import Mqtt, Settings, Sparkplug
from edged.core.backoff import Backoff
from edged.core.compensation.record import channels_of
from edged.core.errors import EdgedError
from edged.core.model import Event, Interval, parse_iso_utc
from edged.core.sparkplug import (
    BD_SEQ_METRIC,
    REBIRTH_METRIC,
    DeviceSpec,
    MessageType,
    Metric,
    NodeFigures,
    alias_table,
    death_metrics,
    decide_command,
    device_birth_metrics,
    epoch_ms,
    host_state,
    interval_metric,
    measurement_metrics,
    newer_state,
    next_seq,
    node_birth_metrics,
    node_metrics,
    parse_row,
    row_payload,
    state_topic,
    topic,
)
from edged.io.mqtt import (
    PUBLISH_WINDOW,
    BrokerAddress,
    _unless_dropped,
    _watch_connection,
    broker_addresses,
    mqtt_client,
    resolve_password,
)
from edged.io.paho_window import publish_qos0, send_window
from edged.io.sparkplug_pb import DecodeError, decode_metrics, encode_payload
from edged.io.store import OutboxMessage, OutboxRow, Store

log = structlog.get_logger("edged.io.sparkplug")

OUTBOX_BATCH = 512
# Consecutive rows of one device (a boundary's channels) share a DDATA up to this.
METRICS_PER_DDATA = 64
BD_SEQ_MARK = "sparkplug_bd_seq"


def device_specs(settings: Settings) -> list[DeviceSpec]:
    """The Sparkplug devices: every configured device and virtual meter."""
    specs = [
        DeviceSpec(
            id=d.id,
            # raw and compensated channels (docs/compensation.md)
            channels=tuple((name, c.unit) for name, c in channels_of(d).items()),
            points=tuple((p.name, p.unit) for p in d.measurements.points) if d.measurements else (),
        )
        for d in settings.devices
    ]
    specs += [
        DeviceSpec(id=vm.id, channels=tuple((c.name, c.unit) for c in vm.channels))
        for vm in settings.virtual_meters
    ]
    return specs


def default_client_id(settings: Sparkplug, site: str) -> str:
    return settings.client_id or f"edged-sp-{site}-{socket.gethostname()}"


class HostOffline(EdgedError, aiomqtt.MqttError):
    """The primary host application said it is offline: the session ends."""


class SparkplugPublisher:
    def __init__(
        self,
        settings: Sparkplug,
        mqtt_settings: Mqtt,
        store: Store,
        *,
        site: str,
        devices: Sequence[DeviceSpec],
        figures: NodeFigures,
        now: Callable[[], datetime],
        on_event: Callable[[Event], None],
    ) -> None:
        self._group = settings.group_id
        self.node = settings.edge_node_id or site
        self._host_id = settings.primary_host_id
        self._client_id = default_client_id(settings, site)
        self._mqtt = mqtt_settings
        self._password = resolve_password(mqtt_settings)
        self._brokers = broker_addresses(mqtt_settings)
        self._broker_index = 0
        self._store = store
        self._now = now
        self._on_event = on_event
        self._specs = {spec.id: spec for spec in devices}
        self._figures = figures
        self._figures_sent: dict[str, Metric] = {}
        self._offline: set[str] = set()  # devices whose comms are offline (DDEATH)
        self._born: set[str] = set()  # devices with a DBIRTH in this session
        self._last: dict[str, dict[str, Metric]] = {}  # last live value per metric
        self._aliases: dict[tuple[str | None, str], int] = {}
        self._seq = 0
        self.bd_seq: int | None = None
        self._client_now: aiomqtt.Client | None = None
        self._dropped: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._rebirth = False
        self._rescan = False
        self._host_state: bool | None = None
        self._host_seen: tuple[bool, int] | None = None  # (online, timestamp ms) last taken
        self._host_changed = asyncio.Event()
        self._stopping = False
        self._backoff = Backoff(first_s=0.2, max_s=10.0)
        self._historical_upto = 0

    # -- fed by the application ------------------------------------------------

    def rows_for(self, records: Sequence[Interval]) -> list[OutboxMessage]:
        """The outbox rows of interval records (committed with their JSON rows)."""
        return [
            OutboxMessage(
                topic=topic(self._group, MessageType.DDATA, self.node, r.device),
                payload=row_payload(r.device, interval_metric(r)),
            )
            for r in records
        ]

    def wake(self) -> None:
        self._wake.set()

    def set_figures(self, figures: NodeFigures) -> None:
        """The gateway's figures now: NDATA with what changed."""
        self._figures = figures
        self._wake.set()

    def set_devices(self, devices: Sequence[DeviceSpec]) -> None:
        """After a reload: a changed device list means new births (and aliases)."""
        specs = {spec.id: spec for spec in devices}
        if specs != self._specs:
            self._specs = specs
            self._offline &= set(specs)
            self.request_rebirth()

    def device_comms(self, device: str, online: bool) -> None:
        """A device went offline (DDEATH) or came back (DBIRTH)."""
        if online == (device not in self._offline):
            return
        if online:
            self._offline.discard(device)
        else:
            self._offline.add(device)
        self._wake.set()

    def request_rebirth(self) -> None:
        self._rebirth = True
        self._wake.set()

    def publish_measurement(self, device: str, payload: dict[str, object]) -> bool:
        """Fast-poll values as QoS 0 DDATA at once, or dropped (never stored)."""
        values = payload.get("values")
        at = payload.get("at")
        if not isinstance(values, dict) or not isinstance(at, str):
            return False
        metrics = measurement_metrics(values, parse_iso_utc(at))
        last = self._last.setdefault(device, {})
        for metric in metrics:
            last[metric.name] = metric
        client = self._client_now
        if client is None or device not in self._born:
            return False
        encoded = self._encode_data(device, metrics)
        return publish_qos0(
            client, topic(self._group, MessageType.DDATA, self.node, device), encoded
        )

    async def stop(self) -> None:
        """Send NDEATH if connected (a clean disconnect fires no will), then end `run`."""
        self._stopping = True
        self._wake.set()
        self._host_changed.set()

    # -- the session -----------------------------------------------------------

    async def run(self) -> None:
        mark = await self._store.get_mark(BD_SEQ_MARK)
        self.bd_seq = int(mark) if mark is not None and mark.isdigit() else None
        while not self._stopping:
            broker = self._brokers[self._broker_index]
            try:
                await self._session(broker)
            except aiomqtt.MqttError as exc:
                self._client_now = None
                self._born.clear()
                if self._stopping:
                    break
                if not isinstance(exc, HostOffline):
                    self._broker_index = (self._broker_index + 1) % len(self._brokers)
                delay_s = self._backoff.failed()
                log.warning("sparkplug session ended", broker=f"{broker.host}:{broker.port}",
                            error=str(exc), retry_in_s=delay_s)  # fmt: skip
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=delay_s)

    def _topic(self, kind: MessageType, device: str | None = None) -> str:
        return topic(self._group, kind, self.node, device)

    async def _session(self, broker: BrokerAddress) -> None:
        # A new connection, a new bdSeq: the will names it, the NBIRTH repeats it.
        bd_seq = 0 if self.bd_seq is None else next_seq(self.bd_seq)
        await self._store.set_mark(BD_SEQ_MARK, str(bd_seq))
        self.bd_seq = bd_seq
        death = encode_payload(
            death_metrics(bd_seq), timestamp_ms=epoch_ms(self._now()), seq=None, with_datatypes=True
        )
        client = mqtt_client(
            self._mqtt,
            broker,
            client_id=self._client_id,
            password=self._password,
            will=aiomqtt.Will(self._topic(MessageType.NDEATH), death, qos=1, retain=False),
        )
        self._host_state = None
        async with client, _watch_connection(client, self._take_message) as dropped:
            self._dropped = dropped
            self._backoff.succeeded()
            log.info("sparkplug connected", broker=f"{broker.host}:{broker.port}",
                     node=self.node, bd_seq=bd_seq)  # fmt: skip
            await client.subscribe(self._topic(MessageType.NCMD), qos=1)
            await client.subscribe(self._topic(MessageType.DCMD, "+"), qos=1)
            if self._host_id is not None:
                await client.subscribe(state_topic(self._host_id), qos=1)
                await self._until_host_online(dropped)
                if self._stopping:
                    return
            self._client_now = client
            self._historical_upto = await self._store.outbox_last_seq()
            self._birth(client)
            try:
                await self._drain(client, dropped, death)
            finally:
                self._client_now = None
                self._born.clear()

    async def _until_host_online(self, dropped: asyncio.Task[None]) -> None:
        while self._host_state is not True and not self._stopping:
            self._host_changed.clear()
            log.info("sparkplug waiting for the primary host", host=self._host_id)
            await _unless_dropped(self._host_changed.wait(), dropped)

    def _take_message(self, message: aiomqtt.Message) -> None:
        name = message.topic.value
        payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
        if self._host_id is not None and name == state_topic(self._host_id):
            state = host_state(bytes(payload))
            if state is None:
                log.warning("sparkplug STATE not understood", topic=name)
                return
            if not newer_state(self._host_seen, state):
                log.info("sparkplug STATE older than the last one ignored", topic=name)
                return
            self._host_seen = state
            self._host_state = state[0]
            self._host_changed.set()
            self._wake.set()
            return
        parts = name.split("/")
        if len(parts) < 4 or parts[2] not in (MessageType.NCMD, MessageType.DCMD):
            log.warning("sparkplug message on an unexpected topic ignored", topic=name)
            return
        kind = MessageType(parts[2])
        device = parts[4] if kind is MessageType.DCMD and len(parts) > 4 else None
        try:
            received = decode_metrics(bytes(payload))
        except DecodeError as exc:
            log.warning("sparkplug command not decodable", topic=name, error=str(exc))
            received = []
        named = [(self._name_of(device, m.name, m.alias), m.value) for m in received]
        decision = decide_command(kind, named)
        if decision.rebirth:
            log.info("sparkplug rebirth requested", topic=name)
            self.request_rebirth()
        if decision.refused or not received:
            refused = list(decision.refused) or ["(no metrics)"]
            log.warning("sparkplug command refused: edged is read-only", topic=name,
                        metrics=refused)  # fmt: skip
            self._on_event(
                Event(
                    # A DCMD to an id edged does not know is the gateway's business.
                    device=device if device in self._specs else None,
                    kind="sparkplug_command_refused",
                    at=self._now(),
                    message=f"Sparkplug {kind} refused (edged writes nothing to meters): "
                    + ", ".join(refused),
                    details={
                        "topic": name,
                        "type": str(kind),
                        "sparkplug_device": device,
                        "metrics": refused,
                    },
                )
            )

    def _name_of(self, device: str | None, name: str | None, alias: int | None) -> str | None:
        if name is not None or alias is None:
            return name
        for (dev, metric_name), known in self._aliases.items():
            if known == alias and dev == device:
                return metric_name
        return None

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq = next_seq(seq)
        return seq

    def _publish_now(self, client: aiomqtt.Client, name: str, payload: bytes) -> None:
        """Births and deaths: QoS 0, not retained (Sparkplug B)."""
        if not publish_qos0(client, name, payload):
            raise aiomqtt.MqttError(f"could not publish {name}")

    def _birth(self, client: aiomqtt.Client) -> None:
        """NBIRTH (seq 0) and a DBIRTH for every device not offline, in one go."""
        self._rebirth = False
        at_ms = epoch_ms(self._now())
        assert self.bd_seq is not None
        node = node_birth_metrics(self.bd_seq, self._figures, at_ms)
        births = {
            d: device_birth_metrics(spec, self._last.get(d, {}), at_ms)
            for d, spec in self._specs.items()
        }
        self._aliases = alias_table(
            [m.name for m in node], [(d, [m.name for m in ms]) for d, ms in births.items()]
        )
        self._seq = 0
        self._publish_now(
            client,
            self._topic(MessageType.NBIRTH),
            encode_payload(self._aliased(None, node), timestamp_ms=at_ms, seq=self._next_seq(),
                           with_datatypes=True),
        )  # fmt: skip
        self._figures_sent = {m.name: m for m in node}
        self._born.clear()
        for device, metrics in births.items():
            if device in self._offline:
                continue
            self._publish_now(
                client,
                self._topic(MessageType.DBIRTH, device),
                encode_payload(self._aliased(device, metrics), timestamp_ms=at_ms,
                               seq=self._next_seq(), with_datatypes=True),
            )  # fmt: skip
            self._born.add(device)
        log.info("sparkplug births published", bd_seq=self.bd_seq, devices=len(self._born))

    def _aliased(self, device: str | None, metrics: Sequence[Metric]) -> list[Metric]:
        return [replace(m, alias=self._aliases.get((device, m.name))) for m in metrics]

    def _encode_data(self, device: str | None, metrics: Sequence[Metric]) -> bytes:
        """NDATA/DDATA: aliases instead of names, no datatypes, the next seq."""
        return encode_payload(
            self._aliased(device, metrics),
            timestamp_ms=epoch_ms(self._now()),
            seq=self._next_seq(),
            with_datatypes=False,
        )

    def _reconcile_devices(self, client: aiomqtt.Client) -> None:
        """DBIRTH for devices back online, DDEATH for devices gone offline."""
        at_ms = epoch_ms(self._now())
        for device, spec in self._specs.items():
            should = device not in self._offline
            if should and device not in self._born:
                metrics = device_birth_metrics(spec, self._last.get(device, {}), at_ms)
                self._publish_now(
                    client,
                    self._topic(MessageType.DBIRTH, device),
                    encode_payload(self._aliased(device, metrics), timestamp_ms=at_ms,
                                   seq=self._next_seq(), with_datatypes=True),
                )  # fmt: skip
                self._born.add(device)
                self._rescan = True  # rows held while it was dead go out now
            elif not should and device in self._born:
                self._publish_now(
                    client,
                    self._topic(MessageType.DDEATH, device),
                    encode_payload([], timestamp_ms=at_ms, seq=self._next_seq(),
                                   with_datatypes=False),
                )  # fmt: skip
                self._born.discard(device)

    def _publish_figures(self, client: aiomqtt.Client) -> None:
        metrics = node_metrics(self._figures, epoch_ms(self._now()))
        changed = [m for m in metrics if (s := self._figures_sent.get(m.name)) is None
                   or s.value != m.value]  # fmt: skip
        if not changed:
            return
        for m in changed:
            self._figures_sent[m.name] = m
        self._publish_now(client, self._topic(MessageType.NDATA), self._encode_data(None, changed))

    async def _drain(
        self, client: aiomqtt.Client, dropped: asyncio.Task[None], death: bytes
    ) -> None:
        cursor = 0
        while True:
            self._wake.clear()
            if self._stopping or (self._host_id is not None and self._host_state is False):
                # A clean disconnect fires no will: say NDEATH ourselves.
                await client.publish(self._topic(MessageType.NDEATH), death, qos=1)
                if self._stopping:
                    log.info("sparkplug NDEATH published", bd_seq=self.bd_seq)
                    return
                raise HostOffline("primary host offline")
            if self._rebirth:
                self._birth(client)
                self._historical_upto = await self._store.outbox_last_seq()
                cursor = 0
            self._reconcile_devices(client)
            self._publish_figures(client)
            if self._rescan:
                self._rescan = False
                self._historical_upto = await self._store.outbox_last_seq()
                cursor = 0
            rows = await self._store.outbox_batch(OUTBOX_BATCH, after_seq=cursor, sparkplug=True)
            if rows:
                await self._publish_rows(client, rows, dropped)
                cursor = rows[-1].seq
            if len(rows) == OUTBOX_BATCH or self._wake.is_set():
                continue
            await _unless_dropped(self._wake.wait(), dropped)

    async def _publish_rows(
        self, client: aiomqtt.Client, rows: Sequence[OutboxRow], dropped: asyncio.Task[None]
    ) -> None:
        """One DDATA per run of consecutive rows of a device; rows are deleted
        once their DDATA is acknowledged. Rows of a device without a DBIRTH in
        this session (offline) wait in the outbox."""
        groups: list[tuple[str, list[OutboxRow], list[Metric]]] = []
        drop: list[int] = []
        for row in rows:
            parsed = parse_row(row.payload)
            if parsed is None or parsed.device not in self._specs:
                # Not a row this session can send (a device since removed from
                # the config): its JSON record is unaffected.
                reason = "unreadable" if parsed is None else "device not configured"
                log.warning("sparkplug row dropped", seq=row.seq, topic=row.topic, reason=reason)
                drop.append(row.seq)
                continue
            if parsed.device not in self._born:
                continue
            # Waiting in the outbox when this session was born: store and forward.
            metric = replace(parsed.metric, is_historical=row.seq <= self._historical_upto)
            if groups and groups[-1][0] == parsed.device and len(groups[-1][1]) < METRICS_PER_DDATA:
                groups[-1][1].append(row)
                groups[-1][2].append(metric)
            else:
                groups.append((parsed.device, [row], [metric]))
        if drop:
            await self._store.ack(drop)
        for start in range(0, len(groups), PUBLISH_WINDOW):
            window = groups[start : start + PUBLISH_WINDOW]
            acked, error = await _unless_dropped(self._send(client, window), dropped)
            seqs = [
                row.seq
                for (_, grouped, _), ok in zip(window, acked, strict=True)
                if ok
                for row in grouped
            ]
            if seqs:
                await self._store.ack(seqs)
            if error is not None:
                raise error

    async def _send(
        self, client: aiomqtt.Client, window: Sequence[tuple[str, list[OutboxRow], list[Metric]]]
    ) -> tuple[list[bool], aiomqtt.MqttError | None]:
        """Number and publish a window of DDATA in one step of the loop: a
        measurement published in between would otherwise take a seq out of
        order (send_window hands every message to paho before it first awaits)."""
        messages = []
        for device, _, metrics in window:
            payload = self._encode_data(device, metrics)
            messages.append((self._topic(MessageType.DDATA, device), payload, 1, False))
            last = self._last.setdefault(device, {})
            for metric in metrics:
                if not metric.is_historical:
                    last[metric.name] = metric
        return await send_window(client, messages)


__all__ = ["BD_SEQ_METRIC", "REBIRTH_METRIC", "SparkplugPublisher", "device_specs"]
