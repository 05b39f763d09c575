"""Read-only queries of the local store for the operator commands (`edged status`,
`edged intervals`).

The store is opened read-only (`mode=ro`, `PRAGMA query_only`) with the
standard library's sqlite3: the daemon keeps writing while an operator looks,
because in WAL mode readers never block the writer nor wait for it. Nothing
here writes to the store or creates files beside it.

Times in the store are UTC ISO-8601 text as written by `payloads.iso_utc`,
which omits the fraction when it is zero, so two times within the same second
do not sort as text ("00Z" > "00.002Z"). Interval ends are whole seconds and
compare fine; for reads, the latest row is found through the index to the
second and settled by parsing the few rows of that second.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from edged.config.schema import Settings
from edged.core.errors import EdgedError
from edged.core.export import format_age, format_duration, format_table
from edged.core.model import (
    iso_utc,
    parse_iso_utc,
)
from edged.io.liveness import later_mark, liveness_path, read_mark

# The store schema version (PRAGMA user_version) these queries were written for.
KNOWN_SCHEMA_VERSION = 1
LIVENESS_MARK = "liveness"
# The daemon persists the liveness mark every few seconds (10 s, in a file
# beside the store); older than this, it is not running (or is stuck).
LIVENESS_STALE_S = 30.0
# A device whose last read is older than this many intervals (plus slack) is stale.
STALE_INTERVALS = 2
STALE_SLACK_S = 30.0
# The outbox is not draining when its oldest message is older than this.
OUTBOX_STALE_MIN_S = 120.0
RECENT = timedelta(hours=24)


class StoreUnavailable(EdgedError):
    """The store cannot be opened or is not an edged store."""


def connect_readonly(path: Path) -> sqlite3.Connection:
    """Open the store without being able to change it (never creates it)."""
    if not path.exists():
        raise StoreUnavailable(
            f"no store at {path} (storage.path): has edged run with this configuration?"
        )
    # With the daemon running the -wal and -shm files exist and are its own. With
    # it stopped they do not, and even a read-only connection would create them
    # (owned by whoever runs this, e.g. root, so the daemon's user could not open
    # them afterwards): open such a quiescent database as immutable instead.
    quiescent = not path.with_name(path.name + "-wal").exists()
    uri = f"{path.resolve().as_uri()}?mode=ro" + ("&immutable=1" if quiescent else "")
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=10.0)
        conn.execute("PRAGMA query_only=ON")
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.Error as exc:
        raise StoreUnavailable(f"cannot read {path}: {exc}") from None
    if version < 1:
        conn.close()
        raise StoreUnavailable(f"{path} is not an edged store (schema version {version})")
    return conn


def _second(t: datetime) -> str:
    """'2026-11-21T00:15:00' - a prefix every stored time in that second starts with."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _whole_second(t: datetime) -> str:
    """A bound comparable as text with the (whole-second) interval ends."""
    return _second(t) + "Z"


# -- intervals ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class IntervalQuery:
    """Records whose end lies in (start, end] - the store's convention:
    `--from 2026-11-21 --to 2026-11-22` is that local day's intervals."""

    start: datetime | None = None
    end: datetime | None = None
    devices: Sequence[str] = ()
    channels: Sequence[str] = ()

    def where(self) -> tuple[str, list[str]]:
        clauses: list[str] = []
        params: list[str] = []
        # Interval ends are whole seconds, so for them `end > t` is `end > floor(t)`.
        if self.start is not None:
            clauses.append('"end" > ?')
            params.append(_whole_second(self.start))
        if self.end is not None:
            clauses.append('"end" <= ?')
            params.append(_whole_second(self.end))
        if self.devices:
            clauses.append(f"device IN ({','.join('?' * len(self.devices))})")
            params.extend(self.devices)
        if self.channels:
            clauses.append(f"channel IN ({','.join('?' * len(self.channels))})")
            params.extend(self.channels)
        return (f" WHERE {' AND '.join(clauses)}" if clauses else ""), params


def count_intervals(conn: sqlite3.Connection, query: IntervalQuery) -> int:
    where, params = query.where()
    return int(conn.execute(f"SELECT count(*) FROM intervals{where}", params).fetchone()[0])


def iter_interval_payloads(
    conn: sqlite3.Connection, query: IntervalQuery, batch: int = 1000
) -> Iterator[dict[str, Any]]:
    """Stored payloads, ordered by end, device, channel, fetched `batch` at a time."""
    where, params = query.where()
    cursor = conn.execute(
        f'SELECT payload FROM intervals{where} ORDER BY "end", device, channel', params
    )
    try:
        while rows := cursor.fetchmany(batch):
            for (payload,) in rows:
                yield json.loads(payload)
    finally:
        cursor.close()


