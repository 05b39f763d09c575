"""The liveness mark file (edged.io.liveness) and the app's use of it."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import struct
import threading
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from edged.app.liveness import LIVENESS_EVERY_S, Liveness
from edged.core.model import iso_utc, parse_iso_utc
from edged.io.liveness import (
    BLOCK_BYTES,
    LivenessFile,
    MarkWriter,
    decode_slot,
    encode_slot,
    later_mark,
    liveness_path,
    read_mark,
)
from edged.io.store import Store
from tests.support.config import daemon_config
from tests.support.daemon import Daemon
from tests.support.meters import meter
from tests.support.mqtt import Broker, collect, events

T0 = datetime(2026, 11, 21, 3, 14, 15, 250000, tzinfo=UTC)
T1 = datetime(2026, 11, 21, 3, 14, 25, 250000, tzinfo=UTC)
T2 = datetime(2026, 11, 21, 3, 14, 35, tzinfo=UTC)


def test_a_slot_is_one_block_with_magic_sequence_text_and_crc() -> None:
    block = encode_slot(7, T0)
    assert len(block) == BLOCK_BYTES
    text = b"2026-11-21T03:14:15.250Z"
    # Laid out by hand: magic, u64 sequence, u16 length, text, CRC-32 of those.
    body = b"EDGEDLV1" + (7).to_bytes(8, "little") + len(text).to_bytes(2, "little") + text
    assert block[: len(body)] == body
    assert block[len(body) : len(body) + 4] == struct.pack("<I", zlib.crc32(body))
    assert block[len(body) + 4 :] == bytes(BLOCK_BYTES - len(body) - 4)
    found = decode_slot(block)
    assert found is not None
    assert (found.sequence, found.mark) == (7, T0)


def test_a_torn_or_foreign_slot_is_rejected() -> None:
    block = bytearray(encode_slot(3, T0))
    block[30] ^= 0x01  # a bit of the text: the CRC no longer matches
    assert decode_slot(bytes(block)) is None
    assert decode_slot(bytes(BLOCK_BYTES)) is None  # never written
    assert decode_slot(b"EDGEDLV1") is None  # cut short


def test_the_mark_survives_reopening_and_alternates_slots(tmp_path: Path) -> None:
    path = liveness_path(tmp_path / "edged.db")
    assert path == tmp_path / "edged.db-liveness"
    file = LivenessFile(path)
    assert file.last is None
    assert path.stat().st_size == 2 * BLOCK_BYTES  # preallocated once
    file.write(T0)
    file.write(T1)
    file.close()
    assert path.stat().st_size == 2 * BLOCK_BYTES  # overwritten in place
    data = path.read_bytes()
    first, second = decode_slot(data[:BLOCK_BYTES]), decode_slot(data[BLOCK_BYTES:])
    assert first is not None
    assert second is not None
    # Sequence 1 went to slot 1, sequence 2 to slot 0.
    assert (first.sequence, first.mark) == (2, T1)
    assert (second.sequence, second.mark) == (1, T0)
    assert read_mark(path) == T1
    reopened = LivenessFile(path)
    assert reopened.last == T1
    reopened.write(T2)  # sequence 3: slot 1, the older one
    reopened.close()
    assert read_mark(path) == T2


def test_a_torn_last_write_falls_back_to_the_previous_mark(tmp_path: Path) -> None:
    path = tmp_path / "edged.db-liveness"
    file = LivenessFile(path)
    file.write(T0)  # slot 1
    file.write(T1)  # slot 0
    file.close()
    data = bytearray(path.read_bytes())
    # Power lost halfway through the last write: the slot's tail is old bytes.
    data[20:BLOCK_BYTES] = bytes(BLOCK_BYTES - 20)
    path.write_bytes(bytes(data))
    assert read_mark(path) == T0
    reopened = LivenessFile(path)
    assert reopened.last == T0
    reopened.write(T2)  # sequence 2 again, into the torn slot, not over T0
    reopened.close()
    assert read_mark(path) == T2
    second = decode_slot(path.read_bytes()[BLOCK_BYTES:])
    assert second is not None
    assert second.mark == T0


def test_no_file_or_no_valid_slot_reads_as_no_mark(tmp_path: Path) -> None:
    assert read_mark(tmp_path / "absent") is None
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\xff" * 2 * BLOCK_BYTES)
    assert read_mark(garbage) is None


def test_the_later_mark_wins() -> None:
    assert later_mark(None, None) is None
    assert later_mark(T0, None) == T0
    assert later_mark(None, T1) == T1
    assert later_mark(T1, T0) == T1


def test_the_period_keeps_idle_writes_under_a_tenth() -> None:
    # One 4 KiB block a mark: at most 3 MB an hour for the mark and everything
    # else (docs/performance.md, flash wear).
    assert 3600 / LIVENESS_EVERY_S * BLOCK_BYTES <= 1.5e6


async def test_an_older_version_s_store_mark_is_found_after_the_upgrade(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "edged.db")
    try:
        await store.set_mark("liveness", "2026-11-21T03:14:15.250Z")  # as edged <= 0.x wrote it
        liveness = Liveness(store, lambda: T1)
        assert await liveness.last() == T0  # no file yet: the store's mark
        await liveness.write(T1)
        assert await liveness.last() == T1  # the file's, later
        assert await store.get_mark("liveness") == "2026-11-21T03:14:15.250Z"  # not rewritten
        await liveness.final(T2)  # a clean stop: both
        assert await store.get_mark("liveness") == "2026-11-21T03:14:35Z"
        liveness.close()
        assert await Liveness(store, lambda: T2).last() == T2
    finally:
        await store.close()


async def test_a_store_mark_newer_than_the_file_wins(tmp_path: Path) -> None:
    """After a downgrade (the older edged kept marking the store) and upgrade again."""
    store = await Store.open(tmp_path / "edged.db")
    try:
        liveness = Liveness(store, lambda: T0)
        await liveness.write(T0)
        liveness.close()
        await store.set_mark("liveness", "2026-11-21T03:14:35Z")
        assert await Liveness(store, lambda: T0).last() == T2
    finally:
        await store.close()


async def test_an_unusable_file_sends_the_mark_to_the_store(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "edged.db")
    try:
        liveness_path(store.path).mkdir()  # a directory where the file should be
        liveness = Liveness(store, lambda: T1)
        assert not liveness.in_file
        await liveness.write(T1)
        assert await store.get_mark("liveness") == "2026-11-21T03:14:25.250Z"
        assert await liveness.last() == T1
    finally:
        await store.close()


def test_a_closed_file_refuses_writes(tmp_path: Path) -> None:
    file = LivenessFile(tmp_path / "m")
    file.close()
    with pytest.raises(ValueError, match="closed"):
        file.write(T0)


@pytest.mark.integration
async def test_a_killed_daemon_s_outage_starts_within_one_mark_period(
    tmp_path: Path, broker: Broker, ntp_port: int
) -> None:
    """SIGKILL (no clean-shutdown mark): the file holds a mark at most one
    period old, and the restart reports the outage from that mark
    (gateway_outage event; the intervals spanning it get POWER_FAIL)."""
    async with meter() as (_server, port), collect(broker, "edged/#") as got:
        config = daemon_config(tmp_path, broker.port, port, ntp_port)
        store = tmp_path / "state" / "edged.db"
        async with Daemon(config, tmp_path, autostart=False) as d:
            await d.start()
            await asyncio.sleep(1.5)
            killed_at = datetime.now(UTC)
            await d.stop(signal.SIGKILL)
            mark = read_mark(liveness_path(store))
            assert mark is not None
            # The reference clock agrees with the system clock (local NTP server).
            age_s = (killed_at - mark).total_seconds()
            assert -0.5 < age_s < LIVENESS_EVERY_S + 0.5
            with sqlite3.connect(store) as conn:
                clean = conn.execute("SELECT value FROM marks WHERE name='clean_shutdown'")
                assert clean.fetchone() == ("",)  # cleared at start, not set: unclean
            await d.start()
            await got.wait_for(lambda c: bool(events(c, "gateway_outage")), 20, "the outage")
            (outage,) = events(got, "gateway_outage")
            assert parse_iso_utc(outage["details"]["from"]) == mark
            assert parse_iso_utc(outage["details"]["to"]) >= killed_at
            assert outage["details"]["end_assumed"] is False
            assert await d.stop() == 0
    # The clean stop leaves the same final mark in the file and the store.
    with sqlite3.connect(store) as conn:
        marks = dict(conn.execute("SELECT name, value FROM marks"))
    file_mark = read_mark(liveness_path(store))
    assert file_mark is not None
    assert marks["liveness"] == marks["clean_shutdown"] == iso_utc(file_mark)


def test_the_writer_thread_marks_on_its_own_timer_and_skips_none(tmp_path: Path) -> None:
    path = tmp_path / "edged.db-liveness"
    file = LivenessFile(path)
    marks = iter([T0, None, T1])
    written = threading.Event()

    def mark() -> datetime | None:
        value = next(marks, None)
        if value == T1:
            written.set()
        return value

    writer = MarkWriter(file, mark, every_s=0.02)
    assert written.wait(5.0)
    writer.stop()
    assert writer.written in (1, 2)  # T0 at once; None skipped; T1 (unless stopped first)
    assert writer.take_error() is None
    assert read_mark(path) in (T0, T1)
    file.close()
    broken = MarkWriter(file, lambda: T2, every_s=60.0)  # closed underneath it
    broken.stop()
    assert broken.take_error() == "liveness file closed"
    assert broken.take_error() is None


def test_the_mark_comes_from_the_loop_s_snapshot_and_stops_when_it_is_stale(
    tmp_path: Path,
) -> None:
    class FakeStore:
        path = tmp_path / "edged.db"

    mono = [1000.0]
    liveness = Liveness(
        FakeStore(),  # type: ignore[arg-type]
        lambda: T0,
        monotonic=lambda: mono[0],
    )
    assert liveness.mark_now() is None  # the loop has not ticked yet
    liveness._refresh()  # the loop's tick at monotonic 1000 s: reference T0
    mono[0] = 1005.0
    assert liveness.mark_now() == T0 + timedelta(seconds=5)
    mono[0] = 1020.0  # two periods: still
    assert liveness.mark_now() == T0 + timedelta(seconds=20)
    mono[0] = 1020.5  # the loop missed two ticks: stuck, no mark
    assert liveness.mark_now() is None
    liveness.close()


@pytest.mark.looptime
async def test_the_loop_refreshes_on_whole_multiples_of_the_period(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "edged.db")
    loop = asyncio.get_running_loop()
    ticks: list[float] = []

    def now() -> datetime:
        ticks.append(loop.time())
        return T0 + timedelta(seconds=len(ticks))

    try:
        await asyncio.sleep(3.0 - loop.time() % 10.0)  # start off the grid
        liveness = Liveness(store, now, monotonic=loop.time)
        task = asyncio.create_task(liveness.run())
        await asyncio.sleep(25.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # At start, then on the 10 s grid of the loop's clock.
        assert [round(t % 10.0, 6) for t in ticks[1:]] == [0.0, 0.0]
        assert len(ticks) == 3
        # The writer's first mark, at start: the reference then.
        assert read_mark(liveness_path(store.path)) == T0 + timedelta(seconds=1)
        liveness.close()
    finally:
        await store.close()
