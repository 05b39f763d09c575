"""Operator output (pure): interval rows as CSV, JSON or a text table; time arguments.

Nothing here opens a file or a database or reads a clock: writers take the
stream to write to, and `parse_time` takes `now` and the site time zone.

CSV (`edged intervals --format csv`): one row per interval record, a header
row, `CSV_COLUMNS` in that order, `\\n` line ends, UTF-8. Empty cell = null.
`flags` and `iee_status` are lists joined with `|` (`LIST_SEPARATOR`): not
`,` (the cell separator) and not `;` (the cell separator of spreadsheets in
locales with a decimal comma). Numbers are written exactly as stored (shortest
round-trip form), so a CSV parsed back equals the store.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import Any, Literal, Protocol, TextIO

from edged.core.errors import EdgedError
from edged.core.model import (
    iso_utc,
    parse_iso_utc,
)
from edged.core.units import parse_duration_s

CSV_COLUMNS: tuple[str, ...] = (
    "id",
    "device",
    "channel",
    "start",
    "end",
    "duration_s",
    "value",
    "unit",
    "demand",
    "demand_unit",
    "quality",
    "flags",
    "iee_status",
    "time_state",
    "read_at",
    "read_lateness_ms",
)
LIST_SEPARATOR = "|"
_LIST_COLUMNS = frozenset({"flags", "iee_status"})
_NUMBER_COLUMNS = frozenset({"duration_s", "value", "demand", "read_lateness_ms"})

Format = Literal["table", "csv", "json"]
FORMATS: tuple[Format, ...] = ("table", "csv", "json")


# -- time arguments -----------------------------------------------------------------


class TimeArgumentError(EdgedError, ValueError):
    """A --from/--to value that cannot be turned into one instant."""


_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")

TIME_HELP = (
    "ISO-8601 with an offset or Z (2026-11-21T06:00+13:00, 2026-11-21T00:00Z), or a local "
    "date or time in the site time zone (2026-11-21, '2026-11-21 06:00'), or now, today, "
    "yesterday, or -DURATION before now (-2h, -7d)"
)


def start_of_local_day(day: date, zone: tzinfo) -> datetime:
    """The first instant of a local calendar day, in UTC.

    If local midnight does not exist (a zone whose DST starts at midnight), the
    day begins when the clocks jump, which is what fold=0 resolves to.
    """
    return datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC)


def localize(naive: datetime, zone: tzinfo, text: str | None = None) -> datetime:
    """A local wall-clock time in `zone` -> UTC; refuses times DST makes unclear.

    A time skipped when the clocks go forward does not exist; a time repeated
    when they go back happens twice. Either way the caller is asked to write
    the offset, instead of edged guessing which hour of billing data they meant.
    """
    shown = text if text is not None else naive.isoformat(sep=" ", timespec="minutes")
    first = naive.replace(tzinfo=zone, fold=0).astimezone(UTC)
    second = naive.replace(tzinfo=zone, fold=1).astimezone(UTC)
    if first.astimezone(zone).replace(tzinfo=None) != naive:
        suggestion = first.astimezone(zone).isoformat(timespec="minutes")
        raise TimeArgumentError(
            f"{shown} does not exist in {zone} (the clocks skip it when daylight saving "
            f"starts); give the time with its UTC offset, e.g. {suggestion}"
        )
    if first != second:
        one = first.astimezone(zone).isoformat(timespec="minutes")
        other = second.astimezone(zone).isoformat(timespec="minutes")
        raise TimeArgumentError(
            f"{shown} happens twice in {zone} (the clocks go back when daylight saving "
            f"ends); give the time with its UTC offset: {one} or {other}"
        )
    return first


def parse_time(text: str, zone: tzinfo, now: datetime) -> datetime:
    """A --from/--to argument -> an aware UTC datetime (see `TIME_HELP`)."""
    s = text.strip()
    word = s.lower()
    if word == "now":
        return now.astimezone(UTC)
    if word in ("today", "yesterday"):
        day = now.astimezone(zone).date() - timedelta(days=1 if word == "yesterday" else 0)
        return start_of_local_day(day, zone)
    if s.startswith("-"):
        try:
            seconds = parse_duration_s(s[1:])
        except ValueError:
            raise TimeArgumentError(f"{text!r}: expected -DURATION such as -2h or -7d") from None
        return now.astimezone(UTC) - timedelta(seconds=seconds)
    if _DATE_RE.match(s):
        try:
            return start_of_local_day(date.fromisoformat(s), zone)
        except ValueError as exc:
            raise TimeArgumentError(f"{text!r}: {exc}") from None
    try:
        parsed = datetime.fromisoformat(s)
    except ValueError:
        raise TimeArgumentError(
            f"{text!r} is not a time edged understands: expected {TIME_HELP}"
        ) from None
    if parsed.tzinfo is not None:
        return parsed.astimezone(UTC)
    return localize(parsed, zone, s)


DEFAULT_SPAN = timedelta(days=1)


def parse_range(
    start: str | None,
    end: str | None,
    zone: tzinfo,
    now: datetime,
    names: tuple[str, str] = ("--from", "--to"),
) -> tuple[datetime, datetime]:
    """--from/--to (either may be omitted: `end` defaults to now, `start` to a day
    before `end`) -> the range (start, end] of interval ends, start before end.
    `names` are what the caller calls the two in messages."""
    end_at = parse_time(end, zone, now) if end is not None else now.astimezone(UTC)
    start_at = parse_time(start, zone, now) if start is not None else end_at - DEFAULT_SPAN
    if start_at >= end_at:
        raise TimeArgumentError(
            f"{names[0]} must be before {names[1]} "
            f"({iso_utc(start_at)} is not before {iso_utc(end_at)})"
        )
    return start_at, end_at


# -- formatting helpers -------------------------------------------------------------


def format_age(seconds: float) -> str:
    """3.2 -> '3.2 s', 125 -> '2 min 5 s', 7500 -> '2 h 5 min', 93600 -> '1 d 2 h'."""
    negative = seconds < 0
    s = abs(seconds)
    if s < 60:
        text = f"{s:.1f} s"
    elif s < 3600:
        text = f"{int(s // 60)} min {int(s % 60)} s"
    elif s < 86_400:
        text = f"{int(s // 3600)} h {int(s % 3600 // 60)} min"
    else:
        text = f"{int(s // 86_400)} d {int(s % 86_400 // 3600)} h"
    return f"-{text}" if negative else text


def format_duration(seconds: float) -> str:
    """900 -> '15m', 1 -> '1s', 86400 -> '1d' (the config's own duration syntax)."""
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def local_time(text: str | None, zone: tzinfo) -> str:
    """'2026-11-21T00:15:00Z' -> '2026-11-21 13:15:00+13:00' in the site zone."""
    if not text:
        return ""
    return parse_iso_utc(text).astimezone(zone).isoformat(sep=" ", timespec="seconds")


def format_table(
    headers: Sequence[str], rows: Iterable[Sequence[str]], right: Iterable[str] = ()
) -> str:
    """Plain aligned columns (two spaces apart); columns named in `right` align right."""
    body = [list(r) for r in rows]
    widths = [len(h) for h in headers]
    for row in body:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    right_set = set(right)

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.rjust(widths[i]) if headers[i] in right_set else cell.ljust(widths[i])
            for i, cell in enumerate(cells)
        ]
        return "  ".join(parts).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out.extend(line(row) for row in body)
    return "\n".join(out) + "\n"


