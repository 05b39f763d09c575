"""Operator commands: `edged status`, `edged intervals` (table/CSV/JSON/plot), --help.

The store is populated the way the daemon does it: reads go through the real
interval engine (`edged.core.engine.intervals`), payloads through `payloads.interval_payload`,
and everything is committed with `Store.commit_boundary`. The timeline crosses
the start of daylight saving in Pacific/Auckland (2026-09-27 02:00 NZST ->
03:00 NZDT), has a failed read, a boundary nobody read, and a 16-bit counter
that wraps.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
import signal
import sys
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edged.app.liveness import LIVENESS_EVERY_S
from edged.cli import main as cli
from edged.config.load import load_settings
from edged.core.export import (
    CSV_COLUMNS,
    LIST_SEPARATOR,
    TimeArgumentError,
    format_age,
    parse_csv,
    parse_time,
    start_of_local_day,
)
from edged.core.model import (
    iso_utc,
    parse_iso_utc,
)
from edged.io.queries import (
    connect_readonly,
    evaluate_alarms,
    format_status,
    status_json,
    store_status,
)
from edged.io.store import Store
from tests.support.config import site_config, tcp_device
from tests.support.daemon import Daemon
from tests.support.mqtt import Broker
from tests.support.store import (
    LAST_BOUNDARY,
    LIVENESS,
    NZ,
    UNACKED,
    Populated,
    edged,
    fixture_read,
    populate,
    write_cli_config,
)

COMMANDS = ("run", "check-config", "demo", "status", "intervals", "replay")


@pytest.fixture
async def populated(tmp_path: Path) -> Populated:
    return await populate(tmp_path)


def stored(db: Path) -> list[dict[str, Any]]:
    conn = connect_readonly(db)
    try:
        rows = conn.execute('SELECT payload FROM intervals ORDER BY "end", device, channel')
        return [json.loads(r[0]) for r in rows]
    finally:
        conn.close()


# -- the fixture itself ---------------------------------------------------------------


def test_fixture_covers_the_interesting_cases(populated: Populated) -> None:
    flags = {f for p in stored(populated.db) for f in p["flags"]}
    assert {"PARTIAL", "MISSING", "LONG", "ROLLOVER", "DST"} <= flags
    assert len(stored(populated.db)) == len(populated.records)


# -- --help ---------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    result = edged(command, "--help", check=True)
    assert result.stdout.startswith(f"usage: edged {command}")
    assert result.stderr == ""


@pytest.mark.integration
def test_top_level_help_lists_every_command() -> None:
    result = edged("--help", check=True)
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.integration
def test_unknown_command_is_a_usage_error() -> None:
    result = edged("frobnicate")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


@pytest.mark.integration
def test_check_config_still_works(populated: Populated) -> None:
    result = edged("check-config", "-c", str(populated.config), check=True)
    assert "OK - site cli-site, 2 device(s), 3 channel(s)" in result.stdout


# -- intervals: CSV -------------------------------------------------------------------


@pytest.mark.integration
def test_csv_round_trips_the_store(populated: Populated) -> None:
    result = edged(
        "intervals",
        "-c",
        str(populated.config),
        "--from",
        "2026-09-26",
        "--to",
        "2026-09-28",
        "--format",
        "csv",
        check=True,
    )
    assert result.stderr == ""  # quiet when stderr is not a terminal
    header = result.stdout.splitlines()[0]
    assert header == ",".join(CSV_COLUMNS)
    rows = parse_csv(result.stdout)
    expected = stored(populated.db)
    assert len(rows) == len(expected) == len(populated.records)
    for row, payload in zip(rows, expected, strict=True):
        assert row == {column: payload[column] for column in CSV_COLUMNS}
    # A spreadsheet sees plain cells: flags joined with '|', empty = null.
    raw = list(csv.DictReader(io.StringIO(result.stdout)))
    long_row = next(r for r in raw if "LONG" in r["flags"] and "DST" in r["flags"])
    assert long_row["flags"] == f"LONG{LIST_SEPARATOR}DST"
    missing = next(r for r in raw if r["quality"] == "missing")
    assert missing["value"] == ""
    assert missing["demand"] == ""


@pytest.mark.integration
def test_csv_rows_match_the_engine_exactly(populated: Populated) -> None:
    result = edged(
        "intervals",
        "-c",
        str(populated.config),
        "--from",
        "2026-09-26",
        "--to",
        "2026-09-28",
        "--format",
        "csv",
        check=True,
    )
    rows = {r["id"]: r for r in parse_csv(result.stdout)}
    for record in populated.records:
        row = rows[record.id]
        assert row["value"] == record.value
        assert parse_iso_utc(row["end"]) == record.end
        assert set(row["flags"]) == {str(f) for f in record.flags}
    # the worked example's arithmetic survives the trip exactly: 1755 counts x 0.144
    full = [
        r
        for r in rows.values()
        if r["channel"] == "energy_import" and r["device"] == "unit1" and r["quality"] == "actual"
    ]
    assert full
    assert all(r["value"] == 252.72 for r in full)
    assert all(r["demand"] == 1010.88 for r in full)


@pytest.mark.integration
def test_device_and_channel_filters(populated: Populated) -> None:
    result = edged(
        "intervals",
        "-c",
        str(populated.config),
        "--from",
        "2026-09-26",
        "--to",
        "2026-09-28",
        "--format",
        "csv",
        "--device",
        "unit1",
        "--channel",
        "energy_export",
        check=True,
    )
    rows = parse_csv(result.stdout)
    assert rows
    assert {(r["device"], r["channel"]) for r in rows} == {("unit1", "energy_export")}
    assert any("ROLLOVER" in r["flags"] for r in rows)


@pytest.mark.integration
def test_local_range_across_dst_start(populated: Populated) -> None:
    """01:00 to 04:00 local on the day DST starts is only two real hours."""
    local = edged(
        "intervals",
        "-c",
        str(populated.config),
        "--from",
        "2026-09-27 01:00",
        "--to",
        "2026-09-27 04:00",
        "--format",
        "csv",
        "--device",
        "unit2",
        check=True,
    )
    iso = edged(
        "intervals",
        "-c",
        str(populated.config),
        "--from",
        "2026-09-26T13:00Z",
        "--to",
        "2026-09-27T04:00+13:00",
        "--format",
        "csv",
        "--device",
        "unit2",
        check=True,
    )
    assert local.stdout == iso.stdout
    ends = [r["end"] for r in parse_csv(local.stdout)]
    assert len(ends) == 8
    assert ends[0] == "2026-09-26T13:15:00Z"
    assert ends[-1] == "2026-09-26T15:00:00Z"


@pytest.mark.integration
def test_json_is_the_stored_payloads(populated: Populated, tmp_path: Path) -> None:
    out = tmp_path / "export.json"
    result = edged(
        "intervals",
        "-c",
        str(populated.config),
        "--from",
        "2026-09-26",
        "--to",
        "2026-09-28",
        "--format",
        "json",
        "-o",
        str(out),
        check=True,
    )
    assert result.stdout == ""
    assert f"wrote {len(populated.records)} interval(s)" in result.stderr
    assert json.loads(out.read_text()) == stored(populated.db)


@pytest.mark.integration
def test_empty_range(populated: Populated) -> None:
    result = edged(
        "intervals",
        "-c",
        str(populated.config),
        "--from",
        "2020-01-01",
        "--to",
        "2020-01-02",
        "--format",
        "json",
        check=True,
    )
    assert json.loads(result.stdout) == []
    assert "no intervals" in result.stderr


@pytest.mark.integration
def test_table_shows_local_times(populated: Populated) -> None:
    result = edged(
        "intervals",
        "-c",
        str(populated.config),
        "--from",
        "2026-09-27 03:00",
        "--to",
        "2026-09-27 03:15",
        "--device",
        "unit2",
        check=True,
    )
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["end", "(local)", "device"]
    assert len(lines) == 3
    assert lines[2].startswith("2026-09-27 03:15:00+13:00  unit2")
    assert "DST" in lines[2]


@pytest.mark.integration
def test_default_range_is_the_last_day(populated: Populated) -> None:
    # The fixture's data is from 2026-09; the last 24 h before --to holds all of it.
    result = edged(
        "intervals",
        "-c",
        str(populated.config),
        "--to",
        "2026-09-27 12:00",
        "--format",
        "csv",
        check=True,
    )
    assert len(parse_csv(result.stdout)) == len(populated.records)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--from", "2026-09-27 02:30"), "does not exist in Pacific/Auckland"),
        (("--from", "2026-04-05 02:30"), "happens twice in Pacific/Auckland"),
        (("--from", "tomorrow-ish"), "is not a time edged understands"),
        (("--from", "2026-09-28", "--to", "2026-09-27"), "--from must be before --to"),
    ],
)
def test_bad_times_are_usage_errors(
    populated: Populated, args: tuple[str, ...], message: str
) -> None:
    result = edged("intervals", "-c", str(populated.config), *args)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.integration
def test_missing_store_is_reported(tmp_path: Path) -> None:
    config = tmp_path / "edged.yaml"
    write_cli_config(config, tmp_path / "nowhere.db")
    for command in ("status", "intervals"):
        result = edged(command, "-c", str(config))
        assert result.returncode == 1
        assert "no store at" in result.stderr
    assert not (tmp_path / "nowhere.db").exists()  # read-only: never creates one


@pytest.mark.integration
def test_reading_a_stopped_store_creates_no_files(populated: Populated) -> None:
    """Run as root against a stopped daemon's store, a reader must not leave root-owned
    -wal/-shm files behind that the daemon's own user could not open later."""
    beside = sorted(p.name for p in populated.db.parent.iterdir())
    assert beside == ["edged.db"]
    edged("status", "-c", str(populated.config))
    edged("intervals", "-c", str(populated.config), "--from", "2026-09-26", check=True)
    assert sorted(p.name for p in populated.db.parent.iterdir()) == beside


