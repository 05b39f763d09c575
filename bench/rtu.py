"""RTU bus throughput against the wire ceiling (a benchmark, not a test).

    python -m bench.rtu [--seconds 3] [--registers 2]

A simulated meter (in its own process) serves Modbus RTU on a pty and takes
the line's time both ways: it answers a request no earlier than its last byte
would have arrived at the baud rate, and its reply's last byte leaves when it
would have finished on the wire (`edged.sim.meter.paced_write`), with zero
turnaround in between.

For 9600 and 38400 Bd (8E1 timing; the clients open the pty 8N1, see
`PTY_PARITY`) it measures back-to-back boundary reads through
`edged.io.modbus.RtuBus` (which keeps the 3.5-character silence before each
request) and through a bare pymodbus loop on the same line (which does not),
and compares both with the wire ceiling of one transaction: request +
response + 3.5-character gap.
Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from pymodbus.client import AsyncModbusSerialClient
from pymodbus.framer import FramerType

from edged.core.registers import Point, coalesce
from edged.io.modbus import RtuBus, rtu_frame_gap_s
from edged.sim.meter import MeterServer, SimulatedMeter, StaticPoint
from edged.sim.modbus_frames import DataType

TIMING_PARITY = "E"  # the line modelled: 8E1, 11 bits per character
# What the clients open the pty with: ptys may refuse a parity bit (EINVAL), so
# edged keeps the 8N1 silence, 3.65 instead of 4.01 ms at 9600 Bd (the same
# 1.75 ms above 19200 Bd); `edged_gap_ms` in the figures.
PTY_PARITY = "N"


def char_s(baud: int) -> float:
    return 11 / baud


async def serve(baud: int, registers: int) -> None:
    """The simulator (run in its own process); prints the client's pty path."""
    points = [
        StaticPoint(name=f"r{i}", address=i, value=i, data_type=DataType.UINT16)
        for i in range(registers)
    ]
    async with MeterServer({1: SimulatedMeter(points)}) as server:
        print(await server.start_rtu_pty(baudrate=baud, parity=TIMING_PARITY), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def run(baud: int, seconds: float, registers: int) -> dict[str, float]:
    requests = coalesce(
        [
            Point(name=f"r{i}", function="holding", address=i, data_type="uint16")
            for i in range(registers)
        ]
    )
    request_bytes, reply_bytes = 8, 5 + 2 * registers
    gap_s = rtu_frame_gap_s(baud, TIMING_PARITY)
    ceiling = 1.0 / ((request_bytes + reply_bytes) * char_s(baud) + gap_s)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.rtu", "--serve", str(baud), "--registers", str(registers),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdin is not None
    client_path = (await proc.stdout.readline()).decode().strip()
    try:
        bus = RtuBus(client_path, baudrate=baud, parity=PTY_PARITY, timeout_s=0.5)
        bus.register_unit(1, 0.5)
        await bus.read(1, requests)  # connect
        n, errors, end = 0, 0, time.monotonic() + seconds
        start = time.monotonic()
        cpu = time.process_time()
        while time.monotonic() < end:
            raw = await bus.read(1, requests)
            n += 1
            errors += raw.error is not None
        edged_tps = n / (time.monotonic() - start)
        edged_cpu_ms = 1000 * (time.process_time() - cpu) / max(n, 1)
        await bus.aclose()

        client = AsyncModbusSerialClient(
            client_path, framer=FramerType.RTU, baudrate=baud, parity=PTY_PARITY,
            timeout=0.5, retries=0, reconnect_delay=0,
        )  # fmt: skip
        await client.connect()
        m, bare_errors, end = 0, 0, time.monotonic() + seconds
        start = time.monotonic()
        while time.monotonic() < end:
            try:
                await client.read_holding_registers(0, count=registers, device_id=1)
                m += 1
            except Exception:  # a bare loop has no error handling of its own
                bare_errors += 1
        bare_tps = m / (time.monotonic() - start)
        client.close()
    finally:
        proc.stdin.close()
        await proc.wait()
    # What this apparatus allows a correct master: the bare loop's period plus
    # the inter-frame silence it omits.
    achievable = 1.0 / (1.0 / bare_tps + gap_s)
    return {
        f"baud{baud}_ceiling_tps": round(ceiling, 2),
        f"baud{baud}_edged_tps": round(edged_tps, 2),
        f"baud{baud}_edged_pct_of_ceiling": round(100 * edged_tps / ceiling, 1),
        f"baud{baud}_bare_pymodbus_tps": round(bare_tps, 2),
        f"baud{baud}_edged_pct_of_bare_plus_gap": round(100 * edged_tps / achievable, 1),
        f"baud{baud}_edged_cpu_ms_per_tx": round(edged_cpu_ms, 3),
        f"baud{baud}_edged_gap_ms": round(1000 * rtu_frame_gap_s(baud, PTY_PARITY), 3),
        f"baud{baud}_errors": errors,
        f"baud{baud}_bare_errors": bare_errors,
    }


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rtu")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--registers", type=int, default=2)
    parser.add_argument("--serve", type=int, metavar="BAUD", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        await serve(args.serve, args.registers)
        return 0
    figures: dict[str, float] = {"registers": args.registers}
    for baud in (9600, 38400):
        result = await run(baud, args.seconds, args.registers)
        figures.update(result)
        print(
            f"{baud:>6} Bd: ceiling {result[f'baud{baud}_ceiling_tps']:.1f} tx/s, "
            f"edged {result[f'baud{baud}_edged_tps']:.1f} tx/s "
            f"({result[f'baud{baud}_edged_pct_of_ceiling']:.1f}% of ceiling, "
            f"{result[f'baud{baud}_edged_pct_of_bare_plus_gap']:.1f}% of bare pymodbus + gap), "
            f"bare pymodbus (no inter-frame gap) "
            f"{result[f'baud{baud}_bare_pymodbus_tps']:.1f} tx/s",
            flush=True,
        )
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    import logging

    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    sys.exit(asyncio.run(main(sys.argv[1:])))
