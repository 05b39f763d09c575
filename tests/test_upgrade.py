"""Upgrades keep the data (issue 16): a store written by the previous release
(tests/fixtures/store-v3.db, made by tests/fixtures/make_store.py with edged
0.1.0, store schema 3) is opened by today's code, migrated, and nothing is
lost: every interval, every outbox row, every peak and every engine state is
still there, and the outbox drains to a real broker. A store from a newer
edged is refused, untouched, with both schema versions in the message."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from edged.config.schema import Mqtt
from edged.io.mqtt import Publisher
from edged.io.store import MIGRATIONS, Store, StoreError
from tests.support.mqtt import Broker, collect

FIXTURE = Path(__file__).parent / "fixtures" / "store-v3.db"
SITE = "fixture-site"

# What the fixture holds, read once with the sqlite3 shell when it was made
# (not with edged): schema 3, two devices, ten 1-second intervals each, and
# an outbox of those 20 records plus 2 events, never sent.
FIXTURE_SCHEMA = 3
FIXTURE_INTERVALS = 20
FIXTURE_OUTBOX = 22
FIXTURE_OUTBOX_SEQS = list(range(1, 23))


def rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [tuple(r) for r in conn.execute(sql).fetchall()]
    finally:
        conn.close()


def snapshot(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    """The fixture's rows, in the columns schema 3 has: a later schema may add
    columns, but must keep these values."""
    return {
        "intervals": rows(
            db,
            'SELECT id, device, channel, start, "end", duration_s, value, unit, demand, flags,'
            " quality, time_state, payload, created_at FROM intervals ORDER BY id",
        ),
        "outbox": rows(
            db, "SELECT seq, topic, payload, qos, retain, created_at FROM outbox ORDER BY seq"
        ),
        "peak_state": rows(db, "SELECT device, channel, state FROM peak_state ORDER BY device"),
        "channel_state": rows(
            db,
            "SELECT device, channel, counter, counter_at, last_end, state FROM channel_state"
            " ORDER BY device",
        ),
        "reads": rows(db, "SELECT * FROM reads ORDER BY id"),
        "measurements": rows(db, "SELECT * FROM measurements ORDER BY id"),
    }


@pytest.fixture
def old_store(tmp_path: Path) -> Path:
    db = tmp_path / "edged.db"
    shutil.copyfile(FIXTURE, db)
    return db


def test_the_fixture_is_the_previous_releases_store(old_store: Path) -> None:
    assert rows(old_store, "PRAGMA user_version") == [(FIXTURE_SCHEMA,)]
    before = snapshot(old_store)
    assert len(before["intervals"]) == FIXTURE_INTERVALS
    assert [r[0] for r in before["outbox"]] == FIXTURE_OUTBOX_SEQS
    assert len(before["peak_state"]) == 2


async def test_opening_an_old_store_migrates_it_and_keeps_every_row(old_store: Path) -> None:
    before = snapshot(old_store)
    store = await Store.open(old_store)
    try:
        assert rows(old_store, "PRAGMA user_version") == [(len(MIGRATIONS),)]
        assert snapshot(old_store) == before
        # ... and today's code reads them as the old code wrote them. The
        # figures are the fixture's, read with the sqlite3 shell.
        peaks = await store.peak_states()
        unit1, unit2 = peaks[("unit1", "energy_import")], peaks[("unit2", "energy_import")]
        assert unit1.block is not None
        assert unit1.rolling is not None
        assert unit2.block is not None
        assert unit1.block.demand == 3625.2
        assert unit1.rolling.demand == 3619.8
        assert unit2.block.demand == 3650.4
        states = await store.channel_states()
        assert states[("unit1", "energy_import")].counter == 21330
        assert states[("unit2", "energy_import")].counter == 21337
        assert (await store.outbox_depth()).count == FIXTURE_OUTBOX
        # New records carry on after the old ones: seq never goes back.
        assert store.allocate_seq() == FIXTURE_OUTBOX_SEQS[-1] + 1
    finally:
        await store.close()
    # Opening it again (already migrated) changes nothing either.
    store = await Store.open(old_store)
    await store.close()
    assert snapshot(old_store) == before


@pytest.mark.integration
async def test_the_old_outbox_drains_to_the_broker_after_the_upgrade(
    old_store: Path, broker: Broker
) -> None:
    before = snapshot(old_store)
    unsent = {(topic, json.dumps(json.loads(payload), sort_keys=True))
              for _seq, topic, payload, _q, _r, _at in before["outbox"]}  # fmt: skip
    assert len(unsent) == FIXTURE_OUTBOX
    store = await Store.open(old_store)
    publisher = Publisher(
        Mqtt(host=broker.host, port=broker.port),
        store,
        "edged-upgrade",
        f"edged/{SITE}/gateway/status",
        b'{"state": "offline"}',
    )
    try:
        async with collect(broker, f"edged/{SITE}/#") as got:
            task = asyncio.create_task(publisher.run())
            try:
                await got.wait_for(
                    lambda c: len(c.messages) >= FIXTURE_OUTBOX, 30, "the old outbox"
                )
                for _ in range(100):  # the rows go once the broker's PUBACKs are in
                    if (await store.outbox_depth()).count == 0:
                        break
                    await asyncio.sleep(0.1)
                assert (await store.outbox_depth()).count == 0
            finally:
                await publisher.stop({})
                await asyncio.wait_for(task, 10)
        received = {(t, json.dumps(p, sort_keys=True)) for t, p, _retained in got.messages}
        assert received == unsent
        records = [p for t, p, _r in got.messages if "/interval/" in t]
        assert sorted(r["seq"] for r in records) == sorted(
            json.loads(payload)["seq"] for *_x, payload, _c in before["intervals"]
        )
    finally:
        await store.close()
    after = snapshot(old_store)
    assert after["outbox"] == []
    # Sending deletes outbox rows only: the records, peaks and states stay.
    for table in ("intervals", "peak_state", "channel_state", "reads", "measurements"):
        assert after[table] == before[table], table


async def test_a_store_from_a_newer_edged_is_refused_and_left_alone(old_store: Path) -> None:
    conn = sqlite3.connect(old_store)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    before = snapshot(old_store)
    with pytest.raises(StoreError) as refused:
        await Store.open(old_store)
    message = str(refused.value)
    assert "store schema version 99" in message
    assert f"knows store schema versions up to {len(MIGRATIONS)}" in message
    assert "docs/deployment.md#roll-back" in message
    # Not moved aside as damaged, not migrated, not written.
    assert rows(old_store, "PRAGMA user_version") == [(99,)]
    assert snapshot(old_store) == before
    assert sorted(p.name for p in old_store.parent.iterdir()) == ["edged.db"]


def test_counters_in_the_fixture_are_exact_decimals() -> None:
    """The fixture's engine state stores counters as text: an upgrade must not
    turn them into floats (a 64-bit counter would lose its low digits)."""
    state = rows(FIXTURE, "SELECT counter FROM channel_state WHERE device = 'unit1'")
    assert state == [("21330",)]
    assert Decimal(state[0][0]) == 21330
