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

from typing import Any

import aiomqtt
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode


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
