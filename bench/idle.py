"""Idle cost: N meters on 15-minute intervals, between boundaries and over a soak.

    python -m bench.idle [--devices 100] [--seconds 3600] [--sample-every 10]

`edged run` reads N simulated meters (other processes) at 15-minute boundaries
and publishes to a local mosquitto; between boundaries it only keeps its
liveness mark, its statuses and its connections. Over `--seconds` the daemon's
CPU and RSS are sampled every `--sample-every` s: CPU is reported between
boundaries (samples within 10 s after a boundary left out) and overall; RSS
growth is the least-squares slope over the soak, after a warm-up.

The baseline, measured first for a tenth of the time (at least 20 s): bench.bare
with the same connections, reading the counters at the same boundaries.

Besides CPU, each sample reads the process's `write_bytes` (/proc/PID/io:
bytes it sent towards the disk, the flash-wear figure) and its voluntary
context switches summed over all its threads (/proc/PID/task/*/status: the
event loop, aiosqlite's thread, executor threads): each is one wake-up after
a sleep. Between boundaries they give bytes written per hour and wake-ups per
second; samples around a boundary give the bytes per interval record (the
boundary's writes above the idle rate, divided by the meters read).

Targets (100 meters): under 1 % of a core between boundaries, at most one
wake-up a second; for 20 meters at most 3 MB written per hour; RSS
growth under 1 MB/hour over a 1-hour soak (shorter runs report the slope but
cannot show a leak of that size; `python -m bench --full` runs the hour).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import harness
from bench.harness import MIB, ProcSample, say

INTERVAL_S = 900.0
# CPU samples this soon after a boundary are the boundary's, not idle.
AFTER_BOUNDARY_S = 10.0
WARMUP_S = 20.0


@dataclass(frozen=True, slots=True)
class IoSample:
    at_s: float  # time.monotonic()
    write_bytes: int  # /proc/PID/io: bytes this process caused to be written to storage
    wakeups: int  # voluntary context switches, summed over the process's threads


def io_sample(pid: int) -> IoSample:
    write_bytes = 0
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                write_bytes = int(line.split()[1])
    wakeups = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        try:
            text = status.read_text()
        except OSError:  # the thread ended in between
            continue
        for line in text.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                wakeups += int(line.split()[1])
    return IoSample(time.monotonic(), write_bytes, wakeups)


def _near_boundary(a_s: float, b_s: float, wall_offset_s: float) -> bool:
    boundary = harness.next_multiple(a_s + wall_offset_s - AFTER_BOUNDARY_S, INTERVAL_S)
    return boundary <= b_s + wall_offset_s


def idle_rates(samples: list[IoSample], wall_offset_s: float) -> tuple[float, float]:
    """(bytes written per hour, wake-ups per second) between boundaries."""
    written = wakeups = 0
    elapsed = 0.0
    for a, b in itertools.pairwise(samples):
        if _near_boundary(a.at_s, b.at_s, wall_offset_s):
            continue
        written += b.write_bytes - a.write_bytes
        wakeups += b.wakeups - a.wakeups
        elapsed += b.at_s - a.at_s
    if not elapsed:
        return float("nan"), float("nan")
    return written / elapsed * 3600, wakeups / elapsed


def boundary_bytes(
    samples: list[IoSample], wall_offset_s: float, idle_bytes_per_h: float
) -> tuple[float, int] | None:
    """(bytes written by the boundaries above the idle rate, boundaries seen), or None."""
    extra = 0.0
    seen: set[float] = set()
    for a, b in itertools.pairwise(samples):
        if not _near_boundary(a.at_s, b.at_s, wall_offset_s):
            continue
        # Several sample pairs cover one boundary and its aftermath: count it once.
        seen.add(harness.next_multiple(a.at_s + wall_offset_s - AFTER_BOUNDARY_S, INTERVAL_S))
        extra += (b.write_bytes - a.write_bytes) - idle_bytes_per_h * (b.at_s - a.at_s) / 3600
    return (extra, len(seen)) if seen else None


async def sample_io_every(pid: int, every_s: float, until_s: float) -> list[IoSample]:
    samples = [io_sample(pid)]
    while time.monotonic() < until_s:
        await asyncio.sleep(min(every_s, max(0.0, until_s - time.monotonic())))
        samples.append(io_sample(pid))
    return samples


def idle_cpu(samples: list[ProcSample], wall_offset_s: float) -> float:
    """Cores used between boundaries: sample pairs with no boundary in or just before them."""
    used = elapsed = 0.0
    for a, b in itertools.pairwise(samples):
        wall_a = a.at_s + wall_offset_s
        boundary = harness.next_multiple(wall_a - AFTER_BOUNDARY_S, INTERVAL_S)
        if boundary <= b.at_s + wall_offset_s:
            continue  # a boundary (or its aftermath) falls within this pair
        used += b.cpu_s - a.cpu_s
        elapsed += b.at_s - a.at_s
    return used / elapsed if elapsed else float("nan")


async def soak(
    pid: int, seconds: float, every_s: float
) -> tuple[list[ProcSample], list[IoSample], float]:
    offset = time.time() - time.monotonic()
    until_s = time.monotonic() + seconds
    samples, io = await asyncio.gather(
        harness.sample_every(pid, every_s, until_s), sample_io_every(pid, every_s, until_s)
    )
    return samples, io, offset


async def run(devices: int, seconds: float, every_s: float) -> dict[str, Any]:
    directory = harness.workdir("idle")
    figures: dict[str, Any] = {"devices": devices, "seconds": seconds, "interval_s": INTERVAL_S}
    with harness.broker(directory) as broker:
        async with harness.meters(devices) as ports, harness.ntp_server() as ntp_port:
            bare = harness.Bare(directory, ports, broker.port, INTERVAL_S)
            await bare.start()
            await asyncio.sleep(5.0)
            samples, io, offset = await soak(
                bare.pid, min(seconds, max(20.0, seconds / 10)), every_s
            )
            await bare.finish()
            figures["bare_idle_cpu_pct"] = round(100 * idle_cpu(samples, offset), 3)
            figures["bare_rss_mib"] = round(samples[-1].rss_bytes / MIB, 1)
            bare_bytes_per_h, bare_wakeups = idle_rates(io, offset)
            figures["bare_idle_wakeups_per_s"] = round(bare_wakeups, 3)
            figures["bare_idle_write_mb_per_h"] = round(bare_bytes_per_h / 1e6, 4)
            say(f"bare pymodbus+aiomqtt: {figures['bare_idle_cpu_pct']:.3f} % of a core idle, "
                f"{bare_wakeups:.2f} wake-ups/s, {figures['bare_rss_mib']} MiB RSS")  # fmt: skip

            config = harness.write_config(
                directory, ports, broker.port, interval="15m", ntp_port=ntp_port
            )
            async with harness.daemon(config) as edged:
                await asyncio.sleep(WARMUP_S)
                samples, io, offset = await soak(edged.pid, seconds, every_s)
                figures["edged_warnings"] = edged.warnings()
    bytes_per_h, wakeups_per_s = idle_rates(io, offset)
    figures["edged_idle_wakeups_per_s"] = round(wakeups_per_s, 3)
    figures["edged_idle_write_mb_per_h"] = round(bytes_per_h / 1e6, 4)
    figures["edged_idle_write_mb_per_day"] = round(bytes_per_h * 24 / 1e6, 2)
    figures["edged_write_mb_per_h_overall"] = round(
        (io[-1].write_bytes - io[0].write_bytes) / max(io[-1].at_s - io[0].at_s, 1e-9) * 3.6e-3, 4
    )
    boundaries = boundary_bytes(io, offset, bytes_per_h)
    figures["boundaries_seen"] = boundaries[1] if boundaries else 0
    figures["bytes_per_interval_record"] = (
        round(boundaries[0] / boundaries[1] / devices) if boundaries else None
    )
    figures["wakeup_ratio_edged_vs_bare"] = round(
        wakeups_per_s / max(figures["bare_idle_wakeups_per_s"], 1e-3), 2
    )
    overall = harness.cpu_share(samples[0], samples[-1])
    figures.update({
        "edged_idle_cpu_pct": round(100 * idle_cpu(samples, offset), 3),
        "edged_overall_cpu_pct": round(100 * overall, 3),
        "edged_rss_start_mib": round(samples[0].rss_bytes / MIB, 2),
        "edged_rss_end_mib": round(samples[-1].rss_bytes / MIB, 2),
        "edged_rss_growth_mib_per_h": round(harness.rss_slope_mib_per_h(samples), 3),
    })  # fmt: skip
    figures["cpu_ratio_edged_vs_bare"] = round(
        figures["edged_idle_cpu_pct"] / max(figures["bare_idle_cpu_pct"], 1e-3), 2
    )
    say(f"edged: {figures['edged_idle_cpu_pct']:.3f} % of a core between boundaries "
        f"({figures['edged_overall_cpu_pct']:.3f} % overall), RSS "
        f"{figures['edged_rss_start_mib']} -> {figures['edged_rss_end_mib']} MiB, "
        f"slope {figures['edged_rss_growth_mib_per_h']} MiB/h over {seconds:.0f} s")  # fmt: skip
    say(f"edged: {wakeups_per_s:.2f} wake-ups/s and {bytes_per_h / 1e6:.3f} MB/h written "
        f"between boundaries; {figures['bytes_per_interval_record']} bytes per interval record "
        f"({figures['boundaries_seen']} boundary windows)")  # fmt: skip
    return figures


def targets(figures: dict[str, Any]) -> dict[str, bool]:
    found = {
        "idle_cpu_under_1pct": figures["edged_idle_cpu_pct"] < 1.0,
        "idle_wakeups_at_most_1_per_s": figures["edged_idle_wakeups_per_s"] <= 1.0,
    }
    if figures["devices"] <= 20:
        found["idle_writes_at_most_3mb_per_h"] = figures["edged_idle_write_mb_per_h"] <= 3.0
    if figures["seconds"] >= 3600:
        found["rss_growth_under_1mb_per_h"] = figures["edged_rss_growth_mib_per_h"] * MIB < 1e6
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.idle")
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=3600.0)
    parser.add_argument("--sample-every", type=float, default=10.0)
    args = parser.parse_args(argv)
    return harness.conclude("idle", run(args.devices, args.seconds, args.sample_every), targets)


if __name__ == "__main__":
    sys.exit(main())