# -- status ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class LastRead:
    read_at: datetime
    ok: bool
    error: str | None  # "timeout: no response in 0.5 s"
    boundary: datetime | None
    lateness_ms: float | None
    time_state: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ChannelSummary:
    channel: str
    last_end: datetime | None
    last_quality: str | None
    last_flags: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceSummary:
    device: str
    interval_s: int
    last_read: LastRead | None
    last_good_read: datetime | None
    consecutive_errors: int  # failed reads since the last good one
    reads_recent: int
    errors_recent: int
    channels: tuple[ChannelSummary, ...]
    quality_recent: dict[str, int]  # interval records ending in the recent window

    @property
    def last_interval_end(self) -> datetime | None:
        ends = [c.last_end for c in self.channels if c.last_end is not None]
        return max(ends) if ends else None


@dataclass(frozen=True, slots=True)
class OutboxSummary:
    count: int
    oldest: datetime | None
    last_seq: int | None  # the last sequence number the daemon allocated


@dataclass(frozen=True, slots=True)
class Alarm:
    level: Literal["alarm", "warning"]
    subject: str  # a device id, "daemon" or "outbox"
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreStatus:
    site: str
    store: Path
    now: datetime
    schema_version: int
    devices: tuple[DeviceSummary, ...]
    outbox: OutboxSummary
    marks: dict[str, str]
    alarms: tuple[Alarm, ...] = field(default=())

    @property
    def liveness(self) -> datetime | None:
        value = self.marks.get(LIVENESS_MARK)
        if value is None:
            return None
        try:
            return parse_iso_utc(value)
        except ValueError:
            return None


def _latest_read(
    conn: sqlite3.Connection, device: str, only_ok: bool
) -> tuple[LastRead | None, int | None]:
    ok_clause = " AND ok=1" if only_ok else ""
    row = conn.execute(
        f"SELECT max(read_at) FROM reads WHERE device=?{ok_clause}", (device,)
    ).fetchone()
    if row is None or row[0] is None:
        return None, None
    # The text maximum is right to the second; settle within the second by parsing.
    candidates = conn.execute(
        "SELECT id, read_at, ok, error_kind, error_detail, boundary, read_lateness_ms,"
        f" time_state FROM reads WHERE device=? AND read_at >= ?{ok_clause}",
        (device, str(row[0])[:19]),
    ).fetchall()
    best = max(candidates, key=lambda r: (parse_iso_utc(r[1]), r[0]))
    _id, read_at, ok, kind, detail, boundary, lateness, time_state = best
    error = None if ok else f"{kind}: {detail}" if detail else str(kind)
    read = LastRead(
        read_at=parse_iso_utc(read_at),
        ok=bool(ok),
        error=error,
        boundary=parse_iso_utc(boundary) if boundary else None,
        lateness_ms=float(lateness) if lateness is not None else None,
        time_state=str(time_state),
    )
    return read, int(_id)


def _failed_since(conn: sqlite3.Connection, device: str, since: datetime | None) -> int:
    if since is None:
        row = conn.execute("SELECT count(*) FROM reads WHERE device=? AND ok=0", (device,))
        return int(row.fetchone()[0])
    # Later seconds by the index, the same second by parsing.
    next_second = _second(since + timedelta(seconds=1))
    later = conn.execute(
        "SELECT count(*) FROM reads WHERE device=? AND ok=0 AND read_at >= ?",
        (device, next_second),
    ).fetchone()[0]
    same = conn.execute(
        "SELECT read_at FROM reads WHERE device=? AND ok=0 AND read_at >= ? AND read_at < ?",
        (device, _second(since), next_second),
    ).fetchall()
    return int(later) + sum(1 for (t,) in same if parse_iso_utc(t) > since)


def device_summary(
    conn: sqlite3.Connection, device: str, interval_s: int, channels: Sequence[str], now: datetime
) -> DeviceSummary:
    last_read, _ = _latest_read(conn, device, only_ok=False)
    last_good, _ = _latest_read(conn, device, only_ok=True)
    last_good_at = last_good.read_at if last_good else None
    since = _second(now - RECENT)
    reads, errors = conn.execute(
        "SELECT count(*), coalesce(sum(ok=0), 0) FROM reads WHERE device=? AND read_at >= ?",
        (device, since),
    ).fetchone()
    channel_summaries = []
    for channel in channels:
        row = conn.execute(
            'SELECT "end", quality, flags FROM intervals WHERE device=? AND channel=?'
            ' ORDER BY "end" DESC LIMIT 1',
            (device, channel),
        ).fetchone()
        if row is None:
            channel_summaries.append(
                ChannelSummary(channel=channel, last_end=None, last_quality=None, last_flags=())
            )
        else:
            channel_summaries.append(
                ChannelSummary(
                    channel=channel,
                    last_end=parse_iso_utc(row[0]),
                    last_quality=str(row[1]),
                    last_flags=tuple(json.loads(row[2])),
                )
            )
    quality = dict(
        conn.execute(
            'SELECT quality, count(*) FROM intervals WHERE device=? AND "end" > ?'
            " GROUP BY quality ORDER BY quality",
            (device, _whole_second(now - RECENT)),
        ).fetchall()
    )
    return DeviceSummary(
        device=device,
        interval_s=interval_s,
        last_read=last_read,
        last_good_read=last_good_at,
        consecutive_errors=_failed_since(conn, device, last_good_at),
        reads_recent=int(reads),
        errors_recent=int(errors),
        channels=tuple(channel_summaries),
        quality_recent={str(k): int(v) for k, v in quality.items()},
    )


