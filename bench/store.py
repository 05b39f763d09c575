"""Store throughput: reads persisted per second, and what synchronous=FULL costs.

    python -m bench.store [--seconds 5] [--devices 1000]

In this process, on the disk of `EDGED_BENCH_DIR` (default: the temp dir),
for as many commits as fit in `--seconds` each:

* reads: `Store.commit_boundary` with batches of 1, 100 and 1000 reads (one
  transaction each, as the recorder groups a boundary), against bare aiosqlite
  inserting the same rows (already converted) into the same table in a
  transaction of the same size;
* boundaries: what one boundary of `--devices` meters commits (reads,
  interval records with their payloads, channel states, outbox messages) under
  `synchronous=FULL` (what edged runs) and `NORMAL`, against bare aiosqlite
  inserting the same rows, converted beforehand, into the same tables.

Everything is a ratio to bare aiosqlite measured in the same run: the disk,
not the code, sets the absolute figures.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiosqlite

from bench import harness
from bench.harness import say
from edged.app.poller import Pending, outbox_pending
from edged.core.engine.state import ChannelState
from edged.core.model import Interval, Read, TimeState
from edged.core.payloads import Topics
from edged.io.store import MIGRATIONS, Store, _interval_row, _read_row, _state_row

START = datetime(2026, 1, 1, tzinfo=UTC)


def reads(count: int, boundary: datetime) -> list[Read]:
    return [
        Read(
            device=f"m{i:04d}", boundary=boundary, read_at=boundary + timedelta(milliseconds=3),
            read_lateness_ms=3.0, time_state=TimeState.SYNCED, values={"energy": 1000 + i},
            registers=((0, (0, 1000 + i)),),
        )
        for i in range(count)
    ]  # fmt: skip


def intervals(count: int, end: datetime) -> list[Interval]:
    return [
        Interval(
            site=harness.SITE, device=f"m{i:04d}", channel="energy",
            start=end - timedelta(minutes=15), end=end, duration_s=900.0, value=1.25,
            unit="kWh", demand=5.0, demand_unit="kW",
            counter_start=1000, counter_end=2250, flags=frozenset(), time_state=TimeState.SYNCED,
            read_at=end + timedelta(milliseconds=3), read_lateness_ms=3.0,
        )
        for i in range(count)
    ]  # fmt: skip


async def rate(
    seconds: float, prepare: Callable[[int], Any], commit: Callable[[Any], Awaitable[int]]
) -> tuple[float, float]:
    """(rows per second, ms per commit) of `commit(prepare(k))` repeated; only
    the commits are timed (preparing stands for the pollers' work)."""
    rows = commits = 0
    elapsed = 0.0
    while elapsed < seconds:
        data = prepare(commits)
        started = time.perf_counter()
        rows += await commit(data)
        elapsed += time.perf_counter() - started
        commits += 1
    return rows / elapsed, 1000.0 * elapsed / commits


READ_COLUMNS = (
    "INSERT INTO reads (device, boundary, read_at, read_lateness_ms, time_state,"
    ' ok, "values", registers, error_kind, error_detail, exception_code, flags)'
    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
)


async def bare_db(path: Path, synchronous: str) -> aiosqlite.Connection:
    db = await aiosqlite.connect(path, isolation_level=None)
    await db.execute("PRAGMA journal_mode=WAL")
    await db.execute(f"PRAGMA synchronous={synchronous}")
    for migration in MIGRATIONS:
        for statement in migration.split(";"):
            if statement.strip():
                await db.execute(statement)
    return db


async def edged_reads(path: Path, batch: int, seconds: float) -> tuple[float, float]:
    store = await Store.open(path)
    batch_reads = reads(batch, START)
    try:

        async def commit(data: list[Read]) -> int:
            await store.commit_boundary(data, [], {}, [])
            return batch

        return await rate(seconds, lambda k: batch_reads, commit)
    finally:
        await store.close()


async def bare_reads(path: Path, batch: int, seconds: float) -> tuple[float, float]:
    db = await bare_db(path, "FULL")
    rows = [_read_row(r) for r in reads(batch, START)]
    try:

        async def commit(data: list[tuple[Any, ...]]) -> int:
            await db.execute("BEGIN IMMEDIATE")
            await db.executemany(READ_COLUMNS, data)
            await db.execute("COMMIT")
            return batch

        return await rate(seconds, lambda k: rows, commit)
    finally:
        await db.close()


class _Seqs:
    """Outbox sequence numbers for a bare database (Store.allocate_seq's job)."""

    def __init__(self) -> None:
        self.n = 0
        self.store_id: str | None = None  # payloads without one, as before

    def allocate_seq(self) -> int:
        self.n += 1
        return self.n


def boundary(
    k: int, devices: int, seqs: Any
) -> tuple[list[Read], Pending, dict[tuple[str, str], ChannelState]]:
    """What the pollers hand the recorder for boundary k of `devices` meters."""
    end = START + timedelta(minutes=15 * (k + 1))
    records = intervals(devices, end)
    pending = outbox_pending(seqs, Topics(harness.TOPIC_PREFIX, harness.SITE), harness.SITE,
                             records, [])  # fmt: skip
    states = {
        (r.device, r.channel): ChannelState(counter=r.counter_end, counter_at=end, last_end=end)
        for r in records
    }
    return reads(devices, end), pending, states


async def edged_boundaries(
    path: Path, devices: int, seconds: float, synchronous: str
) -> tuple[float, float]:
    store = await Store.open(path)
    # The bench's one reach inside: edged always runs FULL; NORMAL shows its cost.
    await store._db.execute(f"PRAGMA synchronous={synchronous}")
    try:

        async def commit(data: Any) -> int:
            boundary_reads, pending, states = data
            await store.commit_boundary(boundary_reads, pending.intervals, states, pending.messages)
            return devices

        return await rate(seconds, lambda k: boundary(k, devices, store), commit)
    finally:
        await store.close()


async def bare_boundaries(
    path: Path, devices: int, seconds: float, synchronous: str
) -> tuple[float, float]:
    """The same rows in the same tables, converted before the clock starts."""
    db = await bare_db(path, synchronous)
    seqs = _Seqs()
    now = START.isoformat()

    def prepare(k: int) -> tuple[list[Any], ...]:
        boundary_reads, pending, states = boundary(k, devices, seqs)
        return (
            [_read_row(r) for r in boundary_reads],
            [_interval_row(i, p, now) for i, p in pending.intervals],
            [_state_row(dev, ch, st) for (dev, ch), st in states.items()],
            [(seq, m.topic, m.payload, m.qos, int(m.retain), now) for seq, m in pending.messages],
        )

    async def commit(data: tuple[list[Any], ...]) -> int:
        read_rows, interval_rows, state_rows, outbox_rows = data
        await db.execute("BEGIN IMMEDIATE")
        await db.executemany(READ_COLUMNS, read_rows)
        await db.executemany(
            'INSERT OR REPLACE INTO intervals (id, device, channel, start, "end", duration_s,'
            " value, unit, demand, flags, quality, time_state, payload, created_at)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            interval_rows,
        )
        await db.executemany(
            "INSERT OR REPLACE INTO channel_state"
            " (device, channel, counter, counter_at, last_end, state) VALUES (?,?,?,?,?,?)",
            state_rows,
        )
        await db.executemany(
            "INSERT INTO outbox (seq, topic, payload, qos, retain, created_at)"
            " VALUES (?,?,?,?,?,?)",
            outbox_rows,
        )
        await db.execute("COMMIT")
        return devices

    try:
        return await rate(seconds, prepare, commit)
    finally:
        await db.close()


async def run(seconds: float, devices: int) -> dict[str, Any]:
    directory = harness.workdir("store")
    figures: dict[str, Any] = {"seconds_per_case": seconds, "devices": devices}
    for batch in (1, 100, 1000):
        bare, bare_ms = await bare_reads(directory / f"bare-{batch}.db", batch, seconds)
        mine, mine_ms = await edged_reads(directory / f"edged-{batch}.db", batch, seconds)
        figures[f"bare_reads_per_s_batch{batch}"] = round(bare)
        figures[f"edged_reads_per_s_batch{batch}"] = round(mine)
        figures[f"ratio_reads_batch{batch}"] = round(mine / bare, 2)
        say(f"reads, {batch:4d} per commit: edged {mine:9.0f}/s ({mine_ms:.2f} ms/commit), "
            f"bare aiosqlite {bare:9.0f}/s ({bare_ms:.2f} ms/commit): "
            f"{mine / bare:.2f}x")  # fmt: skip
    for sync in ("FULL", "NORMAL"):
        bare, bare_ms = await bare_boundaries(
            directory / f"bare-b-{sync}.db", devices, seconds, sync
        )
        mine, mine_ms = await edged_boundaries(
            directory / f"edged-b-{sync}.db", devices, seconds, sync
        )
        key = sync.lower()
        figures[f"edged_boundary_commit_ms_{key}"] = round(mine_ms, 2)
        figures[f"edged_intervals_per_s_{key}"] = round(mine)
        figures[f"bare_boundary_commit_ms_{key}"] = round(bare_ms, 2)
        figures[f"bare_intervals_per_s_{key}"] = round(bare)
        figures[f"ratio_intervals_{key}"] = round(mine / bare, 2)
        say(f"boundary of {devices} meters, synchronous={sync}: edged {mine_ms:.1f} ms/commit "
            f"({mine:.0f} intervals/s), bare aiosqlite (same rows) {bare_ms:.1f} ms "
            f"({bare:.0f}/s)")  # fmt: skip
    figures["full_cost_ratio_edged"] = round(
        figures["edged_boundary_commit_ms_full"] / figures["edged_boundary_commit_ms_normal"], 2
    )
    figures["full_cost_ratio_bare"] = round(
        figures["bare_boundary_commit_ms_full"] / figures["bare_boundary_commit_ms_normal"], 2
    )
    say(f"synchronous=FULL costs {figures['full_cost_ratio_edged']:.2f}x NORMAL per boundary "
        f"(bare: {figures['full_cost_ratio_bare']:.2f}x)")  # fmt: skip
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.store")
    parser.add_argument("--seconds", type=float, default=5.0, help="per case")
    parser.add_argument("--devices", type=int, default=1000)
    args = parser.parse_args(argv)
    figures = asyncio.run(run(args.seconds, args.devices))
    # A boundary of 1000 meters committed well inside its 15 minutes, many
    # times over: what the daemon needs of its store.
    harness.emit(
        "store",
        figures,
        {"boundary_commit_under_1s": figures["edged_boundary_commit_ms_full"] < 1000},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
