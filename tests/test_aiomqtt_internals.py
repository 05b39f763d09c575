"""A canary for the aiomqtt internals edged's publisher relies on.

Backlog drains and fast-poll values go straight through paho
(edged/io/paho_window.py): aiomqtt's public publish() costs a task, an event
and a timer per message and held a drain under the rate bench/drain.py asks
for. That uses aiomqtt's private `_client` (the paho client) and
`_pending_publishes` (mid -> object whose set() its on_publish calls). aiomqtt
is pinned to the minor these were read from; if an upgrade changes them, this
fails loudly, before a drain silently never sees its acknowledgements.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiomqtt
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edged.sim.broker import Mosquitto


class _Recorder:
    def __init__(self) -> None:
        self.calls = 0

    def set(self) -> None:
        self.calls += 1


def test_aiomqtt_is_the_minor_edged_was_written_against() -> None:
    from importlib.metadata import version

    assert version("aiomqtt").startswith("2.5."), "re-read edged/io/paho_window.py"


async def test_the_paho_client_and_the_pending_publishes_table_are_where_edged_expects() -> None:
    client = aiomqtt.Client("127.0.0.1", port=1, protocol=aiomqtt.ProtocolVersion.V5)
    paho: Any = client._client
    assert isinstance(paho, mqtt.Client)
    pending: Any = client._pending_publishes
    assert isinstance(pending, dict)
    # aiomqtt's on_publish (as paho calls it on a PUBACK) pops the mid and
    # calls set() on what it finds: edged puts its own entries there.
    entry = _Recorder()
    pending[7] = entry
    on_publish: Any = paho.on_publish
    properties: Any = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]
    on_publish(paho, None, 7, ReasonCode(PacketTypes.PUBACK, "Success"), properties)
    assert entry.calls == 1
    assert 7 not in pending


def test_paho_publish_answers_with_a_message_info() -> None:
    paho = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    info = paho.publish("edged/canary", b"x", qos=1)  # not connected: queued, not sent
    assert isinstance(info, mqtt.MQTTMessageInfo)
    assert isinstance(info.mid, int)
    assert info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN)
    assert callable(info.is_published)


# -- the keepalive at its deadlines (paho_window.drive_keepalive_by_deadline) ------------


def test_aiomqtt_starts_its_misc_loop_from_the_instance_attribute() -> None:
    import inspect

    # aiomqtt creates the keepalive task as `self._misc_loop()` when the socket
    # opens: an attribute set on the instance replaces it.
    source = inspect.getsource(aiomqtt.Client._on_socket_open)
    assert "self._misc_loop()" in source
    assert "loop_misc()" in inspect.getsource(aiomqtt.Client._misc_loop)


def test_paho_keeps_the_keepalive_times_edged_reads() -> None:
    from edged.io.paho_window import keepalive_due_s

    paho: Any = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    for name in ("_keepalive", "_last_msg_out", "_last_bytes_received", "_ping_t"):
        assert isinstance(getattr(paho, name), (int, float)), name
    assert mqtt.time_func() >= 0.0  # paho's clock, the one its times are on
    paho._keepalive = 30
    paho._last_msg_out = 100.0
    paho._last_bytes_received = 110.0
    paho._ping_t = 0
    # Next PINGREQ: 30 s after the last packet out (the older of the two).
    assert keepalive_due_s(paho, 120.0) == 10.0
    paho._last_msg_out = 125.0
    assert keepalive_due_s(paho, 126.0) == 14.0  # 110 + 30 - 126
    # A PINGREQ awaiting its PINGRESP: overdue 30 s after it was sent.
    paho._last_msg_out = paho._last_bytes_received = 200.0
    paho._ping_t = 195.0
    assert keepalive_due_s(paho, 200.0) == 25.0
    paho._keepalive = 0  # keepalive off: nothing due, the longest sleep
    assert keepalive_due_s(paho, 200.0) == 30.0


@pytest.mark.integration
async def test_the_deadline_keepalive_keeps_a_silent_connection_with_fewer_wakeups(
    broker: Mosquitto,
) -> None:
    """Nothing published for 7 s with a 3 s keepalive: mosquitto drops a client
    silent for 1.5 keepalives, so the connection living on proves the PINGREQs
    went out; paho's loop_misc ran at the deadlines, not every second."""
    from edged.io.paho_window import drive_keepalive_by_deadline

    client = aiomqtt.Client("127.0.0.1", broker.port, keepalive=3, identifier="keepalive-test")
    drive_keepalive_by_deadline(client)
    paho: Any = client._client
    calls: list[float] = []
    pings: list[float] = []
    loop_misc, send_pingreq = paho.loop_misc, paho._send_pingreq

    def counted_loop_misc() -> Any:
        calls.append(mqtt.time_func())
        return loop_misc()

    def counted_pingreq() -> Any:
        pings.append(mqtt.time_func())
        return send_pingreq()

    paho.loop_misc = counted_loop_misc
    paho._send_pingreq = counted_pingreq
    async with client:
        await asyncio.sleep(7.0)
        await client.publish("edged/keepalive", b"still here", qos=1)  # needs the PUBACK
    assert len(pings) >= 2  # about 3 s and 6 s after connecting
    # aiomqtt's own loop: 7-8 calls in 7 s (measured: 7); at the deadlines:
    # 3 (measured), plus at most one retry per deadline the timer fired early for.
    assert len(calls) <= 6, calls
