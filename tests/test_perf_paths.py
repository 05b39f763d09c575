"""The fast paths (same results as the slow ones they replaced),
and the benchmark suite's own arithmetic and a smoke run of one benchmark."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench import harness, profile
from edged.config.schema import (
    Channel,
    Device,
)
from edged.core.model import iso_utc
from edged.io.store import ACK_CHUNK, OutboxMessage, Store


def iso_utc_reference(t: datetime) -> str:
    """The strftime version iso_utc replaced."""
    t = t.astimezone(UTC)
    if t.microsecond:
        return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


@given(
    st.datetimes(
        min_value=datetime(1971, 1, 1),
        max_value=datetime(2200, 1, 1),
        timezones=st.sampled_from(
            [UTC, ZoneInfo("Pacific/Auckland"), timezone(timedelta(hours=5, minutes=45))]
        ),
    ),
    st.booleans(),
)
def test_iso_utc_matches_the_strftime_format(t: datetime, whole: bool) -> None:
    if whole:
        t = t.replace(microsecond=0)
    assert iso_utc(t) == iso_utc_reference(t)


def test_channel_multiplier_is_cached_with_the_ratio_folded_in() -> None:
    alone = Channel.model_validate({"name": "e", "register": 0, "multiplier": 0.144})
    assert alone.multiplier == 0.144  # no device: no transformer ratio (and now cached)
    device = Device.model_validate(
        {
            "id": "m",
            "transport": {"type": "tcp", "host": "h", "port": 1},
            "ct_ratio": 200,
            "channels": [alone],  # kWh carries the CT and VT ratios
        }
    )
    channel = device.channels[0]
    assert channel.multiplier == 28.8  # 0.144 x 200 exactly, not the stale 0.144
    assert channel.multiplier is channel.multiplier  # computed once


async def test_ack_deletes_more_rows_than_one_statement_takes(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "edged.db")
    try:
        count = 2 * ACK_CHUNK + 7
        messages = [
            (store.allocate_seq(), OutboxMessage(topic="t", payload=b"{}")) for _ in range(count)
        ]
        await store.commit_boundary([], [], {}, messages)
        keep = {messages[0][0], messages[ACK_CHUNK][0], messages[-1][0]}
        await store.ack(seq for seq, _ in messages if seq not in keep)
        left = await store.outbox_batch(count)
        assert {row.seq for row in left} == keep
        await store.ack([])  # nothing to delete is fine
    finally:
        await store.close()


def test_bench_percentiles_and_rss_slope() -> None:
    values = [float(v) for v in range(1, 101)]
    assert harness.percentile(values, 0.5) == 50.0
    assert harness.percentile(values, 0.99) == 99.0
    assert harness.percentile([3.0], 0.99) == 3.0
    samples = [harness.ProcSample(at_s=60.0 * i, cpu_s=0.0, rss_bytes=harness.MIB * (10 + i))
               for i in range(5)]  # fmt: skip
    assert abs(harness.rss_slope_mib_per_h(samples) - 60.0) < 1e-9  # 1 MiB a minute


def test_profile_summary_counts_self_and_inclusive_time(tmp_path: Path) -> None:
    raw = (
        "main (/x/edged/cli/main.py:1);run (/x/edged/app/poller.py:5);"
        "decode (/x/edged/core/registers.py:9) 3\n"
        "main (/x/edged/cli/main.py:1);run (/x/edged/app/poller.py:5) 1\n"
    )
    found = profile.summarise(raw, tmp_path / "raw.txt")
    assert found.samples == 4
    assert dict(found.self_pct) == {
        "edged/core/registers.py:decode": 75.0,
        "edged/app/poller.py:run": 25.0,
    }
    assert dict(found.inclusive_pct)["edged/cli/main.py:main"] == 100.0


@pytest.mark.integration
def test_store_benchmark_runs_and_ends_with_its_figures(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.store", "--seconds", "0.05", "--devices", "50"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "EDGED_BENCH_DIR": str(tmp_path)},
        check=True,
    )
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["benchmark"] == "store"
    assert figures["edged_reads_per_s_batch1000"] > 0
    assert figures["targets"] == {"boundary_commit_under_1s": True}
