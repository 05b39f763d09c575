"""Many masters through edged's facade onto one slow RTU bus (a benchmark, not a test).

    python -m bench.multimaster [--seconds 30] [--masters 3] [--mode pass_through]

A simulated 9600-baud RS-485 bus (a pty pair; the simulator, in its own
process, paces every reply at the line speed as bench/rtu.py describes) with
two meters. edged's side runs here: an `RtuBus` (the link edged's pollers
use), boundary reads of both meters on every 1 s boundary exactly as the
poller submits them (`expect_boundary`, then both reads at boundary priority
the moment the boundary arrives), and the facade (`edged.io.facade`) serving
both meters. The masters run in another process: each polls 10 registers of
one meter every second (phases spread over the second), with a 2 s timeout.

Two phases of `--seconds` each: boundary reads alone, then with the masters.
Reported: boundary-read lateness (request start minus boundary) p50/p99/max
for the first and the second meter in each phase, the masters' answer latency
p50/p99 and their errors, and bus utilisation (time with a transaction on the
wire / elapsed). The target: lateness p99 with masters <= without + one
transaction time (a 10-register read is ~42 ms on the wire at 9600 8E1).
Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

from pymodbus.client import AsyncModbusTcpClient

from bench.harness import machine_load
from edged.config.schema import Facade
from edged.core.registers import Point, ReadRequest
from edged.io.bus import Priority
from edged.io.facade import FacadeServer
from edged.io.modbus import Link, RawRead, RtuBus, rtu_frame_gap_s
from edged.sim.meter import MeterServer, SimulatedMeter, StaticPoint
from edged.sim.modbus_frames import DataType

BAUD = 9600
TIMING_PARITY = "E"  # the line modelled: 8E1, 11 bits a character
PTY_PARITY = "N"  # ptys may refuse a parity bit (see bench/rtu.py)
UNITS = (1, 2)
MASTER_REGISTERS = 10
BOUNDARY_REGISTERS = 2  # one uint32 energy counter per meter
DEVICE_TIMEOUT_S = 0.25


def wire_s(request_bytes: int, reply_bytes: int) -> float:
    """One transaction on the wire: both frames and the inter-frame silence."""
    return (request_bytes + reply_bytes) * 11 / BAUD + rtu_frame_gap_s(BAUD, TIMING_PARITY)


def pct(samples: Sequence[float], q: float) -> float | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def ms(value: float | None) -> float | None:
    return None if value is None else round(1000 * value, 1)


async def serve() -> None:
    """The simulated bus (own process): prints the client's pty path."""
    meters = {
        unit: SimulatedMeter(
            [StaticPoint(name=f"r{i}", address=i, value=1000 * unit + i, data_type=DataType.UINT16)
             for i in range(20)]
        )
        for unit in UNITS
    }  # fmt: skip
    async with MeterServer(meters) as server:
        print(await server.start_rtu_pty(baudrate=BAUD, parity=TIMING_PARITY), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def masters(port: int, count: int, seconds: float) -> None:
    """The other masters (own process): one JSON line of their latencies."""
    latencies: list[float] = []
    errors: dict[str, int] = {}

    async def master(n: int) -> None:
        client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
        await client.connect()
        unit = UNITS[n % len(UNITS)]
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.5 + n / count  # phases spread over the second
        end = start + seconds
        tick = start
        while tick < end:
            await asyncio.sleep(max(0.0, tick - loop.time()))
            asked = loop.time()
            try:
                answer = await client.read_holding_registers(0, count=MASTER_REGISTERS,
                                                             device_id=unit)  # fmt: skip
                if answer.isError():
                    key = f"exception_{answer.exception_code:#04x}"
                    errors[key] = errors.get(key, 0) + 1
                else:
                    latencies.append(loop.time() - asked)
            except Exception as exc:  # a master's timeout or a dropped connection
                key = type(exc).__name__
                errors[key] = errors.get(key, 0) + 1
            tick += 1.0
        client.close()

    await asyncio.gather(*(master(n) for n in range(count)))
    print(json.dumps({"latencies_s": latencies, "errors": errors}), flush=True)


class MeteredLink:
    """The bus as the facade and the boundary reads see it, adding up the
    time transactions spend on the wire (utilisation)."""

    def __init__(self, link: RtuBus) -> None:
        self.link = link
        self.busy_s = 0.0
        self.transactions = 0

    @property
    def name(self) -> str:
        return self.link.name

    async def read(self, unit_id: int, requests: Sequence[ReadRequest], **kw: Any) -> RawRead:
        raw = await self.link.read(unit_id, requests, **kw)
        if raw.duration_s:
            self.busy_s += raw.duration_s
            self.transactions += 1
        return raw

    def expect_boundary(self, in_s: float) -> None:
        self.link.expect_boundary(in_s)

    def status(self) -> dict[str, Any]:
        return self.link.status()

    def close(self) -> None:
        self.link.close()


def request(count: int) -> ReadRequest:
    return ReadRequest(
        function="holding",
        address=0,
        count=count,
        points=(Point(name="r0", function="holding", address=0, data_type="uint16"),),
    )


async def boundary_reads(link: MeteredLink, seconds: float) -> dict[int, list[float]]:
    """Both meters read on every 1 s boundary of the loop clock; lateness per unit."""
    loop = asyncio.get_running_loop()
    late: dict[int, list[float]] = {u: [] for u in UNITS}
    boundary = math.floor(loop.time()) + 1.0
    end = boundary + seconds
    energy = (request(BOUNDARY_REGISTERS),)

    async def read(unit: int, asked: float, due: float) -> None:
        raw = await link.read(unit, energy, priority=Priority.BOUNDARY)
        if raw.error is None:
            # As the poller records it: when the request went out, less the boundary.
            late[unit].append(asked + raw.queued_s - due)

    while boundary < end:
        link.expect_boundary(boundary - loop.time())
        await asyncio.sleep(max(0.0, boundary - loop.time()))
        now = loop.time()
        await asyncio.gather(*(read(u, now, boundary) for u in UNITS))
        boundary += 1.0
    return late


async def phase(link: MeteredLink, seconds: float, facade_port: int | None,
                masters_n: int) -> dict[str, Any]:  # fmt: skip
    loop = asyncio.get_running_loop()
    busy0, started = link.busy_s, loop.time()
    proc = None
    if facade_port is not None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.multimaster", "--as-masters", str(facade_port),
            "--masters", str(masters_n), "--seconds", str(seconds),
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
    late = await boundary_reads(link, seconds + 1.0)
    result: dict[str, Any] = {}
    if proc is not None:
        assert proc.stdout is not None
        line = await proc.stdout.readline()
        await proc.wait()
        got = json.loads(line)
        result["master_latency_p50_ms"] = ms(pct(got["latencies_s"], 0.5))
        result["master_latency_p99_ms"] = ms(pct(got["latencies_s"], 0.99))
        result["master_answers"] = len(got["latencies_s"])
        result["master_errors"] = got["errors"]
    for n, unit in enumerate(UNITS):
        which = "first" if n == 0 else "second"
        result[f"{which}_lateness_p50_ms"] = ms(pct(late[unit], 0.5))
        result[f"{which}_lateness_p95_ms"] = ms(pct(late[unit], 0.95))
        result[f"{which}_lateness_p99_ms"] = ms(pct(late[unit], 0.99))
        result[f"{which}_lateness_max_ms"] = ms(max(late[unit], default=None))
        result[f"{which}_reads"] = len(late[unit])
    result["bus_utilisation_pct"] = round(100 * (link.busy_s - busy0) / (loop.time() - started), 1)
    return result


async def run(seconds: float, masters_n: int, mode: str) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.multimaster", "--serve",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdin is not None
    path = (await proc.stdout.readline()).decode().strip()
    bus = RtuBus(path, baudrate=BAUD, parity=PTY_PARITY, timeout_s=DEVICE_TIMEOUT_S)
    bus.set_units([(u, DEVICE_TIMEOUT_S) for u in UNITS])
    link = MeteredLink(bus)
    entries = [{"device": f"meter{u}", "unit_id": u, "mode": mode} for u in UNITS]
    if mode == "cache":
        for entry in entries:
            entry.update(blocks=[{"register": 0, "count": MASTER_REGISTERS, "every": "1s"}],
                         max_age="3s")  # fmt: skip
    settings = Facade.model_validate(
        {"enabled": True, "listeners": [{"port": 0, "devices": entries}]}
    )
    links: dict[str, tuple[Link, int]] = {f"meter{u}": (link, u) for u in UNITS}
    units = {f"meter{u}": u for u in UNITS}
    facade = FacadeServer(settings, links.get, units.get)
    figures: dict[str, Any] = {
        "baud": BAUD, "masters": masters_n, "mode": mode, "seconds": seconds,
        "boundary_tx_ms": round(1000 * wire_s(8, 5 + 2 * BOUNDARY_REGISTERS), 1),
        "master_tx_ms": round(1000 * wire_s(8, 5 + 2 * MASTER_REGISTERS), 1),
    }  # fmt: skip
    try:
        await bus.read(1, (request(1),))  # open the port
        alone = await phase(link, seconds, None, 0)
        (port,) = await facade.start()
        with_masters = await phase(link, seconds, port, masters_n)
        figures.update({f"alone_{k}": v for k, v in alone.items()})
        figures.update({f"masters_{k}": v for k, v in with_masters.items()})
        status = facade.status()
        figures["pass_through_reads"] = status["pass_through_reads"]
        figures["pass_through_shared"] = status["pass_through_shared"]
        figures["queue_wait_p99_ms"] = max(
            (c["queue_wait_p99_ms"] or 0.0 for c in status["clients"]), default=None
        )
        # The target: with the masters, no boundary read later than alone plus
        # one transaction (the master's read already on the wire).
        figures["targets"] = {
            f"{which}_p99_within_one_transaction": (
                figures[f"masters_{which}_lateness_p99_ms"] or 0.0
            )
            <= (figures[f"alone_{which}_lateness_p99_ms"] or 0.0) + figures["master_tx_ms"]
            for which in ("first", "second")
        }
        figures["machine"] = machine_load()
    finally:
        await facade.close()
        await bus.aclose()
        proc.stdin.close()
        await proc.wait()
    return figures


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.multimaster")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--masters", type=int, default=3)
    parser.add_argument("--mode", choices=("pass_through", "cache"), default="pass_through")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--as-masters", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        await serve()
        return 0
    if args.as_masters:
        await masters(args.as_masters, args.masters, args.seconds)
        return 0
    started = time.monotonic()
    figures = await run(args.seconds, args.masters, args.mode)
    a, m = "alone_", "masters_"
    print(
        f"{BAUD} Bd, 2 meters, 1 s boundaries, {args.masters} masters x "
        f"{MASTER_REGISTERS} registers/s ({args.mode}); one transaction: boundary "
        f"{figures['boundary_tx_ms']} ms, master {figures['master_tx_ms']} ms\n"
        f"  boundary lateness p50 first/second meter: alone "
        f"{figures[a + 'first_lateness_p50_ms']}/{figures[a + 'second_lateness_p50_ms']} ms, "
        f"with masters {figures[m + 'first_lateness_p50_ms']}/"
        f"{figures[m + 'second_lateness_p50_ms']} ms\n"
        f"  boundary lateness p99 first/second meter: alone "
        f"{figures[a + 'first_lateness_p99_ms']}/{figures[a + 'second_lateness_p99_ms']} ms, "
        f"with masters {figures[m + 'first_lateness_p99_ms']}/"
        f"{figures[m + 'second_lateness_p99_ms']} ms (max {figures[m + 'first_lateness_max_ms']}/"
        f"{figures[m + 'second_lateness_max_ms']} ms)\n"
        f"  masters: p50 {figures[m + 'master_latency_p50_ms']} ms, p99 "
        f"{figures[m + 'master_latency_p99_ms']} ms, {figures[m + 'master_answers']} answers, "
        f"errors {figures[m + 'master_errors']}\n"
        f"  bus utilisation: alone {figures[a + 'bus_utilisation_pct']}%, with masters "
        f"{figures[m + 'bus_utilisation_pct']}%  ({time.monotonic() - started:.0f} s)",
        flush=True,
    )
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    import logging

    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    sys.exit(asyncio.run(main(sys.argv[1:])))
