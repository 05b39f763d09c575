"""The store's identity (issue 20, defect 8): a random store_id kept in the
database and carried by every payload, so seq is unique per store_id; a
database deleted or replaced while edged runs stops it with a clear error
instead of writing on unseen."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from edged.app.poller import Recorder, outbox_pending
from edged.core.model import Event
from edged.core.payloads import Topics
from edged.io.store import Store, StoreReplaced
from edged.sim.meter import MeterServer
from tests.support.config import site_config, tcp_device
from tests.support.daemon import Daemon
from tests.support.meters import pmc1_meter
from tests.support.mqtt import Broker, collect, gateway_status, intervals

TOPICS = Topics("edged", "s1")


async def test_store_id_is_random_kept_and_per_store(tmp_path: Path) -> None:
    first = await Store.open(tmp_path / "a.db")
    a_id = first.store_id
    await first.close()
    assert re.fullmatch(r"[0-9a-f]{32}", a_id)
    again = await Store.open(tmp_path / "a.db")
    assert again.store_id == a_id  # kept in the store
    await again.close()
    other = await Store.open(tmp_path / "b.db")
    assert other.store_id != a_id
    event = Event(device=None, kind="x", at=datetime(2026, 1, 1, tzinfo=UTC), message="m")
    ((_seq, message),) = outbox_pending(other, TOPICS, "s1", [], [event]).messages
    assert f'"store_id":"{other.store_id}"' in message.payload.decode()
    await other.close()


@pytest.mark.parametrize("how", ["deleted", "replaced"])
async def test_identity_check_sees_a_deleted_or_replaced_file(tmp_path: Path, how: str) -> None:
    db = tmp_path / "edged.db"
    store = await Store.open(db)
    try:
        store.check_identity()  # the file opened: fine
        if how == "deleted":
            db.unlink()
        else:
            shutil.copy(db, tmp_path / "copy.db")
            (tmp_path / "copy.db").replace(db)  # a restore over the live file
        with pytest.raises(StoreReplaced, match=how):
            store.check_identity()
        recorder = Recorder(store, on_committed=lambda: None)
        fatal: list[StoreReplaced] = []
        recorder.on_fatal = fatal.append
        task = asyncio.create_task(recorder.run())
        event = Event(device=None, kind="x", at=datetime(2026, 1, 1, tzinfo=UTC), message="m")
        recorder.submit(outbox_pending(store, TOPICS, "s1", [], [event]))
        await recorder.close()
        await asyncio.wait_for(task, 10)
        assert len(fatal) >= 1
        assert recorder.holding.counts()["held_messages"] == 1  # not written anywhere
    finally:
        await store.close()


@pytest.mark.integration
async def test_daemon_stops_when_its_database_is_deleted(
    tmp_path: Path, broker: Broker, ntp_port: int
) -> None:
    async with MeterServer({1: pmc1_meter()}) as server, collect(broker, "edged/#") as got:
        port = await server.start_tcp()
        config = site_config(
            tmp_path, devices=[tcp_device("unit1", port)], mqtt_port=broker.port, ntp_port=ntp_port
        )
        d = Daemon(config, tmp_path)
        try:
            await d.start()
            await got.wait_for(lambda c: len(intervals(c)) >= 2, 20, "2 intervals")
            db = tmp_path / "state" / "edged.db"
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{db}{suffix}")
            assert d.process is not None
            code = await asyncio.wait_for(d.process.wait(), 20)
        finally:
            await d.close()
    assert code == 1
    log = (tmp_path / "edged.log").read_text()
    assert f"the store {db} was deleted while edged was running" in log
    assert "Traceback" not in log
    assert not db.exists()  # nothing wrote a new empty store behind its back
    store_ids = {r["store_id"] for r in intervals(got)}
    statuses = [s for s in gateway_status(got) if s.get("state") == "online"]
    assert len(store_ids) == 1
    assert statuses[-1]["store_id"] in store_ids
