"""The one place edged reaches into aiomqtt's internals (aiomqtt 2.5, pinned).

Backlog drains and fast-poll values go straight through paho: aiomqtt's
public publish() costs a task, an event and a timer per message, and a scan
of every pending call, which held a backlog drain to the rate of a bare
aiomqtt loop (bench/drain.py) and was the largest cost of fast polling
(bench/fastpoll.py). What that needs of aiomqtt is `client._client` (the paho
client) and `client._pending_publishes` (mid -> object whose set() aiomqtt's
on_publish calls), nothing else; tests/test_aiomqtt_internals.py fails
loudly if an upgrade changes either.

The keepalive: aiomqtt runs paho's `loop_misc()` once a second for the whole
connection (`Client._misc_loop`), a wake-up a second that an idle gateway does
not need. `drive_keepalive_by_deadline` replaces that loop on the client
(aiomqtt creates it from `self._misc_loop` when the socket opens) with one that
sleeps until paho has something to do: a PINGREQ due `keepalive` after the
last packet sent or received, or a PINGRESP overdue. paho's own rules decide,
as before; only the idle calls are gone. This reads paho's `_keepalive`,
`_last_msg_out`, `_last_bytes_received` and `_ping_t` (paho 2.1 and 2.2), also checked
by the canary test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, cast

import aiomqtt
import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties

PUBLISH_TIMEOUT_S = 10.0
# Bounds of the keepalive loop's sleep: a deadline just missed by the timer
# (paho compares with >=) is retried this soon; and nothing sleeps longer than
# this whatever the keepalive, so a clock oddity cannot silence the keepalive.
MISC_MIN_S = 0.05
MISC_MAX_S = 30.0
# Woken this much after the deadline, so that paho's `now - last >= keepalive`
# holds at the first call.
MISC_LATE_S = 0.01


def publish_qos0(client: aiomqtt.Client, topic: str, payload: bytes) -> bool:
    """Fire and forget, no task: True when paho took the message."""
    paho: mqtt.Client = client._client
    return paho.publish(topic, payload, qos=0).rc == mqtt.MQTT_ERR_SUCCESS


class _Window:
    """The acknowledgements of one window of publishes."""

    __slots__ = ("acked", "done", "left", "refused")

    def __init__(self, size: int) -> None:
        self.acked = [False] * size
        # index -> MQTT 5 reason code of a PUBACK that refused the message
        self.refused: dict[int, int] = {}
        self.left = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class _Ack:
    """One message's entry in aiomqtt's table of pending publishes, whose
    on_publish callback calls `set()` when paho has the PUBACK."""

    __slots__ = ("index", "window")

    def __init__(self, window: _Window, index: int) -> None:
        self.window = window
        self.index = index

    def set(self) -> None:
        window = self.window
        if window.acked[self.index] or self.index in window.refused:
            return
        window.acked[self.index] = True
        window.left -= 1
        if window.left == 0 and not window.done.done():
            window.done.set_result(None)

    def refuse(self, reason_code: int) -> None:
        """The broker answered, but with a failure reason code (MQTT 5
        PUBACK >= 0x80: 0x87 not authorised, 0x97 quota exceeded, ...): the
        message was not accepted and must not count as delivered."""
        window = self.window
        if window.acked[self.index] or self.index in window.refused:
            return
        window.refused[self.index] = reason_code
        window.left -= 1
        if window.left == 0 and not window.done.done():
            window.done.set_result(None)


def _watch_reason_codes(paho: mqtt.Client) -> None:
    """Route PUBACKs of edged's windows through their reason code.

    aiomqtt's on_publish ignores the reason code, so a refusal would look
    like a delivery; this wrapper (installed once per paho client) gives each
    `_Ack` the code and leaves every other publish to aiomqtt."""
    original: Any = paho.on_publish
    if getattr(original, "_edged_reason_codes", False):
        return

    def on_publish(client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        pending: Any = getattr(client, "_edged_pending", None)
        entry = pending.get(mid) if pending is not None else None
        if isinstance(entry, _Ack):
            value = int(getattr(reason_code, "value", 0) or 0)
            if value >= 0x80:
                del pending[mid]
                entry.refuse(value)
                return
        if original is not None:
            original(client, userdata, mid, reason_code, properties)

    on_publish._edged_reason_codes = True  # type: ignore[attr-defined]
    paho.on_publish = on_publish


async def send_window(
    client: aiomqtt.Client,
    messages: Sequence[tuple[str, bytes, int, bool]],
    refused: dict[int, int] | None = None,
    properties: Sequence[Properties | None] | None = None,
) -> tuple[list[bool], aiomqtt.MqttError | None]:
    """Publish `messages` (topic, payload, qos, retain) at once and wait for
    their acknowledgements: which were acknowledged, and the error that ended
    the window early, if any. A message the broker refused (MQTT 5 PUBACK
    with a failure reason code) is not acknowledged; `refused`, if given,
    learns its index and reason code.

    Straight through paho: aiomqtt's publish() costs a task, an event, a
    timer and a scan of every pending call per message, which held a backlog
    drain to the rate of a bare aiomqtt loop, under 5000 msg/s
    (bench/drain.py). The PUBACKs still arrive through aiomqtt's on_publish,
    via its table of pending publishes (aiomqtt 2.5, pinned in pyproject)."""
    paho = client._client
    pending = cast(dict[int, Any], client._pending_publishes)
    paho._edged_pending = pending  # type: ignore[attr-defined]
    _watch_reason_codes(paho)
    window = _Window(len(messages))
    mids: list[int] = []
    error: aiomqtt.MqttError | None = None
    try:
        for index, (topic, payload, qos, retain) in enumerate(messages):
            props = properties[index] if properties is not None else None
            info = paho.publish(topic, payload, qos, retain, props)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                error = aiomqtt.MqttCodeError(info.rc, "Could not publish message")
                break
            if qos == 0 or info.is_published():
                window.acked[index] = True
                continue
            window.left += 1
            pending[info.mid] = _Ack(window, index)
            mids.append(info.mid)
        if window.left:
            try:
                async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                    await window.done
            except TimeoutError:
                error = error or aiomqtt.MqttError(
                    f"no acknowledgement within {PUBLISH_TIMEOUT_S:g} s"
                )
        if refused is not None:
            refused.update(window.refused)
        return window.acked, error
    finally:
        for mid in mids:
            entry = pending.get(mid)
            if isinstance(entry, _Ack) and entry.window is window:
                del pending[mid]


def keepalive_due_s(paho: mqtt.Client, now_s: float) -> float:
    """Seconds from `now_s` (paho's clock, `mqtt.time_func`) until paho's
    loop_misc has work: a PINGREQ to send or a PINGRESP overdue."""
    keepalive = float(paho._keepalive)
    if keepalive <= 0:
        return MISC_MAX_S
    due = min(float(paho._last_msg_out), float(paho._last_bytes_received)) + keepalive
    if paho._ping_t > 0:
        due = min(due, float(paho._ping_t) + keepalive)
    return due - now_s


def drive_keepalive_by_deadline(client: aiomqtt.Client) -> None:
    """Run paho's loop_misc at its deadlines instead of every second (module doc)."""
    paho: mqtt.Client = client._client

    async def misc_loop() -> None:
        while paho.loop_misc() == mqtt.MQTT_ERR_SUCCESS:
            wait_s = keepalive_due_s(paho, mqtt.time_func()) + MISC_LATE_S
            await asyncio.sleep(min(max(wait_s, MISC_MIN_S), MISC_MAX_S))

    client._misc_loop = misc_loop  # type: ignore[method-assign]