@pytest.mark.integration
def test_invalid_config_is_reported(tmp_path: Path) -> None:
    config = tmp_path / "edged.yaml"
    config.write_text("site: x\ndevices: []\nbogus: 1\n")
    result = edged("status", "-c", str(config))
    assert result.returncode == 1
    assert "bogus: unknown key" in result.stderr


@pytest.mark.integration
def test_db_option_reads_another_store(populated: Populated, tmp_path: Path) -> None:
    config = tmp_path / "other.yaml"
    write_cli_config(config, tmp_path / "elsewhere.db")
    result = edged(
        "intervals",
        "-c",
        str(config),
        "--db",
        str(populated.db),
        "--from",
        "2026-09-26",
        "--to",
        "2026-09-28",
        "--format",
        "csv",
        check=True,
    )
    assert len(parse_csv(result.stdout)) == len(populated.records)


# -- intervals: plot ------------------------------------------------------------------


def test_plot_writes_a_png(populated: Populated, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "demand.png"
    result = edged(
        "intervals",
        "-c",
        str(populated.config),
        "--from",
        "2026-09-26",
        "--to",
        "2026-09-28",
        "--plot",
        str(png),
        check=True,
    )
    assert result.stdout == ""  # only --plot: no table
    assert f"plotted {len(populated.records)} interval(s)" in result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_install(
    populated: Populated,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    code = cli.main(
        [
            "intervals",
            "-c",
            str(populated.config),
            "--from",
            "2026-09-26",
            "--to",
            "2026-09-28",
            "--plot",
            str(tmp_path / "x.png"),
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "needs matplotlib" in err
    assert "edged[plot]" in err
    assert not (tmp_path / "x.png").exists()


# -- progress -------------------------------------------------------------------------


class _FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    quiet = io.StringIO()
    monkeypatch.setattr(sys, "stderr", quiet)
    with cli._progress(cli.PROGRESS_MIN_ROWS * 2) as advance:
        advance()
    assert quiet.getvalue() == ""
    tty = _FakeTty()
    monkeypatch.setattr(sys, "stderr", tty)
    with cli._progress(10) as advance:  # short exports: no bar even on a terminal
        advance()
    assert tty.getvalue() == ""
    with cli._progress(cli.PROGRESS_MIN_ROWS) as advance:
        for _ in range(cli.PROGRESS_MIN_ROWS):
            advance()
    assert "intervals" in tty.getvalue()


# -- status ---------------------------------------------------------------------------


def _status_at(populated: Populated, now: datetime) -> Any:
    settings = load_settings(populated.config)
    conn = connect_readonly(populated.db)
    try:
        return store_status(conn, settings, populated.db, now)
    finally:
        conn.close()


def test_status_summarises_the_store(populated: Populated) -> None:
    now = parse_iso_utc(LIVENESS) + timedelta(seconds=5)
    status = _status_at(populated, now)
    unit1, unit2 = status.devices
    assert unit1.last_read.read_at == LAST_BOUNDARY + timedelta(milliseconds=3)
    assert unit1.last_read.ok
    assert unit1.consecutive_errors == 0
    assert unit1.last_interval_end == LAST_BOUNDARY
    assert unit2.errors_recent == 1
    assert unit2.consecutive_errors == 0
    assert unit2.reads_recent == 18  # baseline + 17 boundaries 12:00Z..16:00Z
    assert unit1.reads_recent == 17  # one boundary nobody read
    assert unit2.quality_recent["missing"] == 1
    assert status.outbox.count == UNACKED
    assert status.outbox.last_seq == len(populated.records)
    assert status.liveness == parse_iso_utc(LIVENESS)
    # Healthy daemon, nothing stale: only warnings (the failed read, flagged intervals).
    assert {a.level for a in status.alarms} == {"warning"}
    assert any(a.subject == "unit2" and "1 failed read" in a.message for a in status.alarms)
    text = format_status(status)
    assert "outbox  3 unsent" in text
    assert "liveness mark 2026-09-26T16:00:01.250Z (5.0 s ago)" in text
    assert "unit2" in text
    assert "1/18" in text
    data = status_json(status)
    assert data["outbox"]["depth"] == UNACKED
    assert data["devices"][0]["last_interval_end"] == "2026-09-26T16:00:00Z"
    json.dumps(data)


def test_status_alarms_when_things_stop(populated: Populated) -> None:
    now = LAST_BOUNDARY + timedelta(hours=2)
    status = _status_at(populated, now)
    alarms = {(a.subject, a.message.split(" ")[0]) for a in status.alarms if a.level == "alarm"}
    assert ("daemon", "liveness") in alarms
    # The outbox rows were written just now (real time); seen from then they are old.
    later = replace(status, now=datetime.now(UTC) + timedelta(hours=1))
    outbox = [a for a in evaluate_alarms(later) if a.subject == "outbox"]
    assert outbox[0].message.startswith("3 unsent message(s), oldest 1 h")
    assert ("unit1", "no") in alarms
    assert ("unit2", "no") in alarms


async def test_status_counts_consecutive_failures(tmp_path: Path) -> None:
    populated = await populate(tmp_path)
    store = await Store.open(populated.db)
    try:
        # Three failures after the last good read, one of them in the same second.
        good_at = LAST_BOUNDARY + timedelta(milliseconds=3)
        failures = [good_at + timedelta(milliseconds=500)] + [
            LAST_BOUNDARY + timedelta(minutes=15 * i, milliseconds=2) for i in (1, 2)
        ]
        reads = [fixture_read("unit2", None, at, ok=False) for at in failures]
        await store.commit_boundary(reads, [], {}, [])
    finally:
        await store.close()
    status = _status_at(populated, LAST_BOUNDARY + timedelta(minutes=31))
    unit2 = status.devices[1]
    assert unit2.consecutive_errors == 3
    assert unit2.last_good_read == good_at
    assert not unit2.last_read.ok
    assert unit2.last_read.error == "timeout: no response in 1 s"
    alarm = next(a for a in status.alarms if a.subject == "unit2" and a.level == "alarm")
    assert "last 3 read(s) failed" in alarm.message


@pytest.mark.integration
def test_status_command(populated: Populated) -> None:
    # The data is from 2026-09: seen from today everything is stale -> exit 3.
    result = edged("status", "-c", str(populated.config))
    assert result.returncode == cli.STATUS_ALARM, result.stderr
    assert result.stdout.startswith("site cli-site")
    assert "ALARM" in result.stdout
    assert "unit1" in result.stdout
    result = edged("status", "-c", str(populated.config), "--format", "json")
    data = json.loads(result.stdout)
    assert [d["device"] for d in data["devices"]] == ["unit1", "unit2"]
    assert data["outbox"]["depth"] == UNACKED


# -- time arguments -------------------------------------------------------------------

NOW = datetime(2026, 11, 21, 3, 4, 5, tzinfo=UTC)  # 16:04:05 NZDT


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-21T06:00:00+13:00", "2026-11-20T17:00:00Z"),
        ("2026-11-21T00:15Z", "2026-11-21T00:15:00Z"),
        ("2026-11-21 00:15:00.250Z", "2026-11-21T00:15:00.250Z"),
        ("2026-11-21", "2026-11-20T11:00:00Z"),  # local midnight NZDT
        ("2026-07-01", "2026-06-30T12:00:00Z"),  # local midnight NZST
        ("2026-11-21 06:00", "2026-11-20T17:00:00Z"),
        ("2026-11-21T06:00", "2026-11-20T17:00:00Z"),
        ("2026-09-27 01:59", "2026-09-26T13:59:00Z"),  # just before DST starts
        ("2026-09-27 03:00", "2026-09-26T14:00:00Z"),  # the same instant as 02:00 NZST
        ("2026-04-05 01:59", "2026-04-04T12:59:00Z"),
        ("2026-04-05 03:00", "2026-04-04T15:00:00Z"),  # after the repeated hour
        ("now", "2026-11-21T03:04:05Z"),
        ("today", "2026-11-20T11:00:00Z"),
        ("yesterday", "2026-11-19T11:00:00Z"),
        ("-2h", "2026-11-21T01:04:05Z"),
        ("-7d", "2026-11-14T03:04:05Z"),
    ],
)
def test_parse_time(text: str, expected: str) -> None:
    assert iso_utc(parse_time(text, NZ, NOW)) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("2026-09-27 02:00", "does not exist"),
        ("2026-09-27 02:59", "does not exist"),
        ("2026-04-05 02:00", "happens twice"),
        ("2026-04-05 02:45", "2026-04-05T02:45+13:00 or 2026-04-05T02:45+12:00"),
        ("2026-02-30", "day is out of range"),
        ("21/11/2026", "not a time"),
        ("-soon", "expected -DURATION"),
    ],
)
def test_parse_time_refuses(text: str, message: str) -> None:
    with pytest.raises(TimeArgumentError, match=re.escape(message)):
        parse_time(text, NZ, NOW)


