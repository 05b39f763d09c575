"""Bounded disk end to end: the real daemon, simulator and broker.

A disk budget smaller than an empty database puts the daemon in the disk alarm
at once: the retained status says so, a `disk_budget` event is published,
measurements and raw reads are no longer stored, and intervals still are and
are still delivered. A damaged database is moved aside at start-up and
reported with a `store_corrupt` event, and the fresh one works."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from edged.io.queries import connect_readonly
from tests.support.config import site_config, tcp_device
from tests.support.daemon import Daemon
from tests.support.meters import meter
from tests.support.mqtt import Broker, Collector, collect, events, intervals
from tests.support.schema import validate_messages

pytestmark = pytest.mark.integration

STATUS = "edged/disk-site/gateway/status"


def write_config(tmp_path: Path, broker: Broker, modbus_port: int, **storage: Any) -> Path:
    """unit1 with a fast-poll measurement every 200 ms; `storage` settings merged in."""
    device = tcp_device(
        "unit1",
        modbus_port,
        measurements={
            "every": "200ms",
            "points": [{"name": "pulses", "register": 0, "type": "uint32"}],
        },
    )
    return site_config(
        tmp_path,
        devices=[device],
        mqtt_port=broker.port,
        site="disk-site",
        timezone=None,
        mqtt={"topic_prefix": None},
        storage=storage,
    )


def counts(db: Path) -> dict[str, int]:
    conn = connect_readonly(db)
    try:
        return {
            table: int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
            for table in ("reads", "measurements", "intervals")
        }
    finally:
        conn.close()


def statuses(got: Collector) -> list[dict[str, Any]]:
    return [p for t, p, _ in got.messages if t == STATUS]


async def test_disk_budget_reached_raises_the_alarm_and_sheds(
    tmp_path: Path, broker: Broker
) -> None:
    db = tmp_path / "state" / "edged.db"
    storage = {"disk_budget": "16 kB", "min_free": 0, "check_every": "500ms"}
    async with meter() as (_server, port), collect(broker, "edged/#") as got:
        config = write_config(tmp_path, broker, port, **storage)
        async with Daemon(config, tmp_path) as d:
            await got.wait_for(
                lambda c: any(s.get("storage_shedding") == ["measurements", "reads"]
                              for s in statuses(c)),
                20, "a status shedding measurements and reads",
            )  # fmt: skip
            await got.wait_for(
                lambda c: any(e["details"]["storage_shedding"] == ["measurements", "reads"]
                              for e in events(c, "disk_budget")),
                10, "the disk_budget event",
            )  # fmt: skip
            await asyncio.sleep(1.2)  # the check in flight finishes its deletes
            before = counts(db)
            delivered_before = len(intervals(got))
            await asyncio.sleep(2.5)  # more than two intervals and several checks
            after = counts(db)
            await got.wait_for(
                lambda c: len(intervals(c)) >= delivered_before + 2, 10, "intervals after"
            )
            assert await d.stop() == 0
    validate_messages(got.messages)
    alarm = [s for s in statuses(got) if s["state"] == "online" and s["disk_alarm"]]
    assert alarm, statuses(got)
    assert alarm[-1]["disk_alarm"] == "budget"
    assert alarm[-1]["disk_budget_bytes"] == 16_000
    assert alarm[-1]["disk_used_bytes"] > 16_000
    changes = [(e["details"]["change"], e["details"]["storage_shedding"])
               for e in events(got, "disk_budget")]  # fmt: skip
    # Entered (shedding measurements first; straight on to reads when no
    # measurement was stored yet), perhaps escalated, never left: the alarm
    # does not flap while use stays over the budget.
    assert changes[0][0] == "entered"
    assert changes[0][1] in (["measurements"], ["measurements", "reads"])
    assert [c for c, _shed in changes[1:]] in ([], ["escalated"])
    assert changes[-1][1] == ["measurements", "reads"]
    # Shed: nothing of these kinds is stored any more (and what was, is deleted) ...
    assert before["measurements"] == after["measurements"] == 0
    assert before["reads"] == after["reads"] == 0
    # ... while intervals are still stored and delivered, and fast polls still published.
    assert after["intervals"] >= before["intervals"] + 2
    assert len(got.payloads("/measurement")) > 10


async def test_damaged_database_is_moved_aside_and_reported(tmp_path: Path, broker: Broker) -> None:
    db = tmp_path / "state" / "edged.db"
    db.parent.mkdir()
    garbage = b"\x00not an sqlite file\xff" * 300
    db.write_bytes(garbage)
    async with meter() as (_server, port), collect(broker, "edged/#") as got:
        config = write_config(tmp_path, broker, port, check_every="1s")
        async with Daemon(config, tmp_path) as d:
            await got.wait_for(lambda c: events(c, "store_corrupt") != [], 20, "store_corrupt")
            await got.wait_for(lambda c: len(intervals(c)) >= 2, 20, "intervals from the new db")
            await asyncio.sleep(1.5)  # a measurement flush rides on a boundary commit
            stored = counts(db)
            assert await d.stop() == 0
    validate_messages(got.messages)
    (event,) = events(got, "store_corrupt")
    moved = Path(event["details"]["moved_to"])
    assert moved.parent == db.parent
    assert moved.name.startswith("edged.db.corrupt-")
    assert await asyncio.to_thread(moved.read_bytes) == garbage  # kept as it was
    assert "not a database" in event["details"]["error"]
    assert event["device"] is None
    # the fresh store works: intervals and fast-poll measurements are stored
    assert stored["intervals"] >= 2
    assert stored["measurements"] > 0
    assert stored["reads"] >= 2
    logged = [json.loads(line) for line in (tmp_path / "edged.log").read_text().splitlines()
              if line.startswith("{")]  # fmt: skip
    damaged = [e for e in logged if e["event"].startswith("database damaged")]
    assert [e["level"] for e in damaged] == ["error"]
