"""YAML configuration -> validated, immutable settings.

Every problem is reported with the file, the line and the key path
(`edged.yaml:17 devices[0].channels[0].multipler: unknown key`), all at once,
so an engineer fixes a file in one pass. Device profiles (`profile: pmc-1`)
are YAML files whose channels the device inherits and may override.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import zoneinfo
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from edged.model import Flag
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

# Decimal units as disk vendors and `df -H` count, binary ones as `df -h` does.
SIZE_UNITS_BYTES = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)\s*$", re.IGNORECASE)


def parse_size_bytes(value: object) -> int:
    """'2 GB' -> 2_000_000_000, '512MiB' -> 536_870_912; bare integers are bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match:
            return round(float(match.group(1)) * SIZE_UNITS_BYTES[match.group(2).upper()])
    raise ValueError(
        f"expected a size such as 2 GB, 500 MB or 512 MiB (units B, kB, MB, GB, TB, "
        f"KiB, MiB, GiB, TiB), got {value!r}"
    )


SizeBytes = Annotated[int, BeforeValidator(parse_size_bytes)]


def check_zone_name(name: str) -> str:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown IANA time zone {name!r}") from None
    return name


ZoneName = Annotated[str, AfterValidator(check_zone_name)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TcpTransport(_Strict):
    """Modbus TCP: a meter, or a TCP/RTU gateway with several unit ids behind it.

    Every device naming the same host:port shares one link: the same
    connection(s) and one request queue, so a gateway never sees more
    concurrent transactions than `max_connections`."""

    type: Literal["tcp"]
    host: str
    port: int = Field(502, ge=1, le=65535)
    unit_id: int = Field(1, ge=0, le=255)
    timeout: DurationS = Field(1.0, gt=0, description="per-request timeout")
    max_connections: int = Field(
        1, ge=1, le=8, description="TCP connections to this endpoint, shared by its devices"
    )
    request_gap_ms: float = Field(
        0.0, ge=0, le=10_000, description="quiet time between transactions (slow gateways)"
    )


class RtuTransport(_Strict):
    """Modbus RTU on a local serial port; devices naming the same port share the bus."""

    type: Literal["rtu"]
    port: str = Field(min_length=1, description="serial device, e.g. /dev/ttyUSB0")
    baudrate: int = Field(9600, ge=300, le=921_600)
    parity: Literal["E", "N", "O"] = "E"
    bytesize: Literal[8] = 8  # RTU framing is always 8 data bits
    stopbits: Literal[1, 2] = 1
    unit_id: int = Field(1, ge=1, le=247)
    timeout: DurationS = Field(1.0, gt=0, description="per-request timeout")


class RtuOverTcpTransport(_Strict):
    """RTU frames (with CRC, no MBAP header) tunnelled through a TCP serial
    device server; one transaction at a time, as on the serial bus behind it."""

    type: Literal["rtu_over_tcp"]
    host: str
    port: int = Field(ge=1, le=65535)
    unit_id: int = Field(1, ge=1, le=247)
    timeout: DurationS = Field(1.0, gt=0, description="per-request timeout")


Transport = Annotated[
    TcpTransport | RtuTransport | RtuOverTcpTransport, Field(discriminator="type")
]


class Limits(_Strict):
    min: float | None = None
    max: float | None = None


class DemandSettings(_Strict):
    window: DurationS = Field(description="rolling demand window, e.g. 30m")
    subintervals: int = Field(ge=1, le=60, description="sub-intervals per window, e.g. 2")


OrderCodeField = Literal["ABCD", "CDAB", "BADC", "DCBA"]
Ratios = Literal["auto", "ct_vt", "ct", "vt", "none"]

_ORDER_CODES: dict[str, tuple[str, str]] = {
    "ABCD": ("big", "big"),
    "CDAB": ("little", "big"),
    "BADC": ("big", "little"),
    "DCBA": ("little", "little"),
}
# Units whose values scale with both transformer ratios (energy and power),
# with the CT ratio only (current) or the VT ratio only (voltage).
_CT_VT_UNITS = frozenset({"wh", "varh", "vah", "w", "var", "va"})
_SI_PREFIXES = ("k", "m", "g")


def ratio_kind(unit: str) -> Literal["ct_vt", "ct", "vt", "none"]:
    """Which instrument-transformer ratios a value in `unit` carries."""
    base = unit.strip().lower()
    if len(base) > 1 and base[0] in _SI_PREFIXES and base[1:] in _CT_VT_UNITS | {"a", "v"}:
        base = base[1:]
    if base in _CT_VT_UNITS:
        return "ct_vt"
    if base == "a":
        return "ct"
    if base == "v":
        return "vt"
    return "none"


def _exact_product(*factors: float) -> float:
    # Through the decimal repr, so 0.144 x 200 is 28.8 and not 28.799999999999997.
    result = Decimal(1)
    for factor in factors:
        result *= Decimal(repr(float(factor)))
    return float(result)


def _order_to_words(data: Any) -> Any:
    """`order: CDAB` is shorthand for word_order/byte_order (which must then agree)."""
    if isinstance(data, dict) and data.get("order") is not None:
        words = _ORDER_CODES.get(str(data["order"]))
        if words is None:
            return data  # the Literal reports the bad code
        given = (data.get("word_order", words[0]), data.get("byte_order", words[1]))
        if given != words:
            raise ValueError(
                f"order {data['order']} contradicts word_order/byte_order {given[0]}/{given[1]}; "
                "give one or the other"
            )
        data = {**data, "word_order": words[0], "byte_order": words[1]}
    return data


def _register_shorthand(value: Any) -> Any:
    """`scale_register: 40` is shorthand for `scale_register: {register: 40}`."""
    if isinstance(value, int) and not isinstance(value, bool):
        return {"register": value}
    return value


class ScaleRegister(_Strict):
    """A SunSpec-style scale factor: value = raw x 10**sf, sf read from this register."""

    address: int = Field(alias="register", ge=0, le=65535, description="0-based register address")
    function: Literal["holding", "input"] = "holding"
    type: Literal["int16"] = "int16"


class _RegisterMap(_Strict):
    """Where a value lives and how its registers become a number."""

    name: str = Field(pattern=_IDENT_RE)
    # `register` in YAML; renamed here because BaseModel already has `register`.
    address: int = Field(alias="register", ge=0, le=65535, description="0-based register address")
    function: Literal["holding", "input"] = "holding"
    type: DataType = "uint32"
    word_order: Literal["big", "little"] = "big"
    byte_order: Literal["big", "little"] = "big"
    order: OrderCodeField | None = Field(
        None, description="vendor label for word_order/byte_order: ABCD, CDAB, BADC or DCBA"
    )
    encoding: Literal["binary", "m10k"] = Field(
        "binary",
        description="m10k: a 32-bit value sent as high x 10000 + low (ION 'M10K' formats)",
    )
    scale: float = Field(1.0, description="factor applied to the raw value")
    scale_register: Annotated[ScaleRegister | None, BeforeValidator(_register_shorthand)] = None
    ratios: Ratios = Field(
        "auto",
        description="device CT/VT ratios applied: auto = by unit (energy/power: CT x VT, "
        "A: CT, V: VT), or ct_vt, ct, vt, none",
    )
    # Set by the owning Device (its CT/VT ratios); 1 for a register map on its own.
    _ratio_factor: float = PrivateAttr(1.0)

    _words = model_validator(mode="before")(_order_to_words)

    @model_validator(mode="after")
    def _check_register_map(self) -> _RegisterMap:
        if self.address + register_count(self.type) > 65536:
            raise ValueError(f"a {self.type} at register {self.address} runs past 65535")
        if self.encoding == "m10k" and self.type not in ("uint32", "int32"):
            raise ValueError("encoding m10k needs type uint32 or int32")
        if not math.isfinite(self.scale) or self.scale == 0:
            raise ValueError("scale must be a finite, non-zero number")
        return self

    @property
    def unit_label(self) -> str:
        raise NotImplementedError

    def ratio_factor_for(self, ct_ratio: float, vt_ratio: float) -> float:
        kind = ratio_kind(self.unit_label) if self.ratios == "auto" else self.ratios
        return {
            "ct_vt": _exact_product(ct_ratio, vt_ratio),
            "ct": float(ct_ratio),
            "vt": float(vt_ratio),
            "none": 1.0,
        }[kind]

    @property
    def ratio_factor(self) -> float:
        """CT/VT factor folded into this value (set from the owning device)."""
        return self._ratio_factor


class Channel(_RegisterMap):
    """One energy counter register, turned into interval records.

    The interval engine works on raw counts (integers stay exact) and
    `multiplier`; `scale` and the device's CT/VT ratios are folded into
    `multiplier` here, so `channel.multiplier` is always the unit per count.
    """

    unit: str = "kWh"
    configured_multiplier: float = Field(
        1.0, alias="multiplier", gt=0, description="unit per count before scale and CT x VT"
    )
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

    @model_validator(mode="after")
    def _positive_scale(self) -> Channel:
        if self.scale <= 0:
            raise ValueError("scale of an energy counter must be positive")
        return self

    @property
    def unit_label(self) -> str:
        return self.unit

    @functools.cached_property
    def multiplier(self) -> float:
        """Unit per count: the configured multiplier x scale x CT/VT ratio.

        Cached (the interval engine asks several times per record and it is a
        decimal product); `Device._fold_ratios` drops the cache when it sets
        the ratio."""
        return _exact_product(self.configured_multiplier, self.scale, self._ratio_factor)

    @property
    def rollover_counts(self) -> int | None:
        if self.rollover is not None:
            return self.rollover
        if self.scale_register is not None:
            return None  # values arrive scaled by 10**sf: no fixed modulus in counts
        if self.encoding == "m10k":
            return 65536 * 10_000 if self.type == "uint32" else None
        if self.type.startswith("uint"):
            return 1 << (16 * register_count(self.type))
        return None

    @property
    def demand_unit(self) -> str | None:
        # Demand is energy per hour: kWh -> kW, Wh -> W, kvarh -> kvar.
        return self.unit[:-1] if self.unit.endswith("h") else None


class MeasurementPoint(_RegisterMap):
    """An instantaneous value for fast polling (kW, V, A, Hz …):
    value = raw x scale x 10**sf x CT/VT ratio + offset."""

    unit: str = ""
    offset: float = 0.0

    @property
    def unit_label(self) -> str:
        return self.unit


class Measurements(_Strict):
    """Optional fast polling between boundaries, published on .../measurement (QoS 0)."""

    every: DurationS = Field(1.0, ge=0.1, le=3600, description="poll period, e.g. 1s")
    points: tuple[MeasurementPoint, ...] = Field(min_length=1)


class StatusWord(_Strict):
    """A meter status register whose bits map to interval flags."""

    address: int = Field(alias="register", ge=0, le=65535, description="0-based register address")
    function: Literal["holding", "input"] = "holding"
    type: Literal["uint16", "uint32", "uint64"] = "uint16"
    word_order: Literal["big", "little"] = "big"
    byte_order: Literal["big", "little"] = "big"
    order: OrderCodeField | None = None
    bits: dict[int, Flag] = Field(min_length=1, description="bit (0 = LSB) -> flag name")

    _words = model_validator(mode="before")(_order_to_words)

    @field_validator("bits")
    @classmethod
    def _bits_fit(cls, bits: dict[int, Flag]) -> dict[int, Flag]:
        for bit in bits:
            if not 0 <= bit <= 63:
                raise ValueError(f"bit {bit} is not 0..63")
        return bits


class MeterClock(_Strict):
    """Where the meter keeps its clock, compared with the reference at each read.

    epoch: seconds since 1970 UTC in one 32/64-bit value; ymdhms: six uint16
    registers year, month, day, hour, minute, second; datetime4: the four-register
    IEC 870-5-4 packed date/time of Schneider PowerLogic meters.
    """

    format: Literal["epoch", "ymdhms", "datetime4"] = "epoch"
    address: int = Field(alias="register", ge=0, le=65535, description="0-based register address")
    function: Literal["holding", "input"] = "holding"
    type: Literal["uint32", "int32", "uint64", "int64"] = "uint32"
    word_order: Literal["big", "little"] = "big"
    byte_order: Literal["big", "little"] = "big"
    order: OrderCodeField | None = None
    timezone: ZoneName = Field("UTC", description="zone of a ymdhms/datetime4 wall clock")

    _words = model_validator(mode="before")(_order_to_words)


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, dict) else value


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
    ct_ratio: float = Field(1.0, gt=0, description="primary/secondary CT ratio, e.g. 200 (1000:5)")
    vt_ratio: float = Field(1.0, gt=0, description="primary/secondary VT ratio, e.g. 100")
    max_gap: int = Field(
        8, ge=0, le=124, description="unused registers a read may span to merge two reads"
    )
    status: Annotated[tuple[StatusWord, ...], BeforeValidator(_one_or_many)] = ()
    clock: MeterClock | None = None
    clock_tolerance: DurationS = Field(
        10.0, gt=0, description="meter clock offset beyond this flags CLOCK_ERROR"
    )
    elapsed_tolerance: DurationS = Field(
        1.0,
        gt=0,
        description="a record whose real elapsed time (monotonic, between its two reads) "
        "differs from what the reference clock says by more than the larger of this and "
        "elapsed_tolerance_fraction of the interval reports the real time in duration_s and "
        "is flagged (PARTIAL/LONG besides any CLOCK_SET_*/TIME_ADJUSTED), never actual",
    )
    elapsed_tolerance_fraction: float = Field(
        0.002, ge=0, lt=1, description="see elapsed_tolerance (0.002 = 0.2 % of the interval)"
    )
    measurements: Measurements | None = None
    channel_count: int | None = Field(
        None, ge=1, le=1024, description="channels expanded from a channel_template"
    )

    @field_validator("interval")
    @classmethod
    def _interval_divides_day(cls, interval_s: float) -> float:
        if not 1.0 <= interval_s <= SECONDS_PER_DAY:
            raise ValueError("interval must be between 1s and 24h")
        if interval_s != int(interval_s) or SECONDS_PER_DAY % int(interval_s):
            raise ValueError(f"interval {interval_s:g}s does not divide a day (86400 s)")
        return interval_s

    @model_validator(mode="after")
    def _fold_ratios(self) -> Device:
        # Each register map learns the CT/VT factor it carries; Channel.multiplier
        # and the measurement scaling include it from here on.
        points: list[_RegisterMap] = list(self.channels)
        if self.measurements is not None:
            points.extend(self.measurements.points)
        for point in points:
            point._ratio_factor = point.ratio_factor_for(self.ct_ratio, self.vt_ratio)
            point.__dict__.pop("multiplier", None)
        return self

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


