"""CPU per meter of a boundary after its read: the interval engine's step, the
payloads, the outbox and the store commit, in this process.

    python -m bench.afterread [--devices 1000] [--boundaries 20] [--profile]

What `bench.boundary` measures end to end includes the reads (pymodbus) and
the publish (paho); this isolates what edged does between a `Read` coming
back and its messages being committed to the outbox, with the pollers'
own code (`DevicePoller._submit`, `Recorder`, `Store.commit_boundary`) on
the same config as bench.boundary's meters (one uint32 energy channel,
multiplier 0.001). CPU time (`time.process_time`, the sqlite thread
included), so the figure is the work, not the wait for the disk; with
`--profile` a cProfile of the same run, top functions by own time.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from bench import harness
from bench.harness import say
from edged.app import logs
from edged.app.poller import DevicePoller, Recorder
from edged.config.load import load_settings
from edged.core.engine import intervals as engine
from edged.core.model import Read, TimeState
from edged.core.payloads import Topics
from edged.io.store import Store

START = datetime(2026, 1, 1, tzinfo=UTC)
INTERVAL_S = 900


class _Clock:
    boot_id = None
    time_state = TimeState.SYNCED

    def now(self) -> datetime:
        return START

    def monotonic(self) -> float:
        return 0.0


def _read(device: str, k: int, i: int) -> Read:
    boundary = START + timedelta(seconds=INTERVAL_S * k)
    return Read(
        device=device, boundary=boundary if k else None,
        read_at=boundary + timedelta(milliseconds=3 + i % 200),
        read_lateness_ms=3.0 + i % 200 if k else None, time_state=TimeState.SYNCED,
        values={"energy": 100_000 + 1234 * k + i}, registers=((0, (0, 1000 + i)),),
        mono_s=float(INTERVAL_S * k) + 0.003,
    )  # fmt: skip


async def run(devices: int, boundaries: int, profile: bool) -> dict[str, Any]:
    directory = harness.workdir("afterread")
    config = harness.write_config(
        directory, [10000 + i for i in range(devices)], 1883, interval="15m"
    )
    settings = load_settings(config)
    logs.configure(settings.log.level, settings.log.format)  # as `edged run` does
    store = await Store.open(directory / "edged.db")
    recorder = Recorder(store, lambda: None)
    topics = Topics(harness.TOPIC_PREFIX, harness.SITE)
    pollers = [
        DevicePoller(
            site=harness.SITE, device=device, zone=UTC, link=None,  # type: ignore[arg-type]
            clock=_Clock(), waiter=None, store=store, recorder=recorder,  # type: ignore[arg-type]
            topics=topics, states={}, on_health=lambda _d, _h: None,
        )
        for device in settings.devices
    ]  # fmt: skip
    runner = asyncio.create_task(recorder.run())
    for i, poller in enumerate(pollers):
        read = _read(poller.device.id, 0, i)
        poller._states = engine.baseline_device(poller._states, read, poller.device.channels)
        poller._submit(read, [], [])
    await recorder.flush()
    profiler = cProfile.Profile(time.process_time) if profile else None
    cpu_s = 0.0
    for k in range(1, boundaries + 1):
        reads = [_read(p.device.id, k, i) for i, p in enumerate(pollers)]
        started = time.process_time()
        if profiler is not None:
            profiler.enable()
        for poller, read in zip(pollers, reads, strict=True):
            poller._update_health(read)
            step = engine.step_device(poller._states, read, poller._ctx)
            poller._states = step.states
            poller._submit(read, step.records, step.events)
        await recorder.flush()
        if profiler is not None:
            profiler.disable()
        cpu_s += time.process_time() - started
    await recorder.close()
    await runner
    await store.close()
    per_meter_us = 1e6 * cpu_s / (devices * boundaries)
    per_boundary_ms = 1000 * cpu_s / boundaries
    say(
        f"{devices} meters x {boundaries} boundaries: {per_meter_us:.0f} us of CPU per meter "
        f"per boundary, read to committed ({per_boundary_ms:.0f} ms a boundary)"
    )
    if profiler is not None:
        stats = pstats.Stats(profiler, stream=sys.stdout)
        stats.sort_stats("tottime").print_stats(25)
    return {"devices": devices, "boundaries": boundaries, "cpu_us_per_meter": round(per_meter_us)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.afterread")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--boundaries", type=int, default=20)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    figures = asyncio.run(run(args.devices, args.boundaries, args.profile))
    harness.emit("afterread", figures, {})
    return 0


if __name__ == "__main__":
    sys.exit(main())
