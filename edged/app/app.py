"""Composition root: builds the daemon's parts and runs them in one TaskGroup.

Shutdown (SIGTERM/SIGINT) is ordered so nothing built is lost: pollers finish
the read in flight, the recorder commits what they handed over, the publisher
sends the offline status, and only then is the store closed.

SIGHUP reloads the config file: an invalid one is rejected with an event and
the running configuration carries on; a valid one is applied to the devices
(`edged.app.devices.DeviceSet`), and what only a restart can apply is reported.
Under systemd (`Type=notify`) the daemon reports READY once the store is open,
RELOADING/READY around a reload, STOPPING on shutdown, and pings the watchdog
only while the loop and every poller make progress (`edged.io.sdnotify`).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from edged import __version__
from edged.app import logs
from edged.app.devices import DeviceSet, PollerContext, supervised
from edged.app.holding import STORAGE_ERRORS
from edged.app.housekeeping import (
    BudgetDecision,
    DiskUsage,
    Housekeeper,
    budget_event,
    store_corrupt_event,
)
from edged.app.liveness import Liveness
from edged.app.poller import DeviceHealth, HealthShown, MeasureCounts, Recorder, outbox_pending
from edged.app.replay import ReplayCommands
from edged.app.status import device_fields, disk_fields, outbox_fields, time_fields
from edged.config.load import (
    ConfigError,
    config_hash,
    load_settings,
)
from edged.config.schema import (
    Settings,
    TimeSettings,
)
from edged.core.compensation.record import channels_of
from edged.core.demand import PeakState, peak_event, update_peaks
from edged.core.model import (
    Event,
    Flag,
    Interval,
    TimeState,
    iso_utc,
    parse_iso_utc,
)
from edged.core.payloads import (
    DEVICE_STATUS_SCHEMA,
    GATEWAY_STATUS_SCHEMA,
    Topics,
    encode,
    peak_payload,
)
from edged.core.reload import DeviceDiff, applied_settings, restart_required
from edged.core.sparkplug import NodeFigures
from edged.core.time.flags import TimeFlags
from edged.core.time.outage import gateway_outage
from edged.core.time.settings import (
    TimebaseConfig,
    TimeSource,
)
from edged.core.time.transitions import TimeTransition
from edged.core.virtual.meters import VirtualMeters
from edged.core.virtual.plan import plan_virtual_meter
from edged.io.clock import BoundaryWaiter, Clock, SystemClock
from edged.io.facade import FacadeServer
from edged.io.mqtt import Publisher, Refusal, default_client_id
from edged.io.ntp import NtpReferenceClock, SystemReferenceClock
from edged.io.sdnotify import Notifier, Systemd, run_watchdog
from edged.io.sparkplug import SparkplugPublisher, device_specs
from edged.io.store import OutboxDepth, Store, StoreError, StoreReplaced

log = structlog.get_logger("edged.app.app")

# A config file that takes longer than this to read and validate is rejected.
RELOAD_LOAD_TIMEOUT_S = 30.0
# How long a shutdown waits for the publisher to send the offline status.
PUBLISHER_STOP_GRACE_S = 5.0
# Comms changes within this are reported by one gateway status.
GATEWAY_STATUS_DEBOUNCE_S = 0.5


def timebase_config(settings: TimeSettings) -> TimebaseConfig:
    return TimebaseConfig(
        source=TimeSource(settings.source),
        poll_s=settings.ntp_poll,
        step_threshold_s=settings.step_threshold,
        holdover_after_s=settings.holdover_after,
    )


def build_clock(
    settings: TimeSettings,
    last_mark: datetime | None,
    on_transition: Callable[[TimeTransition], None],
    system_now: Callable[[], float] = time.time,
) -> NtpReferenceClock | SystemReferenceClock:
    """The reference clock; `last_mark` lets it apply the AMT rule at start-up."""
    config = timebase_config(settings)
    if settings.source == "ntp":
        return NtpReferenceClock(
            settings.ntp_servers,
            config,
            last_mark=last_mark,
            timeout_s=settings.ntp_timeout,
            on_transition=on_transition,
            system_now=system_now,
        )
    return SystemReferenceClock(
        config, last_mark=last_mark, on_transition=on_transition, system_now=system_now
    )


class App:
    def __init__(
        self,
        settings: Settings,
        config_path: Path | None,
        clock: NtpReferenceClock | SystemReferenceClock | None = None,
        system_now: Callable[[], float] = time.time,
        systemd: Systemd | None = None,
    ):
        # system_now: the system clock (the demo passes one reset by a "dead
        # RTC battery"); edged only ever reads it.
        self._system_now = system_now
        self.settings = settings
        self.config_path = config_path
        self._clock_override = clock
        # Until the reference clock is built from the store's last mark.
        self.clock: Clock = clock or SystemClock(TimeState.ASSUMED, system_now=system_now)
        self.reference: NtpReferenceClock | SystemReferenceClock | None = clock
        self.topics = Topics(settings.mqtt.topic_prefix, settings.site)
        self._stop = asyncio.Event()
        self._started_mono = self.clock.monotonic()
        # Reference time at start-up, once the reference clock exists (run()).
        self._started_at: datetime | None = None
        self.time_flags = TimeFlags()
        self._recorder: Recorder | None = None
        self._early_events: list[Event] = []
        self._demand_units: dict[tuple[str, str], str | None] = {}
        # Peak demand of virtual meters' channels (they had none).
        self._virtual_peaks: dict[str, dict[str, PeakState]] = {}
        self._virtual: VirtualMeters | None = None
        self._devices: DeviceSet | None = None
        self._outbox: OutboxDepth | None = None
        self._config_hash = config_hash(config_path) if config_path else None
        # Changed settings sections that wait for a restart (after a reload).
        self._restart_required: tuple[str, ...] = ()
        self._reload_requested = asyncio.Event()
        self._systemd = systemd or Systemd(Notifier(None), None)
        self._device_health: dict[str, DeviceHealth] = {}
        self._health_shown: dict[str, HealthShown] = {}  # as last published
        self._gateway_status_due = False
        self.store: Store | None = None
        self.publisher: Publisher | None = None
        # An error that ends the daemon (run() raises it after a clean stop).
        self.fatal: StoreReplaced | None = None
        self.sparkplug: SparkplugPublisher | None = None
        self._commands: ReplayCommands | None = None
        self.housekeeper: Housekeeper | None = None
        # The facade figures last written to the store (its "facade" mark).
        self._facade_marked: str | None = None
        self.facade: FacadeServer | None = None
        # Fast-poll counts at the last rate computation, and the rates then.
        self._measure_mark: tuple[float, MeasureCounts] | None = None
        self._measure_rates: dict[str, float] = {}

    def request_stop(self) -> None:
        if not self._stop.is_set():
            log.info("shutdown requested")
        self._stop.set()

    def request_reload(self) -> None:
        log.info("config reload requested")
        self._reload_requested.set()

    # -- status payloads --------------------------------------------------------

    def gateway_status(self, state: str, outbox: OutboxDepth | None = None) -> dict[str, Any]:
        # Default: the depth last measured by the status loop, so a status
        # published on a comms change does not blank it.
        outbox = outbox or self._outbox
        now = self.clock.now()
        return {
            "schema": GATEWAY_STATUS_SCHEMA,
            "site": self.settings.site,
            "state": state,
            "version": __version__,
            "config_hash": self._config_hash,
            "restart_required": list(self._restart_required),
            "started_at": iso_utc(self._started_at or now),
            "uptime_s": round(self.clock.monotonic() - self._started_mono, 1),
            "time_state": str(self.clock.time_state),
            **self._time_fields(),
            **device_fields(self._device_health.values(), len(self.settings.devices)),
            "links": [link.status() for link in self._devices.links()] if self._devices else [],
            **outbox_fields(outbox, now),
            **self._disk_fields(),
            **self._publish_status(),
            **self._storage_status(),
            **({"store_id": self.store.store_id} if self.store is not None else {}),
            **({"facade": self.facade.status()} if self.facade is not None else {}),
            **self._measure_status(),
            "updated_at": iso_utc(now),
        }

    def _on_store_replaced(self, exc: StoreReplaced) -> None:
        """The database file was deleted or replaced under the daemon: stop,
        and exit with the error (run() raises it), never write on unseen."""
        if self.fatal is None:
            log.error("store replaced or deleted while running; stopping", error=str(exc))
            self.fatal = exc
        self.request_stop()

    def _storage_status(self) -> dict[str, Any]:
        if self._recorder is None:
            return {}
        holding = self._recorder.holding
        return {"storage_error": holding.error, **({} if holding.error is None else {
            "storage_held": holding.counts()})}  # fmt: skip

    def _on_storage_error(self, error: str | None) -> None:
        """The store started or stopped refusing writes: an event (written
        with the held data once possible) and the status at once."""
        holding = self._recorder.holding if self._recorder is not None else None
        counts = holding.counts() if holding is not None else {}
        path = str(self.settings.storage.path)
        self._record_event(
            Event(
                device=None,
                kind="storage_error",
                at=self.clock.now(),
                message=(f"the store {path} refuses writes ({error}); data is held in "
                         "memory and written when it accepts writes again")
                if error is not None else f"the store {path} accepts writes again; "
                "held data written",
                details={"change": "entered" if error is not None else "left",
                         "error": error, "path": path, **counts},
            )
        )  # fmt: skip
        if self.publisher is not None:
            self.publisher.set_retained(self.topics.gateway_status, self.gateway_status("online"))

    def _publish_status(self) -> dict[str, Any]:
        if self.publisher is None:
            return {}
        return {"publish": self.publisher.refusals.status()}

    def _publish_refused(self, refusal: Refusal) -> None:
        """The broker refused publishes (MQTT 5 PUBACK reason code): they stay
        in the outbox and are retried; operators must hear of it."""
        self._record_event(
            Event(
                device=None,
                kind="publish_refused",
                at=self.clock.now(),
                message=f"the broker refused {refusal.count} publish(es) ({refusal.reason}, "
                f"e.g. {refusal.topic}); kept in the outbox and retried",
                details={"count": refusal.count, "topic": refusal.topic,
                         "reason_code": refusal.reason_code, "reason": refusal.reason},
            )
        )  # fmt: skip
        if self.publisher is not None:
            self.publisher.set_retained(self.topics.gateway_status, self.gateway_status("online"))

    def _measure_status(self) -> dict[str, Any]:
        """Fast-poll values per second (polled, published after report by
        exception, stored) over the time since the last status."""
        if self._recorder is None:
            return {}
        counts = self._recorder.measure_counts
        now_s = self.clock.monotonic()
        mark = self._measure_mark
        if mark is None or now_s - mark[0] >= 1.0:
            if mark is not None:
                then_s, before = mark
                self._measure_rates = {
                    f"{kind}_per_s": round((getattr(counts, kind) - getattr(before, kind))
                                           / (now_s - then_s), 3)
                    for kind in ("polled", "published", "stored")
                }  # fmt: skip
            self._measure_mark = (now_s, MeasureCounts(counts.polled, counts.published,
                                                       counts.stored))  # fmt: skip
        return {
            "measurements": {
                "polled": counts.polled,
                "published": counts.published,
                "stored": counts.stored,
                **self._measure_rates,
            }
        }

    # -- time events ------------------------------------------------------------

    def _on_transition(self, transition: TimeTransition) -> None:
        """A clock event: flag the intervals it falls in and publish it."""
        # Filed by monotonic time: it belongs to the records open when it
        # happened, whatever it did to the reference clock.
        self.time_flags.add_event(transition.mono_s, transition.flags)
        self._record_event(transition.to_event(None))

    def _record_event(self, event: Event) -> None:
        if self._recorder is None or self.store is None:
            self._early_events.append(event)  # before the recorder exists: sent at start
            return
        self._recorder.submit(
            outbox_pending(self.store, self.topics, self.settings.site, [], [event])
        )

    def _on_budget(self, decision: BudgetDecision, usage: DiskUsage) -> None:
        """The disk alarm came, went or sheds more: an event, and the status now."""
        assert self.housekeeper is not None
        self._record_event(budget_event(decision, usage, self.housekeeper.limits, self.clock.now()))
        if self.publisher is not None:
            self.publisher.set_retained(self.topics.gateway_status, self.gateway_status("online"))

    def _on_peak(self, device_id: str, channel: str, peak: PeakState) -> None:
        if self.publisher is None:
            return
        unit = self._demand_units.get((device_id, channel))
        self.publisher.set_retained(
            self.topics.peak(device_id, channel),
            peak_payload(self.settings.site, device_id, channel, unit, peak),
        )

    def _on_records(self, records: Sequence[Interval]) -> None:
        if self._virtual is None or self._recorder is None or self.store is None:
            return
        combined = self._virtual.add(records)
        if not combined:
            return
        changed: dict[tuple[str, str], PeakState] = {}
        events = []
        for meter in sorted({r.device for r in combined}):
            before = self._virtual_peaks.get(meter, {})
            mine = [r for r in combined if r.device == meter]
            after, closed = update_peaks(before, mine, self.settings.zone)
            self._virtual_peaks[meter] = after
            if closed:
                units = {r.channel: r.demand_unit for r in mine}
                events.append(peak_event(meter, closed, units))
            for channel, state in after.items():
                if state != before.get(channel):
                    changed[(meter, channel)] = state
        pending = outbox_pending(self.store, self.topics, self.settings.site, combined, events)
        pending.peaks.update(changed)
        self._recorder.submit(pending)
        for (meter, channel), state in changed.items():
            self._on_peak(meter, channel, state)

    async def _note_outage(self, store: Store, last_mark: datetime | None) -> None:
        """After an unclean stop, POWER_FAIL on the intervals the outage spans."""
        clean_mark = await store.get_mark("clean_shutdown")
        await store.set_mark("clean_shutdown", "")
        if last_mark is None or (clean_mark and parse_iso_utc(clean_mark) == last_mark):
            return
        outage = gateway_outage(last_mark, datetime.fromtimestamp(self._system_now(), UTC))
        if outage is None:
            return
        self.time_flags.add(outage.start, outage.end, frozenset({Flag.POWER_FAIL}))
        self._record_event(
            Event(
                device=None,
                kind="gateway_outage",
                at=outage.end,
                message=f"edged was down for {outage.duration_s:.0f} s without a clean "
                "shutdown; intervals spanning it are flagged POWER_FAIL",
                details={
                    "from": iso_utc(outage.start),
                    "to": iso_utc(outage.end),
                    "end_assumed": outage.end_assumed,
                },
            )
        )

    def _device_status(self, device_id: str, health: DeviceHealth) -> dict[str, Any]:
        return {
            "schema": DEVICE_STATUS_SCHEMA,
            "site": self.settings.site,
            "device": device_id,
            "comms": health.comms,
            "last_good_read": iso_utc(health.last_good_read) if health.last_good_read else None,
            "consecutive_errors": health.consecutive_errors,
            "last_error": health.last_error,
            "reads": health.reads,
            "errors": health.errors,
            "meter_clock_offset_s": None
            if health.meter_clock_offset_s is None
            else round(health.meter_clock_offset_s, 3),
        }

    def _disk_fields(self) -> dict[str, Any]:
        disk = self.housekeeper.status() if self.housekeeper is not None else None
        return disk_fields(disk, self.settings.storage.disk_budget)

    def _time_fields(self) -> dict[str, Any]:
        return time_fields(self.reference.status() if self.reference is not None else None)

    def _node_figures(self) -> NodeFigures:
        """The Sparkplug node metrics, from what the gateway status says."""
        disk = self._disk_fields()
        return NodeFigures(
            version=__version__,
            time_state=str(self.clock.time_state),
            ntp_offset_s=self._time_fields().get("ntp_offset_s"),
            outbox_depth=self._outbox.count if self._outbox is not None else None,
            disk_used_bytes=disk["disk_used_bytes"],
            disk_free_bytes=disk["disk_free_bytes"],
            disk_alarm=disk["disk_alarm"],
        )

    def _on_measurement(self, topic: str, payload: dict[str, Any]) -> bool:
        assert self.publisher is not None
        sent = False
        if self.settings.sparkplug.json_data:
            sent = self.publisher.publish_now(topic, payload)
        if self.sparkplug is not None:
            sent = self.sparkplug.publish_measurement(str(payload["device"]), payload) or sent
        return sent

    def _on_health(self, device_id: str, health: DeviceHealth) -> None:
        """After every boundary read: publish the device status only when it is
        news (comms, error counts, meter clock); the status cadence refreshes
        the rest. A status per read was a retained QoS 1 message per meter per
        boundary, half of what a 1000-meter boundary published (bench/boundary.py)."""
        self._device_health[device_id] = health
        if self.sparkplug is not None:
            self.sparkplug.device_comms(device_id, health.comms != "offline")
        shown = self._health_shown.get(device_id)
        now = HealthShown.of(health)
        if shown is not None and not shown.news(now):
            return
        self._publish_device_status(device_id, health)
        if (shown.comms if shown else None) != now.comms:
            self._gateway_status_soon()

    def _gateway_status_soon(self) -> None:
        """Refresh the gateway status shortly: the comms changes of many devices
        at once (start-up, a line going down) then cost one status, not one
        each (building one reads every link: quadratic in the devices)."""
        if self._gateway_status_due:
            return
        self._gateway_status_due = True

        def refresh() -> None:
            self._gateway_status_due = False
            # After a stop request the final status is the offline one.
            if self.publisher is not None and not self._stop.is_set():
                self.publisher.set_retained(
                    self.topics.gateway_status, self.gateway_status("online")
                )

        asyncio.get_running_loop().call_later(GATEWAY_STATUS_DEBOUNCE_S, refresh)

    def _publish_device_status(self, device_id: str, health: DeviceHealth) -> None:
        if self.publisher is None:
            return
        self._health_shown[device_id] = HealthShown.of(health)
        self.publisher.set_retained(
            self.topics.device_status(device_id), self._device_status(device_id, health)
        )

    # -- running ----------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
            if self.fatal is not None:
                raise self.fatal
        except BaseException:
            # Whatever failed before the task group was up (a store that
            # stops accepting writes during start-up ...): close the store, or
            # its worker thread keeps the process alive with no READY sent and
            # systemd's restart policy never runs.
            if self.store is not None:
                with contextlib.suppress(Exception):
                    await self.store.close()
            raise

    async def _run(self) -> None:
        settings = self.settings
        notifier = self._systemd.notifier
        # Rows are stamped with the reference clock (read late: it replaces the
        # placeholder below), the timeline every age is measured on.
        store = await Store.open(settings.storage.path, now=lambda: self.clock.now())
        self.store = store
        try:
            # A store that cannot be written is a clean exit naming the path
            # and the OS's reason (systemd restarts it), not a half-started
            # daemon that never says READY.
            await store.check_writable()
        except StoreError:
            await store.close()
            raise
        log.info("store open", path=str(settings.storage.path))
        if store.recovered_from is not None:
            self._record_event(store_corrupt_event(store.recovered_from))
        liveness = Liveness(
            store, lambda: self.clock.now(), monotonic=lambda: self.clock.monotonic()
        )
        last_mark = await liveness.last()
        if self._clock_override is None:
            self.reference = build_clock(
                settings.time, last_mark, self._on_transition, self._system_now
            )
        assert self.reference is not None
        self.clock = self.reference
        self._started_at = self.clock.now()
        self._started_mono = self.clock.monotonic()
        publisher = Publisher(
            settings.mqtt,
            store,
            client_id=default_client_id(settings.mqtt, settings.site),
            will_topic=self.topics.gateway_status,
            will_payload=encode({"schema": GATEWAY_STATUS_SCHEMA, "site": settings.site,
                                "state": "offline", "version": __version__}),
        )  # fmt: skip
        self.publisher = publisher
        publisher.on_refused(self._publish_refused)
        self._outbox = await store.outbox_depth()
        publisher.set_retained(self.topics.gateway_status, self.gateway_status("online"))
        sparkplug = self.sparkplug = None
        if not settings.sparkplug.enabled and (dropped := await store.drop_sparkplug_rows()):
            log.warning("sparkplug is off: its unsent rows were dropped (JSON records are kept)",
                        rows=dropped)  # fmt: skip
        if settings.sparkplug.enabled:
            sparkplug = self.sparkplug = SparkplugPublisher(
                settings.sparkplug, settings.mqtt, store, site=settings.site,
                devices=device_specs(settings), figures=self._node_figures(),
                now=self.clock.now, on_event=self._record_event,
            )  # fmt: skip

        def committed() -> None:
            publisher.wake()
            if sparkplug is not None:
                sparkplug.wake()

        recorder = Recorder(
            store,
            on_committed=committed,
            tap=sparkplug.rows_for if sparkplug else None,
            tap_replaces=not settings.sparkplug.json_data,
        )
        recorder.holding.on_change = self._on_storage_error
        recorder.on_fatal = self._on_store_replaced
        self._recorder = recorder
        commands = self._commands = None
        if settings.mqtt.commands.enabled:
            commands = self._commands = ReplayCommands(
                settings, store, recorder, publisher, self.topics, self.clock.now
            )
            publisher.accept_commands(commands.topic, commands.receive, commands.acked)
        housekeeper = Housekeeper(
            store,
            settings.storage,
            self.clock,
            apply_shedding=recorder.set_shedding,
            on_change=self._on_budget,
        )
        self.housekeeper = housekeeper
        recorder.before_commit = housekeeper.check_free_space
        for event in self._early_events:
            self._record_event(event)
        self._early_events.clear()
        await self._note_outage(store, last_mark)
        peaks = await store.peak_states()
        self._demand_units = self._demand_units_of(settings)
        virtual_ids = {vm.id for vm in settings.virtual_meters}
        for (device_id, channel), peak in peaks.items():
            if device_id in virtual_ids:
                self._virtual_peaks.setdefault(device_id, {})[channel] = peak
        for (device_id, channel), peak in peaks.items():
            self._on_peak(device_id, channel, peak)
        self._virtual = self._plan_virtual(settings, None)
        context = PollerContext(
            site=settings.site,
            zone=settings.zone,
            clock=self.clock,
            waiter=BoundaryWaiter(self.clock),
            store=store,
            recorder=recorder,
            topics=self.topics,
            time_flags=self.time_flags,
            on_health=self._on_health,
            on_records=self._on_records,
            on_peak=self._on_peak,
            on_measurement=self._on_measurement if sparkplug else publisher.publish_now,
        )
        try:
            async with asyncio.TaskGroup() as group:
                recorder_task = group.create_task(recorder.run(), name="recorder")
                publisher_task = group.create_task(publisher.run(), name="publisher")
                sparkplug_task = (
                    group.create_task(sparkplug.run(), name="sparkplug") if sparkplug else None
                )
                devices = self._devices = DeviceSet(context, group)
                await devices.apply(settings.devices)
                if settings.facade.enabled:
                    await self._start_facade(settings, devices, store)
                status_task = group.create_task(self._status_loop(publisher, store), name="status")
                housekeeping_task = group.create_task(
                    supervised(housekeeper.run, "housekeeping", self._stop), name="housekeeping"
                )
                liveness_task = group.create_task(liveness.run(), name="liveness")
                clock_task = group.create_task(self.reference.run(), name="clock")
                commands_task = (
                    group.create_task(commands.run(), name="commands") if commands else None
                )
                reload_task = group.create_task(self._reload_loop(), name="reload")
                watchdog_task = None
                if self._systemd.watchdog_s is not None:
                    watchdog_task = group.create_task(
                        run_watchdog(notifier, self._systemd.watchdog_s, self._stalls,
                                     self._status_line),
                        name="watchdog",
                    )  # fmt: skip
                notifier.ready(self._status_line())
                log.info("edged running", site=settings.site, devices=len(settings.devices),
                         version=__version__)  # fmt: skip
                await self._stop.wait()
                notifier.stopping()
                await reload_task  # a reload in progress completes first
                if self.facade is not None:
                    await self.facade.close()
                    await store.set_mark("facade", self._facade_summary())
                await devices.stop()
                if watchdog_task is not None:
                    # Pings up to here: a slow stop is not a hang; TimeoutStopSec bounds it.
                    watchdog_task.cancel()
                status_task.cancel()
                housekeeping_task.cancel()
                liveness_task.cancel()
                clock_task.cancel()
                if commands_task is not None:
                    commands_task.cancel()
                await recorder.close()
                await recorder_task
                self._recorder = None
                # Last liveness mark doubles as the clean-shutdown mark: a
                # restart then knows this was no power failure.
                final_at = self.clock.now()
                final_mark = iso_utc(final_at)
                try:
                    await liveness.final(final_at)
                    await store.set_mark("clean_shutdown", final_mark)
                except STORAGE_ERRORS as exc:
                    # A failing disk: the next start counts this as an outage
                    # (POWER_FAIL), which is the honest reading.
                    log.error("clean-shutdown mark not written", error=str(exc))
                await publisher.stop({self.topics.gateway_status: self.gateway_status("offline")})
                try:
                    await asyncio.wait_for(asyncio.shield(publisher_task), PUBLISHER_STOP_GRACE_S)
                except TimeoutError:
                    log.warning("mqtt not reachable at shutdown; offline status left to last will")
                    publisher_task.cancel()
                if sparkplug is not None and sparkplug_task is not None:
                    await sparkplug.stop()
                    try:
                        await asyncio.wait_for(
                            asyncio.shield(sparkplug_task), PUBLISHER_STOP_GRACE_S
                        )
                    except TimeoutError:
                        log.warning("sparkplug NDEATH not sent at shutdown; left to the last will")
                        sparkplug_task.cancel()
        finally:
            if self.facade is not None:
                await self.facade.close()
            if self._devices is not None:
                self._devices.close_links()
            liveness.close()
            await store.close()
            log.info("edged stopped")

    async def _start_facade(self, settings: Settings, devices: DeviceSet, store: Store) -> None:
        """Serve the other masters. A listener that cannot bind (the port taken,
        an address not on this host) costs the facade, never the billing reads:
        an error, a `facade_failed` event, and edged runs on without it."""
        units = {d.id: d.transport.unit_id for d in settings.devices}
        facade = FacadeServer(settings.facade, devices.link_for, units.get)
        try:
            await facade.start()
        except OSError as exc:
            await facade.close()
            log.error("facade not started; edged runs without it", error=str(exc))
            self._record_event(
                Event(device=None, kind="facade_failed", at=self.clock.now(),
                      message=f"the Modbus TCP facade could not start: {exc}",
                      details={"error": str(exc),
                               "listeners": [f"{x.host}:{x.port}"
                                             for x in settings.facade.listeners]})
            )  # fmt: skip
            return
        self.facade = facade
        await store.set_mark("facade", self._facade_summary())

    async def _mark_facade_if_changed(self, store: Store) -> None:
        """The facade mark only when its figures moved (its trailing time
        aside): an unchanged mark was an SQLite commit every status_every."""
        summary = self._facade_summary()
        figures = summary.rpartition("; at ")[0]
        if figures != self._facade_marked:
            await store.set_mark("facade", summary)
            self._facade_marked = figures

    def _facade_summary(self) -> str:
        """One line on the facade for `edged status` (kept as a store mark)."""
        assert self.facade is not None
        st = self.facade.status()
        listening = ", ".join(f"{x['host']}:{x['port']} ({x['devices']} devices)"
                              for x in st["listeners"])  # fmt: skip
        clients = st["clients"]
        return (
            f"listening {listening}; {st['connections']} connections, {len(clients)} clients, "
            f"{sum(c['requests'] for c in clients)} requests, "
            f"{sum(c['exceptions'] for c in clients)} exceptions "
            f"({sum(c['busy'] for c in clients)} busy); pass-through "
            f"{st['pass_through_reads']} bus reads, {st['pass_through_shared']} shared; "
            f"refused {st['rejected_connections']} connections, closed "
            f"{st['closed_malformed']} malformed; at {iso_utc(self.clock.now())}"
        )

    # -- reload -----------------------------------------------------------------

    async def _reload_loop(self) -> None:
        """Serve SIGHUPs one at a time until shutdown."""
        while not self._stop.is_set():
            reload = asyncio.ensure_future(self._reload_requested.wait())
            stop = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait({reload, stop}, return_when=asyncio.FIRST_COMPLETED)
            reload.cancel()
            stop.cancel()
            if self._reload_requested.is_set() and not self._stop.is_set():
                self._reload_requested.clear()
                await self.reload()

    async def reload(self) -> None:
        """Re-read the config file and apply it, or reject it and keep running."""
        notifier = self._systemd.notifier
        notifier.reloading()
        try:
            await self._reload()
        finally:
            notifier.ready(self._status_line())

    async def _reload(self) -> None:
        path = self.config_path
        if path is None or self._devices is None:
            log.warning("config reload ignored: not started from a config file")
            return
        try:
            # Off the loop: parsing and validating many devices must not
            # delay a boundary read.
            try:
                # The reader's work is bounded (edged.config.safe_yaml); this
                # bounds the rest, so a reload can never hold up a shutdown.
                async with asyncio.timeout(RELOAD_LOAD_TIMEOUT_S):
                    new = await asyncio.to_thread(load_settings, path)
            except TimeoutError:
                self._reject_config(
                    path, [f"{path}: not loaded within {RELOAD_LOAD_TIMEOUT_S:g} s"]
                )
                return
            diff = await self._devices.apply(new.devices)
        except ConfigError as exc:
            self._reject_config(path, [str(p) for p in exc.problems])
            return
        except ValueError as exc:  # a device the links or register planner refuse
            self._reject_config(path, [f"{path}: {exc}"])
            return
        except Exception as exc:  # whatever else a file can provoke: keep running
            log.exception("config reload failed")
            self._reject_config(path, [f"{path}: {type(exc).__name__}: {exc}"])
            return
        pending = restart_required(self.settings, new)
        self.settings = applied_settings(self.settings, new)
        self._after_reload(new)
        with contextlib.suppress(OSError):  # the file may be gone again already
            self._config_hash = config_hash(path)
        self._restart_required = pending
        self._record_event(self._reloaded_event(diff, pending))
        if self.publisher is not None:
            self.publisher.set_retained(self.topics.gateway_status, self.gateway_status("online"))

    def _after_reload(self, new: Settings) -> None:
        """Everything that follows the device list, in line with it again."""
        ids = {d.id for d in new.devices}
        self._device_health = {k: h for k, h in self._device_health.items() if k in ids}
        self._health_shown = {k: h for k, h in self._health_shown.items() if k in ids}
        self._demand_units = self._demand_units_of(new)
        self._virtual = self._plan_virtual(self.settings, self._virtual)
        if self._commands is not None:
            self._commands.use_settings(self.settings)
        if self.sparkplug is not None:
            self.sparkplug.set_devices(device_specs(self.settings))
        logs.configure(new.log.level, new.log.format)

    def _reject_config(self, path: Path, problems: list[str]) -> None:
        count = len(problems)
        log.error("config reload rejected; the running configuration is kept",
                  file=str(path), problems=problems)  # fmt: skip
        self._record_event(
            Event(
                device=None,
                kind="config_rejected",
                at=self.clock.now(),
                message=f"config reload rejected ({count} problem{'s' if count != 1 else ''}), "
                f"the running configuration is kept: {problems[0] if problems else path}",
                details={"file": str(path), "problems": problems,
                         "running_config_hash": self._config_hash},
            )
        )  # fmt: skip

    def _reloaded_event(self, diff: DeviceDiff, pending: Sequence[str]) -> Event:
        parts = [f"{len(ids)} {what}" for what, ids in (("added", diff.added),
                 ("removed", diff.removed), ("changed", diff.changed)) if ids]  # fmt: skip
        message = "config reloaded: " + (", ".join(parts) or "no device changes")
        if pending:
            message += f"; restart required to apply {', '.join(pending)}"
            log.warning("config reloaded; restart required for some sections", sections=pending)
        log.info("config reloaded", config_hash=self._config_hash, **diff.as_details())
        return Event(
            device=None,
            kind="config_reloaded",
            at=self.clock.now(),
            message=message,
            details={"config_hash": self._config_hash, **diff.as_details(),
                     "restart_required": list(pending)},
        )  # fmt: skip

    @staticmethod
    def _demand_units_of(settings: Settings) -> dict[tuple[str, str], str | None]:
        units = {
            (d.id, name): c.demand_unit
            for d in settings.devices
            for name, c in channels_of(d).items()  # raw and compensated channels
        }
        for vm in settings.virtual_meters:
            for vc in vm.channels:
                units[(vm.id, vc.name)] = vc.unit[:-1] if vc.unit.endswith("h") else None
        return units

    @staticmethod
    def _plan_virtual(settings: Settings, running: VirtualMeters | None) -> VirtualMeters | None:
        if not settings.virtual_meters:
            return None
        plans = [plan_virtual_meter(vm, settings.devices) for vm in settings.virtual_meters]
        if running is not None:
            return running.replanned(plans)
        return VirtualMeters(plans, settings.site, settings.zone)

    # -- health -----------------------------------------------------------------

    def _stalls(self) -> list[str]:
        """What looks hung, for the watchdog (empty: healthy)."""
        now = self.clock.now()
        mono_s = asyncio.get_running_loop().time()
        problems = self._devices.stalls(now, mono_s) if self._devices is not None else []
        if self._recorder is not None and (stall := self._recorder.heartbeat.stall(now, mono_s)):
            problems.append(stall)
        return problems

    def _status_line(self) -> str:
        """One line for `systemctl status`."""
        devices = len(self.settings.devices)
        online = sum(1 for h in self._device_health.values() if h.comms == "online")
        line = f"running: {devices} device(s), {online} online, config {self._config_hash}"
        if self._restart_required:
            line += f"; restart required for {', '.join(self._restart_required)}"
        return line

    async def _status_loop(self, publisher: Publisher, store: Store) -> None:
        while True:
            await asyncio.sleep(self.settings.status_every)
            with contextlib.suppress(*STORAGE_ERRORS):
                self._outbox = await store.outbox_depth()
            publisher.set_retained(self.topics.gateway_status, self.gateway_status("online"))
            if self.facade is not None:  # for `edged status`, which reads the store
                await self._mark_facade_if_changed(store)
            if self.sparkplug is not None:
                self.sparkplug.set_figures(self._node_figures())
            # Read counts and last good reads, which change with every read.
            for device_id, health in self._device_health.items():
                self._publish_device_status(device_id, health)


async def run_until_signal(app: App) -> None:
    """SIGTERM/SIGINT stop the daemon; SIGHUP reloads its config."""
    loop = asyncio.get_running_loop()
    handlers = {signal.SIGTERM: app.request_stop, signal.SIGINT: app.request_stop,
                signal.SIGHUP: app.request_reload}  # fmt: skip
    for sig, handler in handlers.items():
        loop.add_signal_handler(sig, handler)
    try:
        await app.run()
    finally:
        for sig in handlers:
            loop.remove_signal_handler(sig)
