"""YAML configuration -> validated, immutable settings.

Every problem is reported with the file, the line and the key path
(`edged.yaml:17 devices[0].channels[0].multipler: unknown key`), all at once,
so an engineer fixes a file in one pass. Device profiles (`profile: pmc-1`)
are YAML files whose channels the device inherits and may override. The
models themselves are in :mod:`edged.config.schema`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edged.config import safe_yaml
from edged.config.registers import address_hint, normalise, parse_register_text
from edged.config.schema import (
    IDENT_RE,
    Settings,
    facade_problems,
)
from edged.config.sunspec import model_definition
from edged.core.engine.rules import device_problems
from edged.core.errors import EdgedError
from edged.core.plan import check_links
from edged.core.sunspec import expand as expand_sunspec
from edged.core.virtual.plan import VirtualMeterError, plan_virtual_meter

_YAML_LIMITS = safe_yaml.Limits()
# Package data, found through importlib.resources so that a wheel, a zipapp or a
# Debian package's virtualenv finds them as well as a source checkout does.
SHIPPED_PROFILES_DIR: Traversable = files("edged.config") / "profiles"
SYSTEM_PROFILES_DIR = Path("/etc/edged/profiles")


def _duplicates(items: Any, key: str) -> Iterator[tuple[int, str]]:
    """(index, name) of every list item whose `key` repeats an earlier one."""
    if not isinstance(items, list):
        return
    seen: set[str] = set()
    for i, item in enumerate(items):
        name = item.get(key) if isinstance(item, dict) else None
        if isinstance(name, str):
            if name in seen:
                yield i, name
            seen.add(name)


@dataclass(frozen=True, slots=True, kw_only=True)
class Problem:
    file: str
    line: int | None
    key_path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return (
            f"{where} {self.key_path}: {self.message}"
            if self.key_path
            else f"{where} {self.message}"
        )


class ConfigError(EdgedError):
    """Raised with every problem found; str() is the report for a human."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


KeyPath = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class _Located:
    """A YAML document as plain data plus the line of every key path."""

    file: str
    data: Any
    lines: Mapping[KeyPath, int]  # path -> 1-based line of the key (or item)


def _load_yaml(path: Path | Traversable) -> _Located:
    name = str(path)
    try:
        # Shipped profiles (package data) may not be files on disk: no stat.
        size = path.stat().st_size if isinstance(path, Path) else 0
        if size > _YAML_LIMITS.max_bytes:
            raise ConfigError(
                [
                    Problem(
                        file=name,
                        line=None,
                        key_path="",
                        message=f"file larger than {_YAML_LIMITS.max_bytes} bytes",
                    )
                ]
            )
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            [Problem(file=name, line=None, key_path="", message=f"cannot read: {exc.strerror}")]
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [Problem(file=name, line=None, key_path="", message=f"not UTF-8 text: {exc.reason}")]
        ) from None
    try:
        data, lines = safe_yaml.build(text, _YAML_LIMITS)
    except safe_yaml.YamlRefused as exc:
        raise ConfigError(
            [Problem(file=name, line=exc.line, key_path="", message=exc.message)]
        ) from None
    return _Located(name, data, lines)


def format_key_path(path: KeyPath) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


@dataclass(frozen=True, slots=True)
class _Origin:
    """Where a value in the merged document came from."""

    doc: _Located
    path: KeyPath


def _profile_dirs(config_dir: Path) -> tuple[Traversable, ...]:
    return (config_dir / "profiles", SYSTEM_PROFILES_DIR, SHIPPED_PROFILES_DIR)


def find_profile(name: str, config_dir: Path) -> Traversable | None:
    if not re.match(IDENT_RE, name):
        return None
    for directory in _profile_dirs(config_dir):
        candidate = directory / f"{name}.yaml"
        if candidate.is_file():
            return candidate
    return None


