"""`edged probe`: read every point of one device once and print what it says.

A commissioning read: before going live, an engineer compares the decoded
values with the meter's display. It only reads (function 3 or 4; the link has
no write method), one point at a time so each exception or timeout is
reported on its own row.
"""

from __future__ import annotations

import time

from edged.config.schema import Device
from edged.core.probe import ProbeRow, device_probes, format_table, probe_row
from edged.io.modbus import build_links


async def probe_device(device: Device) -> list[ProbeRow]:
    """Read each probe of ``device`` once, in order, through a link of its own."""
    link = build_links([device])[device.id]
    rows: list[ProbeRow] = []
    try:
        for probe in device_probes(device):
            requested_s = time.time()
            raw = await link.read(device.transport.unit_id, probe.plan.requests)
            error = None
            if raw.error is not None:
                error = f"{raw.error.kind}: {raw.error.detail}"
            rows.append(
                probe_row(
                    probe,
                    registers=raw.registers,
                    values=None if raw.error is not None else raw.values,
                    error=error,
                    reference_s=requested_s + raw.queued_s,
                )
            )
    finally:
        link.close()
    return rows


async def run_probe(device: Device) -> tuple[str, bool]:
    """The table, and whether every point was read."""
    rows = await probe_device(device)
    return format_table(device.id, rows), all(r.ok for r in rows)
