"""SQLite store (aiosqlite, WAL): reads, intervals, channel state, outbox.

Everything a boundary produces (its reads, interval records, the engine state
they leave behind and the outbox messages) is written in one transaction, so
after a crash the store is either before or after that boundary, never between.
The connection runs `synchronous=FULL`: a committed interval survives a power
cut. aiosqlite keeps the commit (and its fsync) off the event loop.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite

from edged import flags as flag_table
from edged.demand import PeakState
from edged.intervals import ChannelState, parse_counter
from edged.model import Interval, Read
from edged.payloads import iso_utc, parse_iso_utc

# Each entry migrates the schema from version i to i + 1. Never edit a released
# entry: append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE reads (
        id INTEGER PRIMARY KEY,
        device TEXT NOT NULL,
        boundary TEXT,
        read_at TEXT NOT NULL,
        read_lateness_ms REAL,
        time_state TEXT NOT NULL,
        ok INTEGER NOT NULL,
        "values" TEXT NOT NULL,
        registers TEXT NOT NULL,
        error_kind TEXT,
        error_detail TEXT,
        exception_code INTEGER,
        flags TEXT NOT NULL
    );
    CREATE INDEX reads_device_time ON reads (device, read_at);
    CREATE TABLE intervals (
        id TEXT PRIMARY KEY,
        device TEXT NOT NULL,
        channel TEXT NOT NULL,
        start TEXT NOT NULL,
        "end" TEXT NOT NULL,
        duration_s REAL NOT NULL,
        value REAL,
        unit TEXT NOT NULL,
        demand REAL,
        flags TEXT NOT NULL,
        quality TEXT NOT NULL,
        time_state TEXT NOT NULL,
        payload TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE INDEX intervals_device_end ON intervals (device, channel, "end");
    CREATE TABLE channel_state (
        device TEXT NOT NULL,
        channel TEXT NOT NULL,
        counter TEXT,
        counter_at TEXT,
        last_end TEXT,
        PRIMARY KEY (device, channel)
    );
    CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        topic TEXT NOT NULL,
        payload BLOB NOT NULL,
        qos INTEGER NOT NULL,
        retain INTEGER NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE marks (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
    # 2: the engine's whole per-channel state (gap history, rolling window) as
    # JSON, and peak demand per billing period.
    """
    ALTER TABLE channel_state ADD COLUMN state TEXT;
    CREATE TABLE peak_state (
        device TEXT NOT NULL,
        channel TEXT NOT NULL,
        state TEXT NOT NULL,
        PRIMARY KEY (device, channel)
    );
    """,
)


# Sequence numbers deleted by one statement (well under SQLite's 32766 variables).
ACK_CHUNK = 500


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass(frozen=True, slots=True)
class OutboxRow:
    seq: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class OutboxDepth:
    count: int
    oldest: datetime | None


class StoreError(Exception):
    pass


class Store:
    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self.path = path
        self._next_seq = 1

    @classmethod
    async def open(cls, path: Path) -> Store:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create {path.parent}: {exc.strerror}") from None
        try:
            db = await aiosqlite.connect(path, isolation_level=None)
        except Exception as exc:
            raise StoreError(f"cannot open {path}: {exc}") from None
        store = cls(db, path)
        await store._setup()
        return store

    async def _setup(self) -> None:
        db = self._db
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")
        await db.execute("PRAGMA foreign_keys=ON")
        async with db.execute("PRAGMA user_version") as cursor:
            row = await cursor.fetchone()
        version = int(row[0]) if row else 0
        if version > len(MIGRATIONS):
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this edged "
                f"({len(MIGRATIONS)}); upgrade edged or restore an older database"
            )
        for target in range(version, len(MIGRATIONS)):
            await db.execute("BEGIN IMMEDIATE")
            await _execute_script(db, MIGRATIONS[target])
            await db.execute(f"PRAGMA user_version={target + 1}")
            await db.execute("COMMIT")
        async with db.execute("SELECT seq FROM sqlite_sequence WHERE name='outbox'") as cursor:
            row = await cursor.fetchone()
        self._next_seq = (int(row[0]) if row else 0) + 1

    async def close(self) -> None:
        await self._db.close()

    # -- writing --------------------------------------------------------------

    def allocate_seq(self) -> int:
        """The next outbox sequence number (single writer: the event loop)."""
        seq = self._next_seq
        self._next_seq += 1
        return seq

    async def commit_boundary(
        self,
        reads: Sequence[Read],
        intervals: Sequence[tuple[Interval, bytes]],
        states: Mapping[tuple[str, str], ChannelState],
        messages: Sequence[tuple[int, OutboxMessage]],
        peaks: Mapping[tuple[str, str], PeakState] | None = None,
    ) -> None:
        """One durable transaction for everything a boundary produced."""
        now = iso_utc(datetime.now(UTC))
        db = self._db
        await db.execute("BEGIN IMMEDIATE")
        try:
            if reads:
                await db.executemany(
                    "INSERT INTO reads (device, boundary, read_at, read_lateness_ms, time_state,"
                    ' ok, "values", registers, error_kind, error_detail, exception_code, flags)'
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    [_read_row(r) for r in reads],
                )
            if intervals:
                await db.executemany(
                    'INSERT OR REPLACE INTO intervals (id, device, channel, start, "end",'
                    " duration_s, value, unit, demand, flags, quality, time_state, payload,"
                    " created_at)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    [_interval_row(i, p, now) for i, p in intervals],
                )
            if states:
                await db.executemany(
                    "INSERT OR REPLACE INTO channel_state"
                    " (device, channel, counter, counter_at, last_end, state)"
                    " VALUES (?,?,?,?,?,?)",
                    [_state_row(dev, ch, s) for (dev, ch), s in states.items()],
                )
            if peaks:
                await db.executemany(
                    "INSERT OR REPLACE INTO peak_state (device, channel, state) VALUES (?,?,?)",
                    [(dev, ch, p.to_json()) for (dev, ch), p in peaks.items()],
                )
            if messages:
                await db.executemany(
                    "INSERT INTO outbox (seq, topic, payload, qos, retain, created_at)"
                    " VALUES (?,?,?,?,?,?)",
                    [(seq, m.topic, m.payload, m.qos, int(m.retain), now) for seq, m in messages],
                )
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise

    async def set_mark(self, name: str, value: str) -> None:
        await self._db.execute(
            "INSERT OR REPLACE INTO marks (name, value) VALUES (?, ?)", (name, value)
        )

    async def get_mark(self, name: str) -> str | None:
        async with self._db.execute("SELECT value FROM marks WHERE name=?", (name,)) as cursor:
            row = await cursor.fetchone()
        return None if row is None else str(row[0])

    # -- outbox ---------------------------------------------------------------

    async def outbox_batch(
        self, limit: int, after_seq: int = 0, up_to_seq: int | None = None
    ) -> list[OutboxRow]:
        """Unsent messages with after_seq < seq <= up_to_seq, oldest first."""
        async with self._db.execute(
            "SELECT seq, topic, payload, qos, retain, created_at FROM outbox"
            " WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
            (after_seq, up_to_seq if up_to_seq is not None else 2**63 - 1, limit),
        ) as cursor:
            rows = await cursor.fetchall()
        return [
            OutboxRow(int(r[0]), str(r[1]), bytes(r[2]), int(r[3]), bool(r[4]), parse_iso_utc(r[5]))
            for r in rows
        ]

    async def ack(self, seqs: Iterable[int]) -> None:
        """Delete messages the broker has acknowledged (after PUBACK)."""
        batch = list(seqs)
        # One statement per chunk: in autocommit mode each statement is a
        # transaction (an fsync), so a row per statement cost a window of
        # PUBACKs 64 fsyncs.
        for start in range(0, len(batch), ACK_CHUNK):
            chunk = batch[start : start + ACK_CHUNK]
            marks = ",".join("?" * len(chunk))
            await self._db.execute(f"DELETE FROM outbox WHERE seq IN ({marks})", chunk)

    async def outbox_max_seq(self) -> int:
        async with self._db.execute("SELECT coalesce(max(seq), 0) FROM outbox") as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def outbox_depth(self) -> OutboxDepth:
        async with self._db.execute("SELECT count(*), min(created_at) FROM outbox") as cursor:
            row = await cursor.fetchone()
        assert row is not None
        return OutboxDepth(int(row[0]), parse_iso_utc(row[1]) if row[1] else None)

    # -- reading back ---------------------------------------------------------

    async def channel_states(self) -> dict[tuple[str, str], ChannelState]:
        async with self._db.execute(
            "SELECT device, channel, counter, counter_at, last_end, state FROM channel_state"
        ) as cursor:
            rows = await cursor.fetchall()
        states: dict[tuple[str, str], ChannelState] = {}
        for device, channel, counter, counter_at, last_end, full in rows:
            if full:
                states[(str(device), str(channel))] = ChannelState.from_json(str(full))
                continue
            value = None if counter is None else parse_counter(str(counter))
            states[(str(device), str(channel))] = ChannelState(
                counter=value,
                counter_at=parse_iso_utc(counter_at) if counter_at else None,
                last_end=parse_iso_utc(last_end) if last_end else None,
            )
        return states

    async def peak_states(self) -> dict[tuple[str, str], PeakState]:
        async with self._db.execute("SELECT device, channel, state FROM peak_state") as cursor:
            rows = await cursor.fetchall()
        return {(str(d), str(c)): PeakState.from_json(str(st)) for d, c, st in rows}


async def _execute_script(db: aiosqlite.Connection, script: str) -> None:
    # executescript() would COMMIT the open transaction; run statements one by one.
    for statement in script.split(";"):
        if statement.strip():
            await db.execute(statement)


def _read_row(read: Read) -> tuple[Any, ...]:
    error = read.error
    return (
        read.device,
        iso_utc(read.boundary) if read.boundary else None,
        iso_utc(read.read_at),
        read.read_lateness_ms,
        str(read.time_state),
        int(read.ok),
        json.dumps(dict(read.values)),
        json.dumps([[address, list(words)] for address, words in read.registers]),
        str(error.kind) if error else None,
        error.detail if error else None,
        error.exception_code if error else None,
        json.dumps(sorted(str(f) for f in read.flags)),
    )


def _interval_row(interval: Interval, payload: bytes, now: str) -> tuple[Any, ...]:
    # The flags and quality as interval_payload states them, from the record
    # itself: parsing the payload back cost more than writing the row.
    flags = flag_table.ordered(interval.flags)
    return (
        interval.id,
        interval.device,
        interval.channel,
        iso_utc(interval.start),
        iso_utc(interval.end),
        interval.duration_s,
        interval.value,
        interval.unit,
        interval.demand,
        json.dumps([str(f) for f in flags]),
        str(flag_table.quality(flags)),
        str(interval.time_state),
        payload.decode(),
        now,
    )


def _state_row(device: str, channel: str, state: ChannelState) -> tuple[Any, ...]:
    return (
        device,
        channel,
        None if state.counter is None else repr(state.counter),
        iso_utc(state.counter_at) if state.counter_at else None,
        iso_utc(state.last_end) if state.last_end else None,
        state.to_json(),
    )
