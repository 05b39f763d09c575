"""Boundary precision: read lateness and per-boundary spread (issue 3).

Runs `edged run` against 1, 50 and 200 simulated TCP meters (served by a
separate process, one port each) at 1 s intervals, then reads the precise
per-read `read_lateness_ms` from the daemon's SQLite store. Prints p50/p99/max
lateness and the p99/max spread between the first and last device's request
at each boundary, then one JSON line of all figures.

    python -m bench.boundary [--devices 1,50,200] [--seconds 60]

Targets on a 2-core machine: p99 lateness <= 2 ms for one device, p99 spread
<= 50 ms for 200 devices.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sqlite3
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from simulators.broker import Mosquitto, free_port


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def write_config(workdir: Path, ports: list[int], mqtt_port: int) -> Path:
    lines = [
        "site: bench",
        "timezone: UTC",
        f"storage: {{path: {workdir / 'edged.db'}}}",
        f"mqtt: {{host: 127.0.0.1, port: {mqtt_port}}}",
        "log: {level: warning, format: json}",
        "devices:",
    ]
    for i, port in enumerate(ports):
        lines += [
            f"  - id: m{i:04d}",
            "    interval: 1s",
            f"    transport: {{type: tcp, host: 127.0.0.1, port: {port}, timeout: 500ms}}",
            "    channels: [{name: energy, register: 0, type: uint32, multiplier: 0.001}]",
        ]
    path = workdir / "edged.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def run_case(devices: int, seconds: float, mqtt_port: int) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"edged-bench-{devices}-"))
    meters = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.meters", str(devices), stdout=asyncio.subprocess.PIPE
    )
    assert meters.stdout is not None
    ports = json.loads(await meters.stdout.readline())["ports"]
    config = write_config(workdir, ports, mqtt_port)
    daemon = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edged.cli", "run", "-c", str(config),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    await asyncio.sleep(seconds)
    daemon.send_signal(signal.SIGTERM)
    await daemon.wait()
    meters.send_signal(signal.SIGTERM)
    await meters.wait()
    with sqlite3.connect(workdir / "edged.db") as db:
        rows = db.execute(
            "SELECT boundary, read_lateness_ms, ok FROM reads WHERE boundary IS NOT NULL"
        ).fetchall()
    by_boundary: dict[str, list[float]] = defaultdict(list)
    lateness = []
    failed = 0
    for boundary, late_ms, ok in rows:
        by_boundary[boundary].append(late_ms)
        lateness.append(late_ms)
        failed += 0 if ok else 1
    # Only boundaries every device reached (the first and last may be cut short).
    spreads = [max(v) - min(v) for v in by_boundary.values() if len(v) == devices]
    return {
        "devices": devices,
        "reads": len(lateness),
        "failed_reads": failed,
        "boundaries": len(spreads),
        "lateness_p50_ms": round(statistics.median(lateness), 3),
        "lateness_p99_ms": round(percentile(lateness, 0.99), 3),
        "lateness_max_ms": round(max(lateness), 3),
        "spread_p99_ms": round(percentile(spreads, 0.99), 3) if spreads else None,
        "spread_max_ms": round(max(spreads), 3) if spreads else None,
    }


async def main_async(device_counts: list[int], seconds: float) -> list[dict[str, Any]]:
    workdir = Path(tempfile.mkdtemp(prefix="edged-bench-broker-"))
    broker = Mosquitto(free_port(), workdir)
    broker.start()
    try:
        results = []
        for devices in device_counts:
            result = await run_case(devices, seconds, broker.port)
            print(
                f"{devices:4d} devices: lateness p50 {result['lateness_p50_ms']:.3f} ms, "
                f"p99 {result['lateness_p99_ms']:.3f} ms, max {result['lateness_max_ms']:.3f} ms; "
                f"spread p99 {result['spread_p99_ms']} ms, max {result['spread_max_ms']} ms "
                f"({result['reads']} reads, {result['failed_reads']} failed, "
                f"{result['boundaries']} boundaries)",
                flush=True,
            )
            results.append(result)
        return results
    finally:
        broker.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", default="1,50,200")
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    counts = [int(x) for x in args.devices.split(",")]
    results = asyncio.run(main_async(counts, args.seconds))
    print(json.dumps({"benchmark": "boundary", "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