# -- interval rows ------------------------------------------------------------------


def csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list | tuple):
        return LIST_SEPARATOR.join(str(v) for v in value)
    return str(value)


def csv_row(payload: Mapping[str, Any]) -> list[str]:
    return [csv_cell(payload.get(column)) for column in CSV_COLUMNS]


def parse_csv(text: str) -> list[dict[str, Any]]:
    """The inverse of `write_csv`: rows with numbers, nulls and lists restored."""
    rows: list[dict[str, Any]] = []
    for raw in csv.DictReader(io.StringIO(text)):
        row: dict[str, Any] = {}
        for column in CSV_COLUMNS:
            cell = raw[column]
            if column in _LIST_COLUMNS:
                row[column] = cell.split(LIST_SEPARATOR) if cell else []
            elif cell == "":
                row[column] = None
            elif column in _NUMBER_COLUMNS:
                row[column] = float(cell)
            else:
                row[column] = cell
        rows.append(row)
    return rows


class RowWriter(Protocol):
    def write(self, payload: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class CsvWriter:
    def __init__(self, out: TextIO) -> None:
        self._writer = csv.writer(out, lineterminator="\n")
        self._writer.writerow(CSV_COLUMNS)

    def write(self, payload: Mapping[str, Any]) -> None:
        self._writer.writerow(csv_row(payload))

    def close(self) -> None:
        pass


class JsonWriter:
    """A JSON array of the stored payloads, one record per line (streams)."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._count = 0

    def write(self, payload: Mapping[str, Any]) -> None:
        self._out.write("[\n" if self._count == 0 else ",\n")
        self._out.write(json.dumps(payload, separators=(",", ":"), ensure_ascii=False))
        self._count += 1

    def close(self) -> None:
        self._out.write("[]\n" if self._count == 0 else "\n]\n")


TABLE_HEADERS: tuple[str, ...] = (
    "end (local)",
    "device",
    "channel",
    "value",
    "unit",
    "demand",
    "quality",
    "flags",
)
_TABLE_RIGHT = ("value", "demand")


def table_row(payload: Mapping[str, Any], zone: tzinfo) -> list[str]:
    demand = payload.get("demand")
    demand_unit = payload.get("demand_unit") or ""
    return [
        local_time(payload.get("end"), zone),
        str(payload.get("device", "")),
        str(payload.get("channel", "")),
        csv_cell(payload.get("value")) or "-",
        str(payload.get("unit", "")),
        f"{csv_cell(demand)} {demand_unit}" if demand is not None else "-",
        str(payload.get("quality", "")),
        ",".join(payload.get("flags") or []) or "-",
    ]


@dataclass
class TableWriter:
    """Human-readable; buffers every row to size the columns."""

    out: TextIO
    zone: tzinfo
    rows: list[list[str]] = field(default_factory=list)

    def write(self, payload: Mapping[str, Any]) -> None:
        self.rows.append(table_row(payload, self.zone))

    def close(self) -> None:
        self.out.write(format_table(TABLE_HEADERS, self.rows, right=_TABLE_RIGHT))


def make_writer(fmt: Format, out: TextIO, zone: tzinfo) -> RowWriter:
    if fmt == "csv":
        return CsvWriter(out)
    if fmt == "json":
        return JsonWriter(out)
    return TableWriter(out, zone)


def write_csv(payloads: Iterable[Mapping[str, Any]], out: TextIO) -> int:
    writer = CsvWriter(out)
    count = 0
    for payload in payloads:
        writer.write(payload)
        count += 1
    return count


def to_csv(payloads: Iterable[Mapping[str, Any]]) -> str:
    out = io.StringIO()
    write_csv(payloads, out)
    return out.getvalue()


def utc_text(t: datetime | None) -> str | None:
    return None if t is None else iso_utc(t)
