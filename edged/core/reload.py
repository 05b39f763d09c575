"""What a config reload changes, and what it may apply without a restart (pure).

Devices (and the virtual meters over them), the status period and logging
are applied live. The site, time zone, store, MQTT connection and reference
clock are fixed for the life of the process (topics, the open database, the
broker session and the time model depend on them): a reload that changes
them applies the rest and reports these as needing a restart, rather than
half-applying them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edged.core.engine.state import ChannelState

if TYPE_CHECKING:  # only annotations: the engine loads no pydantic at run time
    from edged.config.schema import (
        Channel,
        Device,
        Settings,
    )


# Settings fields that only a restart applies.
RESTART_FIELDS = ("site", "timezone", "storage", "mqtt", "time", "sparkplug", "facade")


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceDiff:
    """Device ids by what a reload does to them (each in config order)."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()

    def as_details(self) -> dict[str, object]:
        return {
            "added": list(self.added),
            "removed": list(self.removed),
            "changed": list(self.changed),
            "unchanged": list(self.unchanged),
        }


def diff_devices(old: Sequence[Device], new: Sequence[Device]) -> DeviceDiff:
    """Compare devices by id and by their resolved settings (profiles merged,
    templates expanded), so a changed profile file counts as a change."""
    before = {d.id: d for d in old}
    after = {d.id for d in new}
    return DeviceDiff(
        added=tuple(d.id for d in new if d.id not in before),
        removed=tuple(d.id for d in old if d.id not in after),
        changed=tuple(d.id for d in new if d.id in before and before[d.id] != d),
        unchanged=tuple(d.id for d in new if d.id in before and before[d.id] == d),
    )


def restart_required(old: Settings, new: Settings) -> tuple[str, ...]:
    """The settings sections that changed but only apply at the next start."""
    return tuple(name for name in RESTART_FIELDS if getattr(old, name) != getattr(new, name))


def applied_settings(running: Settings, new: Settings) -> Settings:
    """The settings in force after a reload: `new` where it applies live."""
    return running.model_copy(
        update={
            "devices": new.devices,
            "virtual_meters": new.virtual_meters,
            "status_every": new.status_every,
            "log": new.log,
        }
    )


def _counter_source(channel: Channel) -> tuple[object, ...]:
    # What the stored counter was read from; multiplier and ratios only scale
    # the counts, so changing them keeps the counter comparable.
    return (channel.function, channel.address, channel.type, channel.word_order,
            channel.byte_order, channel.encoding, channel.scale_register)  # fmt: skip


def carried_states(
    old: Device | None, new: Device, states: Mapping[str, ChannelState]
) -> dict[str, ChannelState]:
    """The stored engine state that stays valid for `new`.

    A channel that still exists and still reads the same counter keeps its
    state, so the interval spanning the reload closes from the last stored
    counter and nothing is lost. A channel whose register changed starts
    afresh (its first interval is PARTIAL), as a new channel does; a removed
    channel's state is not used.
    """
    before = {c.name: c for c in old.channels} if old is not None else {}
    kept: dict[str, ChannelState] = {}
    for channel in new.channels:
        state = states.get(channel.name)
        if state is None:
            continue
        previous = before.get(channel.name)
        if old is None or (
            previous is not None and _counter_source(previous) == _counter_source(channel)
        ):
            kept[channel.name] = state
    return kept
