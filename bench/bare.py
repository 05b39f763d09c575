"""Bare baselines: the same reads and publishes as edged, with nothing else.

    python -m bench.bare --ports-file F --mqtt-port P --every S [--registers R] [--ticks K]

Runs as its own process, so the benchmark measures its CPU and memory exactly
as it measures the daemon's. On every wall-clock multiple of ``--every`` it
reads every meter at once (one `AsyncModbusTcpClient` per port, `asyncio.gather`)
and publishes each result through one aiomqtt client:

* without ``--registers``: the PMC-1 counter (2 registers at 0), published
  as a minimal interval message (device, end, energy delta) at QoS 1 on
  ``bare/device/{device}/interval`` — the boundary baseline;
* with ``--registers R``: R registers from 200, decoded as float32 values and
  published as a measurement at QoS 0 on ``bare/device/{device}/measurement``
  — the fast-poll baseline.

No store, no schedule settling, no error handling beyond counting. After
``--ticks`` ticks (or on SIGTERM) it prints one JSON line: reads, errors and
the spread (ms) between the first and last request sent at each tick.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import struct
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
from pymodbus.client import AsyncModbusTcpClient

from bench.harness import MEASURE_BASE_REGISTER, next_multiple, raise_fd_limit, sleep_to_wall
from edged.sim.signals import until_signalled


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    ports: list[int] = json.loads(args.ports_file.read_text())
    raise_fd_limit(len(ports) + 256)
    clients = [AsyncModbusTcpClient("127.0.0.1", port=p, timeout=1, retries=0) for p in ports]
    await asyncio.gather(*(c.connect() for c in clients))
    names = [f"v{i:02d}" for i in range(args.registers // 2)]
    unpack = struct.Struct(f">{args.registers}H")
    floats = struct.Struct(f">{len(names)}f")
    last_counts: list[int | None] = [None] * len(ports)
    reads = errors = 0
    spreads_ms: list[float] = []

    async with aiomqtt.Client(
        "127.0.0.1", args.mqtt_port, identifier="bench-bare", max_inflight_messages=64
    ) as mqtt:

        async def one(i: int, tick_s: float, sent: list[float]) -> None:
            nonlocal reads, errors
            device = f"m{i:04d}"
            sent.append(time.time())
            try:
                if names:
                    rr = await clients[i].read_holding_registers(
                        MEASURE_BASE_REGISTER, count=args.registers, device_id=1
                    )
                else:
                    rr = await clients[i].read_holding_registers(0, count=2, device_id=1)
            except Exception:
                errors += 1
                return
            if rr.isError():
                errors += 1
                return
            reads += 1
            if names:
                values = floats.unpack(unpack.pack(*rr.registers))
                measured: dict[str, object] = {"device": device, "at": iso(tick_s),
                           "values": dict(zip(names, values, strict=True))}  # fmt: skip
                await mqtt.publish(f"bare/device/{device}/measurement", json.dumps(measured), qos=0)
                return
            count = rr.registers[0] << 16 | rr.registers[1]
            previous, last_counts[i] = last_counts[i], count
            if previous is None:
                return
            payload: dict[str, object] = {
                "device": device, "end": iso(tick_s), "value": (count - previous) * 0.001,
            }  # fmt: skip
            await mqtt.publish(f"bare/device/{device}/interval", json.dumps(payload), qos=1)

        async def ticking() -> None:
            tick_s = next_multiple(time.time(), args.every)
            for _ in range(args.ticks or 2**62):
                await sleep_to_wall(tick_s)
                sent: list[float] = []
                await asyncio.gather(*(one(i, tick_s, sent) for i in range(len(clients))))
                if sent:
                    spreads_ms.append(1000.0 * (max(sent) - min(sent)))
                tick_s = next_multiple(max(tick_s, time.time()), args.every)

        ticker = asyncio.create_task(ticking())
        stopper = asyncio.create_task(until_signalled())
        await asyncio.wait({ticker, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for task in (ticker, stopper):
            task.cancel()
    for client in clients:
        client.close()
    return {"reads": reads, "errors": errors, "spreads_ms": [round(s, 3) for s in spreads_ms]}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare")
    parser.add_argument("--ports-file", type=Path, required=True)
    parser.add_argument("--mqtt-port", type=int, required=True)
    parser.add_argument("--every", type=float, required=True)
    parser.add_argument("--registers", type=int, default=0)
    parser.add_argument("--ticks", type=int, default=0)
    args = parser.parse_args()
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    # aiomqtt warns when many publishes wait for the broker, as a tick's do.
    logging.getLogger("mqtt").setLevel(logging.ERROR)
    print(json.dumps(asyncio.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
