"""SQLite store (aiosqlite, WAL): reads, intervals, channel state, outbox.

Everything a boundary produces (its reads, interval records, the engine state
they leave behind and the outbox messages) is written in one transaction, so
after a crash the store is either before or after that boundary, never between.
The connection runs `synchronous=FULL`: a committed interval survives a power
cut. aiosqlite keeps the commit (and its fsync) off the event loop.

Opening checks the file first (`PRAGMA integrity_check`, or `quick_check` for a
large file): a file that is not a database or fails the check is moved aside,
never deleted, and a fresh one is created; `Store.recovered_from` says so. A
file that is merely locked or not accessible is an error, not corruption.
Retention and the disk budget (edged.app.housekeeping) delete through the methods
here in small batches; new databases use incremental auto-vacuum so that the
space freed goes back to the file system.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import stat
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite
import structlog

from edged import __version__
from edged.core import flags as flag_table
from edged.core.demand import PeakState
from edged.core.engine.state import (
    ChannelState,
    parse_counter,
)
from edged.core.errors import EdgedError
from edged.core.model import (
    Interval,
    Measurement,
    Read,
    iso_utc,
    parse_iso_utc,
)
from edged.io.queries import IntervalQuery

log = structlog.get_logger("edged.io.store")

# Above this size the start-up check is `quick_check` (every page and record
# is still read and checked, but indexes are not cross-checked against their
# tables, the part whose cost grows faster than the file); see
# docs/deployment.md for the timings behind the figure.
FULL_CHECK_MAX_BYTES = 256 * 2**20
# Errors shown in the store_corrupt event and the log (integrity_check rows).
CHECK_ERRORS_SHOWN = 10
# The WAL is truncated to this after a checkpoint, so a burst does not leave a
# large file behind (it counts against the disk budget).
JOURNAL_SIZE_LIMIT_BYTES = 8 * 2**20
# Flash wear (docs/performance.md#flash-wear): in WAL mode every page a commit
# changes is written once to the WAL (fsync'd: synchronous=FULL, which stays:
# a committed interval must survive a power cut) and once more to the database
# when a checkpoint copies it back. A checkpoint copies each page once however
# many commits changed it, so the second copy shrinks as checkpoints get
# rarer; SQLite's default, a checkpoint when the WAL passes 1000 pages (4 MiB),
# already makes them rare at 15-minute intervals (tens of pages a boundary),
# and a larger WAL would count against the disk budget and lengthen recovery.
# Set explicitly so the policy is visible, not tuned away from the default.
WAL_AUTOCHECKPOINT_PAGES = 1000
# Pages handed back to the file system per step of Store.reclaim (2 MiB of
# 4 KiB pages, tens of milliseconds): the recorder's commits slip in between.
RECLAIM_CHUNK_PAGES = 512
# SQLite primary result codes (extended codes carry them in the low byte).
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6

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
    # 3: fast-poll measurements (kept to backfill a historian), and time indexes
    # so retention finds old rows without scanning the tables.
    """
    CREATE TABLE measurements (
        id INTEGER PRIMARY KEY,
        device TEXT NOT NULL,
        at TEXT NOT NULL,
        "values" TEXT NOT NULL
    );
    CREATE INDEX measurements_at ON measurements (at);
    CREATE INDEX reads_read_at ON reads (read_at);
    CREATE INDEX intervals_end ON intervals ("end");
    """,
)

# Kinds of stored rows that retention and the disk budget delete: table and
# the column holding each row's time. The outbox is never among them.
TIMED_TABLES: Mapping[str, tuple[str, str]] = {
    "reads": ("reads", "read_at"),
    "intervals": ("intervals", '"end"'),
    "measurements": ("measurements", "at"),
}
# An interval whose outbox row still exists has not been acknowledged by the
# broker (rows are deleted on PUBACK); its payload carries its outbox seq.
_UNSENT_INTERVAL = (
    "EXISTS (SELECT 1 FROM outbox WHERE outbox.seq = json_extract(intervals.payload, '$.seq'))"
)


# Sequence numbers deleted by one statement (well under SQLite's 32766 variables).
ACK_CHUNK = 500


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxMessage:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
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


class StoreError(EdgedError):
    pass


class StoreReplaced(StoreError):
    """The file at the store's path is no longer the one edged opened."""


