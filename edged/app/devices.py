"""The running devices: their pollers, supervised tasks and Modbus links.

`DeviceSet.apply` takes the whole device list and makes it so, whether at
start-up (every device is new) or on a config reload: removed devices'
pollers stop, added ones start, changed ones restart, and unchanged ones keep
running untouched (their loop, interval state and link). Links are shared by
every device on one port or endpoint; one is kept while its identity (port,
line settings) is unchanged, so a device on a shared line can restart
without disturbing its neighbours, and closed once no device uses it.

A (re)started poller takes its engine state from the store after the
recorder has committed everything queued, so the interval spanning a reload
closes from the last stored counter: nothing buffered is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from typing import Any

import structlog

from edged.app.heartbeat import Heartbeat
from edged.app.poller import DeviceHealth, DevicePoller, Recorder
from edged.config.schema import Device
from edged.core.demand import PeakState
from edged.core.engine.state import ChannelState
from edged.core.model import Interval
from edged.core.payloads import Topics
from edged.core.plan import (
    LinkConfigError,
    check_links,
    link_identity,
    plan_device,
)
from edged.core.reload import DeviceDiff, carried_states, diff_devices
from edged.core.time.flags import TimeFlags
from edged.io.clock import BoundaryWaiter, Clock
from edged.io.modbus import (
    ScheduledLink,
    build_links,
)
from edged.io.store import Store

log = structlog.get_logger("edged.app.devices")

# A poller that crashes (a bug, not a failed read) is restarted after this.
POLLER_RESTART_S = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class PollerContext:
    """What every poller shares."""

    site: str
    zone: tzinfo
    clock: Clock
    waiter: BoundaryWaiter
    store: Store
    recorder: Recorder
    topics: Topics
    time_flags: TimeFlags
    on_health: Callable[[str, DeviceHealth], None]
    on_records: Callable[[Sequence[Interval]], None]
    on_peak: Callable[[str, str, PeakState], None]
    on_measurement: Callable[[str, dict[str, Any]], bool]


@dataclass(slots=True, kw_only=True)
class _Running:
    poller: DevicePoller
    link: ScheduledLink
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[tuple[asyncio.Task[None], Heartbeat]] = field(default_factory=list)

    def request_stop(self) -> None:
        self.stop.set()
        self.poller.stop()


class DeviceSet:
    def __init__(self, ctx: PollerContext, group: asyncio.TaskGroup) -> None:
        self._ctx = ctx
        self._group = group
        self._devices: tuple[Device, ...] = ()
        self._running: dict[str, _Running] = {}

    @property
    def devices(self) -> tuple[Device, ...]:
        return self._devices

    def links(self) -> list[ScheduledLink]:
        """The links in use, each once, in config order."""
        unique = {id(r.link): r.link for r in self._running.values()}
        return list(unique.values())

    def link_for(self, device_id: str) -> tuple[ScheduledLink, int] | None:
        """A running device's link and unit id on it (the facade reads through it)."""
        running = self._running.get(device_id)
        if running is None:
            return None
        return running.link, running.poller.device.transport.unit_id

    async def apply(self, devices: Sequence[Device]) -> DeviceDiff:
        """Run exactly `devices`. Raises ValueError (LinkConfigError among them)
        before anything is stopped if the devices cannot share their links or
        a register map cannot be planned; config validation makes that rare."""
        devices = tuple(devices)
        diff = diff_devices(self._devices, devices)
        before = {d.id: d for d in self._devices}
        # Fail here, before anything is stopped.
        problems = check_links(devices)
        if problems:
            raise LinkConfigError("; ".join(problems))
        for device in devices:
            if device.id not in diff.unchanged:
                plan_device(device)
        old_links = self.links()
        reuse = {link_identity(r.poller.device.transport): r.link for r in self._running.values()}
        stopping = [self._running.pop(i) for i in (*diff.removed, *diff.changed)]
        await self._stop(stopping)
        links = build_links(devices, reuse)
        # An unchanged device keeps its link (same transport, same identity);
        # should it ever not, it must restart on the new one.
        moved = [i for i in diff.unchanged if links[i] is not self._running[i].link]
        if moved:
            log.warning("unchanged devices restart on a new link", devices=moved)
            moved_running = [self._running.pop(i) for i in moved]
            await self._stop(moved_running)
            stopping += moved_running
        restart = {*diff.changed, *moved}
        health = {r.poller.device.id: r.poller.health for r in stopping}
        in_use = {id(link) for link in links.values()}
        for link in old_links:
            if id(link) not in in_use:
                link.close()
        starting = [d for d in devices if d.id in diff.added or d.id in restart]
        if starting:
            # The stopped pollers' last state is in the recorder's queue: commit
            # it, then start from the store.
            await self._ctx.recorder.flush()
            states = await self._ctx.store.channel_states()
            peaks = await self._ctx.store.peak_states()
            for device in starting:
                device_states = {ch: s for (dev, ch), s in states.items() if dev == device.id}
                self._start(
                    device,
                    links[device.id],
                    carried_states(before.get(device.id), device, device_states),
                    {ch: p for (dev, ch), p in peaks.items() if dev == device.id},
                    health.get(device.id),
                )
        # Config order for the status and the next reload.
        self._running = {d.id: self._running[d.id] for d in devices}
        self._devices = devices
        return diff

    def _start(
        self,
        device: Device,
        link: ScheduledLink,
        states: dict[str, ChannelState],
        peaks: dict[str, PeakState],
        health: DeviceHealth | None,
    ) -> None:
        ctx = self._ctx
        poller = DevicePoller(
            site=ctx.site,
            device=device,
            zone=ctx.zone,
            link=link,
            clock=ctx.clock,
            waiter=ctx.waiter,
            store=ctx.store,
            recorder=ctx.recorder,
            topics=ctx.topics,
            states=states,
            on_health=ctx.on_health,
            time_flags=ctx.time_flags,
            peaks=peaks,
            on_records=ctx.on_records,
            on_peak=ctx.on_peak,
            on_measurement=ctx.on_measurement,
            health=health,
        )
        running = _Running(poller=poller, link=link)
        name = f"poller:{device.id}"
        task = self._group.create_task(supervised(poller.run, name, running.stop), name=name)
        running.tasks.append((task, poller.heartbeat))
        if device.measurements is not None:
            name = f"measure:{device.id}"
            task = self._group.create_task(
                supervised(poller.run_measurements, name, running.stop), name=name
            )
            running.tasks.append((task, poller.measure_heartbeat))
        self._running[device.id] = running

    async def _stop(self, running: Sequence[_Running]) -> None:
        """Stop pollers; each finishes the read in flight first."""
        for r in running:
            r.request_stop()
        await asyncio.gather(*(task for r in running for task, _ in r.tasks))

    async def stop(self) -> None:
        await self._stop(list(self._running.values()))

    def close_links(self) -> None:
        for link in self.links():
            link.close()

    def stalls(self, now: datetime, mono_s: float) -> list[str]:
        """Pollers that look hung (for the watchdog): a task that ended while
        not asked to stop, or a heartbeat past its bound."""
        problems = []
        for r in self._running.values():
            for task, heartbeat in r.tasks:
                if task.done() and not r.stop.is_set():
                    problems.append(f"{heartbeat.name}: task ended")
                elif (stall := heartbeat.stall(now, mono_s)) is not None:
                    problems.append(stall)
        return problems


async def supervised(run: Callable[[], Awaitable[None]], name: str, stop: asyncio.Event) -> None:
    """Restart a crashed task after a pause instead of losing it silently."""
    while not stop.is_set():
        try:
            await run()
            return
        except Exception:
            log.exception("task crashed; restarting", task=name, restart_in_s=POLLER_RESTART_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), POLLER_RESTART_S)