def outbox_summary(conn: sqlite3.Connection) -> OutboxSummary:
    count, oldest = conn.execute("SELECT count(*), min(created_at) FROM outbox").fetchone()
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name='outbox'").fetchone()
    return OutboxSummary(
        count=int(count),
        oldest=parse_iso_utc(oldest) if oldest else None,
        last_seq=int(row[0]) if row else None,
    )


def read_marks(conn: sqlite3.Connection) -> dict[str, str]:
    return {str(k): str(v) for k, v in conn.execute("SELECT name, value FROM marks ORDER BY name")}


def with_file_liveness(marks: dict[str, str], store: Path) -> dict[str, str]:
    """The daemon keeps its liveness mark in a file beside the store
    (edged.io.liveness) and in the store only at a clean stop: the later wins."""
    stored = marks.get(LIVENESS_MARK)
    try:
        stored_at = parse_iso_utc(stored) if stored else None
    except ValueError:
        stored_at = None
    latest = later_mark(read_mark(liveness_path(store)), stored_at)
    if latest is not None and latest != stored_at:
        marks = {**marks, LIVENESS_MARK: iso_utc(latest)}
    return marks


def store_status(
    conn: sqlite3.Connection, settings: Settings, store: Path, now: datetime
) -> StoreStatus:
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    devices = tuple(
        device_summary(conn, d.id, d.interval_s, [c.name for c in d.channels], now)
        for d in settings.devices
    )
    status = StoreStatus(
        site=settings.site,
        store=store,
        now=now,
        schema_version=version,
        devices=devices,
        outbox=outbox_summary(conn),
        marks=with_file_liveness(read_marks(conn), store),
    )
    outbox_stale_s = max(OUTBOX_STALE_MIN_S, 2 * settings.status_every)
    return replace(status, alarms=tuple(evaluate_alarms(status, outbox_stale_s)))


def evaluate_alarms(status: StoreStatus, outbox_stale_s: float = OUTBOX_STALE_MIN_S) -> list[Alarm]:
    """What an operator should look at, most serious first (pure)."""
    now = status.now
    alarms: list[Alarm] = []
    warnings: list[Alarm] = []
    liveness = status.liveness
    if liveness is None:
        warnings.append(Alarm("warning", "daemon", "no liveness mark in the store"))
    elif (age := (now - liveness).total_seconds()) > LIVENESS_STALE_S:
        alarms.append(
            Alarm(
                "alarm",
                "daemon",
                f"liveness mark is {format_age(age)} old: edged is not running (or is stuck)",
            )
        )
    outbox = status.outbox
    if outbox.oldest is not None:
        age = (now - outbox.oldest).total_seconds()
        if age > outbox_stale_s:
            alarms.append(
                Alarm(
                    "alarm",
                    "outbox",
                    f"{outbox.count} unsent message(s), oldest "
                    f"{format_age(age)} old: is the MQTT broker reachable?",
                )
            )
    for d in status.devices:
        read = d.last_read
        if read is None:
            alarms.append(Alarm("alarm", d.device, "no read recorded"))
            continue
        if d.consecutive_errors:
            since = (
                f"since the last good read {iso_utc(d.last_good_read)}"
                if d.last_good_read
                else "and no read has ever succeeded"
            )
            alarms.append(
                Alarm(
                    "alarm",
                    d.device,
                    f"last {d.consecutive_errors} read(s) failed {since}; last error: {read.error}",
                )
            )
        stale_s = STALE_INTERVALS * d.interval_s + STALE_SLACK_S
        age = (now - read.read_at).total_seconds()
        if age > stale_s:
            alarms.append(
                Alarm(
                    "alarm",
                    d.device,
                    f"no read for {format_age(age)} (interval {format_duration(d.interval_s)})",
                )
            )
        if d.errors_recent and not d.consecutive_errors:
            warnings.append(
                Alarm("warning", d.device, f"{d.errors_recent} failed read(s) in the last 24 h")
            )
        flagged = {q: n for q, n in d.quality_recent.items() if q != "actual"}
        if flagged:
            counts = ", ".join(f"{n} {q}" for q, n in sorted(flagged.items()))
            warnings.append(Alarm("warning", d.device, f"intervals in the last 24 h: {counts}"))
    return alarms + warnings


