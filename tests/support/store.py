"""A store populated as the daemon would have left it, and the `edged` CLI.

16 quarter hours across the Pacific/Auckland DST start (2026-09-27), two
meters: unit2 fails one read, unit1 misses one boundary (the daemon was down),
the last few outbox messages are unsent. Built with the engine and the real
Store; the CLI and replay tests read it back.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from edged.config.load import load_settings
from edged.core.engine import intervals as engine
from edged.core.engine.state import (
    ChannelState,
    IntervalContext,
)
from edged.core.model import Interval, Read, ReadError, ReadErrorKind, TimeState
from edged.core.payloads import encode, interval_payload
from edged.core.schedule import next_boundary
from edged.io.store import OutboxMessage, Store
from tests.support.config import write_settings

ROOT = Path(__file__).resolve().parents[2]
NZ = ZoneInfo("Pacific/Auckland")
COMMANDS = ("run", "check-config", "demo", "status", "intervals", "replay")

# 2026-09-26 23:50:00.5 NZST: the start-up read; 16 quarter hours follow, across
# the DST change at 02:00 NZST (14:00Z).
BASELINE_AT = datetime(2026, 9, 26, 11, 50, 0, 500_000, tzinfo=UTC)
LAST_BOUNDARY = datetime(2026, 9, 26, 16, 0, tzinfo=UTC)
UNIT2_FAILS_AT = datetime(2026, 9, 26, 13, 0, tzinfo=UTC)
UNIT1_NOT_READ_AT = datetime(2026, 9, 26, 15, 0, tzinfo=UTC)  # the daemon was down
UNACKED = 3  # outbox messages left unsent
LIVENESS = "2026-09-26T16:00:01.250Z"


def cli_settings(db: Path) -> dict[str, Any]:
    """Two meters on one Modbus TCP gateway, 15-minute intervals, no broker."""
    transport = {"type": "tcp", "host": "127.0.0.1", "port": 1502}
    return {
        "site": "cli-site",
        "timezone": "Pacific/Auckland",
        "storage": {"path": str(db)},
        "status_every": "60s",
        "devices": [
            {
                "id": "unit1",
                "interval": "15m",
                "transport": {**transport, "unit_id": 1},
                "channels": [
                    {"name": "energy_import", "register": 0, "type": "uint32",
                     "multiplier": 0.144},
                    {"name": "energy_export", "register": 2, "type": "uint16", "multiplier": 0.5},
                ],
            },
            {
                "id": "unit2",
                "interval": "15m",
                "transport": {**transport, "unit_id": 2},
                "channels": [
                    {"name": "energy_import", "register": 0, "type": "uint32",
                     "multiplier": 0.001},
                ],
            },
        ],
    }  # fmt: skip


def write_cli_config(path: Path, db: Path) -> Path:
    return write_settings(path, cli_settings(db))


@dataclass(frozen=True)
class Populated:
    config: Path
    db: Path
    records: list[Interval]


def counts_at(device: str, t: datetime) -> dict[str, int]:
    """Counters that grow with time; unit1's 16-bit export counter wraps."""
    minutes = int((t - BASELINE_AT).total_seconds() // 60) + 10
    if device == "unit1":
        return {
            "energy_import": 1_000_000 + 117 * minutes,
            "energy_export": (65_000 + 13 * minutes) % 65_536,
        }
    return {"energy_import": 5_000 + 2_000 * minutes}


def fixture_read(device: str, boundary: datetime | None, at: datetime, ok: bool = True) -> Read:
    lateness = None if boundary is None else (at - boundary).total_seconds() * 1000
    if not ok:
        return Read(
            device=device,
            boundary=boundary,
            read_at=at,
            read_lateness_ms=lateness,
            time_state=TimeState.SYNCED,
            error=ReadError(ReadErrorKind.TIMEOUT, "no response in 1 s"),
        )
    return Read(
        device=device,
        boundary=boundary,
        read_at=at,
        read_lateness_ms=lateness,
        time_state=TimeState.SYNCED,
        values=counts_at(device, at),
    )


async def populate(tmp_path: Path) -> Populated:
    db = tmp_path / "state" / "edged.db"
    config = write_cli_config(tmp_path / "edged.yaml", db)
    settings = load_settings(config)
    store = await Store.open(db)
    records: list[Interval] = []
    seqs: list[int] = []
    try:
        states: dict[str, dict[str, ChannelState]] = {d.id: {} for d in settings.devices}
        for device in settings.devices:
            read = fixture_read(device.id, None, BASELINE_AT)
            states[device.id] = engine.baseline_device(states[device.id], read, device.channels)
            await store.commit_boundary([read], [], flat_states(device.id, states[device.id]), [])
        boundary = next_boundary(BASELINE_AT, 900, NZ)
        while boundary <= LAST_BOUNDARY:
            for device in settings.devices:
                if device.id == "unit1" and boundary == UNIT1_NOT_READ_AT:
                    continue
                at = boundary + timedelta(milliseconds=3)
                read = fixture_read(
                    device.id,
                    boundary,
                    at,
                    ok=not (device.id == "unit2" and boundary == UNIT2_FAILS_AT),
                )
                ctx = IntervalContext("cli-site", device, NZ)
                step = engine.step_device(states[device.id], read, ctx)
                states[device.id], new = dict(step.states), list(step.records)
                pairs, messages = [], []
                for record in new:
                    seq = store.allocate_seq()
                    payload = encode(interval_payload(record, seq))
                    pairs.append((record, payload))
                    topic = f"edged/cli-site/device/{record.device}/interval/{record.channel}"
                    messages.append((seq, OutboxMessage(topic=topic, payload=payload)))
                    seqs.append(seq)
                records.extend(new)
                await store.commit_boundary(
                    [read], pairs, flat_states(device.id, states[device.id]), messages
                )
            boundary = next_boundary(boundary, 900, NZ)
        await store.ack(seqs[:-UNACKED])
        await store.set_mark("liveness", LIVENESS)
    finally:
        await store.close()
    return Populated(config, db, records)


def flat_states(
    device: str, states: dict[str, ChannelState]
) -> dict[tuple[str, str], ChannelState]:
    return {(device, channel): state for channel, state in states.items()}


def edged(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "edged.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result
