"""Read-path cost: edged's Modbus read path against bare pymodbus, in one process.

    python -m bench.readpath [--devices 100] [--seconds 6] [--rounds 2]

(The daemon as a whole is measured by bench.fastpoll; this isolates the read
path: scheduler, backoff bookkeeping, decoding and scaling.)

The simulated meters run in a separate process (one TCP port per device, four
float32 values each). In this process the same reads are made twice per
round, each for ``--seconds``, on 1 s ticks:

* edged: `build_links` -> `read_device(..., priority=FAST)` on each device's
  measurement plan (scheduler, backoff bookkeeping, decoding and scaling);
* bare: one `AsyncModbusTcpClient` per device and `read_holding_registers`,
  decoded with the same `decode_response`.

It prints reads/s and CPU milliseconds per 1000 reads for both and their ratio
(target: edged <= 1.3 x bare), then one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pymodbus.client import AsyncModbusTcpClient

from bench.harness import emit
from edged.config.schema import Device
from edged.core.plan import plan_device
from edged.core.registers import decode_response
from edged.io.bus import Priority
from edged.io.modbus import (
    build_links,
    read_device,
)
from edged.sim.meter import MeterServer, SimulatedMeter, StaticPoint
from edged.sim.modbus_frames import DataType

NAMES = ("power", "voltage", "current", "frequency")


async def serve(devices: int) -> None:
    points = [StaticPoint(name=n, address=2 * i, value=100.0 + i, data_type=DataType.FLOAT32)
              for i, n in enumerate(NAMES)]  # fmt: skip
    async with MeterServer({1: SimulatedMeter(points)}) as server:
        ports = [await server.start_tcp("127.0.0.1", 0) for _ in range(devices)]
        print(json.dumps(ports), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


def device(i: int, port: int) -> Device:
    return Device.model_validate(
        {
            "id": f"m{i}",
            "transport": {"type": "tcp", "host": "127.0.0.1", "port": port, "timeout": "1s"},
            "channels": [{"name": "energy", "register": 0}],
            "measurements": {
                "every": "1s",
                "points": [{"name": n, "register": 2 * i, "type": "float32", "unit": "x"}
                           for i, n in enumerate(NAMES)],
            },
        }
    )  # fmt: skip


async def ticking(
    n: int, seconds: float, read: Callable[[int], Awaitable[bool]]
) -> tuple[int, int, float]:
    """Each of n pollers reads on every whole-second tick; (reads, errors, cpu s)."""
    loop = asyncio.get_running_loop()
    first_tick = float(int(loop.time()) + 1)
    ticks = int(seconds)
    counts = [0, 0]

    async def poller(i: int) -> None:
        for k in range(ticks):
            await asyncio.sleep(max(0.0, first_tick + k - loop.time()))
            ok = await read(i)
            counts[0 if ok else 1] += 1

    await asyncio.sleep(max(0.0, first_tick - loop.time() - 0.2))
    cpu = time.process_time()
    await asyncio.gather(*(poller(i) for i in range(n)))
    return counts[0], counts[1], time.process_time() - cpu


async def run_edged(ports: list[int], seconds: float) -> tuple[int, int, float]:
    devices = [device(i, p) for i, p in enumerate(ports)]
    links = build_links(devices)
    plans = [plan_device(d) for d in devices]

    async def read(i: int) -> bool:
        plan = plans[i].measurements
        assert plan is not None
        result = await read_device(links[devices[i].id], 1, plan, priority=Priority.FAST)
        return result.error is None and len(result.values) == len(NAMES)

    await asyncio.gather(*(read(i) for i in range(len(ports))))  # connect
    try:
        return await ticking(len(ports), seconds, read)
    finally:
        for link in links.values():
            link.close()


async def run_bare(ports: list[int], seconds: float) -> tuple[int, int, float]:
    clients = [AsyncModbusTcpClient("127.0.0.1", port=p, timeout=1, retries=0) for p in ports]
    await asyncio.gather(*(c.connect() for c in clients))
    plan = plan_device(device(0, ports[0])).measurements
    assert plan is not None
    request = plan.requests[0]

    async def read(i: int) -> bool:
        try:
            rr = await clients[i].read_holding_registers(0, count=request.count, device_id=1)
        except Exception:
            return False
        if rr.isError():
            return False
        return len(decode_response(request, rr.registers)) == len(NAMES)

    try:
        return await ticking(len(ports), seconds, read)
    finally:
        for c in clients:
            c.close()


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.readpath")
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--serve", type=int, metavar="N", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        await serve(args.serve)
        return 0
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.readpath", "--serve", str(args.devices),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdin is not None
    ports: list[int] = json.loads(await proc.stdout.readline())
    results: dict[str, list[tuple[int, int, float]]] = {"bare": [], "edged": []}
    try:
        for _ in range(args.rounds):
            results["bare"].append(await run_bare(ports, args.seconds))
            results["edged"].append(await run_edged(ports, args.seconds))
    finally:
        proc.stdin.close()
        await proc.wait()
    figures: dict[str, Any] = {"devices": args.devices, "seconds": args.seconds}
    for name, runs in results.items():
        reads = sum(r[0] for r in runs)
        errors = sum(r[1] for r in runs)
        cpu_per_1000 = statistics.median(1000 * r[2] / max(r[0], 1) for r in runs)
        figures[f"{name}_reads_per_s"] = round(reads / (args.seconds * len(runs)), 1)
        figures[f"{name}_errors"] = errors
        figures[f"{name}_cpu_ms_per_1000_reads"] = round(1000 * cpu_per_1000, 1)
        print(
            f"{name:>5}: {figures[f'{name}_reads_per_s']:.1f} reads/s, "
            f"{figures[f'{name}_cpu_ms_per_1000_reads']:.1f} ms CPU per 1000 reads, "
            f"{errors} errors",
            flush=True,
        )
    ratio = figures["edged_cpu_ms_per_1000_reads"] / figures["bare_cpu_ms_per_1000_reads"]
    figures["cpu_ratio_edged_vs_bare"] = round(ratio, 3)
    print(f"edged / bare pymodbus CPU per read: {ratio:.2f}x (target <= 1.3x)", flush=True)
    emit("readpath", figures, {"cpu_ratio_le_1.3": ratio <= 1.3})
    return 0


if __name__ == "__main__":
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    sys.exit(asyncio.run(main(sys.argv[1:])))
