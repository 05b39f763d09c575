"""YAML configuration -> validated, immutable settings.

Every problem is reported with the file, the line and the key path
(`edged.yaml:17 devices[0].channels[0].multipler: unknown key`), all at once,
so an engineer fixes a file in one pass. Device profiles (`profile: pmc-1`)
are YAML files whose channels the device inherits and may override.
"""

from __future__ import annotations

import hashlib
import re
import zoneinfo
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from edged.registers import DataType, register_count

SECONDS_PER_DAY = 86_400
DURATION_UNITS_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_IDENT_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"

# Where `profile: NAME` is looked up, after the directory `profiles/` beside the config file.
SHIPPED_PROFILES_DIR = Path(__file__).resolve().parent.parent / "config" / "profiles"
SYSTEM_PROFILES_DIR = Path("/etc/edged/profiles")


def parse_duration_s(value: object) -> float:
    """'15m' -> 900.0; bare numbers are seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 15m, 30s or 1h")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match:
            return float(match.group(1)) * DURATION_UNITS_S[match.group(2)]
    raise ValueError(f"expected a duration such as 15m, 30s or 1h, got {value!r}")


DurationS = Annotated[float, BeforeValidator(parse_duration_s)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TcpTransport(_Strict):
    type: Literal["tcp"]
    host: str
    port: int = Field(502, ge=1, le=65535)
    unit_id: int = Field(1, ge=0, le=255)
    timeout: DurationS = Field(1.0, gt=0, description="per-request timeout")


Transport = Annotated[TcpTransport, Field(discriminator="type")]


class Limits(_Strict):
    min: float | None = None
    max: float | None = None


class DemandSettings(_Strict):
    window: DurationS = Field(description="rolling demand window, e.g. 30m")
    subintervals: int = Field(ge=1, le=60, description="sub-intervals per window, e.g. 2")


class Channel(_Strict):
    """One energy counter register, turned into interval records."""

    name: str = Field(pattern=_IDENT_RE)
    # `register` in YAML; renamed here because BaseModel already has `register`.
    address: int = Field(alias="register", ge=0, le=65535, description="0-based register address")
    function: Literal["holding", "input"] = "holding"
    type: DataType = "uint32"
    word_order: Literal["big", "little"] = "big"
    unit: str = "kWh"
    multiplier: float = Field(1.0, gt=0, description="unit per count (CT x VT ratio folds in)")
    rollover: int | None = Field(
        None, gt=0, description="counter modulus; default 2**bits for integer types"
    )
    max_demand: float | None = Field(
        None,
        gt=0,
        description="highest plausible demand (kW for a kWh channel); a counter wrap implying "
        "more is a COUNTER_RESET. Default: half the counter modulus per interval",
    )
    limits: Limits | None = Field(None, description="interval values outside are OUT_OF_RANGE")

    @property
    def rollover_counts(self) -> int | None:
        if self.rollover is not None:
            return self.rollover
        if self.type.startswith("uint"):
            return 1 << (16 * register_count(self.type))
        return None

    @property
    def demand_unit(self) -> str | None:
        # Demand is energy per hour: kWh -> kW, Wh -> W, kvarh -> kvar.
        return self.unit[:-1] if self.unit.endswith("h") else None


class Device(_Strict):
    id: str = Field(pattern=_IDENT_RE)
    profile: str | None = None
    interval: DurationS = 900.0
    transport: Transport
    channels: tuple[Channel, ...] = Field(min_length=1)
    gaps: Literal["long", "prorate"] = Field(
        "long",
        description="energy across missed boundaries: on the next good record (LONG) or "
        "spread over the missed intervals (ESTIMATED)",
    )
    validation: Literal["none", "amt_rule"] = "none"
    estimation: Literal["none", "zero_fill_amt"] = "none"
    demand: DemandSettings | None = None
    billing_reset_day: int = Field(
        1, ge=1, le=28, description="day of month (site time zone) the peak demand resets"
    )

    @field_validator("interval")
    @classmethod
    def _interval_divides_day(cls, interval_s: float) -> float:
        if not 1.0 <= interval_s <= SECONDS_PER_DAY:
            raise ValueError("interval must be between 1s and 24h")
        if interval_s != int(interval_s) or SECONDS_PER_DAY % int(interval_s):
            raise ValueError(f"interval {interval_s:g}s does not divide a day (86400 s)")
        return interval_s

    @property
    def interval_s(self) -> int:
        return int(self.interval)


class VirtualChannel(_Strict):
    name: str = Field(pattern=_IDENT_RE)
    add: tuple[str, ...] = Field(min_length=1, description="'device.channel' inputs to sum")
    subtract: tuple[str, ...] = ()
    unit: str = "kWh"


class VirtualMeter(_Strict):
    """Per-interval sums and differences of real channels (e.g. a station total)."""

    id: str = Field(pattern=_IDENT_RE)
    channels: tuple[VirtualChannel, ...] = Field(min_length=1)


class Storage(_Strict):
    path: Path = Path("/var/lib/edged/edged.db")


class MqttTls(_Strict):
    ca_file: Path | None = Field(None, description="CA bundle that signed the broker's cert")
    cert_file: Path | None = Field(None, description="client certificate (mutual TLS)")
    key_file: Path | None = Field(None, description="client private key (mutual TLS)")
    insecure: bool = Field(False, description="skip hostname verification (testing only)")


_BROKER_URL = r"^(mqtt|mqtts)://[^:/\s]+(:\d{1,5})?/?$"


class Mqtt(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    brokers: tuple[str, ...] = Field(
        (),
        description="broker URLs tried in turn for failover (mqtt://h:1883, mqtts://h:8883); "
        "when set, host and port are not used",
    )
    topic_prefix: str = Field("edged", pattern=r"^[^#+/][^#+]*[^#+/]$|^[^#+/]$")
    client_id: str | None = None
    keepalive: DurationS = Field(30.0, ge=5)
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    username: str | None = None
    password_file: Path | None = Field(None, description="file holding the password")
    password_env: str | None = Field(None, description="environment variable holding it")
    tls: MqttTls | None = None
    backlog_rate: float = Field(
        2000.0, gt=0, description="messages/s when draining a backlog beside live data"
    )

    @field_validator("brokers")
    @classmethod
    def _broker_urls(cls, urls: tuple[str, ...]) -> tuple[str, ...]:
        for url in urls:
            if not re.match(_BROKER_URL, url):
                raise ValueError(f"{url!r} is not mqtt://host[:port] or mqtts://host[:port]")
        return urls


class Log(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class Settings(_Strict):
    site: str = Field(pattern=_IDENT_RE)
    timezone: str = "UTC"
    storage: Storage = Storage()
    mqtt: Mqtt = Mqtt()
    log: Log = Log()
    status_every: DurationS = Field(60.0, gt=0)
    devices: tuple[Device, ...] = Field(min_length=1)
    virtual_meters: tuple[VirtualMeter, ...] = ()

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, name: str) -> str:
        try:
            zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown IANA time zone {name!r}") from None
        return name

    @property
    def zone(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.timezone)


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


# --------------------------------------------------------------------------
# Loading with line numbers


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


def _construct(node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int]) -> Any:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = (
                yaml.safe_load(yaml.serialize(key_node))
                if not isinstance(key_node, yaml.ScalarNode)
                else _scalar(key_node)
            )
            lines[(*path, key)] = key_node.start_mark.line + 1
            result[key] = _construct(value_node, (*path, key), lines)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_construct(item, (*path, i), lines) for i, item in enumerate(node.value)]
    return _scalar(node)


def _scalar(node: yaml.Node) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()


def _load_yaml(path: Path) -> _Located:
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem(name, None, "", f"cannot read: {exc.strerror}")]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([Problem(name, line, "", f"invalid YAML: {problem}")]) from None
    lines: dict[KeyPath, int] = {}
    data = _construct(node, (), lines) if node is not None else None
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
    if not re.match(_IDENT_RE, name):
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


PROFILE_KEYS = frozenset({"name", "description", "channels", "interval"})


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
    if "interval" in profile.data:
        merged["interval"] = profile.data["interval"]
        origins[(*device_path, "interval")] = _Origin(profile, ("interval",))
    profile_channels = profile.data.get("channels", [])
    channels: list[Any] = []
    by_name: dict[str, int] = {}
    if isinstance(profile_channels, list):
        for i, channel in enumerate(profile_channels):
            origins[(*device_path, "channels", len(channels))] = _Origin(profile, ("channels", i))
            if isinstance(channel, dict) and isinstance(channel.get("name"), str):
                by_name[channel["name"]] = len(channels)
            channels.append(channel)
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
    merged.update({k: v for k, v in device.items() if k != "channels"})
    merged["channels"] = channels
    return merged


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
        return f"unknown type {error['input'].get('type')!r} (expected tcp)"
    return message


def load_settings(path: Path | str) -> Settings:
    """Read, merge profiles and validate; raises ConfigError listing every problem."""
    config_path = Path(path)
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
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        problems.extend(_pydantic_problems(exc, doc, origins, unloaded_profiles))
        settings = None
    if problems or settings is None:
        raise ConfigError(sorted(set(problems), key=_problem_sort_key))
    return settings


def _problem_sort_key(problem: Problem) -> tuple[str, int, str]:
    return (problem.file, problem.line or 0, problem.key_path)


def config_hash(path: Path | str) -> str:
    """Short digest of the config file, published in the gateway status."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
