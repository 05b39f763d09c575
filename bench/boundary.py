"""Boundary reads at scale: request spread and publish latency for N meters.

    python -m bench.boundary [--devices 1000] [--every 5] [--boundaries 12] [--profile S]

N simulated meters (other processes, one TCP port each) are read by `edged run`
on every boundary (`--every` seconds stands in for 15 minutes: the same code
path, more boundaries per minute) and their intervals published to a local
mosquitto. From the daemon's store: each read's lateness (request sent minus
boundary) and, per boundary, the spread between the first and the last of
the N requests. From a subscriber: each interval's publish latency (arrival
minus interval end).

The baseline, measured first in the same run: bench.bare reading the same
counters at the same boundaries with bare pymodbus (all at once, gather) and
publishing a minimal interval message per meter at QoS 1 with bare aiomqtt.

Targets (1000 meters on a 2-core machine): p99 spread <= 50 ms (100 ms
before) and every interval published within 2 s of its boundary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench import harness, profile
from bench.harness import MIB, say, summary


def latencies(
    collector: harness.Collector, prefix: str, ends: set[float]
) -> dict[float, list[float]]:
    """Publish latency (s) of each interval message ending on one of `ends`, by end."""
    found: dict[float, list[float]] = defaultdict(list)
    for message in collector.messages:
        if not message.topic.startswith(prefix):
            continue
        end = harness.parse_epoch(json.loads(message.payload)["end"])
        if end in ends:
            found[end].append(message.received_s - end)
    return found


def store_figures(
    db_path: Path, devices: int, since_s: float
) -> tuple[dict[float, list[float]], int]:
    """Lateness (ms) of every boundary read from `since_s` on, by boundary, and
    how many of those reads failed."""
    with sqlite3.connect(db_path) as db:
        rows = db.execute(
            "SELECT boundary, read_lateness_ms, ok FROM reads WHERE boundary IS NOT NULL"
        ).fetchall()
    by_boundary: dict[float, list[float]] = defaultdict(list)
    failed = 0
    for boundary, late_ms, ok in rows:
        at = harness.parse_epoch(boundary)
        if at >= since_s:
            by_boundary[at].append(late_ms)
            failed += 0 if ok else 1
    return by_boundary, failed


async def run_bare(
    directory: Path, ports: list[int], mqtt_port: int, every_s: float, boundaries: int,
    got: harness.Collector,
) -> dict[str, Any]:  # fmt: skip
    # One tick more than measured: the first tick only gives the counters a start.
    bare = harness.Bare(directory, ports, mqtt_port, every_s, ticks=boundaries + 1)
    await bare.start()
    result = await bare.finish(timeout_s=(boundaries + 3) * every_s + 60)
    await asyncio.sleep(1.0)  # the last publishes arrive
    spreads = result["spreads_ms"][1:]
    ends = {
        harness.parse_epoch(json.loads(m.payload)["end"])
        for m in got.messages
        if m.topic.startswith("bare/")
    }
    by_end = latencies(got, "bare/", ends)
    delays = [d for values in by_end.values() for d in values]
    return {
        "bare_reads": result["reads"],
        "bare_errors": result["errors"],
        **summary(spreads, "bare_spread_ms"),
        **summary(delays, "bare_publish_latency_s"),
    }


async def run(devices: int, every_s: float, boundaries: int, profile_s: float) -> dict[str, Any]:
    directory = harness.workdir("boundary")
    figures: dict[str, Any] = {"devices": devices, "every_s": every_s, "boundaries": boundaries}
    with harness.broker(directory) as broker:
        async with (
            harness.meters(devices) as ports,
            harness.ntp_server() as ntp_port,
            harness.collect(broker.port, ["bare/#", "edged/+/device/+/interval/#"]) as got,
        ):
            figures.update(await run_bare(directory, ports, broker.port, every_s, boundaries, got))
            say(f"bare pymodbus+aiomqtt: spread p99 {figures['bare_spread_ms_p99']} ms, "
                f"publish latency p99 {figures['bare_publish_latency_s_p99']} s, "
                f"max {figures['bare_publish_latency_s_max']} s")  # fmt: skip

            config = harness.write_config(
                directory, ports, broker.port, interval=f"{every_s:g}s", ntp_port=ntp_port
            )
            async with harness.daemon(config) as edged:
                started = time.monotonic()
                ok = await harness.wait_until(
                    lambda: sum(m.topic.startswith("edged/") for m in got.messages) >= devices,
                    120 + 3 * every_s,
                )
                if not ok:
                    raise RuntimeError(f"edged published no intervals:\n{edged.log_tail()}")
                figures["edged_startup_s"] = round(time.monotonic() - started, 1)
                # Measure from the next boundary on: every device is connected by now.
                first_s = harness.next_multiple(time.time(), every_s)
                last_s = first_s + (boundaries - 1) * every_s
                await harness.sleep_to_wall(first_s - 0.5)
                cpu = await harness.sample_every(
                    edged.pid, 1.0, time.monotonic() + boundaries * every_s
                )
                await harness.sleep_to_wall(last_s + 3.0)  # publishing deadline + margin
                figures["edged_cpu_cores"] = round(harness.cpu_share(cpu[0], cpu[-1]), 4)
                figures["edged_peak_rss_mib"] = round(harness.peak_rss_bytes(edged.pid) / MIB, 1)
                if profile_s > 0:
                    found = await profile.record(edged.pid, profile_s, directory)
                    if found is not None:
                        profile.show(found, f"edged, {devices} meters every {every_s:g} s")
                        figures["profile_top_self"] = found.self_pct[:8]
                figures["edged_warnings"] = edged.warnings()

    by_boundary, failed = store_figures(directory / "edged.db", devices, first_s)
    measured = {b: v for b, v in by_boundary.items() if first_s <= b <= last_s}
    spreads = [max(v) - min(v) for v in measured.values() if len(v) == devices]
    lateness = [x for v in measured.values() for x in v]
    by_end = latencies(got, "edged/", set(measured))
    delays = [d for values in by_end.values() for d in values]
    figures.update({
        "edged_boundaries_measured": len(measured),
        "edged_boundaries_complete": len(spreads),
        "edged_failed_reads": failed,
        **summary(lateness, "edged_lateness_ms"),
        **summary(spreads, "edged_spread_ms"),
        "edged_intervals_expected": devices * len(measured),
        "edged_intervals_published": len(delays),
        **summary(delays, "edged_publish_latency_s"),
    })  # fmt: skip
    f = figures
    say(f"edged: spread p99 {f['edged_spread_ms_p99']} ms "
        f"(lateness p99 {f['edged_lateness_ms_p99']} ms), publish latency "
        f"p99 {f['edged_publish_latency_s_p99']} s, max {f['edged_publish_latency_s_max']} s, "
        f"{f['edged_intervals_published']}/{f['edged_intervals_expected']} intervals, "
        f"{f['edged_cpu_cores']:.3f} cores, peak RSS {f['edged_peak_rss_mib']} MiB")  # fmt: skip
    for name in ("spread_ms_p99", "publish_latency_s_max"):
        base = figures[f"bare_{name}"]
        if base:
            figures[f"ratio_{name}"] = round(figures[f"edged_{name}"] / base, 2)
    return figures


def targets(figures: dict[str, Any]) -> dict[str, bool]:
    spread = figures["edged_spread_ms_p99"]
    latency = figures["edged_publish_latency_s_max"]
    return {
        "spread_p99_le_50ms": spread is not None and spread <= 50.0,
        "all_published_within_2s": latency is not None
        and latency <= 2.0
        and figures["edged_intervals_published"] == figures["edged_intervals_expected"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.boundary")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--every", type=float, default=5.0, help="interval, s")
    parser.add_argument("--boundaries", type=int, default=12)
    parser.add_argument("--profile", type=float, default=0.0, metavar="S")
    args = parser.parse_args(argv)
    return harness.conclude(
        "boundary", run(args.devices, args.every, args.boundaries, args.profile), targets
    )


if __name__ == "__main__":
    sys.exit(main())
