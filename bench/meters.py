"""Serve N simulated PMC-1 meters, one TCP port each, in this process.

Run as `python -m bench.meters N [--registers R]` from a benchmark, so the
simulator's CPU is not charged to the daemon being measured; prints the ports
as one JSON line. With R, each meter also serves R/2 float32 values (R
registers) from register 200 on, for fast polling.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os

from bench.harness import MEASURE_BASE_REGISTER, raise_fd_limit
from edged.sim.meter import MeterServer, SimulatedMeter, StaticPoint
from edged.sim.modbus_frames import DataType
from edged.sim.signals import until_signalled


def meter(registers: int) -> SimulatedMeter:
    base = SimulatedMeter.pmc1(load_kw=3600.0, kwh_per_count=0.001)
    block = [
        StaticPoint(name=f"v{i:02d}", address=MEASURE_BASE_REGISTER + 2 * i, value=230.0 + i,
                    data_type=DataType.FLOAT32)
        for i in range(registers // 2)
    ]  # fmt: skip
    return SimulatedMeter([*base.points, *block]) if block else base


async def serve(count: int, registers: int) -> None:
    raise_fd_limit(2 * count + 64)
    # Real meters cost the gateway no CPU: at the lowest priority, the
    # simulators answer on whatever CPU the process measured leaves over
    # instead of preempting it each time a request wakes them.
    os.nice(19)
    servers = []
    ports = []
    for _ in range(count):
        server = MeterServer({1: meter(registers)})
        ports.append(await server.start_tcp("127.0.0.1", 0))
        servers.append(server)
    print(json.dumps({"ports": ports}), flush=True)
    try:
        await until_signalled()
    finally:
        for server in servers:
            await server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.meters")
    parser.add_argument("count", type=int)
    parser.add_argument("--registers", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(serve(args.count, args.registers))


if __name__ == "__main__":
    main()
