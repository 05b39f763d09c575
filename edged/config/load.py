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
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edged.config import safe_yaml
from edged.config.schema import (
    IDENT_RE,
    Settings,
)
from edged.core.engine.intervals import device_problems
from edged.core.plan import check_links
from edged.core.virtual.plan import VirtualMeterError, plan_virtual_meter

_YAML_LIMITS = safe_yaml.Limits()
SHIPPED_PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
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


@dataclass(frozen=True, slots=True)
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


class ConfigError(Exception):
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


def _load_yaml(path: Path) -> _Located:
    name = str(path)
    try:
        size = path.stat().st_size
        if size > _YAML_LIMITS.max_bytes:
            raise ConfigError(
                [Problem(name, None, "", f"file larger than {_YAML_LIMITS.max_bytes} bytes")]
            )
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem(name, None, "", f"cannot read: {exc.strerror}")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([Problem(name, None, "", f"not UTF-8 text: {exc.reason}")]) from None
    try:
        data, lines = safe_yaml.build(text, _YAML_LIMITS)
    except safe_yaml.YamlRefused as exc:
        raise ConfigError([Problem(name, exc.line, "", exc.message)]) from None
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


def find_profile(name: str, config_dir: Path) -> Path | None:
    if not re.match(IDENT_RE, name):
        return None
    for directory in (config_dir / "profiles", SYSTEM_PROFILES_DIR, SHIPPED_PROFILES_DIR):
        candidate = directory / f"{name}.yaml"
        if candidate.is_file():
            return candidate
    return None


def available_profiles(config_dir: Path) -> list[str]:
    names: set[str] = set()
    for directory in (config_dir / "profiles", SYSTEM_PROFILES_DIR, SHIPPED_PROFILES_DIR):
        if directory.is_dir():
            names.update(p.stem for p in directory.glob("*.yaml"))
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
    is the register distance from one channel to the next. A branch-circuit
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
    body = {k: v for k, v in template.items() if k != "stride"}
    name, register, stride = body.get("name"), body.get("register"), template.get("stride", 2)
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
        expanded.append(({**body, "name": channel_name, "register": register + (n - 1) * stride},
                         where))  # fmt: skip
    return expanded


def _merge_points(base: list[Any], overrides: Any) -> list[Any]:
    """Named entries of `overrides` update the base entry of that name; others are added."""
    merged = list(base)
    index = {e["name"]: i for i, e in enumerate(merged) if isinstance(e, dict) and "name" in e}
    for entry in overrides if isinstance(overrides, list) else []:
        target = index.get(entry.get("name")) if isinstance(entry, dict) else None
        if target is not None and isinstance(merged[target], dict):
            merged[target] = {**merged[target], **entry}
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
        problems.append(Problem(profile.file, 1, "", "a profile must be a mapping"))
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
    for channel, source_path in sources:
        origins[(*device_path, "channels", len(channels))] = _Origin(profile, source_path)
        if isinstance(channel, dict) and isinstance(channel.get("name"), str):
            by_name[channel["name"]] = len(channels)
        channels.append(channel)
    measurements = profile.data.get("measurements")
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
            channels[target] = {**channels[target], **override}
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
    merged.update({k: v for k, v in device.items() if k not in ("channels", "measurements")})
    merged["channels"] = channels
    if "measurements" in device and "measurements" not in merged:
        merged["measurements"] = device["measurements"]
    return merged


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
    return Problem(doc.file, _line_of(doc, path), format_key_path(path), message)


def _line_of(doc: _Located, path: KeyPath) -> int | None:
    # A missing key has no line of its own; name the nearest enclosing one.
    for end in range(len(path), -1, -1):
        line = doc.lines.get(path[:end])
        if line is not None:
            return line
    return None


def _locate(path: KeyPath, doc: _Located, origins: Mapping[KeyPath, _Origin]) -> Problem:
    """Map a key path of the merged document back to its file and line."""
    for end in range(len(path), 0, -1):
        origin = origins.get(path[:end])
        if origin is not None:
            source_path = origin.path + path[end:]
            return Problem(origin.doc.file, _line_of(origin.doc, source_path), "", "")
    return Problem(doc.file, _line_of(doc, path), "", "")


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
        message = _message(error)
        where = _locate(path, doc, origins)
        yield Problem(where.file, where.line, format_key_path(path), message)


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
    """Read, merge profiles and validate; raises ConfigError listing every problem.

    Nothing else escapes: a failure this module did not foresee is reported
    as a ConfigError too, so neither check-config nor a reload can die of a
    file's contents."""
    return load_settings_with_warnings(path)[0]


def load_settings_with_warnings(path: Path | str) -> tuple[Settings, list[Problem]]:
    """`load_settings`, and the located warnings check-config prints: settings
    that are valid but likely mistakes."""
    try:
        return _load_settings(Path(path))
    except ConfigError:
        raise
    except (Exception, RecursionError) as exc:
        problem = Problem(str(path), None, "", f"cannot load: {type(exc).__name__}: {exc}")
        raise ConfigError([problem]) from exc


def _load_settings(config_path: Path) -> tuple[Settings, list[Problem]]:
    doc = _load_yaml(config_path)
    if not isinstance(doc.data, dict):
        raise ConfigError([Problem(doc.file, 1, "", "the file must be a YAML mapping")])
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
                    device, ("devices", i), doc, config_path.parent, origins, problems
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
                where = _locate(key, doc, origins)
                problems.append(
                    Problem(
                        where.file,
                        where.line,
                        format_key_path(key),
                        f"duplicate channel name {name!r}",
                    )
                )
            measurements = device.get("measurements") if isinstance(device, dict) else None
            points = measurements.get("points") if isinstance(measurements, dict) else None
            for j, name in _duplicates(points, "name"):
                key = ("devices", i, "measurements", "points", j, "name")
                where = _locate(key, doc, origins)
                problems.append(
                    Problem(
                        where.file,
                        where.line,
                        format_key_path(key),
                        f"duplicate measurement point name {name!r}",
                    )
                )
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
    return settings, _warnings(settings, doc)


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
                         f"warning: device {device.id}: no rated_power_kva, meter_rating or "
                         f"max_demand for {', '.join(unlimited)}: a counter step is judged only "
                         "by half the counter's range per interval, which lets a garbled read "
                         "through as energy; give the device its rating")
            )  # fmt: skip
        for j, channel in enumerate(device.channels):
            full = channel.register_range
            if channel.rollover is not None and full is not None and channel.rollover < full:
                warnings.append(
                    _problem(doc, ("devices", i, "channels", j, "rollover"),
                             f"warning: rollover {channel.rollover} is below the {channel.type} "
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
    return problems


def _problem_sort_key(problem: Problem) -> tuple[str, int, str]:
    return (problem.file, problem.line or 0, problem.key_path)


def config_hash(path: Path | str) -> str:
    """Short digest of the config file, published in the gateway status."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
