"""`edged demo`: simulated meters, a broker, the daemon and a live view.

Everything a newcomer needs runs in this one process (the broker is
mosquitto when it is installed, otherwise the embedded amqtt): two simulated
meters over real Modbus TCP on loopback, the real daemon with short
intervals, and a view that subscribes to the broker exactly as an upstream
consumer would, so what it shows is what was published. A virtual meter, the
station total, sums both meters' energy per interval. A scripted scenario
exercises the flags: a meter outage and a counter rollover.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiomqtt

from edged.app.app import App
from edged.app.logs import configure
from edged.config.load import load_settings

SITE = "demo-site"
PREFIX = "edged"
# The virtual meter summing both meters' energy, and its channel.
STATION = "station"
STATION_TOTAL = "total_import"

ION_LOAD_KW = 2400.0
ION_KWH_PER_COUNT = 0.01
COUNTER_MODULUS = 1 << 32
# The ION counter starts this many intervals short of its modulus, so it wraps
# on its own during the demo, as a real register would (-> ROLLOVER). One
# interval: the wrap is in an interval that closes within the first two
# boundaries, so even a 25 s demo shows a flag whatever the start-up phase (the
# start-up interval is PARTIAL only when the start is not close to a boundary).
INTERVALS_TO_WRAP = 1.0


@dataclass(frozen=True, slots=True)
class DemoBroker:
    host: str
    port: int
    kind: str  # "mosquitto" or "amqtt"


@contextlib.asynccontextmanager
async def demo_broker(workdir: Path) -> AsyncIterator[DemoBroker]:
    from edged.sim.broker import Mosquitto, free_port, mosquitto_path

    port = free_port()
    if mosquitto_path():
        mosquitto = Mosquitto(port=port, workdir=workdir)
        await asyncio.to_thread(mosquitto.start)
        try:
            yield DemoBroker(mosquitto.host, port, "mosquitto")
        finally:
            await asyncio.to_thread(mosquitto.stop)
        return
    import logging

    from amqtt.broker import Broker

    # amqtt logs every connection at INFO; the demo's view says what matters.
    logging.getLogger("amqtt").setLevel(logging.ERROR)
    logging.getLogger("transitions").setLevel(logging.ERROR)
    broker = Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
    )
    await broker.start()
    try:
        yield DemoBroker("127.0.0.1", port, "amqtt")
    finally:
        await broker.shutdown()


def demo_config(
    workdir: Path,
    broker: DemoBroker,
    modbus_port: int,
    ntp_port: int,
    interval_s: int,
    sparkplug: bool = False,
) -> Path:
    """The demo's configuration, written out so the user can read and reuse it."""
    path = workdir / "edged.yaml"
    path.write_text(
        f"""\
# Written by `edged demo`: two simulated meters on 127.0.0.1:{modbus_port},
# a simulated NTP server on 127.0.0.1:{ntp_port}, and a virtual station total.
site: {SITE}
timezone: Pacific/Auckland
storage:
  path: {workdir / "edged.db"}
mqtt:
  host: {broker.host}
  port: {broker.port}
  topic_prefix: {PREFIX}
status_every: 5s
time:
  source: ntp
  ntp_servers: ["127.0.0.1:{ntp_port}"]
  ntp_poll: 2s
devices:
  - id: pmc1
    profile: pmc-1
    interval: {interval_s}s
    transport: {{type: tcp, host: 127.0.0.1, port: {modbus_port}, unit_id: 1, timeout: 1s}}
    channels:
      # The pulse value is programmed per site: state it (the profile asks to).
      - {{name: energy_import, multiplier: 0.144}}
  - id: ion8600
    interval: {interval_s}s
    transport: {{type: tcp, host: 127.0.0.1, port: {modbus_port}, unit_id: 2, timeout: 1s}}
    channels:
      - name: energy_delivered
        register: 0
        type: uint32
        unit: kWh
        multiplier: {ION_KWH_PER_COUNT}
        rollover: {COUNTER_MODULUS}
virtual_meters:
  # Per interval, the sum of both meters' energy; MISSING when either is.
  - id: {STATION}
    channels:
      - name: {STATION_TOTAL}
        add: [pmc1.energy_import, ion8600.energy_delivered]
        unit: kWh
"""
        + (SPARKPLUG_CONFIG if sparkplug else "")
    )
    return path


SPARKPLUG_GROUP = "demo"
SPARKPLUG_CONFIG = f"""\
# Sparkplug B beside the JSON topics (docs/sparkplug.md): edge node {SITE},
# each meter and the station a device, on spBv1.0/{SPARKPLUG_GROUP}/#.
sparkplug:
  enabled: true
  group_id: {SPARKPLUG_GROUP}
"""


