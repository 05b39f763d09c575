"""Config reload: the pure diff, and DeviceSet applying it to running pollers and
shared links (real simulators over loopback, a real SQLite store)."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from edged.app.devices import DeviceSet, PollerContext
from edged.app.poller import DeviceHealth, Recorder
from edged.config.load import load_settings
from edged.config.schema import Settings
from edged.core.engine.state import ChannelState
from edged.core.model import Interval
from edged.core.payloads import Topics
from edged.core.reload import (
    RESTART_FIELDS,
    applied_settings,
    carried_states,
    diff_devices,
    restart_required,
)
from edged.core.time.flags import TimeFlags
from edged.io.clock import BoundaryWaiter, SystemClock
from edged.io.store import Store
from edged.sim.meter import MeterServer, SimulatedMeter
from tests.support.schema import load_schema

BASE = """\
site: lab
storage: {path: /var/lib/edged/lab.db}
mqtt: {host: 127.0.0.1, port: 1883}
"""


def device_yaml(device_id: str, port: int, unit: int, *, interval: str = "1s",
                register: int = 0, multiplier: float = 0.001) -> str:  # fmt: skip
    return f"""\
  - id: {device_id}
    interval: {interval}
    transport: {{type: tcp, host: 127.0.0.1, port: {port}, unit_id: {unit}, timeout: 500ms}}
    channels:
      - {{name: energy_import, register: {register}, type: uint32, multiplier: {multiplier}}}
