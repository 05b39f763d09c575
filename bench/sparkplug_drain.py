"""Sparkplug backlog drain: interval rows left in the outbox by an outage, sent
as historical DDATA once the session is born.

    python -m bench.sparkplug_drain [--boundaries 500] [--devices 10] [--channels 4]

Fills a fresh store with boundaries x devices x channels Sparkplug rows (as
the recorder's tap writes them, device by device per boundary), starts a
local mosquitto and the Sparkplug session (edged.io.sparkplug) on it, and
times the drain from the NBIRTH to an empty outbox. A subscriber at QoS 0
counts the DDATA messages and metrics, and checks that every metric is
historical and that seq runs without a gap.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiomqtt

from edged.config.schema import Mqtt, Sparkplug
from edged.core.model import Interval, TimeState
from edged.core.sparkplug import DeviceSpec, NodeFigures
from edged.io.sparkplug import SparkplugPublisher
from edged.io.sparkplug_pb import decode_payload
from edged.io.store import Store
from edged.sim.broker import Mosquitto, free_port

START = datetime(2026, 11, 21, tzinfo=UTC)


def record(device: str, channel: str, end: datetime) -> Interval:
    return Interval(
        site="bench", device=device, channel=channel, start=end - timedelta(minutes=15),
        end=end, duration_s=900.0, value=1.5, unit="kWh", demand=6.0, demand_unit="kW",
        counter_start=0, counter_end=1500, flags=frozenset(), time_state=TimeState.SYNCED,
        read_at=end, read_lateness_ms=1.0,
    )  # fmt: skip


async def run(boundaries: int, devices: int, channels: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="edged-bench-sp-"))
    broker = Mosquitto(port=free_port(), workdir=work, tcp_nodelay=True)
    broker.start()
    store = await Store.open(work / "edged.db")
    try:
        specs = [
            DeviceSpec(id=f"m{d}", channels=tuple((f"ch{c}", "kWh") for c in range(channels)))
            for d in range(devices)
        ]
        figures = NodeFigures(version="bench", time_state="synced", ntp_offset_s=0.0,
                              outbox_depth=0, disk_used_bytes=0, disk_free_bytes=0,
                              disk_alarm=None)  # fmt: skip
        publisher = SparkplugPublisher(
            Sparkplug(enabled=True, group_id="bench"),
            Mqtt(host=broker.host, port=broker.port),
            store, site="bench", devices=specs, figures=figures,
            now=lambda: datetime.now(UTC), on_event=lambda e: None,
        )  # fmt: skip
        rows = []
        for b in range(boundaries):
            end = START + timedelta(minutes=15 * (b + 1))
            for spec in specs:
                rows += publisher.rows_for([record(spec.id, ch, end) for ch, _ in spec.channels])
        await store.commit_boundary([], [], {}, [(store.allocate_seq(), m) for m in rows])
        total = len(rows)
        seqs: list[int] = []
        metrics = historical = 0
        born = asyncio.Event()
        received = asyncio.Event()

        async def listen(client: aiomqtt.Client) -> None:
            nonlocal metrics, historical
            async for message in client.messages:
                kind = message.topic.value.split("/")[2]
                assert isinstance(message.payload, bytes)
                decoded = decode_payload(message.payload)
                if kind == "NBIRTH":
                    born.set()
                if decoded.seq is not None:
                    seqs.append(decoded.seq)
                if kind == "DDATA":
                    metrics += len(decoded.metrics)
                    historical += sum(m.is_historical for m in decoded.metrics)
                    if metrics >= total:
                        received.set()

        async with aiomqtt.Client(broker.host, broker.port, identifier="bench-host") as host:
            await host.subscribe("spBv1.0/#", qos=0)
            listener = asyncio.create_task(listen(host))
            session = asyncio.create_task(publisher.run())
            await born.wait()
            started = time.perf_counter()
            while True:  # the outbox empties as PUBACKs come in
                if (await store.outbox_depth()).count == 0:
                    break
                await asyncio.sleep(0.01)
            elapsed = time.perf_counter() - started
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(received.wait(), 10)
            await publisher.stop()
            await asyncio.wait_for(session, 10)
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
        gaps = sum(1 for a, b in itertools.pairwise(seqs) if b != (a + 1) % 256)
        print(
            f"sparkplug drain: {total} rows in {elapsed:.2f} s = {total / elapsed:.0f} rows/s; "
            f"received {metrics} metrics ({historical} historical) in "
            f"{len(seqs) - 1 - devices} DDATA; seq gaps {gaps}"
        )
    finally:
        await store.close()
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--boundaries", type=int, default=500)
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--channels", type=int, default=4)
    args = parser.parse_args()
    asyncio.run(run(args.boundaries, args.devices, args.channels))


if __name__ == "__main__":
    main()