@dataclass(kw_only=True)
class View:
    """What the demo shows: the latest intervals per device and the gateway state."""

    plain: bool
    out: TextIO
    latest: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    gateway: dict[str, Any] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    interval_count: int = 0
    on_change: Callable[[], None] | None = None
    # Sparkplug metric names by (device, alias), learnt from the births.
    aliases: dict[tuple[str | None, int], str] = field(default_factory=dict)

    def handle_sparkplug(self, topic: str, payload: bytes) -> None:
        """One Sparkplug message, decoded, as a line (the raw bytes are protobuf)."""
        from edged.io.sparkplug_pb import DecodeError, decode_payload

        parts = topic.split("/")
        if len(parts) < 4 or parts[1] == "STATE":
            return
        kind, device = parts[2], (parts[4] if len(parts) > 4 else None)
        try:
            decoded = decode_payload(payload)
        except DecodeError:
            return
        shown = []
        for m in decoded.metrics:
            if m.name is not None and m.alias is not None:
                self.aliases[(device, m.alias)] = m.name
            name = m.name or self.aliases.get((device, m.alias or 0), f"alias {m.alias}")
            if kind == "DDATA" and name.startswith("measurement/"):
                return  # fast polls: too many to show
            props = dict(m.properties)
            quality = f" Quality={props['Quality']}" if "Quality" in props else ""
            historical = " historical" if m.is_historical else ""
            shown.append(f"{name}={m.value}{quality}{historical}")
        where = f"{kind} {device}" if device else kind
        listed = ", ".join(shown[:3]) + (f" (+{len(shown) - 3})" if len(shown) > 3 else "")
        self.note(f"sparkplug {where} seq={decoded.seq}: {listed}", prefix="")

    def handle(self, topic: str, payload: dict[str, Any]) -> None:
        if "/interval/" in topic:
            self.interval_count += 1
            key = f"{payload['device']}/{payload['channel']}"
            rows = self.latest.setdefault(key, [])
            rows.append(payload)
            del rows[:-4]
            if self.plain:
                self.out.write(format_interval_line(payload) + "\n")
                self.out.flush()
        elif topic.endswith("/gateway/status"):
            self.gateway = payload
        elif topic.endswith("/event"):
            self.events.append(f"{payload.get('at', '')} {payload.get('message', '')}")
            del self.events[:-5]
            if self.plain:
                self.out.write(f"event {payload.get('kind')}: {payload.get('message')}\n")
        if self.on_change is not None:
            self.on_change()

    def note(self, text: str, prefix: str = "scenario: ") -> None:
        self.events.append(text)
        del self.events[:-5]
        if self.plain:
            self.out.write(f"{prefix}{text}\n")
            self.out.flush()
        if self.on_change is not None:
            self.on_change()

    def render(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        table = Table(title=f"edged demo - site {SITE}", expand=True)
        for column in ("device/channel", "end (UTC)", "energy", "demand", "flags", "quality"):
            table.add_column(column)
        for key in sorted(self.latest):
            for row in self.latest[key]:
                value = "-" if row["value"] is None else f"{row['value']:.3f} {row['unit']}"
                dem = "-" if row["demand"] is None else f"{row['demand']:.1f} {row['demand_unit']}"
                style = {"actual": "green", "suspect": "yellow", "missing": "red",
                         "estimated": "cyan"}.get(row["quality"], "")  # fmt: skip
                table.add_row(key, row["end"][11:19], value, dem, ",".join(row["flags"]) or "-",
                              Text(row["quality"], style=style))  # fmt: skip
            table.add_section()
        gw = self.gateway
        summary = Text(
            f"gateway: {gw.get('state', '?')}  time state: {gw.get('time_state', '?')}  "
            f"outbox depth: {gw.get('outbox_depth', '?')}  devices online: "
            f"{gw.get('devices_online', '?')}/{gw.get('devices', '?')}"
        )
        return Group(table, summary, Text("\n".join(self.events[-5:]), style="dim"))


def format_interval_line(p: dict[str, Any]) -> str:
    value = "null" if p["value"] is None else f"{p['value']:.3f}"
    demand = "null" if p["demand"] is None else f"{p['demand']:.1f}"
    flags = ",".join(p["flags"]) or "-"
    return (
        f"interval {p['device']}/{p['channel']} end={p['end']} value={value} {p['unit']} "
        f"demand={demand} {p['demand_unit'] or ''} flags={flags} quality={p['quality']} "
        f"time_state={p['time_state']}"
    )


async def _subscribe(
    broker: DemoBroker, view: View, ready: asyncio.Event, sparkplug: bool = False
) -> None:
    async with aiomqtt.Client(broker.host, broker.port, identifier="edged-demo-view") as client:
        await client.subscribe(f"{PREFIX}/#", qos=1)
        if sparkplug:
            await client.subscribe(f"spBv1.0/{SPARKPLUG_GROUP}/#", qos=0)
        ready.set()
        async for message in client.messages:
            if message.topic.value.startswith("spBv1.0/"):
                if isinstance(message.payload, bytes):
                    view.handle_sparkplug(message.topic.value, message.payload)
                continue
            try:
                payload = json.loads(bytes(message.payload))
            except (ValueError, TypeError):
                continue
            view.handle(message.topic.value, payload)


def ion_initial_counts(interval_s: int) -> int:
    counts_per_s = ION_LOAD_KW / 3600 / ION_KWH_PER_COUNT
    return COUNTER_MODULUS - int(counts_per_s * interval_s * INTERVALS_TO_WRAP)


# How far a "dead RTC battery" sets the gateway's system clock back.
DEAD_BATTERY_S = 86_400.0


class Daemon:
    """The demo's daemon, which the scenario restarts on a different clock."""

    def __init__(self, settings: Any, config: Path) -> None:
        self.settings = settings
        self.config = config
        self.app: App | None = None
        self.task: asyncio.Task[None] | None = None

    def start(self, system_now: Callable[[], float] = time.time) -> None:
        self.app = App(self.settings, self.config, system_now=system_now)
        self.task = asyncio.create_task(self.app.run(), name="daemon")

    async def stop(self) -> None:
        if self.app is not None and self.task is not None:
            self.app.request_stop()
            await asyncio.wait_for(self.task, 15)
        self.app, self.task = None, None


async def _scenario(meters: Any, ntp: Any, daemon: Daemon, interval_s: int, view: View) -> None:
    """Scripted faults, timed in intervals so they show at any --interval."""
    from edged.sim.faults import Fault

    pmc1 = meters[1]
    view.note(
        f"ion8600 counter starts near its 32-bit modulus and wraps in about "
        f"{INTERVALS_TO_WRAP:g} intervals (-> ROLLOVER)"
    )
    await asyncio.sleep(2.5 * interval_s)
    view.note("pmc1 stops answering for two intervals (outage -> MISSING, then LONG)")
    pmc1.set_fault(Fault.silent(), for_s=2 * interval_s)
    await asyncio.sleep(5 * interval_s)
    view.note(
        "gateway restarts with its RTC battery dead: system clock a day behind, NTP "
        "unreachable (-> AMT, demand suspended)"
    )
    ntp.unreachable = True
    await daemon.stop()
    daemon.start(system_now=lambda: time.time() - DEAD_BATTERY_S)
    await asyncio.sleep(2.5 * interval_s)
    view.note("NTP answers again: assumed time ends (-> TIME_ADJUSTED)")
    ntp.unreachable = False


async def run_demo(
    duration_s: float | None,
    plain: bool,
    interval_s: int,
    out: TextIO = sys.stdout,
    *,
    sparkplug: bool = False,
) -> int:
    from edged.sim.meter import MeterServer, SimulatedMeter
    from edged.sim.ntp import NtpServer

    # The live view shows what matters; log lines would scribble over it.
    configure("warning" if plain else "error", "json", stream=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="edged-demo-"))
    view = View(plain=plain, out=out)
    async with demo_broker(workdir) as broker:
        meters = {
            1: SimulatedMeter.pmc1(load_kw=1000.0, kwh_per_count=0.144, initial_counts=1_000_000),
            2: SimulatedMeter.pmc1(
                load_kw=ION_LOAD_KW,
                kwh_per_count=ION_KWH_PER_COUNT,
                initial_counts=ion_initial_counts(interval_s),
            ),
        }
        async with MeterServer(meters) as server, NtpServer(offset_s=0.0) as ntp:
            modbus_port = await server.start_tcp("127.0.0.1", 0)
            ntp_port = await ntp.start("127.0.0.1", 0)
            config = demo_config(workdir, broker, modbus_port, ntp_port, interval_s, sparkplug)
            settings = load_settings(config)
            print(
                f"edged demo: broker {broker.kind} at {broker.host}:{broker.port}, "
                f"meters at 127.0.0.1:{modbus_port}, {interval_s} s intervals\n"
                f"  config: {config}\n"
                f"  virtual meter {STATION}/{STATION_TOTAL} = pmc1 + ion8600 energy per interval\n"
                f"  watch the raw topics: mosquitto_sub -h {broker.host} -p {broker.port} "
                f"-t '{PREFIX}/#' -v",
                file=out,
                flush=True,
            )
            if sparkplug:
                print(
                    f"  Sparkplug B on spBv1.0/{SPARKPLUG_GROUP}/# (protobuf, shown decoded)",
                    file=out,
                    flush=True,
                )
            daemon = Daemon(settings, config)
            subscribed = asyncio.Event()
            view_task = asyncio.create_task(
                _subscribe(broker, view, subscribed, sparkplug), name="view"
            )
            await subscribed.wait()
            daemon.start()
            scenario = asyncio.create_task(
                _scenario(meters, ntp, daemon, interval_s, view), name="scenario"
            )
            try:
                await _show(view, duration_s, plain)
            finally:
                scenario.cancel()
                await asyncio.gather(scenario, return_exceptions=True)
                await daemon.stop()
                view_task.cancel()
                await asyncio.gather(view_task, return_exceptions=True)
    if plain:
        print(f"edged demo: {view.interval_count} intervals received", file=out)
    return 0


async def _show(view: View, duration_s: float | None, plain: bool) -> None:
    if plain:
        await _sleep(duration_s)
        return
    from rich.live import Live

    with Live(view.render(), refresh_per_second=4, screen=False) as live:
        view.on_change = lambda: live.update(view.render())
        await _sleep(duration_s)


async def _sleep(duration_s: float | None) -> None:
    if duration_s is None:
        await asyncio.Event().wait()  # until Ctrl-C
    else:
        await asyncio.sleep(duration_s)