class Retention(_Strict):
    """How long stored rows are kept, by their own timestamp (a read's `read_at`, an
    interval's `end`, a measurement's `at`); `null` keeps them for ever. An interval
    whose message the broker has not acknowledged yet is kept whatever its age, and
    unsent messages (the outbox, events included) are never deleted by retention.
    Nothing is deleted while the time state is `assumed`: an unconfirmed clock
    (a dead RTC battery, a bogus date) must not decide what is old."""

    reads: DurationS | None = Field(
        35 * SECONDS_PER_DAY, gt=0, description="raw boundary reads (registers, values, errors)"
    )
    intervals: DurationS | None = Field(
        400 * SECONDS_PER_DAY, gt=0, description="interval records (the billing data)"
    )
    measurements: DurationS | None = Field(
        7 * SECONDS_PER_DAY, gt=0, description="fast-poll measurements"
    )


# What the disk budget policy may stop storing, lowest value first by default.
# Intervals, events and unsent messages are never shed.
SHEDDABLE = ("measurements", "reads")


def _check_budget_policy(policy: tuple[str, ...]) -> tuple[str, ...]:
    for name in policy:
        if name not in SHEDDABLE:
            raise ValueError(
                f"{name!r} cannot be shed: the policy lists measurements and/or reads "
                "(intervals, events and unsent messages are always kept)"
            )
    if len(set(policy)) != len(policy):
        raise ValueError("each kind may appear only once")
    return policy


