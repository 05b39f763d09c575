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

Targets (100 meters): under 1 % of a core between boundaries; RSS
growth under 1 MB/hour over a 1-hour soak (shorter runs report the slope but
cannot show a leak of that size; `python -m bench --full` runs the hour).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
from typing import Any

from bench import harness
from bench.harness import MIB, ProcSample, say

INTERVAL_S = 900.0
# CPU samples this soon after a boundary are the boundary's, not idle.
AFTER_BOUNDARY_S = 10.0
WARMUP_S = 20.0


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


async def soak(pid: int, seconds: float, every_s: float) -> tuple[list[ProcSample], float]:
    offset = time.time() - time.monotonic()
    samples = await harness.sample_every(pid, every_s, time.monotonic() + seconds)
    return samples, offset


async def run(devices: int, seconds: float, every_s: float) -> dict[str, Any]:
    directory = harness.workdir("idle")
    figures: dict[str, Any] = {"devices": devices, "seconds": seconds, "interval_s": INTERVAL_S}
    with harness.broker(directory) as broker:
        async with harness.meters(devices) as ports, harness.ntp_server() as ntp_port:
            bare = harness.Bare(directory, ports, broker.port, INTERVAL_S)
            await bare.start()
            await asyncio.sleep(5.0)
            samples, offset = await soak(bare.pid, min(seconds, max(20.0, seconds / 10)), every_s)
            await bare.finish()
            figures["bare_idle_cpu_pct"] = round(100 * idle_cpu(samples, offset), 3)
            figures["bare_rss_mib"] = round(samples[-1].rss_bytes / MIB, 1)
            say(f"bare pymodbus+aiomqtt: {figures['bare_idle_cpu_pct']:.3f} % of a core idle, "
                f"{figures['bare_rss_mib']} MiB RSS")  # fmt: skip

            config = harness.write_config(
                directory, ports, broker.port, interval="15m", ntp_port=ntp_port
            )
            async with harness.daemon(config) as edged:
                await asyncio.sleep(WARMUP_S)
                samples, offset = await soak(edged.pid, seconds, every_s)
                figures["edged_warnings"] = edged.warnings()
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
    return figures


def targets(figures: dict[str, Any]) -> dict[str, bool]:
    found = {"idle_cpu_under_1pct": figures["edged_idle_cpu_pct"] < 1.0}
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
