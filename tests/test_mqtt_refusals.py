"""MQTT 5 refusals (issue 20, defect 3): a PUBACK with a failure reason code
keeps the outbox row, is reported once per episode and counted in the
status, and the row is retried with backoff until the broker accepts it.

The refusal comes from a real mosquitto whose ACL lacks the device topics
(mosquitto answers an MQTT 5 QoS 1 publish it may not accept with PUBACK
reason code 0x87, not authorised)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edged.config.schema import Mqtt
from edged.io.mqtt import Publisher, Refusal
from edged.io.store import OutboxMessage, Store
from edged.sim.broker import Mosquitto, free_port, mosquitto_path
from tests.fake_mqtt5 import FakeMqtt5Broker
from tests.support.mqtt import collect

pytestmark = pytest.mark.integration

DEVICE_TOPIC = "edged/s1/device/unit1/interval/energy_import"
EVENT_TOPIC = "edged/s1/gateway/event"


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    if mosquitto_path() is None:
        pytest.fail("mosquitto is not installed (apt-get install -y mosquitto)")
    broker = Mosquitto(
        port=free_port(), workdir=tmp_path, acl="topic readwrite edged/s1/gateway/#\n"
    )
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


async def wait_until(predicate: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_refused_publish_stays_in_the_outbox_and_is_retried(
    tmp_path: Path, acl_broker: Mosquitto
) -> None:
    store = await Store.open(tmp_path / "edged.db")
    device_seq, event_seq = store.allocate_seq(), store.allocate_seq()
    await store.commit_boundary(
        [], [], {},
        [(device_seq, OutboxMessage(topic=DEVICE_TOPIC, payload=b'{"id":"r1"}')),
         (event_seq, OutboxMessage(topic=EVENT_TOPIC, payload=b'{"kind":"x"}'))],
    )  # fmt: skip
    settings = Mqtt.model_validate({"host": "127.0.0.1", "port": acl_broker.port, "protocol": "5"})
    publisher = Publisher(settings, store, "edged-s1", "edged/s1/gateway/status", b"{}")
    reports: list[Refusal] = []
    publisher.on_refused(reports.append)
    task = asyncio.create_task(publisher.run())
    try:
        # the allowed event goes; the refused record stays, and is tried again
        await wait_until(lambda: publisher.refusals.total >= 2, 15, "a retry")
        rows = await store.outbox_batch(10)
        assert [r.seq for r in rows] == [device_seq]
        assert len(reports) == 1  # one report for the episode, not one per retry
        assert reports[0].reason_code == 0x87
        assert reports[0].topic == DEVICE_TOPIC
        status = publisher.refusals.status()
        assert status["refusing"] is True
        assert status["last_reason"] == "not authorized"
        # the operator fixes the ACL: the broker comes back allowing everything
        acl_broker.stop()
        acl_broker.acl = None
        acl_broker.start()
        async with collect(acl_broker, "edged/s1/device/#") as got:
            await wait_until(lambda: bool(got.messages), 30, "the record delivered")
        assert got.messages[0][0] == DEVICE_TOPIC
        await wait_until(lambda: not publisher.refusals.refusing, 10, "refusing cleared")
        assert await store.outbox_batch(10) == []
    finally:
        await publisher.stop({})
        await asyncio.wait_for(task, 10)
        await store.close()


async def test_quota_exceeded_from_a_fake_mqtt5_broker(tmp_path: Path) -> None:
    """PUBACK 0x97 (quota exceeded) for the device topics until the quota
    frees: kept, counted, retried, then delivered once."""
    quota_full = [True]
    fake = FakeMqtt5Broker(lambda topic: 0x97 if quota_full[0] and "/device/" in topic else 0)
    port = await fake.start()
    store = await Store.open(tmp_path / "edged.db")
    seqs = [store.allocate_seq() for _ in range(3)]
    await store.commit_boundary(
        [],
        [],
        {},
        [(s, OutboxMessage(topic=DEVICE_TOPIC, payload=f'{{"n":{s}}}'.encode())) for s in seqs],
    )
    settings = Mqtt.model_validate({"host": "127.0.0.1", "port": port, "protocol": "5"})
    publisher = Publisher(settings, store, "edged-s1", "edged/s1/gateway/status", b"{}")
    reports: list[Refusal] = []
    publisher.on_refused(reports.append)
    task = asyncio.create_task(publisher.run())
    try:
        await wait_until(lambda: len(fake.refused) >= 6, 15, "two rounds of refusals")
        assert [r.seq for r in await store.outbox_batch(10)] == seqs
        (report,) = reports
        assert (report.reason_code, report.reason, report.count) == (0x97, "quota exceeded", 3)
        assert publisher.refusals.status()["refused_total"] >= 6
        quota_full[0] = False
        await wait_until(lambda: len(fake.accepted) >= 3, 15, "delivery")
        await wait_until(lambda: not publisher.refusals.refusing, 10, "refusing cleared")
        assert await store.outbox_batch(10) == []
        assert [p for t, p in fake.accepted if t == DEVICE_TOPIC] == [
            f'{{"n":{s}}}'.encode() for s in seqs
        ]
    finally:
        await publisher.stop({})
        await asyncio.wait_for(task, 10)
        await store.close()
        await fake.stop()