class Storage(_Strict):
    """The local SQLite store, its retention and its disk budget (docs/deployment.md
    has the sizing and what happens when the budget is reached)."""

    path: Path = Path("/var/lib/edged/edged.db")
    retention: Retention = Retention()
    disk_budget: SizeBytes = Field(
        2 * 10**9,
        gt=0,
        description="most disk the database (main file + WAL) should use, e.g. 2 GB or "
        "1.5 GiB; reaching it raises the disk alarm and applies budget_policy",
    )
    min_free: SizeBytes = Field(
        100 * 10**6,
        ge=0,
        description="free space on the database's file system under which the same alarm "
        "is raised (0: off)",
    )
    budget_policy: Annotated[tuple[str, ...], AfterValidator(_check_budget_policy)] = Field(
        SHEDDABLE,
        description="kinds (`measurements`, `reads`) to stop storing in the disk alarm, in "
        "this order: each kind is no longer stored and its oldest rows are deleted until use "
        "is back under 90% of the budget; the next kind only when that freed too little",
    )
    check_every: DurationS = Field(
        60.0, ge=0.1, le=3600, description="how often retention and the disk budget run"
    )


class MqttTls(_Strict):
    ca_file: Path | None = Field(None, description="CA bundle that signed the broker's cert")
    cert_file: Path | None = Field(None, description="client certificate (mutual TLS)")
    key_file: Path | None = Field(None, description="client private key (mutual TLS)")
    insecure: bool = Field(False, description="skip hostname verification (testing only)")