def test_local_days_have_23_24_and_25_hours() -> None:
    def hours(day: date) -> float:
        start = start_of_local_day(day, NZ)
        end = start_of_local_day(day + timedelta(days=1), NZ)
        return (end - start).total_seconds() / 3600

    assert hours(date(2026, 9, 27)) == 23
    assert hours(date(2026, 4, 5)) == 25
    assert hours(date(2026, 11, 21)) == 24


def test_a_day_that_starts_at_one_in_the_morning() -> None:
    # America/Santiago: DST started at 24:00 on 2022-09-10, so 11 Sept began at 01:00.
    santiago = ZoneInfo("America/Santiago")
    start = start_of_local_day(date(2022, 9, 11), santiago)
    assert start.astimezone(santiago).isoformat() == "2022-09-11T01:00:00-03:00"


@given(
    st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2060, 1, 1), timezones=st.just(UTC)
    )
)
def test_iso_with_offset_round_trips(t: datetime) -> None:
    t = t.replace(microsecond=t.microsecond // 1000 * 1000)
    assert parse_time(t.astimezone(NZ).isoformat(), NZ, NOW) == t
    assert parse_time(iso_utc(t), NZ, NOW) == t


@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2060, 1, 1)))
def test_local_times_resolve_or_are_refused(naive: datetime) -> None:
    naive = naive.replace(second=0, microsecond=0)
    try:
        t = parse_time(naive.isoformat(sep=" "), NZ, NOW)
    except TimeArgumentError as exc:
        message = str(exc)
        first = naive.replace(tzinfo=NZ, fold=0).astimezone(UTC)
        second = naive.replace(tzinfo=NZ, fold=1).astimezone(UTC)
        gap = first.astimezone(NZ).replace(tzinfo=None) != naive
        assert ("does not exist" in message) if gap else (first != second)
        return
    assert t.astimezone(NZ).replace(tzinfo=None) == naive


