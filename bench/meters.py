"""Serve N simulated PMC-1 meters, one TCP port each, in this process.

Run as `python -m bench.meters N` from a benchmark, so the simulator's CPU is
not charged to the daemon being measured; prints the ports as one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import sys

from simulators.meter import MeterServer, SimulatedMeter
from simulators.signals import until_signalled


async def serve(count: int) -> None:
    servers = []
    ports = []
    for _ in range(count):
        server = MeterServer({1: SimulatedMeter.pmc1(load_kw=3600.0, kwh_per_count=0.001)})
        ports.append(await server.start_tcp("127.0.0.1", 0))
        servers.append(server)
    print(json.dumps({"ports": ports}), flush=True)
    try:
        await until_signalled()
    finally:
        for server in servers:
            await server.stop()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