def available_profiles(config_dir: Path) -> list[str]:
    names: set[str] = set()
    for directory in _profile_dirs(config_dir):
        if directory.is_dir():
            names.update(
                p.name.removesuffix(".yaml")
                for p in directory.iterdir()
                if p.name.endswith(".yaml")
            )
    return sorted(names)


PROFILE_KEYS = frozenset(
    {
        "name",
        "description",
        "channels",
        "interval",
        # register-map keys a device inherits from its profile (and may override)
        "ct_ratio",
        "vt_ratio",
        "max_gap",
        "status",
        "clock",
        "clock_tolerance",
        "measurements",
        "channel_count",
        "channel_template",
        # what a site must state itself (reported by check-config when it does not)
        "site_must_set",
        # SunSpec points by name, placed from the model definitions (profile: sunspec)
        "sunspec",
    }
)
# Profile keys copied onto the device as they are (the device's own value wins).
_INHERITED_KEYS = ("interval", "ct_ratio", "vt_ratio", "max_gap", "status", "clock",
                   "clock_tolerance", "channel_count")  # fmt: skip


def _expand_template(
    source: _Located,
    source_path: KeyPath,
    template: Any,
    count: Any,
    problems: list[Problem],
) -> list[tuple[Any, KeyPath]]:
    """`channel_template` x `channel_count` -> channels 1..N, each with its origin.

    The template is a channel whose `name` contains `{n}` (any str.format spec,
    e.g. `branch{n:02d}`), whose `register` is channel 1's, and whose `stride`
    is the register distance from one channel to the next (`scale_stride`
    likewise for a per-channel `scale_register`). A branch-circuit
    monitor configured for 42 or 84 circuits is then one profile.
    """
    where = (*source_path, "channel_template")
    if not isinstance(template, dict):
        problems.append(_problem(source, where, "must be a mapping (a channel with {n})"))
        return []
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 1024:
        problems.append(
            _problem(source, where, "needs channel_count: a whole number of channels, 1..1024")
        )
        return []
    limit = template.get("max_count")
    if isinstance(limit, int) and isinstance(count, int) and count > limit:
        why = f" ({template['why']})" if "why" in template else ""
        message = f"channel_count {count} is more than the {limit} channels this map has per "
        problems.append(_problem(source, where, f"{message}unit id{why}"))
        return []
    body = {k: v for k, v in template.items()
            if k not in ("stride", "scale_stride", "max_count", "why")}  # fmt: skip
    try:
        body = normalise(body)  # `register: "4x1168"` / `register_number` in a template
    except ValueError as exc:
        problems.append(_problem(source, (*where, "register"), str(exc)))
        return []
    body.pop("register_number", None)
    name, register, stride = body.get("name"), body.get("register"), template.get("stride", 2)
    # A per-channel scale register (BCPM: one power-of-ten register per circuit)
    # moves by `scale_stride`; 0 (the default) shares one register (SunSpec style).
    scale, scale_stride = body.get("scale_register"), template.get("scale_stride", 0)
    if isinstance(scale, str):
        try:
            scale = parse_register_text(scale)[0]
        except ValueError as exc:
            problems.append(_problem(source, (*where, "scale_register"), str(exc)))
            return []
    if scale is not None and (
        not isinstance(scale, int) or not isinstance(scale_stride, int) or scale_stride < 0
    ):
        problems.append(
            _problem(
                source,
                where,
                "scale_register (channel 1) and scale_stride (>= 0) must be "
                "whole numbers in a template",
            )
        )
        return []
    if not isinstance(name, str) or "{n" not in name:
        problems.append(_problem(source, (*where, "name"), "must contain {n}, e.g. ch{n}_kwh"))
        return []
    if not isinstance(register, int) or not isinstance(stride, int) or stride < 1:
        problems.append(
            _problem(source, where, "register (channel 1) and stride (>= 1) must be integers")
        )
        return []
    expanded: list[tuple[Any, KeyPath]] = []
    for n in range(1, count + 1):
        try:
            channel_name = name.format(n=n)
        except (ValueError, KeyError, IndexError) as exc:
            problems.append(_problem(source, (*where, "name"), f"cannot format: {exc}"))
            return []
        channel = {**body, "name": channel_name, "register": register + (n - 1) * stride}
        if isinstance(scale, int):
            channel["scale_register"] = scale + (n - 1) * scale_stride
        expanded.append((channel, where))
    return expanded


