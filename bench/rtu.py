"""RTU bus throughput against the wire ceiling (a benchmark, not a test).

    python -m bench.rtu [--seconds 3] [--registers 2]

A simulated meter serves Modbus RTU on a pty and paces its replies at the baud
rate. A pty hands the master's bytes over instantly, which no serial line
does, so a relay between the client's pty and the simulator's paces the
requests at the same rate: the link then costs what a real line would.

For 9600 and 38400 Bd (8E1 timing; the pty itself runs 8N1 because ptys refuse
parity) it measures back-to-back boundary reads through `edged.modbus.RtuBus`
(which keeps the 3.5-character silence before each request) and through a bare
pymodbus loop on the same line (which does not), and compares both with the
wire ceiling of one transaction: request + response + 3.5-character gap.
Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import termios
import time
import tty

from pymodbus.client import AsyncModbusSerialClient
from pymodbus.framer import FramerType

from edged.modbus import RtuBus, rtu_frame_gap_s
from edged.registers import Point, coalesce
from simulators.meter import MeterServer, SimulatedMeter, StaticPoint
from simulators.modbus_frames import DataType

TIMING_PARITY = "E"  # the line modelled: 8E1, 11 bits per character


def char_s(baud: int) -> float:
    return 11 / baud


class PacedRelay:
    """client pty <-> simulator pty; client -> simulator paced at the baud rate."""

    def __init__(self, simulator_path: str, baud: int) -> None:
        self.baud = baud
        self._master, slave = os.openpty()
        tty.setraw(slave, termios.TCSANOW)
        self.client_path = os.ttyname(slave)
        self._slave = slave
        self._sim = os.open(simulator_path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self._sim, termios.TCSANOW)
        os.set_blocking(self._master, False)
        self._loop = asyncio.get_running_loop()
        self._to_sim: asyncio.Queue[bytes] = asyncio.Queue()
        self._task = self._loop.create_task(self._pace())
        self._loop.add_reader(self._master, self._from_client)
        self._loop.add_reader(self._sim, self._from_sim)

    def _from_client(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._to_sim.put_nowait(os.read(self._master, 4096))

    def _from_sim(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            data = os.read(self._sim, 4096)
            os.write(self._master, data)

    async def _pace(self) -> None:
        # Hand each burst over once it would have finished on the wire. Writing it
        # byte by byte would let event-loop jitter open gaps inside a frame that a
        # 38400 Bd receiver (1.75 ms silence) takes for the end of the frame.
        loop = asyncio.get_running_loop()
        free_at = 0.0
        while True:
            data = await self._to_sim.get()
            done_at = max(loop.time(), free_at) + len(data) * char_s(self.baud)
            free_at = done_at
            if done_at - loop.time() > 0.002:
                await asyncio.sleep(done_at - loop.time() - 0.0015)
            while loop.time() < done_at:  # the apparatus may burn CPU for precision
                pass
            os.write(self._sim, data)

    def close(self) -> None:
        self._task.cancel()
        self._loop.remove_reader(self._master)
        self._loop.remove_reader(self._sim)
        for fd in (self._master, self._slave, self._sim):
            with contextlib.suppress(OSError):
                os.close(fd)


async def serve(baud: int, registers: int) -> None:
    """Simulator + paced relay (run in its own process); prints the client's pty path."""
    points = [StaticPoint(f"r{i}", i, i, data_type=DataType.UINT16) for i in range(registers)]
    async with MeterServer({1: SimulatedMeter(points)}) as server:
        sim_path = await server.start_rtu_pty(baudrate=baud, parity=TIMING_PARITY)
        relay = PacedRelay(sim_path, baud)
        print(relay.client_path, flush=True)
        try:
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        finally:
            relay.close()


async def run(baud: int, seconds: float, registers: int) -> dict[str, float]:
    requests = coalesce([Point(f"r{i}", "holding", i, "uint16") for i in range(registers)])
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
        bus = RtuBus(client_path, baudrate=baud, parity="N", timeout_s=0.5)
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
            client_path, framer=FramerType.RTU, baudrate=baud, parity="N",
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
