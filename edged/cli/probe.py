"""`edged probe`: read every point of one device once and print what it says.

A commissioning read: before going live, an engineer compares the decoded
values with the meter's display. It only reads (function 3 or 4; the link has
no write method), one point at a time so each exception or timeout is
reported on its own row.
"""

from __future__ import annotations

import time

from edged.config.schema import Device
from edged.core.errors import EdgedError
from edged.core.model import ReadError
from edged.core.probe import ProbeRow, device_probes, format_table, probe_row
from edged.core.sunspec import ModelRef
from edged.io.modbus import build_links
from edged.io.sunspec import discover


async def probe_device(device: Device) -> list[ProbeRow]:
    """Read each probe of ``device`` once, in order, through a link of its own."""
    link = build_links([device])[device.id]
    rows: list[ProbeRow] = []
    try:
        base_address = 0
        if device.sunspec is not None:
            found = await discover(link, device.transport.unit_id, device.sunspec.models)
            if isinstance(found, ReadError):
                raise ProbeError(f"SunSpec discovery failed: {found.kind}: {found.detail}")
            base_address = found.address
            rows.append(sunspec_row(found))
        for probe in device_probes(device, base_address=base_address):
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


class ProbeError(EdgedError):
    """The device could not be probed at all (SunSpec model not found)."""


def sunspec_row(found: ModelRef) -> ProbeRow:
    return ProbeRow(kind="model", name="sunspec", where=f"holding {found.address} (x2)",
                    data_type="model id, length", registers="", value=str(found.model_id),
                    unit="", ok=True, note=f"model {found.model_id}, {found.length} "
                    "registers; points below are offsets into it")  # fmt: skip


async def run_probe(device: Device) -> tuple[str, bool]:
    """The table, and whether every point was read."""
    try:
        rows = await probe_device(device)
    except ProbeError as exc:
        return f"device {device.id}: {exc}\n", False
    return format_table(device.id, rows), all(r.ok for r in rows)