def _override(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """A profile entry with a device's keys on top; `register` and `register_number`
    say the same thing, so giving one replaces the other."""
    kept = dict(base)
    if "register_number" in override:
        kept.pop("register", None)
    if "register" in override:
        kept.pop("register_number", None)
    return {**kept, **override}


def _merge_points(base: list[Any], overrides: Any) -> list[Any]:
    """Named entries of `overrides` update the base entry of that name; others are added."""
    merged = list(base)
    index = {e["name"]: i for i, e in enumerate(merged) if isinstance(e, dict) and "name" in e}
    for entry in overrides if isinstance(overrides, list) else []:
        target = index.get(entry.get("name")) if isinstance(entry, dict) else None
        if target is not None and isinstance(merged[target], dict):
            merged[target] = _override(merged[target], entry)
        else:
            merged.append(entry)
    return merged


def _merge_profile(
    device: dict[str, Any],
    device_path: KeyPath,
    doc: _Located,
    config_dir: Path,
    origins: dict[KeyPath, _Origin],
    problems: list[Problem],
    warnings: list[Problem] | None = None,
) -> dict[str, Any]:
    """Device entries override the profile's; channels are merged by name."""
    name = device.get("profile")
    if not isinstance(name, str):
        problems.append(_problem(doc, (*device_path, "profile"), "must be a profile name"))
        return device
    profile_path = find_profile(name, config_dir)
    if profile_path is None:
        known = ", ".join(available_profiles(config_dir)) or "none found"
        problems.append(
            _problem(doc, (*device_path, "profile"), f"unknown profile {name!r} (known: {known})")
        )
        return device
    try:
        profile = _load_yaml(profile_path)
    except ConfigError as exc:
        problems.extend(exc.problems)
        return device
    if not isinstance(profile.data, dict):
        problems.append(
            Problem(file=profile.file, line=1, key_path="", message="a profile must be a mapping")
        )
        return device
    for key in profile.data:
        if key not in PROFILE_KEYS:
            problems.append(_problem(profile, (key,), "unknown key in profile"))
    merged: dict[str, Any] = {}
    for key in _INHERITED_KEYS:
        if key in profile.data:
            merged[key] = profile.data[key]
            origins[(*device_path, key)] = _Origin(profile, (key,))
    profile_channels = profile.data.get("channels", [])
    channels: list[Any] = []
    by_name: dict[str, int] = {}
    sources: list[tuple[Any, KeyPath]] = []
    if isinstance(profile_channels, list):
        sources = [(channel, ("channels", i)) for i, channel in enumerate(profile_channels)]
    if "channel_template" in profile.data:
        count = device.get("channel_count", profile.data.get("channel_count"))
        sources += _expand_template(profile, (), profile.data["channel_template"], count, problems)
    sunspec_points: list[Any] = []
    if "sunspec" in profile.data:
        try:
            sunspec_channels, sunspec_points, discovery = expand_sunspec(
                profile.data["sunspec"], model_definition
            )
        except ValueError as exc:
            problems.append(_problem(profile, ("sunspec",), str(exc)))
        else:
            sources += [(c, ("sunspec", "channels", i)) for i, c in enumerate(sunspec_channels)]
            merged["sunspec"] = discovery
            origins[(*device_path, "sunspec")] = _Origin(profile, ("sunspec",))
    for channel, source_path in sources:
        origins[(*device_path, "channels", len(channels))] = _Origin(profile, source_path)
        if isinstance(channel, dict) and isinstance(channel.get("name"), str):
            by_name[channel["name"]] = len(channels)
        channels.append(channel)
    measurements = profile.data.get("measurements")
    if sunspec_points:
        base = measurements if isinstance(measurements, dict) else {}
        measurements = {**base, "points": [*(base.get("points") or []), *sunspec_points]}
    if isinstance(measurements, dict):
        own = device.get("measurements")
        if isinstance(own, dict):
            points = _merge_points(list(measurements.get("points") or []), own.get("points"))
            measurements = {**measurements, **own, "points": points}
        merged["measurements"] = measurements
        origins[(*device_path, "measurements")] = _Origin(profile, ("measurements",))
    for i, override in enumerate(device.get("channels", []) or []):
        target = None
        if isinstance(override, dict) and isinstance(override.get("name"), str):
            target = by_name.get(override["name"])
        if target is not None and isinstance(channels[target], dict):
            channels[target] = _override(channels[target], override)
            # Keys the device overrides point at the device file; the rest at the profile.
            for key in override:
                origins[(*device_path, "channels", target, key)] = _Origin(
                    doc, (*device_path, "channels", i, key)
                )
        else:
            origins[(*device_path, "channels", len(channels))] = _Origin(
                doc, (*device_path, "channels", i)
            )
            channels.append(override)
    if warnings is not None:
        warnings.extend(_site_must_set(profile, device, device_path, doc))
    merged.update({k: v for k, v in device.items() if k not in ("channels", "measurements")})
    merged["channels"] = channels
    if "measurements" in device and "measurements" not in merged:
        merged["measurements"] = device["measurements"]
    return merged


def _site_must_set(
    profile: _Located, device: dict[str, Any], device_path: KeyPath, doc: _Located
) -> Iterator[Problem]:
    """Warnings for a profile's `site_must_set` entries the device does not state.

    An entry is `{key: channels.NAME.KEY | KEY, why: TEXT}`: a value the profile
    can only guess (the PMC-1 pulse value is programmed per site), so a device
    relying on the profile's guess is told so at its own line."""
    entries = profile.data.get("site_must_set")
    if not isinstance(entries, list):
        return
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
            yield _problem(profile, ("site_must_set",), "entries are {key: ..., why: ...}")
            continue
        parts = entry["key"].split(".")
        stated = False
        if len(parts) == 3 and parts[0] == "channels":
            for channel in device.get("channels") or []:
                if isinstance(channel, dict) and channel.get("name") == parts[1]:
                    stated = parts[2] in channel
            if parts[2] == "register":  # a register copied from a list counts too
                stated = stated or any(
                    isinstance(c, dict) and c.get("name") == parts[1] and "register_number" in c
                    for c in device.get("channels") or []
                )
        elif len(parts) == 1:
            stated = parts[0] in device
        if not stated:
            why = entry.get("why", "")
            yield _problem(
                doc,
                device_path,
                f"profile {profile.data.get('name', '?')} only assumes {entry['key']}; "
                f"state it for this device{': ' + why if why else ''}",
            )


def _address_hints(data: dict[str, Any]) -> Iterator[tuple[KeyPath, str]]:
    """Plain addresses that look like 4xxxx/3xxxx register numbers (merged data)."""
    devices = data.get("devices")
    for i, device in enumerate(devices if isinstance(devices, list) else []):
        if not isinstance(device, dict):
            continue
        maps: list[tuple[KeyPath, Any]] = []
        for j, channel in enumerate(device.get("channels") or []):
            maps.append((("devices", i, "channels", j), channel))
        measurements = device.get("measurements")
        if isinstance(measurements, dict):
            for k, point in enumerate(measurements.get("points") or []):
                maps.append((("devices", i, "measurements", "points", k), point))
        status = device.get("status")
        for k, word in enumerate(status if isinstance(status, list) else [status]):
            maps.append((("devices", i, "status", k) if isinstance(status, list)
                         else ("devices", i, "status"), word))  # fmt: skip
        maps.append((("devices", i, "clock"), device.get("clock")))
        for path, entry in maps:
            if not isinstance(entry, dict):
                continue
            yield from _hint(entry, (*path, "register"))
            scale = entry.get("scale_register")
            if isinstance(scale, dict):
                yield from _hint(scale, (*path, "scale_register", "register"))
            elif scale is not None:
                yield from _hint({"register": scale}, (*path, "scale_register"))


def _hint(register_map: dict[str, Any], key_path: KeyPath) -> Iterator[tuple[KeyPath, str]]:
    address = register_map.get("register")
    # Only a plain number: "4x0091" and register_number were converted on purpose.
    if isinstance(address, int) and not isinstance(address, bool):
        hint = address_hint(address, str(register_map.get("function", "holding")))
        if hint is not None:
            yield key_path, hint


def _device_template(
    device: dict[str, Any],
    device_path: KeyPath,
    doc: _Located,
    origins: dict[KeyPath, _Origin],
    problems: list[Problem],
) -> dict[str, Any]:
    """A device's own `channel_template` (no profile): expanded after its channels."""
    device = dict(device)
    template = device.pop("channel_template")
    channels = list(device.get("channels") or [])
    for channel, source_path in _expand_template(
        doc, device_path, template, device.get("channel_count"), problems
    ):
        origins[(*device_path, "channels", len(channels))] = _Origin(doc, source_path)
        channels.append(channel)
    device["channels"] = channels
    return device


def _problem(doc: _Located, path: KeyPath, message: str) -> Problem:
    return Problem(
        file=doc.file, line=_line_of(doc, path), key_path=format_key_path(path), message=message
    )


def _line_of(doc: _Located, path: KeyPath) -> int | None:
    # A missing key has no line of its own; name the nearest enclosing one.
    for end in range(len(path), -1, -1):
        line = doc.lines.get(path[:end])
        if line is not None:
            return line
    return None


def _located(
    path: KeyPath, doc: _Located, origins: Mapping[KeyPath, _Origin], message: str
) -> Problem:
    """A problem at a key path of the merged document, placed at the file and
    line it came from (the site config or a profile)."""
    key_path = format_key_path(path)
    for end in range(len(path), 0, -1):
        origin = origins.get(path[:end])
        if origin is not None:
            line = _line_of(origin.doc, origin.path + path[end:])
            return Problem(file=origin.doc.file, line=line, key_path=key_path, message=message)
    return Problem(file=doc.file, line=_line_of(doc, path), key_path=key_path, message=message)


def _pydantic_problems(
    exc: ValidationError,
    doc: _Located,
    origins: Mapping[KeyPath, _Origin],
    unloaded_profiles: set[int],
) -> Iterator[Problem]:
    for error in exc.errors(include_url=False):
        if _is_consequential(error, unloaded_profiles):
            continue
        # Discriminated unions and `after` validators add non-key parts to loc.
        path: KeyPath = tuple(
            part for part in error["loc"] if isinstance(part, int) or not _is_tag(part, error)
        )
        yield _located(path, doc, origins, _message(error))


def _is_consequential(error: Any, unloaded_profiles: set[int]) -> bool:
    """Errors that only repeat a problem already reported in clearer words."""
    loc = error["loc"]
    if error["type"] == "too_short" and isinstance(error.get("input"), list | tuple):
        # pydantic counts only the items that validated; an item's own error says more.
        return bool(error["input"])
    return (
        error["type"] == "missing"
        and len(loc) == 3
        and loc[0] == "devices"
        and loc[1] in unloaded_profiles
        and loc[2] == "channels"
    )


def _is_tag(part: str, error: Any) -> bool:
    return part in {"tcp", "rtu", "rtu_over_tcp"} and error["type"] != "extra_forbidden"


def _message(error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    message = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    if kind == "too_short":
        return "must list at least one entry"
    if kind == "union_tag_invalid":
        return f"unknown type {error['input'].get('type')!r} (expected tcp, rtu or rtu_over_tcp)"
    return message


def load_settings(path: Path | str) -> Settings:
    """Read, merge profiles and validate; raises ConfigError listing every problem."""
    return load_settings_with_warnings(path)[0]


def load_settings_with_warnings(path: Path | str) -> tuple[Settings, tuple[Problem, ...]]:
    """:func:`load_settings`, plus the warnings check-config prints: values that
    are valid but probably wrong (an address that looks like a 4xxxx register
    number, a value the profile only assumes, a rollover below the register's
    range, a device without a rating), each with its file:line.

    Nothing but a ConfigError escapes: a failure this module did not foresee
    is reported as one too, so neither check-config nor a reload can die of a
    file's contents."""
    try:
        return _load_settings(Path(path))
    except ConfigError:
        raise
    except (Exception, RecursionError) as exc:
        problem = Problem(
            file=str(path),
            line=None,
            key_path="",
            message=f"cannot load: {type(exc).__name__}: {exc}",
        )
        raise ConfigError([problem]) from exc


def _load_settings(config_path: Path) -> tuple[Settings, tuple[Problem, ...]]:
    warnings: list[Problem] = []
    doc = _load_yaml(config_path)
    if not isinstance(doc.data, dict):
        raise ConfigError(
            [Problem(file=doc.file, line=1, key_path="", message="the file must be a YAML mapping")]
        )
    problems: list[Problem] = []
    origins: dict[KeyPath, _Origin] = {}
    unloaded_profiles: set[int] = set()
    data = dict(doc.data)
    devices = data.get("devices")
    if isinstance(devices, list):
        merged_devices = []
        for i, device in enumerate(devices):
            if isinstance(device, dict) and "profile" in device:
                before = len(problems)
                device = _merge_profile(
                    device, ("devices", i), doc, config_path.parent, origins, problems, warnings
                )
                if len(problems) > before:
                    unloaded_profiles.add(i)
            if isinstance(device, dict) and "channel_template" in device:
                device = _device_template(device, ("devices", i), doc, origins, problems)
            merged_devices.append(device)
        data["devices"] = merged_devices
        # Checked here rather than in the models so the message names the key.
        for i, name in _duplicates(merged_devices, "id"):
            problems.append(_problem(doc, ("devices", i, "id"), f"duplicate device id {name!r}"))
        for i, device in enumerate(merged_devices):
            channels = device.get("channels") if isinstance(device, dict) else None
            for j, name in _duplicates(channels, "name"):
                key: KeyPath = ("devices", i, "channels", j, "name")
                problems.append(_located(key, doc, origins, f"duplicate channel name {name!r}"))
            measurements = device.get("measurements") if isinstance(device, dict) else None
            points = measurements.get("points") if isinstance(measurements, dict) else None
            for j, name in _duplicates(points, "name"):
                key = ("devices", i, "measurements", "points", j, "name")
                message = f"duplicate measurement point name {name!r}"
                problems.append(_located(key, doc, origins, message))
        problems.extend(_virtual_meter_ids(doc, data.get("virtual_meters"), merged_devices))
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        problems.extend(_pydantic_problems(exc, doc, origins, unloaded_profiles))
        settings = None
    if settings is not None:
        problems.extend(_cross_checks(settings, doc))
    if problems or settings is None:
        raise ConfigError(sorted(set(problems), key=_problem_sort_key))
    warnings.extend(
        _located(key_path, doc, origins, hint) for key_path, hint in _address_hints(data)
    )
    warnings.extend(_warnings(settings, doc))
    return settings, tuple(sorted(set(warnings), key=lambda w: (*_problem_sort_key(w), w.message)))


def _warnings(settings: Settings, doc: _Located) -> list[Problem]:
    warnings: list[Problem] = []
    for i, device in enumerate(settings.devices):
        unlimited = [
            c.name
            for c in device.channels
            if c.plausible_demand is None
            and c.rollover_counts is not None
            and c.demand_unit is not None
        ]
        if unlimited:
            warnings.append(
                _problem(doc, ("devices", i),
                         f"device {device.id}: no rated_power_kva, meter_rating or "
                         f"max_demand for {', '.join(unlimited)}: a counter step is judged only "
                         "by half the counter's range per interval, which lets a garbled read "
                         "through as energy; give the device its rating")
            )  # fmt: skip
        for j, channel in enumerate(device.channels):
            full = channel.register_range
            if channel.rollover is not None and full is not None and channel.rollover < full:
                warnings.append(
                    _problem(doc, ("devices", i, "channels", j, "rollover"),
                             f"rollover {channel.rollover} is below the {channel.type} "
                             f"register's range ({full}); right only for a meter whose counter "
                             f"wraps at {channel.rollover - 1}")
                )  # fmt: skip
    return warnings


def _virtual_meter_ids(doc: _Located, meters: Any, devices: list[Any]) -> list[Problem]:
    """A virtual meter's id must not repeat another's or a device's: its
    records would carry the same ids as the device's, with other values."""
    problems: list[Problem] = []
    for i, name in _duplicates(meters, "id"):
        problems.append(
            _problem(doc, ("virtual_meters", i, "id"), f"duplicate virtual meter id {name!r}")
        )
    device_ids = {d.get("id") for d in devices if isinstance(d, dict)}
    for i, meter in enumerate(meters if isinstance(meters, list) else []):
        meter_id = meter.get("id") if isinstance(meter, dict) else None
        if isinstance(meter_id, str) and meter_id in device_ids:
            problems.append(
                _problem(doc, ("virtual_meters", i, "id"),
                         f"virtual meter id {meter_id!r} is also a device id")
            )  # fmt: skip
        channels = meter.get("channels") if isinstance(meter, dict) else None
        for j, channel in _duplicates(channels, "name"):
            problems.append(
                _problem(doc, ("virtual_meters", i, "channels", j, "name"),
                         f"duplicate channel name {channel!r}")
            )  # fmt: skip
    return problems


def _cross_checks(settings: Settings, doc: _Located) -> list[Problem]:
    """Checks that span devices or need the engine's rules, after validation."""
    problems: list[Problem] = []
    for i, device in enumerate(settings.devices):
        for message in device_problems(device):
            problems.append(_problem(doc, ("devices", i), message))
    for message in check_links(settings.devices):
        problems.append(_problem(doc, ("devices",), message))
    for i, meter in enumerate(settings.virtual_meters):
        try:
            plan_virtual_meter(meter, settings.devices)
        except VirtualMeterError as exc:
            problems.append(_problem(doc, ("virtual_meters", i), str(exc)))
    for path, message in facade_problems(settings.facade, settings.devices):
        problems.append(_problem(doc, ("facade", *path), message))
    sparkplug = settings.sparkplug
    if sparkplug.enabled and sparkplug.client_id and sparkplug.client_id == settings.mqtt.client_id:
        # Two sessions under one id throw each other off the broker, forever.
        problems.append(
            _problem(doc, ("sparkplug", "client_id"), "must differ from mqtt.client_id")
        )
    if not sparkplug.json_data and not sparkplug.enabled:
        # The data would go out nowhere.
        problems.append(
            _problem(doc, ("sparkplug", "json_data"), "false needs sparkplug.enabled: true")
        )
    return problems


def _problem_sort_key(problem: Problem) -> tuple[str, int, str]:
    return (problem.file, problem.line or 0, problem.key_path)


def config_hash(path: Path | str) -> str:
    """Short digest of the config file, published in the gateway status."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