def status_json(status: StoreStatus) -> dict[str, Any]:
    """`edged status --format json`: the same facts for monitoring scripts."""

    def t(v: datetime | None) -> str | None:
        return iso_utc(v) if v is not None else None

    def age(v: datetime | None) -> float | None:
        return round((status.now - v).total_seconds(), 1) if v is not None else None

    return {
        "site": status.site,
        "store": str(status.store),
        "schema_version": status.schema_version,
        "now": t(status.now),
        "liveness": t(status.liveness),
        "liveness_age_s": age(status.liveness),
        "marks": status.marks,
        "outbox": {
            "depth": status.outbox.count,
            "oldest": t(status.outbox.oldest),
            "oldest_age_s": age(status.outbox.oldest),
            "last_seq": status.outbox.last_seq,
        },
        "devices": [
            {
                "device": d.device,
                "interval_s": d.interval_s,
                "last_read": None
                if d.last_read is None
                else {
                    "read_at": t(d.last_read.read_at),
                    "age_s": age(d.last_read.read_at),
                    "ok": d.last_read.ok,
                    "error": d.last_read.error,
                    "boundary": t(d.last_read.boundary),
                    "lateness_ms": d.last_read.lateness_ms,
                    "time_state": d.last_read.time_state,
                },
                "last_good_read": t(d.last_good_read),
                "consecutive_errors": d.consecutive_errors,
                "reads_24h": d.reads_recent,
                "errors_24h": d.errors_recent,
                "last_interval_end": t(d.last_interval_end),
                "intervals_24h": d.quality_recent,
                "channels": [
                    {
                        "channel": c.channel,
                        "last_end": t(c.last_end),
                        "quality": c.last_quality,
                        "flags": list(c.last_flags),
                    }
                    for c in d.channels
                ],
            }
            for d in status.devices
        ],
        "alarms": [
            {"level": a.level, "subject": a.subject, "message": a.message} for a in status.alarms
        ],
    }


def format_status(status: StoreStatus) -> str:
    """`edged status`: a few lines and a table, for a person at a terminal or in a ticket."""
    now = status.now

    def when(t: datetime | None) -> str:
        if t is None:
            return "-"
        return f"{iso_utc(t)} ({format_age((now - t).total_seconds())} ago)"

    lines = [
        f"site {status.site}  store {status.store} (schema {status.schema_version})  "
        f"now {iso_utc(now)}",
        f"daemon  liveness mark {when(status.liveness)}",
    ]
    outbox = status.outbox
    last_seq = f", last seq {outbox.last_seq}" if outbox.last_seq is not None else ""
    if outbox.count:
        lines.append(f"outbox  {outbox.count} unsent, oldest {when(outbox.oldest)}{last_seq}")
    else:
        lines.append(f"outbox  empty (everything acknowledged by the broker{last_seq})")
    other_marks = {k: v for k, v in status.marks.items() if k != LIVENESS_MARK}
    for name, value in other_marks.items():
        lines.append(f"mark    {name} = {value or '(empty)'}")
    lines.append("")
    headers = (
        "device",
        "interval",
        "last read",
        "result",
        "failed",
        "errors 24h",
        "last good read",
        "last interval end",
        "intervals 24h",
    )
    rows = []
    for d in status.devices:
        read = d.last_read
        result = "-" if read is None else "ok" if read.ok else (read.error or "error")
        quality = ", ".join(f"{n} {q}" for q, n in d.quality_recent.items()) or "-"
        rows.append(
            (
                d.device,
                format_duration(d.interval_s),
                when(read.read_at if read else None),
                result,
                str(d.consecutive_errors),
                f"{d.errors_recent}/{d.reads_recent}",
                iso_utc(d.last_good_read) if d.last_good_read else "-",
                iso_utc(d.last_interval_end) if d.last_interval_end else "-",
                quality,
            )
        )
    lines.append(format_table(headers, rows, right=("failed", "errors 24h")).rstrip("\n"))
    lines.append("")
    if status.alarms:
        lines.append("alarms")
        lines.append(
            format_table(
                ("level", "subject", "message"),
                [
                    (a.level.upper() if a.level == "alarm" else a.level, a.subject, a.message)
                    for a in status.alarms
                ],
            ).rstrip("\n")
        )
    else:
        lines.append("no alarms")
    return "\n".join(lines) + "\n"
