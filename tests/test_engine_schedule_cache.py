"""The interval engine remembers boundary arithmetic for UTC instants only
(edged.core.engine.intervals): two local times that differ only in `fold`
compare equal but are an hour apart, and must not share an answer."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from edged.core.engine.intervals import _between, _dst, _start
from edged.core.model import iso_utc

BERLIN = ZoneInfo("Europe/Berlin")


def test_repeated_local_hour_is_two_instants() -> None:
    # 2026-10-25: Berlin goes from CEST (+02) back to CET (+01) at 03:00 local,
    # so 02:30 happens twice: 00:30 UTC, then 01:30 UTC.
    first = datetime(2026, 10, 25, 2, 30, tzinfo=BERLIN, fold=0)
    second = datetime(2026, 10, 25, 2, 30, tzinfo=BERLIN, fold=1)
    assert first == second  # same tzinfo: Python compares the wall times
    assert _start(first, 3600, BERLIN) == datetime(2026, 10, 25, 0, 0, tzinfo=UTC)
    assert _start(second, 3600, BERLIN) == datetime(2026, 10, 25, 1, 0, tzinfo=UTC)
    assert _dst(first, BERLIN) is True
    assert _dst(second, BERLIN) is False


def test_utc_answers_are_the_same_when_asked_again() -> None:
    end = datetime(2026, 3, 29, 1, 15, tzinfo=UTC)  # 03:15 CEST, just after the change
    for _ in range(2):
        assert _start(end, 900, BERLIN) == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)
        assert _dst(end, BERLIN) is True
        assert _between(datetime(2026, 3, 29, 0, 30, tzinfo=UTC), end, 900, BERLIN) == [
            datetime(2026, 3, 29, 0, 45, tzinfo=UTC),
            datetime(2026, 3, 29, 1, 0, tzinfo=UTC),
        ]


def test_iso_utc_whole_seconds_and_milliseconds() -> None:
    assert iso_utc(datetime(2026, 1, 1, 0, 15, tzinfo=UTC)) == "2026-01-01T00:15:00Z"
    assert iso_utc(datetime(2026, 1, 1, 0, 15, tzinfo=UTC)) == "2026-01-01T00:15:00Z"
    assert iso_utc(datetime(2026, 1, 1, 0, 15, 0, 3000, tzinfo=UTC)) == "2026-01-01T00:15:00.003Z"
    assert iso_utc(datetime(2026, 1, 1, 1, 15, tzinfo=BERLIN)) == "2026-01-01T00:15:00Z"