class StoreCorrupt(StoreError):
    """The file is not a database, or SQLite found it damaged."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CorruptStore:
    """A damaged database found at start-up and moved aside (never deleted)."""

    moved_to: Path  # the database file; its -wal/-shm keep their suffixes beside it
    moved: tuple[Path, ...]  # every file moved
    error: str
    at: datetime


def corrupt_name(path: Path, at: datetime) -> Path:
    """edged.db -> edged.db.corrupt-20261121T001500Z (SQLite finds `<that>-wal` beside it)."""
    return path.with_name(f"{path.name}.corrupt-{at.astimezone(UTC):%Y%m%dT%H%M%SZ}")


def is_corruption(exc: BaseException) -> bool:
    """SQLITE_CORRUPT or SQLITE_NOTADB (any extended code), as opposed to locked or
    inaccessible files, which must never be taken for damage."""
    code = getattr(exc, "sqlite_errorcode", None)
    if not isinstance(exc, sqlite3.DatabaseError) or code is None:
        return False
    return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


async def _check_file(path: Path, busy_timeout_s: float) -> None:
    """Raise StoreCorrupt unless SQLite finds the file at `path` sound.

    The check runs on a read-only connection: closing a read-write one makes
    SQLite checkpoint and delete the WAL, and a damaged file's WAL is evidence
    to keep. Without a WAL or journal the file is opened as immutable, so the
    check creates no -wal/-shm files either."""
    plan = _check_plan(path)
    if plan is None:
        return
    uri, pragma = plan
    try:
        async with (
            aiosqlite.connect(uri, uri=True, timeout=busy_timeout_s) as db,
            db.execute(f"PRAGMA {pragma}({CHECK_ERRORS_SHOWN})") as cursor,
        ):
            rows = [str(r[0]) for r in await cursor.fetchall()]
    except sqlite3.Error as exc:
        if is_corruption(exc):
            raise StoreCorrupt(str(exc)) from None
        raise StoreError(_describe_open_error(path, exc)) from None
    if rows != ["ok"]:
        raise StoreCorrupt(f"{pragma}: " + "; ".join(rows))


def _check_plan(path: Path) -> tuple[str, str] | None:
    """(read-only URI, check pragma) for an existing database; None for a new one."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(status.st_mode):
        raise StoreError(f"cannot use {path}: not a regular file (check storage.path)")
    size_bytes = status.st_size
    if size_bytes == 0 and not path.with_name(path.name + "-wal").exists():
        return None
    quiescent = not any(path.with_name(path.name + s).exists() for s in ("-wal", "-journal"))
    uri = f"{path.resolve().as_uri()}?mode=ro" + ("&immutable=1" if quiescent else "")
    return uri, "integrity_check" if size_bytes <= FULL_CHECK_MAX_BYTES else "quick_check"


def _describe_open_error(path: Path, exc: sqlite3.Error) -> str:
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    if code in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return f"{path} is locked by another process (is another edged using it?): {exc}"
    return (
        f"cannot use {path}: {_os_reason(path, exc)} (check that it is a regular file "
        "the edged user may read and write, in a directory it may write)"
    )


def system_now() -> datetime:
    return datetime.now(UTC)