class Commands(_Strict):
    """Commands edged accepts over MQTT (docs/mqtt.md#commands). Off by default: then
    edged subscribes to nothing. When on, it subscribes to exactly one topic,
    `{prefix}/{site}/gateway/command/replay`; restrict who may publish there with
    the broker's ACLs."""

    enabled: bool = Field(
        False, description="accept replay requests on `{prefix}/{site}/gateway/command/replay`"
    )
    max_intervals: int = Field(
        50_000,
        ge=1,
        description="most interval records one request may replay, counting replays still "
        "being sent; a larger request is refused",
    )


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
    commands: Commands = Field(
        Commands(), description="commands over MQTT (replay); off by default"
    )

    @field_validator("brokers")
    @classmethod
    def _broker_urls(cls, urls: tuple[str, ...]) -> tuple[str, ...]:
        for url in urls:
            if not re.match(_BROKER_URL, url):
                raise ValueError(f"{url!r} is not mqtt://host[:port] or mqtts://host[:port]")
        return urls


class TimeSettings(_Strict):
    """Reference time (DESIGN.md section 3). edged never sets the system clock."""

    source: Literal["system", "ntp"] = Field(
        "system",
        description="system: trust the system clock as far as the kernel says it is "
        "synchronised; ntp: system clock + an offset/drift model fitted from ntp_servers",
    )
    ntp_servers: tuple[str, ...] = Field((), description="'host' or 'host:port' entries")
    ntp_poll: DurationS = Field(64.0, ge=1)
    ntp_timeout: DurationS = Field(2.0, gt=0)
    step_threshold: DurationS = Field(
        0.5, gt=0, description="corrections beyond this are stepped (and flagged), not slewed"
    )
    holdover_after: DurationS | None = Field(
        None,
        gt=0,
        description="synced becomes holdover without confirmation for this long "
        "(default 4 x ntp_poll)",
    )

    @model_validator(mode="after")
    def _servers_for_ntp(self) -> TimeSettings:
        if self.source == "ntp" and not self.ntp_servers:
            raise ValueError("time.source ntp needs at least one entry in ntp_servers")
        return self


class Log(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class Settings(_Strict):
    site: str = Field(pattern=_IDENT_RE)
    timezone: ZoneName = "UTC"
    storage: Storage = Storage()
    mqtt: Mqtt = Mqtt()
    log: Log = Log()
    time: TimeSettings = TimeSettings()
    status_every: DurationS = Field(60.0, gt=0)
    devices: tuple[Device, ...] = Field(min_length=1)
    virtual_meters: tuple[VirtualMeter, ...] = ()

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
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        problems.extend(_pydantic_problems(exc, doc, origins, unloaded_profiles))
        settings = None
    if settings is not None:
        problems.extend(_cross_checks(settings, doc))
    if problems or settings is None:
        raise ConfigError(sorted(set(problems), key=_problem_sort_key))
    return settings


def _cross_checks(settings: Settings, doc: _Located) -> list[Problem]:
    """Checks that span devices or need the engine's rules, after validation."""
    # Imported here: these modules import this one.
    from edged.intervals import device_problems
    from edged.modbus import check_links
    from edged.virtual import VirtualMeterError, plan_virtual_meter

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
