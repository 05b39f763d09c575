"""Full and read-only disks (issue 20, defect 4): the recorder stays up,
holds what it could not write, reports it, and writes all of it once the
disk accepts writes again; an unwritable store at start-up is a clean exit
naming the path and the OS's reason; the free-space alarm is checked before
every boundary commit.

The real-disk tests run on a small tmpfs mounted for the test (the machine
must let the test mount one: root with CAP_SYS_ADMIN); elsewhere they skip
with that reason, and the injected failing writer below covers the same
paths in the recorder."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from edged.app.housekeeping import BudgetDecision, DiskAlarm, DiskUsage, Housekeeper
from edged.app.poller import Recorder, outbox_pending
from edged.config.schema import Storage
from edged.core.backoff import Backoff
from edged.core.model import Event
from edged.core.payloads import Topics
from edged.io.store import Store
from edged.sim.meter import MeterServer
from tests.support.config import site_config, tcp_device
from tests.support.daemon import Daemon
from tests.support.meters import pmc1_meter
from tests.support.mqtt import (
    Broker,
    assert_unbroken,
    by_end,
    collect,
    events,
    gateway_status,
    intervals,
)

TOPICS = Topics("edged", "s1")
T0 = datetime(2026, 11, 21, tzinfo=UTC)


def event(n: int) -> Event:
    return Event(device=None, kind="test", at=T0, message=f"event {n}", details={"n": n})


async def wait_until(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def outbox_seqs(store: Store) -> list[int]:
    return [row.seq for row in await store.outbox_batch(1000)]


# ---------------------------------------------------------------------------
# Injected failing writer (runs everywhere)


class FailingStore(Store):
    """A real store whose boundary commits fail while `failing` is set."""

    failing: str | None = None
    attempts = 0

    async def commit_boundary(self, *args: Any, **kwargs: Any) -> None:
        self.attempts += 1
        if self.failing == "full":
            raise sqlite3.OperationalError("database or disk is full")
        if self.failing == "readonly":
            raise sqlite3.OperationalError("attempt to write a readonly database")
        await super().commit_boundary(*args, **kwargs)


async def test_recorder_holds_and_writes_everything_after_a_failure(tmp_path: Path) -> None:
    base = await Store.open(tmp_path / "edged.db")
    await base.close()
    store = await FailingStore.open(tmp_path / "edged.db")
    assert isinstance(store, FailingStore)
    committed: list[int] = []
    recorder = Recorder(store, on_committed=lambda: committed.append(1))
    # The retries, not their 1 s / 2 s / 4 s pacing, are what this checks.
    recorder.holding.retry_backoff = Backoff(first_s=0.01, max_s=0.05)
    changes: list[str | None] = []
    recorder.holding.on_change = changes.append
    task = asyncio.create_task(recorder.run())
    try:
        store.failing = "full"
        first = outbox_pending(store, TOPICS, "s1", [], [event(1)])
        recorder.submit(first)
        await wait_until(lambda: changes == ["OperationalError: database or disk is full"], 5, "a")
        assert not task.done()  # the recorder is up
        store.failing = "readonly"  # the next boundary fails differently
        second = outbox_pending(store, TOPICS, "s1", [], [event(2), event(3)])
        recorder.submit(second)
        await wait_until(lambda: store.attempts >= 3, 10, "retries")
        assert recorder.holding.counts()["held_messages"] == 3
        assert committed == []
        assert await outbox_seqs(store) == []
        store.failing = None  # the disk accepts writes again
        await wait_until(lambda: changes[-1:] == [None], 10, "recovery")
        expected = [seq for seq, _m in first.messages + second.messages]
        assert await outbox_seqs(store) == sorted(expected)
        assert committed == [1]
        assert recorder.holding.error is None
    finally:
        await recorder.close()
        await asyncio.wait_for(task, 10)
        await store.close()


def test_free_space_alarm_is_raised_before_the_commit(tmp_path: Path) -> None:
    """The periodic check has not run; the commit's pre-check alone sees free
    space under min_free (1 MiB here) and raises the alarm."""
    free = [10 * 1024 * 1024]
    changes: list[tuple[BudgetDecision, DiskUsage]] = []
    storage = Storage.model_validate({"path": str(tmp_path / "edged.db"), "min_free": "1MiB"})
    keeper = Housekeeper(
        None,  # type: ignore[arg-type]  # the pre-check never touches the store
        storage,
        None,  # type: ignore[arg-type]
        apply_shedding=lambda kinds: None,
        on_change=lambda d, u: changes.append((d, u)),
        free_bytes=lambda: free[0],
    )
    keeper.check_free_space()
    assert changes == []
    free[0] = 512 * 1024
    keeper.check_free_space()
    ((decision, usage),) = changes
    assert decision.state.alarm is DiskAlarm.FREE_SPACE
    assert usage.free_bytes == 512 * 1024
    keeper.check_free_space()  # already up: no second event
    assert len(changes) == 1


# ---------------------------------------------------------------------------
# A real small file system


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "fs"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the injected failing writer covers the paths")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); injected writer covers it")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    """Fill the file system to the last byte; returns the filler file."""
    filler = directory / f"filler-{uuid.uuid4().hex}"
    for path, chunk in ((filler, 4096), (directory / "filler-tail", 1)):
        with contextlib.suppress(OSError), path.open("wb", buffering=0) as handle:
            while True:
                handle.write(b"\0" * chunk)
    return filler


def remount(directory: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(directory)], check=True)


@pytest.fixture
async def tmpfs_store(tmpfs: Path) -> AsyncIterator[tuple[Path, Store]]:
    store = await Store.open(tmpfs / "edged.db")
    try:
        yield tmpfs, store
    finally:
        with contextlib.suppress(Exception):
            remount(tmpfs, "rw")
        await store.close()


@pytest.mark.integration
async def test_real_full_disk_is_held_and_written_later(
    tmpfs_store: tuple[Path, Store],
) -> None:
    """(Read-only while running is the injected writer's case: Linux refuses
    to remount a file system read-only while the store has files open for
    writing, so only the start-up test below can use a read-only mount.)"""
    failure = "full"
    directory, store = tmpfs_store
    recorder = Recorder(store, on_committed=lambda: None)
    changes: list[str | None] = []
    recorder.holding.on_change = changes.append
    task = asyncio.create_task(recorder.run())
    try:
        before = outbox_pending(store, TOPICS, "s1", [], [event(0)])
        recorder.submit(before)
        await recorder.flush()
        filler = None
        if failure == "full":
            filler = fill(directory)
        else:
            remount(directory, "ro")
        # a boundary with enough in it to need new pages
        big = outbox_pending(store, TOPICS, "s1", [], [event(n) for n in range(1, 400)])
        recorder.submit(big)
        await wait_until(lambda: bool(changes), 10, "the storage error")
        assert changes[0] is not None
        assert ("full" in changes[0]) if failure == "full" else ("readonly" in changes[0])
        assert not task.done()
        if filler is not None:
            filler.unlink()
            (directory / "filler-tail").unlink()
        else:
            remount(directory, "rw")
        await wait_until(lambda: changes[-1:] == [None], 60, "recovery after the retry")
        expected = [seq for seq, _m in before.messages + big.messages]
        assert await outbox_seqs(store) == sorted(expected)
    finally:
        await recorder.close()
        await asyncio.wait_for(task, 10)


@pytest.mark.integration
@pytest.mark.parametrize("failure", ["full", "read_only"])
async def test_unwritable_store_at_start_is_a_clean_exit(
    tmpfs: Path, tmp_path: Path, failure: str
) -> None:
    db = tmpfs / "edged.db"
    store = await Store.open(db)
    await store.close()
    if failure == "full":
        fill(tmpfs)
    else:
        remount(tmpfs, "ro")
    config = tmp_path / "edged.yaml"
    config.write_text(
        f"site: s1\nstorage: {{path: {db}}}\nmqtt: {{host: 127.0.0.1, port: 1}}\n"
        "devices:\n  - id: unit1\n    transport: {type: tcp, host: 127.0.0.1, port: 1}\n"
        "    channels: [{name: energy_import, register: 0}]\n"
    )
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edged.cli.main", "run", "-c", str(config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _out, err = await asyncio.wait_for(process.communicate(), 60)  # a hang fails here
        stderr = err.decode()
    finally:
        with contextlib.suppress(Exception):
            remount(tmpfs, "rw")
    assert process.returncode == 1, stderr
    assert "Traceback" not in stderr, stderr
    message = stderr.strip().splitlines()[-1]
    assert str(db) in message, message
    reason = "No space left on device" if failure == "full" else "Read-only file system"
    assert reason in message or ("readonly" in message and failure == "read_only"), message


@pytest.mark.integration
async def test_daemon_on_a_full_disk_stays_up_and_loses_nothing(
    tmpfs: Path, tmp_path: Path, broker: Broker, ntp_port: int
) -> None:
    """The whole daemon on a tmpfs that fills up: it keeps running, the
    retained status says storage_error, and once space is freed every
    interval is there, one unbroken series."""
    async with MeterServer({1: pmc1_meter()}) as server, collect(broker, "edged/#") as got:
        port = await server.start_tcp()
        config = site_config(
            tmp_path,
            devices=[tcp_device("unit1", port)],
            mqtt_port=broker.port,
            ntp_port=ntp_port,
            storage={"path": str(tmpfs / "state" / "edged.db")},  # on the small tmpfs
        )
        d = Daemon(config, tmp_path)
        try:
            await d.start()
            await got.wait_for(lambda c: len(intervals(c)) >= 2, 20, "2 intervals")
            filler = await asyncio.to_thread(fill, tmpfs)
            await got.wait_for(
                lambda c: any(s.get("storage_error") for s in gateway_status(c)), 20,
                "storage_error in the status",
            )  # fmt: skip
            await asyncio.sleep(3)  # boundaries pass while the disk is full
            assert d.process is not None
            assert d.process.returncode is None
            full_at = len(intervals(got))
            await asyncio.to_thread(filler.unlink)
            await asyncio.to_thread((tmpfs / "filler-tail").unlink)
            await got.wait_for(
                lambda c: gateway_status(c)[-1].get("storage_error") is None
                and len(intervals(c)) >= full_at + 4, 40, "recovery",
            )  # fmt: skip
            assert await d.stop() == 0
        finally:
            await d.close()
    series = sorted(by_end(intervals(got)).values(), key=lambda r: r["end"])[1:]
    assert_unbroken(series, "unit1 across the full disk")
    kinds = [e["details"].get("change") for e in events(got, "storage_error")]
    assert kinds == ["entered", "left"]


@pytest.mark.integration
async def test_daemon_stopped_on_a_full_disk_exits_cleanly_and_says_what_is_lost(
    tmpfs: Path, tmp_path: Path, broker: Broker, ntp_port: int
) -> None:
    async with MeterServer({1: pmc1_meter()}) as server, collect(broker, "edged/#") as got:
        port = await server.start_tcp()
        config = site_config(
            tmp_path,
            devices=[tcp_device("unit1", port)],
            mqtt_port=broker.port,
            ntp_port=ntp_port,
            storage={"path": str(tmpfs / "state" / "edged.db")},  # on the small tmpfs
        )
        d = Daemon(config, tmp_path)
        try:
            await d.start()
            await got.wait_for(lambda c: len(intervals(c)) >= 1, 20, "an interval")
            await asyncio.to_thread(fill, tmpfs)
            await got.wait_for(
                lambda c: any(s.get("storage_error") for s in gateway_status(c)), 20,
                "storage_error in the status",
            )  # fmt: skip
            code = await d.stop()
        finally:
            await d.close()
    assert code == 0
    log = (tmp_path / "edged.log").read_text()
    assert "shutdown with the store failing: held data not written" in log
    assert "Traceback" not in log