class Store:
    def __init__(
        self, db: aiosqlite.Connection, path: Path, now: Callable[[], datetime] = system_now
    ) -> None:
        self._db = db
        self.path = path
        # The reference clock: rows are stamped on the same timeline the
        # daemon measures ages against (the outbox's oldest message).
        self._now = now
        self._next_seq = 1
        # Multi-statement transactions (a boundary commit, a batch of deletes)
        # must not interleave on the one connection, and no other statement may
        # run inside one: it would join the transaction (a mark or an ack rolled
        # back with it) or read its uncommitted rows (the publisher sending a
        # record that a failed commit then loses).
        self._write_lock = asyncio.Lock()
        self.recovered_from: CorruptStore | None = None
        # A random identity kept in the store (marks.store_id): seq counts per
        # store, and a consumer tells a new store from a rewind by it.
        self.store_id = ""
        # (device, inode) of the file opened: compared before each commit.
        self._identity: tuple[int, int] | None = None

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        busy_timeout_s: float = 5.0,
        now: Callable[[], datetime] = system_now,
    ) -> Store:
        """Open (creating, checking and migrating) the store at `path`.

        `now` is the reference clock: it stamps rows (`created_at`) and names a
        damaged database moved aside to `corrupt_name(path, now())` with its
        -wal and -shm files and a fresh one is created; `recovered_from` then
        describes what was moved. Locked or inaccessible files raise StoreError."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create {path.parent}: {exc.strerror}") from None
        try:
            return await cls._open_checked(path, busy_timeout_s, now)
        except StoreCorrupt as exc:
            error = str(exc)
        at = now()
        try:
            moved = move_aside(path, corrupt_name(path, at))
        except OSError as exc:
            raise StoreError(
                f"{path} is damaged ({error}) and cannot be moved aside: {exc}"
            ) from None
        log.error("database damaged; moved aside and starting a fresh one",
                  path=str(path), moved_to=[str(p) for p in moved], error=error)  # fmt: skip
        store = await cls._open_checked(path, busy_timeout_s, now)
        store.recovered_from = CorruptStore(moved_to=moved[0], moved=moved, error=error, at=at)
        return store

    @classmethod
    async def _open_checked(
        cls, path: Path, busy_timeout_s: float, now: Callable[[], datetime]
    ) -> Store:
        await _check_file(path, busy_timeout_s)
        try:
            db = await aiosqlite.connect(path, isolation_level=None, timeout=busy_timeout_s)
        except sqlite3.Error as exc:
            raise StoreError(_describe_open_error(path, exc)) from None
        store = cls(db, path, now)
        try:
            await store._setup()
        except BaseException as exc:
            await db.close()
            if is_corruption(exc):
                raise StoreCorrupt(str(exc)) from None
            if isinstance(exc, sqlite3.Error):
                raise StoreError(_describe_open_error(path, exc)) from None
            raise
        return store

    async def _setup(self) -> None:
        db = self._db
        async with db.execute("SELECT count(*) FROM sqlite_master") as cursor:
            row = await cursor.fetchone()
        empty = row is not None and int(row[0]) == 0
        # Checked before anything is written (switching to WAL rewrites the header).
        async with db.execute("PRAGMA user_version") as cursor:
            row = await cursor.fetchone()
        version = int(row[0]) if row else 0
        if version > len(MIGRATIONS):
            # A downgrade: this code cannot know what the newer schema means, and
            # writing to it could lose what the newer edged stored. The file is
            # left as it is (it is not damaged, so it is not moved aside).
            raise StoreError(
                f"{self.path} has store schema version {version}, written by a newer edged; "
                f"this edged ({__version__}) knows store schema versions up to "
                f"{len(MIGRATIONS)}. Reinstall the newer edged, or restore the copy of the "
                "database taken before the upgrade (docs/deployment.md#roll-back)"
            )
        if empty:
            # Only possible before the first table exists: freed pages can
            # then be handed back to the file system (Store.reclaim).
            await db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")
        await db.execute("PRAGMA foreign_keys=ON")
        await db.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT_BYTES}")
        await db.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
        for target in range(version, len(MIGRATIONS)):
            await db.execute("BEGIN IMMEDIATE")
            await _execute_script(db, MIGRATIONS[target])
            await db.execute(f"PRAGMA user_version={target + 1}")
            await db.execute("COMMIT")
        async with db.execute("PRAGMA auto_vacuum") as cursor:
            row = await cursor.fetchone()
        if row is not None and int(row[0]) != 2:
            log.warning(
                "database predates incremental auto-vacuum: space freed by retention is "
                "reused but not returned to the file system; to convert it, stop edged and "
                "run: sqlite3 DB 'PRAGMA auto_vacuum=INCREMENTAL; VACUUM;'",
                path=str(self.path),
            )
        async with db.execute("SELECT seq FROM sqlite_sequence WHERE name='outbox'") as cursor:
            row = await cursor.fetchone()
        self._next_seq = (int(row[0]) if row else 0) + 1
        store_id = await self.get_mark("store_id")
        if not store_id:
            store_id = uuid.uuid4().hex
            await self.set_mark("store_id", store_id)
        self.store_id = store_id
        stat_now = os.stat(self.path)
        self._identity = (stat_now.st_dev, stat_now.st_ino)

    def check_identity(self) -> None:
        """Raise StoreReplaced when the file at `path` is missing or is not the
        one opened (deleted, moved, replaced by a copy or a restore): edged
        would otherwise write on into a file nobody will read, and a restart
        would start numbering again in a new one."""
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            raise StoreReplaced(
                f"the store {self.path} was deleted while edged was running (store_id "
                f"{self.store_id}); stopping: restart to start a new store, or restore the file"
            ) from None
        except OSError:
            return  # an unreadable directory is the write's error to report
        if self._identity is not None and (now.st_dev, now.st_ino) != self._identity:
            raise StoreReplaced(
                f"the store {self.path} was replaced while edged was running (store_id "
                f"{self.store_id}); stopping: restart to use the new file"
            )

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
        replays: Sequence[tuple[int, OutboxMessage]] = (),
        measurements: Sequence[Measurement] = (),
    ) -> None:
        """One durable transaction for everything a boundary produced (and the
        fast-poll measurements buffered since the last commit).

        `replays` are copies of stored records queued again under their original
        seq: a record whose row is still unsent is not queued twice."""
        async with self._write_lock:
            await self._commit(reads, intervals, states, messages, peaks, replays, measurements)

    async def _commit(
        self,
        reads: Sequence[Read],
        intervals: Sequence[tuple[Interval, bytes]],
        states: Mapping[tuple[str, str], ChannelState],
        messages: Sequence[tuple[int, OutboxMessage]],
        peaks: Mapping[tuple[str, str], PeakState] | None,
        replays: Sequence[tuple[int, OutboxMessage]],
        measurements: Sequence[Measurement],
    ) -> None:
        now = iso_utc(self._now())
        db = self._db
        await db.execute("BEGIN IMMEDIATE")
        try:
            if measurements:
                await db.executemany(
                    'INSERT INTO measurements (device, at, "values") VALUES (?,?,?)',
                    [(m.device, iso_utc(m.at), json.dumps(dict(m.values))) for m in measurements],
                )
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
            if replays:
                await db.executemany(
                    "INSERT OR IGNORE INTO outbox (seq, topic, payload, qos, retain, created_at)"
                    " VALUES (?,?,?,?,?,?)",
                    [(seq, m.topic, m.payload, m.qos, int(m.retain), now) for seq, m in replays],
                )
            await db.execute("COMMIT")
        except BaseException as exc:
            # SQLite may already have rolled back (SQLITE_FULL, SQLITE_IOERR):
            # a failing ROLLBACK must not hide the error that matters.
            try:
                await db.execute("ROLLBACK")
            except sqlite3.Error as rollback_exc:
                log.warning("rollback after a failed commit failed",
                            error=str(exc), rollback_error=str(rollback_exc))  # fmt: skip
            raise

    async def check_writable(self) -> None:
        """Raise StoreError naming the path and the OS's reason when the store
        cannot be written (a read-only or full file system): at start-up that
        is a clean exit for systemd to restart, not a hang."""
        try:
            await self.set_mark("writable_check", iso_utc(datetime.now(UTC)))
        except (sqlite3.Error, OSError) as exc:
            reason = _os_reason(self.path, exc)
            raise StoreError(f"cannot write the store {self.path}: {reason}") from None

    # -- retention and the disk budget -----------------------------------------

    async def delete_older(self, kind: str, cutoff: datetime, limit: int) -> int:
        """Delete up to `limit` rows of `kind` older than `cutoff`; how many went.
        Intervals not yet acknowledged by the broker are kept whatever their age."""
        table, column = TIMED_TABLES[kind]
        keep = f" AND NOT {_UNSENT_INTERVAL}" if kind == "intervals" else ""
        sql = (
            f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table}"
            f" WHERE {column} < ?{keep} LIMIT ?)"
        )
        return await self._delete(sql, (iso_utc(cutoff), limit))

    async def delete_oldest(self, kind: str, limit: int) -> int:
        """Delete the `limit` oldest rows of a sheddable kind (insertion order)."""
        if kind not in ("reads", "measurements"):
            raise ValueError(f"{kind} is never shed")
        table, _column = TIMED_TABLES[kind]
        sql = f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} ORDER BY id LIMIT ?)"
        return await self._delete(sql, (limit,))

    async def _delete(self, sql: str, params: tuple[Any, ...]) -> int:
        async with self._write_lock:
            cursor = await self._db.execute(sql, params)
            count = cursor.rowcount
            await cursor.close()
        return int(count)

    async def has_rows(self, kind: str) -> bool:
        table, _column = TIMED_TABLES[kind]
        async with self._db.execute(f"SELECT EXISTS (SELECT 1 FROM {table})") as cursor:
            row = await cursor.fetchone()
        return bool(row and row[0])

    async def reclaim(self) -> None:
        """Give pages freed by deletes back to the file system: incremental
        vacuum, then a checkpoint that truncates the WAL (in WAL mode the main
        file shrinks only when the checkpoint copies the vacuum into it).
        In chunks, so a boundary commit never waits long behind it."""
        while await self._pragma_int("freelist_count") > 0:
            async with self._write_lock:
                # Through executescript: sqlite3's execute() steps this pragma
                # once, which frees a single page.
                await self._db.executescript(f"PRAGMA incremental_vacuum({RECLAIM_CHUNK_PAGES});")
            if await self._pragma_int("auto_vacuum") != 2:
                break  # an old database without auto-vacuum: the pages stay free
        async with self._write_lock, self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)") as cursor:
            await cursor.fetchall()

    async def _pragma_int(self, name: str) -> int:
        async with self._db.execute(f"PRAGMA {name}") as cursor:
            row = await cursor.fetchone()
        assert row is not None
        return int(row[0])

    async def used_bytes(self) -> int:
        """Disk the database takes: main file + WAL, less the free pages SQLite
        reuses before it grows the file (none after `reclaim` on a database
        with incremental auto-vacuum)."""
        total = 0
        for file in (self.path, self.path.with_name(self.path.name + "-wal")):
            with contextlib.suppress(FileNotFoundError):
                total += file.stat().st_size
        free_pages = await self._pragma_int("freelist_count")
        return max(0, total - free_pages * await self._pragma_int("page_size"))

    async def set_mark(self, name: str, value: str) -> None:
        async with self._write_lock:
            await self._db.execute(
                "INSERT OR REPLACE INTO marks (name, value) VALUES (?, ?)", (name, value)
            )

    async def get_mark(self, name: str) -> str | None:
        async with self._db.execute("SELECT value FROM marks WHERE name=?", (name,)) as cursor:
            row = await cursor.fetchone()
        return None if row is None else str(row[0])

    # -- outbox ---------------------------------------------------------------

    async def outbox_batch(
        self,
        limit: int,
        after_seq: int = 0,
        up_to_seq: int | None = None,
        *,
        sparkplug: bool = False,
    ) -> list[OutboxRow]:
        """Unsent messages with after_seq < seq <= up_to_seq, oldest first: the JSON
        publisher's, or with `sparkplug` the Sparkplug session's (topics under
        `spBv1.0/`, which only that session can send: edged.io.sparkplug)."""
        async with (
            self._write_lock,
            self._db.execute(
                "SELECT seq, topic, payload, qos, retain, created_at FROM outbox"
                " WHERE seq > ? AND seq <= ? AND (substr(topic, 1, 8) = 'spBv1.0/') = ?"
                " ORDER BY seq LIMIT ?",
                (
                    after_seq,
                    up_to_seq if up_to_seq is not None else 2**63 - 1,
                    int(sparkplug),
                    limit,
                ),
            ) as cursor,
        ):
            rows = await cursor.fetchall()
        # A commit stamps all its rows alike: each stamp is parsed once.
        stamps: dict[str, datetime] = {}
        return [
            OutboxRow(
                seq=int(r[0]),
                topic=str(r[1]),
                payload=bytes(r[2]),
                qos=int(r[3]),
                retain=bool(r[4]),
                created_at=stamps.get(r[5]) or stamps.setdefault(r[5], parse_iso_utc(r[5])),
            )
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
            async with self._write_lock:
                await self._db.execute(f"DELETE FROM outbox WHERE seq IN ({marks})", chunk)

    async def drop_sparkplug_rows(self) -> int:
        """Delete Sparkplug rows left by a session that is no longer configured
        (no one else can send them); how many there were."""
        async with self._write_lock:
            cursor = await self._db.execute(
                "DELETE FROM outbox WHERE substr(topic, 1, 8) = 'spBv1.0/'"
            )
            return cursor.rowcount

    async def outbox_max_seq(self) -> int:
        async with (
            self._write_lock,
            self._db.execute("SELECT coalesce(max(seq), 0) FROM outbox") as cursor,
        ):
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def outbox_last_seq(self) -> int:
        """The highest seq ever committed to the outbox (sent or not). Seqs are
        allocated and committed in order, so every seq up to this one is committed."""
        async with (
            self._write_lock,
            self._db.execute("SELECT seq FROM sqlite_sequence WHERE name='outbox'") as cursor,
        ):
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def outbox_depth(self) -> OutboxDepth:
        async with (
            self._write_lock,
            self._db.execute("SELECT count(*), min(created_at) FROM outbox") as cursor,
        ):
            row = await cursor.fetchone()
        assert row is not None
        return OutboxDepth(int(row[0]), parse_iso_utc(row[1]) if row[1] else None)

    # -- reading back ---------------------------------------------------------

    async def count_intervals(self, query: IntervalQuery) -> int:
        where, params = query.where()
        async with self._db.execute(f"SELECT count(*) FROM intervals{where}", params) as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def interval_payloads(
        self, query: IntervalQuery, after_rowid: int, limit: int
    ) -> list[tuple[int, str]]:
        """(rowid, payload) of stored records, `limit` at a time after `after_rowid`.

        Paged by rowid rather than by holding a cursor open, so the recorder can
        commit on this connection between pages. A record replaced meanwhile gets
        a higher rowid and is met again later, never skipped."""
        where, params = query.where()
        where += (" AND" if where else " WHERE") + " rowid > ?"
        async with self._db.execute(
            f"SELECT rowid, payload FROM intervals{where} ORDER BY rowid LIMIT ?",
            [*params, after_rowid, limit],
        ) as cursor:
            rows = await cursor.fetchall()
        return [(int(r[0]), str(r[1])) for r in rows]

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


def move_aside(path: Path, target: Path) -> tuple[Path, ...]:
    """Rename the database and its -wal/-shm (or rollback journal) to `target`
    plus the same suffixes, never overwriting anything; returns the new paths,
    the database first."""
    base, n = target, 1
    while target.exists():  # a second recovery within the same second
        n += 1
        target = base.with_name(f"{base.name}.{n}")
    moved: list[Path] = []
    # The database last: interrupted half-way, a restart finds the damaged
    # file again rather than a fresh one beside a stale WAL it would replay.
    for suffix in ("-wal", "-shm", "-journal", ""):
        source = path.with_name(path.name + suffix)
        if source.exists():
            destination = target.with_name(target.name + suffix)
            os.rename(source, destination)
            moved.insert(len(moved) if suffix else 0, destination)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the renames survive a power cut
    finally:
        os.close(directory)
    return tuple(moved)


def _os_reason(path: Path, exc: BaseException) -> str:
    """SQLite says "attempt to write a readonly database" or "database or disk
    is full"; the OS's own word (EROFS, ENOSPC, EACCES) is what an operator
    searches for, so ask the file system directly as well."""
    sqlite_says = str(exc)
    probe = path.parent / f".{path.name}.write-check"
    try:
        with probe.open("wb") as handle:
            handle.write(b"\0" * 4096)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as os_exc:
        return f"{os_exc.strerror} [errno {os_exc.errno}] ({sqlite_says})"
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return sqlite_says


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
        json.dumps(sorted(str(f) for f in read.flags)) if read.flags else "[]",
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
        json.dumps([str(f) for f in flags]) if flags else "[]",
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
