"""A broker that refuses edged's credentials says so, with the config keys to
look at (issue 16): a real mosquitto with a password file and no anonymous
access, and edged's Publisher connecting with a wrong password, with none,
and with the right one."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode
from structlog.testing import capture_logs

from edged.config.schema import Mqtt
from edged.io.brokerdiag import explain_connect_error
from edged.io.mqtt import Publisher
from edged.io.store import OutboxMessage, Store
from edged.sim.broker import Mosquitto, free_port, mosquitto_path
from tests.support.store import edged, populate

pytestmark = pytest.mark.integration

USER = "gateway7"
PASSWORD = "correct horse"


@pytest.fixture
def locked_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if mosquitto_path() is None or not Path(tool).exists():
        pytest.fail("mosquitto and mosquitto_passwd are needed (apt-get install -y mosquitto)")
    passwords = tmp_path / "passwd"
    subprocess.run([tool, "-b", "-c", str(passwords), USER, PASSWORD], check=True)
    passwords.chmod(0o600)
    broker = Mosquitto(port=free_port(), workdir=tmp_path, password_file=passwords)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(tmp_path / "edged.db")
    try:
        yield s
    finally:
        await s.close()


async def first_error(settings: Mqtt, store: Store) -> tuple[str, list[MutableMapping[str, Any]]]:
    publisher = Publisher(settings, store, "edged-test", "edged/s/gateway/status", b"{}")
    with capture_logs() as logs:
        task = asyncio.create_task(publisher.run())
        try:
            for _ in range(100):
                if publisher.last_error is not None:
                    break
                await asyncio.sleep(0.05)
        finally:
            await publisher.stop({})
            await asyncio.wait_for(task, 15)
    assert publisher.last_error is not None, "the publisher never reported the refusal"
    return publisher.last_error, logs


async def test_a_wrong_password_is_reported_as_refused_credentials(
    tmp_path: Path, locked_broker: Mosquitto, store: Store
) -> None:
    wrong = tmp_path / "mqtt.password"
    wrong.write_text("battery staple\n")
    settings = Mqtt(
        host=locked_broker.host, port=locked_broker.port, username=USER, password_file=wrong
    )
    error, logs = await first_error(settings, store)
    broker = f"127.0.0.1:{locked_broker.port}"
    # mosquitto answers a wrong password with "not authorised" (3.1.1 code 5)
    assert error.startswith(f"the broker {broker} refused user '{USER}' (")
    assert f"the password from {wrong}" in error
    assert "check mqtt.username and mqtt.password_file / mqtt.password_env" in error
    assert PASSWORD not in error
    assert "battery staple" not in error
    refused = [e for e in logs if e["event"] == "mqtt connection refused"]
    assert refused
    assert refused[0]["log_level"] == "error"
    assert refused[0]["error"] == error


async def test_no_user_name_on_a_broker_without_anonymous_access(
    locked_broker: Mosquitto, store: Store
) -> None:
    settings = Mqtt(host=locked_broker.host, port=locked_broker.port)
    error, _logs = await first_error(settings, store)
    assert error.startswith(
        f"the broker 127.0.0.1:{locked_broker.port} does not accept anonymous clients ("
    )
    assert error.endswith("set mqtt.username and mqtt.password_file (or mqtt.password_env)")


async def test_a_wrong_password_over_mqtt_5(
    tmp_path: Path, locked_broker: Mosquitto, store: Store
) -> None:
    wrong = tmp_path / "mqtt.password"
    wrong.write_text("battery staple\n")
    settings = Mqtt(
        host=locked_broker.host,
        port=locked_broker.port,
        protocol="5",
        username=USER,
        password_file=wrong,
    )
    error, _logs = await first_error(settings, store)
    assert f"the broker 127.0.0.1:{locked_broker.port} refused" in error
    assert "mqtt.username and mqtt.password_file / mqtt.password_env" in error


async def test_the_right_password_connects_and_delivers(
    tmp_path: Path, locked_broker: Mosquitto, store: Store
) -> None:
    """The refusals above are the password's doing: the right one gets in."""
    right = tmp_path / "mqtt.password"
    right.write_text(PASSWORD + "\n")
    settings = Mqtt(
        host=locked_broker.host, port=locked_broker.port, username=USER, password_file=right
    )
    seq = store.allocate_seq()
    await store.commit_boundary(
        [], [], {}, [(seq, OutboxMessage(topic="edged/s/test", payload=b"{}"))]
    )
    publisher = Publisher(settings, store, "edged-test", "edged/s/gateway/status", b"{}")
    task = asyncio.create_task(publisher.run())
    try:
        for _ in range(100):
            if (await store.outbox_depth()).count == 0:
                break
            await asyncio.sleep(0.05)
        assert (await store.outbox_depth()).count == 0
        assert publisher.last_error is None
    finally:
        await publisher.stop({})
        await asyncio.wait_for(task, 15)


def test_bad_user_name_or_password_names_what_edged_sent() -> None:
    """CONNACK 134 (MQTT 5 "Bad User Name or Password"; 3.1.1 code 4), which
    mosquitto does not send but other brokers do."""
    refused = MqttConnectError(ReasonCode(PacketTypes.CONNACK, identifier=134))
    settings = Mqtt(username="gw", password_env="EDGED_MQTT_PASSWORD")
    assert explain_connect_error(refused, settings, "broker.example:8883") == (
        "the broker broker.example:8883 refused the credentials ([code:134] Bad user name or "
        "password): edged sent user name 'gw' and the password from $EDGED_MQTT_PASSWORD; "
        "check mqtt.username and mqtt.password_file / mqtt.password_env, and the broker's "
        "password file"
    )
    assert explain_connect_error(MqttConnectError(4), settings, "b:1883") is not None
    assert "refused the credentials" in str(
        explain_connect_error(MqttConnectError(4), settings, "b:1883")
    )


async def test_edged_replay_says_the_broker_refused_the_credentials(
    tmp_path: Path, locked_broker: Mosquitto
) -> None:
    """The operator's `edged replay` connects with the service's settings: a
    refusal there names the keys too."""
    populated = await populate(tmp_path)
    wrong = tmp_path / "mqtt.password"
    wrong.write_text("battery staple\n")
    config = populated.config.with_name("replay.yaml")
    config.write_text(
        populated.config.read_text()
        + f"mqtt: {{host: 127.0.0.1, port: {locked_broker.port}, username: {USER},"
        f" password_file: {wrong}}}\n"
    )
    result = edged("replay", "-c", str(config), "--from", "2026-09-27", "--to", "2026-09-28")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "cannot connect to the MQTT broker: the broker 127.0.0.1:" in result.stderr
    assert f"refused user '{USER}'" in result.stderr
    assert "check mqtt.username and mqtt.password_file / mqtt.password_env" in result.stderr
