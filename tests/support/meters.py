"""Simulated meters over real Modbus TCP on loopback."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

from edged.sim.meter import MeterServer, SimulatedMeter

KWH_PER_COUNT = 0.001
LOAD_KW = 3600.0  # 1 kWh per second: 1000 counts in a 1 s interval


def pmc1_meter() -> SimulatedMeter:
    """A PMC-1 pulse counter at 1 kWh/s, counter register 0 (uint32)."""
    return SimulatedMeter.pmc1(load_kw=LOAD_KW, kwh_per_count=KWH_PER_COUNT, initial_counts=10_000)


@contextlib.asynccontextmanager
async def meter(units: Sequence[int] = (1,)) -> AsyncIterator[tuple[MeterServer, int]]:
    """One simulator on a free loopback port with a `pmc1_meter` per unit."""
    async with MeterServer({unit: pmc1_meter() for unit in units}) as server:
        port = await server.start_tcp("127.0.0.1", 0)
        yield server, port