"""


def settings(tmp_path: Path, *devices: str, head: str = BASE, name: str = "edged.yaml") -> Settings:
    path = tmp_path / name
    path.write_text(head + "devices:\n" + "".join(devices))
    return load_settings(path)


def test_diff_compares_resolved_devices(tmp_path: Path) -> None:
    old = settings(tmp_path, device_yaml("a", 502, 1), device_yaml("b", 502, 2),
                   device_yaml("c", 503, 1))  # fmt: skip
    new = settings(
        tmp_path,
        device_yaml("d", 503, 2),
        device_yaml("a", 502, 1),  # order does not make a change
        device_yaml("b", 502, 2, multiplier=0.01),
    )
    diff = diff_devices(old.devices, new.devices)
    assert diff.added == ("d",)
    assert diff.removed == ("c",)
    assert diff.changed == ("b",)
    assert diff.unchanged == ("a",)
    assert diff_devices(old.devices, old.devices).unchanged == ("a", "b", "c")


def test_bcpm_channel_count_is_a_device_change(tmp_path: Path) -> None:
    def bcpm(count: int) -> str:
        return (
            "  - id: panel\n    profile: bcpm\n    channel_count: "
            f"{count}\n    transport: {{type: tcp, host: 127.0.0.1, port: 502, unit_id: 3}}\n"
        )

    # (42 is the most one BCPM unit id has: an 84-circuit BCPM is two devices.)
    old = settings(tmp_path, bcpm(20))
    new = settings(tmp_path, bcpm(42))
    assert diff_devices(old.devices, new.devices).changed == ("panel",)
    # Branches 1..20 read the same registers: their stored counters carry over.
    states = {c.name: ChannelState(counter=i) for i, c in enumerate(old.devices[0].channels)}
    kept = carried_states(old.devices[0], new.devices[0], states)
    assert set(kept) == {f"branch{n:02d}_energy" for n in range(1, 21)}
    # Back to 20: the state of branches 21..42 is simply not used.
    assert len(carried_states(new.devices[0], old.devices[0], states)) == 20


def test_carried_states_drop_a_channel_whose_counter_moved(tmp_path: Path) -> None:
    old = settings(tmp_path, device_yaml("a", 502, 1)).devices[0]
    rescaled = settings(tmp_path, device_yaml("a", 502, 1, multiplier=0.01)).devices[0]
    moved = settings(tmp_path, device_yaml("a", 502, 1, register=100)).devices[0]
    readdressed = settings(tmp_path, device_yaml("a", 9502, 7)).devices[0]
    states = {"energy_import": ChannelState(counter=1000), "gone": ChannelState(counter=5)}
    assert carried_states(old, rescaled, states) == {"energy_import": states["energy_import"]}
    assert carried_states(old, readdressed, states) == {"energy_import": states["energy_import"]}
    assert carried_states(old, moved, states) == {}  # another register: a fresh baseline
    assert carried_states(None, old, states) == {"energy_import": states["energy_import"]}


def test_sections_that_need_a_restart_are_reported_not_applied(tmp_path: Path) -> None:
    old = settings(tmp_path, device_yaml("a", 502, 1))
    head = BASE.replace("1883", "1884") + "status_every: 5s\nlog: {level: debug}\n"
    new = settings(tmp_path, device_yaml("a", 502, 1), device_yaml("b", 502, 2), head=head)
    assert restart_required(old, new) == ("mqtt",)
    assert restart_required(old, old) == ()
    running = applied_settings(old, new)
    assert running.mqtt.port == 1883  # only a restart reconnects
    assert [d.id for d in running.devices] == ["a", "b"]
    assert running.status_every == 5.0
    assert running.log.level == "debug"
    schema = load_schema("gateway_status")["$defs"]["status"]["properties"]
    assert schema["restart_required"]["items"]["enum"] == list(RESTART_FIELDS)


def test_replanned_virtual_meters_keep_inputs_held_for_the_interval_in_progress() -> None:
    from edged.core.virtual.meters import VirtualMeters
    from tests.support.virtual import AKL, END, rec, station

    meters = VirtualMeters([station(["unit1.energy_export", "unit2.energy_export"])], "s", AKL)
    assert meters.add([rec("unit1", "energy_export", 5.0)]) == []  # unit2 not yet in
    # Reloaded: the station now also subtracts aux, and unit1's input is kept.
    replanned = meters.replanned(
        [station(["unit1.energy_export", "unit2.energy_export"], ["aux.energy_import"])]
    )
    assert replanned.add([rec("unit2", "energy_export", 7.0)]) == []
    (combined,) = replanned.add([rec("aux", "energy_import", 2.0)])
    assert (combined.end, combined.value) == (END, 10.0)
    # Inputs a new plan no longer reads are not kept.
    assert END not in meters.replanned([station(["unit2.energy_export"])])._pending


# -- DeviceSet on real simulators ---------------------------------------------------


def stored(db: Path) -> dict[str, list[dict[str, Any]]]:
    """Interval rows per device, in end order."""
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        rows = conn.execute('SELECT device, "end", flags, value FROM intervals ORDER BY "end"')
        out: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            out.setdefault(row["device"], []).append(dict(row))
        return out


async def wait_for_intervals(db: Path, device: str, count: int, timeout_s: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while len(stored(db).get(device, [])) < count:
        assert asyncio.get_running_loop().time() < deadline, f"{device}: {count} intervals"
        await asyncio.sleep(0.1)


def assert_unbroken(rows: Sequence[dict[str, Any]]) -> None:
    """One interval per second with no MISSING/PARTIAL/LONG after the first."""
    ends = [datetime.fromisoformat(r["end"].replace("Z", "+00:00")) for r in rows]
    assert all(b - a == timedelta(seconds=1) for a, b in itertools.pairwise(ends)), ends
    for row in rows[1:]:
        assert row["value"] is not None, row
        assert not {"MISSING", "PARTIAL", "LONG"} & set(row["flags"].split("|")), row


@pytest.mark.integration
async def test_device_set_restarts_only_what_changed_and_shares_links(tmp_path: Path) -> None:
    # One physical meter reachable through two gateways: moving the device
    # from one to the other keeps its counter, so its series must continue.
    moved_meter = SimulatedMeter.pmc1(load_kw=3600, kwh_per_count=0.001, initial_counts=5000)
    a_meters = {1: SimulatedMeter.pmc1(load_kw=3600, kwh_per_count=0.001), 2: moved_meter}
    b_meters = {1: SimulatedMeter.pmc1(load_kw=3600, kwh_per_count=0.001), 2: moved_meter}
    db = tmp_path / "state.db"
    async with MeterServer(a_meters) as a, MeterServer(b_meters) as b:
        port_a, port_b = await a.start_tcp(), await b.start_tcp()
        first = settings(tmp_path, device_yaml("d1", port_a, 1), device_yaml("d2", port_a, 2),
                         device_yaml("d3", port_b, 1))  # fmt: skip
        store = await Store.open(db)
        recorder = Recorder(store, on_committed=lambda: None)
        clock = SystemClock()
        health: dict[str, DeviceHealth] = {}

        def on_health(device: str, h: DeviceHealth) -> None:
            health[device] = h

        def on_records(_records: Sequence[Interval]) -> None:
            pass

        context = PollerContext(
            site="lab", zone=first.zone, clock=clock, waiter=BoundaryWaiter(clock), store=store,
            recorder=recorder, topics=Topics("edged", "lab"), time_flags=TimeFlags(),
            on_health=on_health, on_records=on_records, on_peak=lambda *_: None,
            on_measurement=lambda *_: True,
        )  # fmt: skip
        try:
            async with asyncio.TaskGroup() as group:
                recorder_task = group.create_task(recorder.run())
                devices = DeviceSet(context, group)
                diff = await devices.apply(first.devices)
                assert diff.added == ("d1", "d2", "d3")
                link_a, link_b = devices.links()
                assert [link.name for link in (link_a, link_b)] == [
                    f"tcp://127.0.0.1:{port_a}",
                    f"tcp://127.0.0.1:{port_b}",
                ]
                await wait_for_intervals(db, "d2", 2)
                d2_reads_before = health["d2"].reads

                # d2 moves to gateway B (its link changes), d1 and d3 stay.
                second = settings(
                    tmp_path,
                    device_yaml("d1", port_a, 1),
                    device_yaml("d2", port_b, 2),
                    device_yaml("d3", port_b, 1),
                )
                pollers = {i: r.poller for i, r in devices._running.items()}
                diff = await devices.apply(second.devices)
                assert (diff.changed, diff.unchanged) == (("d2",), ("d1", "d3"))
                assert devices.links() == [link_a, link_b]  # both kept: still in use
                running = {i: r.poller for i, r in devices._running.items()}
                assert running["d1"] is pollers["d1"]  # untouched
                assert running["d3"] is pollers["d3"]
                assert running["d2"] is not pollers["d2"]
                assert link_a.scheduler.offline_units() == []
                assert list(link_a.scheduler._units) == [1]
                assert list(link_b.scheduler._units) == [2, 1]  # config order: d2 first
                count = len(stored(db)["d2"])
                await wait_for_intervals(db, "d2", count + 2)
                assert health["d2"].reads > d2_reads_before  # carried over, not reset

                # d1 removed: gateway A has no device left and is closed.
                third = settings(tmp_path, device_yaml("d2", port_b, 2),
                                 device_yaml("d3", port_b, 1))  # fmt: skip
                diff = await devices.apply(third.devices)
                assert diff.removed == ("d1",)
                assert devices.links() == [link_b]
                assert link_a._closed
                assert not devices.stalls(clock.now(), asyncio.get_running_loop().time())
                count = len(stored(db)["d3"])
                await wait_for_intervals(db, "d3", count + 1)
                await devices.stop()
                await recorder.close()
                await recorder_task
        finally:
            devices.close_links()
            await store.close()
    rows = stored(db)
    # Untouched by both reloads, and moved without losing a second:
    assert_unbroken(rows["d3"])
    assert_unbroken(rows["d2"])
    assert_unbroken(rows["d1"])
    assert rows["d1"][-1]["end"] < rows["d3"][-1]["end"]  # removed: it stopped