def test_format_age() -> None:
    assert format_age(3.24) == "3.2 s"
    assert format_age(125) == "2 min 5 s"
    assert format_age(7500) == "2 h 5 min"
    assert format_age(93_600) == "1 d 2 h"


# -- while the daemon runs ------------------------------------------------------------


@pytest.mark.integration
async def test_status_and_export_while_the_daemon_writes(tmp_path: Path, broker: Broker) -> None:
    """The commands read a store the daemon is writing (WAL: readers never block it)."""
    from edged.sim.meter import MeterServer, SimulatedMeter

    sim = SimulatedMeter.pmc1(load_kw=3600.0, kwh_per_count=0.001, initial_counts=10_000)
    async with MeterServer({1: sim}) as server:
        port = await server.start_tcp("127.0.0.1", 0)
        db = tmp_path / "state" / "edged.db"
        channel = {"name": "energy_import", "register": 0, "multiplier": 0.001}
        config = site_config(
            tmp_path,
            devices=[tcp_device("unit1", port, channels=[channel])],
            mqtt_port=broker.port,
            site="live",
            storage={"path": str(db)},
            mqtt={"topic_prefix": None},
            status_every=None,
        )
        async with Daemon(config, tmp_path) as daemon:
            await asyncio.sleep(4.5)
            status = await asyncio.to_thread(edged, "status", "-c", str(config), "--format", "json")
            export = await asyncio.to_thread(
                edged, "intervals", "-c", str(config), "--from=-1h", "--format", "csv"
            )
            assert daemon.process is not None
            assert daemon.process.returncode is None  # still running, not disturbed
            assert await daemon.stop(signal.SIGTERM) == 0
    assert status.returncode == 0, status.stdout + status.stderr
    data = json.loads(status.stdout)
    device = data["devices"][0]
    assert device["last_read"]["ok"]
    assert device["last_read"]["age_s"] < 3
    # The mark (in its file beside the store) is at most one period old, plus the
    # time to start and to run the command.
    assert data["liveness_age_s"] < LIVENESS_EVERY_S + 2
    assert all(a["level"] == "warning" for a in data["alarms"]), data["alarms"]
    assert export.returncode == 0, export.stderr
    rows = parse_csv(export.stdout)
    assert len(rows) >= 3
    after = {p["id"]: p for p in stored(db)}
    for row in rows:  # what was exported then is what the store holds now
        assert row == {column: after[row["id"]][column] for column in CSV_COLUMNS}
