"""Timed simulator scenarios: parsing and timing, nothing else.

A scenario is a YAML list of actions, each at a time relative to simulator
start::

    - at: 12s          # 500ms, 10s, 2m, 1h, or a bare number of seconds
      unit: 1          # Modbus unit id; omit to apply to every unit
      action: silent
      for: 15s         # fault window; omit to keep the fault until `clear`
    - {at: 30s, unit: 1, action: jump_to, value: 4294967000}
    - {at: 40s, unit: 1, action: exception, code: 4, for: 5s}
    - {at: 50s, unit: 1, action: status_bits, value: 1}

Actions and their keys (besides at/unit/action):

=============  =====================================================
silent         for
garbage        for
truncated      for
offline        for
delay          delay (required, duration), for
exception      code (default 4), for
split          pieces (default 3), pause (duration, default 20ms), for
clear          fault (one of the fault names above; default: all)
reset          value (counts, default 0), point (counter name; default all)
jump_to        value (counts, required), point
load           value (kW, required), point
status_bits    value (0..65535, required)
clock_offset   value (seconds, signed; number or duration like -2m)
dead_battery   value (epoch seconds the meter clock restarts from;
               default 946684800 = 2000-01-01T00:00:00Z)
=============  =====================================================

This module is pure: :func:`due_actions` takes elapsed seconds as an
argument, so timing is tested without sleeping. ``edged.sim.meter`` runs
the actions.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from edged.sim.faults import Fault, FaultKind

# Many meters restart their clock at 2000-01-01 after losing the battery.
DEFAULT_DEAD_BATTERY_EPOCH_S = 946_684_800


class ScenarioError(ValueError):
    """A scenario file or flag that cannot be used; the message says where."""


class ActionKind(StrEnum):
    SILENT = "silent"
    DELAY = "delay"
    EXCEPTION = "exception"
    GARBAGE = "garbage"
    TRUNCATED = "truncated"
    SPLIT = "split"
    OFFLINE = "offline"
    CLEAR = "clear"
    RESET = "reset"
    JUMP_TO = "jump_to"
    LOAD = "load"
    STATUS_BITS = "status_bits"
    CLOCK_OFFSET = "clock_offset"
    DEAD_BATTERY = "dead_battery"

    @property
    def fault_kind(self) -> FaultKind | None:
        try:
            return FaultKind(self.value)
        except ValueError:
            return None


@dataclass(frozen=True, kw_only=True)
class Action:
    at_s: float
    kind: ActionKind
    unit: int | None = None  # None: every unit of the server
    for_s: float | None = None  # fault window; None: until cleared
    fault: Fault | None = None  # set for the fault actions
    clear: FaultKind | None = None  # CLEAR: which fault; None: all
    value: float | None = None  # counts, kW, bits, seconds or epoch (see table)
    point: str | None = None  # counter point name; None: all counters
    source: str = ""  # "file.yaml:12", for messages


_COMMON_KEYS = frozenset({"at", "unit", "action"})
_KEYS: dict[ActionKind, frozenset[str]] = {
    ActionKind.SILENT: frozenset({"for"}),
    ActionKind.GARBAGE: frozenset({"for"}),
    ActionKind.TRUNCATED: frozenset({"for"}),
    ActionKind.OFFLINE: frozenset({"for"}),
    ActionKind.DELAY: frozenset({"for", "delay"}),
    ActionKind.EXCEPTION: frozenset({"for", "code"}),
    ActionKind.SPLIT: frozenset({"for", "pieces", "pause"}),
    ActionKind.CLEAR: frozenset({"fault"}),
    ActionKind.RESET: frozenset({"value", "point"}),
    ActionKind.JUMP_TO: frozenset({"value", "point"}),
    ActionKind.LOAD: frozenset({"value", "point"}),
    ActionKind.STATUS_BITS: frozenset({"value"}),
    ActionKind.CLOCK_OFFSET: frozenset({"value"}),
    ActionKind.DEAD_BATTERY: frozenset({"value"}),
}
_REQUIRED: dict[ActionKind, frozenset[str]] = {
    ActionKind.DELAY: frozenset({"delay"}),
    ActionKind.JUMP_TO: frozenset({"value"}),
    ActionKind.LOAD: frozenset({"value"}),
    ActionKind.STATUS_BITS: frozenset({"value"}),
    ActionKind.CLOCK_OFFSET: frozenset({"value"}),
}

_DURATION = re.compile(r"^([+-]?)(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(raw: object, *, signed: bool = False) -> float:
    """``500ms`` -> 0.5, ``10s`` -> 10, ``2m`` -> 120, ``1h`` -> 3600, ``7`` -> 7."""
    if isinstance(raw, bool):
        raise ValueError(f"expected a duration like 500ms, 10s or 2m, got {raw!r}")
    if isinstance(raw, int | float):
        seconds = float(raw)
    elif isinstance(raw, str) and (match := _DURATION.match(raw.strip())):
        sign, number, unit = match.groups()
        seconds = float(number) * _UNIT_S[unit] * (-1.0 if sign == "-" else 1.0)
    else:
        raise ValueError(f"expected a duration like 500ms, 10s or 2m, got {raw!r}")
    if not math.isfinite(seconds):
        raise ValueError(f"duration {raw!r} is not finite")
    if seconds < 0 and not signed:
        raise ValueError(f"duration {raw!r} must not be negative")
    return seconds


def _integer(raw: object, lo: int, hi: int | None = None) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise ValueError(f"expected an integer, got {raw!r}")
    if raw < lo or (hi is not None and raw > hi):
        upper = "" if hi is None else f"..{hi}"
        raise ValueError(f"{raw} is out of range {lo}{upper}")
    return raw


def _number(raw: object) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        raise ValueError(f"expected a number, got {raw!r}")
    return float(raw)


def parse_action(item: Mapping[str, Any], source: str = "") -> Action:
    """Validate one scenario item; ScenarioError names ``source`` and the key."""
    where = f"{source}: " if source else ""
    if not isinstance(item, Mapping):
        raise ScenarioError(f"{where}expected a mapping with at/unit/action, got {item!r}")
    keys = {str(k) for k in item}
    for key in ("at", "action"):
        if key not in keys:
            raise ScenarioError(f"{where}missing key {key!r}")
    raw_kind = item["action"]
    try:
        kind = ActionKind(raw_kind)
    except ValueError:
        names = ", ".join(k.value for k in ActionKind)
        raise ScenarioError(f"{where}unknown action {raw_kind!r} (one of: {names})") from None
    allowed = _COMMON_KEYS | _KEYS[kind]
    if unknown := sorted(keys - allowed):
        raise ScenarioError(
            f"{where}key {unknown[0]!r} is not allowed for action {kind.value!r} "
            f"(allowed: {', '.join(sorted(allowed))})"
        )
    if missing := sorted(_REQUIRED.get(kind, frozenset()) - keys):
        raise ScenarioError(f"{where}action {kind.value!r} needs key {missing[0]!r}")

    def field(key: str, convert: Any) -> Any:
        try:
            return convert(item[key])
        except ValueError as exc:
            raise ScenarioError(f"{where}key {key!r}: {exc}") from None

    at_s = field("at", parse_duration)
    unit = field("unit", lambda v: _integer(v, 0, 255)) if "unit" in item else None
    for_s = field("for", parse_duration) if "for" in item else None
    if for_s is not None and for_s <= 0:
        raise ScenarioError(f"{where}key 'for': the window must be longer than 0")

    fault: Fault | None = None
    clear: FaultKind | None = None
    value: float | None = None
    point = field("point", _point_name) if "point" in item else None
    if (fault_kind := kind.fault_kind) is not None:
        try:
            fault = Fault(
                kind=fault_kind,
                delay_s=field("delay", parse_duration) if "delay" in item else 0.0,
                code=field("code", lambda v: _integer(v, 1, 255)) if "code" in item else 4,
                pieces=field("pieces", lambda v: _integer(v, 2, 64)) if "pieces" in item else 3,
                pause_s=field("pause", parse_duration) if "pause" in item else 0.02,
            )
        except ValueError as exc:
            raise ScenarioError(f"{where}{exc}") from None
    elif kind is ActionKind.CLEAR:
        if "fault" in item:
            clear = field("fault", FaultKind)
    elif kind in (ActionKind.RESET, ActionKind.JUMP_TO):
        value = float(field("value", lambda v: _integer(v, 0))) if "value" in item else 0.0
    elif kind is ActionKind.LOAD:
        value = field("value", _number)
    elif kind is ActionKind.STATUS_BITS:
        value = float(field("value", lambda v: _integer(v, 0, 0xFFFF)))
    elif kind is ActionKind.CLOCK_OFFSET:
        value = field("value", lambda v: parse_duration(v, signed=True))
    elif kind is ActionKind.DEAD_BATTERY:
        value = (
            float(field("value", lambda v: _integer(v, 0, 0xFFFFFFFF)))
            if "value" in item
            else float(DEFAULT_DEAD_BATTERY_EPOCH_S)
        )
    return Action(
        at_s=at_s,
        kind=kind,
        unit=unit,
        for_s=for_s,
        fault=fault,
        clear=clear,
        value=value,
        point=point,
        source=source,
    )


def _point_name(raw: object) -> str:
    if not isinstance(raw, str) or not raw:
        raise ValueError(f"expected a point name, got {raw!r}")
    return raw


def parse_scenario(text: str, source: str = "<scenario>") -> tuple[Action, ...]:
    """Parse scenario YAML; actions come back ordered by time (file order on ties)."""
    try:
        data = yaml.safe_load(text)
        # Composed again only for line numbers: error messages point at the item.
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{source}: not valid YAML: {exc}") from None
    if data is None:
        return ()
    if not isinstance(data, list) or not isinstance(root, yaml.SequenceNode):
        raise ScenarioError(f"{source}: a scenario is a list of actions")
    actions = []
    for index, (item, node) in enumerate(zip(data, root.value, strict=True)):
        where = f"{source}:{node.start_mark.line + 1}: item {index + 1}"
        actions.append(parse_action(item, where))
    return order_actions(actions)


def load_scenario(path: str | Path) -> tuple[Action, ...]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read scenario: {exc.strerror}") from None
    return parse_scenario(text, str(path))


def parse_action_flag(spec: str) -> Action:
    """The CLI form of one item: ``at=12s,unit=1,action=silent,for=15s``."""
    item: dict[str, Any] = {}
    for part in spec.split(","):
        key, sep, raw = part.partition("=")
        if not sep or not key.strip():
            raise ScenarioError(f"--action {spec!r}: expected key=value, got {part!r}")
        # Scalars go through YAML so `unit=1` is an int exactly as in a file.
        try:
            item[key.strip()] = yaml.safe_load(raw.strip())
        except yaml.YAMLError:
            item[key.strip()] = raw.strip()
    return parse_action(item, f"--action {spec!r}")


def order_actions(actions: Iterable[Action]) -> tuple[Action, ...]:
    return tuple(sorted(actions, key=lambda a: a.at_s))  # sorted() is stable


def due_actions(actions: Sequence[Action], after_s: float, until_s: float) -> tuple[Action, ...]:
    """Actions with ``after_s < at_s <= until_s``, in time order.

    ``actions`` must be ordered (as :func:`parse_scenario` returns them). A
    runner calls this with the previous and the current elapsed time, so every
    action fires exactly once however irregular the calls.
    """
    times = [a.at_s for a in actions]
    return tuple(actions[bisect.bisect_right(times, after_s) : bisect.bisect_right(times, until_s)])


def next_due_s(actions: Sequence[Action], after_s: float) -> float | None:
    """Time of the first action after ``after_s``; None when the scenario is over."""
    times = [a.at_s for a in actions]
    index = bisect.bisect_right(times, after_s)
    return times[index] if index < len(times) else None
