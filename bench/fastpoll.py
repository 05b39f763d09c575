"""Fast polling: the daemon reading N meters x R registers every second.

    python -m bench.fastpoll [--devices 500] [--registers 30] [--seconds 60] [--profile 20]

N simulated meters (other processes, one TCP port each) serve R registers
(R/2 float32 values) that `edged run` fast-polls every second and publishes on
`.../measurement` (QoS 0) to a local mosquitto; interval boundaries are 15
minutes apart, so the window measures fast polling alone. The daemon's CPU
(user + system, all threads) and RSS come from /proc over the window.

The baseline, measured first in the same run against the same meters and
broker: bench.bare reading the same registers on the same ticks with bare
pymodbus, decoding them and publishing each as JSON with a bare aiomqtt client.

Targets (2-core machine, 500 x 30 registers): edged under 0.5 core and
under 150 MB RSS. With --profile S, py-spy then samples the daemon for S s.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

from bench import harness, profile
from bench.harness import MIB, say


async def measure_window(
    pid: int, collector: harness.Collector, topic_part: str, seconds: float
) -> dict[str, float]:
    n0 = sum(topic_part in m.topic for m in collector.messages)
    first = harness.proc_sample(pid)
    await asyncio.sleep(seconds)
    last = harness.proc_sample(pid)
    n1 = sum(topic_part in m.topic for m in collector.messages)
    return {
        "cpu_cores": round(harness.cpu_share(first, last), 4),
        "rss_mib": round(last.rss_bytes / MIB, 1),
        "peak_rss_mib": round(harness.peak_rss_bytes(pid) / MIB, 1),
        "published_per_s": round((n1 - n0) / (last.at_s - first.at_s), 1),
    }


async def run(devices: int, registers: int, seconds: float, profile_s: float) -> dict[str, Any]:
    directory = harness.workdir("fastpoll")
    figures: dict[str, Any] = {"devices": devices, "registers": registers, "seconds": seconds}
    with harness.broker(directory) as broker:
        async with (
            harness.meters(devices, registers=registers) as ports,
            harness.ntp_server() as ntp_port,
            harness.collect(broker.port, ["bare/#", "edged/+/device/+/measurement"]) as got,
        ):
            bare = harness.Bare(directory, ports, broker.port, 1.0, registers=registers)
            await bare.start()
            await harness.wait_until(lambda: len(got.messages) >= devices, 30)
            await asyncio.sleep(2.0)
            base = await measure_window(bare.pid, got, "bare/", seconds)
            result = await bare.finish()
            figures.update({f"bare_{k}": v for k, v in base.items()})
            figures["bare_errors"] = result["errors"]
            say(f"bare pymodbus+aiomqtt: {base['cpu_cores']:.3f} cores, "
                f"{base['rss_mib']:.1f} MiB RSS, {base['published_per_s']:.0f} msg/s")  # fmt: skip

            config = harness.write_config(
                directory,
                ports,
                broker.port,
                interval="15m",
                measure_registers=registers,
                ntp_port=ntp_port,
            )
            async with harness.daemon(config) as edged:
                seen = len(got.messages)
                started = time.monotonic()
                ok = await harness.wait_until(lambda: len(got.messages) - seen >= devices, 120)
                if not ok:
                    raise RuntimeError(f"edged published no measurements:\n{edged.log_tail()}")
                figures["edged_startup_s"] = round(time.monotonic() - started, 1)
                await asyncio.sleep(3.0)
                mine = await measure_window(edged.pid, got, "edged/", seconds)
                figures.update({f"edged_{k}": v for k, v in mine.items()})
                say(f"edged:                 {mine['cpu_cores']:.3f} cores, "
                    f"{mine['rss_mib']:.1f} MiB RSS (peak {mine['peak_rss_mib']:.1f}), "
                    f"{mine['published_per_s']:.0f} msg/s")  # fmt: skip
                if profile_s > 0:
                    found = await profile.record(edged.pid, profile_s, directory)
                    if found is None:
                        say("profile: py-spy not available (pip install -e '.[bench]')")
                    else:
                        profile.show(found, f"edged at {devices} x {registers} registers / s")
                        figures["profile_top_self"] = found.self_pct[:8]
                figures["edged_warnings"] = edged.warnings()
    figures["cpu_ratio_edged_vs_bare"] = round(
        figures["edged_cpu_cores"] / max(figures["bare_cpu_cores"], 1e-6), 2
    )
    say(f"edged / bare CPU: {figures['cpu_ratio_edged_vs_bare']:.2f}x")
    return figures


def targets(figures: dict[str, Any]) -> dict[str, bool]:
    devices = figures["devices"]
    return {
        "cpu_under_0.5_core": figures["edged_cpu_cores"] < 0.5,
        "rss_under_150_mb": figures["edged_peak_rss_mib"] * MIB < 150e6,
        # A window holds S or S-1 ticks of every device, and a poll that
        # overruns its tick skips the next one by design: 95 % of the ticks.
        "every_device_polled": figures["edged_published_per_s"] >= 0.95 * devices,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fastpoll")
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--registers", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--profile", type=float, default=0.0, metavar="S")
    args = parser.parse_args(argv)
    return harness.conclude(
        "fastpoll", run(args.devices, args.registers, args.seconds, args.profile), targets
    )


if __name__ == "__main__":
    sys.exit(main())
