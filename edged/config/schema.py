"""The validated, immutable settings: the pydantic models the core reads.

No YAML here: :mod:`edged.config.load` reads the file, merges profiles,
reports every problem with file:line and key, and builds these models.
"""

from __future__ import annotations

import functools
import math
import re
import zoneinfo
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from edged.config.registers import NOTATION_HELP, REGISTER_NUMBER_HELP, normalise
from edged.core.model import Flag
from edged.core.registers import DataType, register_count
from edged.core.units import parse_duration_s, parse_size_bytes

SECONDS_PER_DAY = 86_400
IDENT_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"

# Where `profile: NAME` is looked up, after the directory `profiles/` beside the config file.


DurationS = Annotated[float, BeforeValidator(parse_duration_s)]

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
    """`scale_register: 40` is shorthand for `scale_register: {register: 40}`
    (a register-list string such as "4x0041" too)."""
    if isinstance(value, int | str) and not isinstance(value, bool):
        return {"register": value}
    return value


class ScaleRegister(_Strict):
    """A SunSpec-style scale factor: value = raw x 10**sf, sf read from this register."""

    address: int = Field(alias="register", ge=0, le=65535, description=NOTATION_HELP)
    register_number: int | None = Field(None, description=REGISTER_NUMBER_HELP)
    function: Literal["holding", "input"] = "holding"
    type: Literal["int16"] = "int16"

    _notation = model_validator(mode="before")(normalise)


class _RegisterMap(_Strict):
    """Where a value lives and how its registers become a number."""

    name: str = Field(pattern=IDENT_RE)
    # `register` in YAML; renamed here because BaseModel already has `register`.
    address: int = Field(alias="register", ge=0, le=65535, description=NOTATION_HELP)
    register_number: int | None = Field(None, description=REGISTER_NUMBER_HELP)
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
    not_implemented: int | None = Field(
        None,
        description="raw value by which the meter says 'not implemented' (SunSpec: -32768 "
        "for int16, 0 for acc32): no value is recorded for that read",
    )
    ratios: Ratios = Field(
        "auto",
        description="device CT/VT ratios applied: auto = by unit (energy/power: CT x VT, "
        "A: CT, V: VT), or ct_vt, ct, vt, none",
    )
    # Set by the owning Device (its CT/VT ratios); 1 for a register map on its own.
    _ratio_factor: float = PrivateAttr(1.0)

    _words = model_validator(mode="before")(_order_to_words)
    _notation = model_validator(mode="before")(normalise)

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

    address: int = Field(alias="register", ge=0, le=65535, description=NOTATION_HELP)
    register_number: int | None = Field(None, description=REGISTER_NUMBER_HELP)
    function: Literal["holding", "input"] = "holding"
    type: Literal["uint16", "uint32", "uint64"] = "uint16"
    word_order: Literal["big", "little"] = "big"
    byte_order: Literal["big", "little"] = "big"
    order: OrderCodeField | None = None
    bits: dict[int, Flag] = Field(min_length=1, description="bit (0 = LSB) -> flag name")

    _words = model_validator(mode="before")(_order_to_words)
    _notation = model_validator(mode="before")(normalise)

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
    address: int = Field(alias="register", ge=0, le=65535, description=NOTATION_HELP)
    register_number: int | None = Field(None, description=REGISTER_NUMBER_HELP)
    function: Literal["holding", "input"] = "holding"
    type: Literal["uint32", "int32", "uint64", "int64"] = "uint32"
    word_order: Literal["big", "little"] = "big"
    byte_order: Literal["big", "little"] = "big"
    order: OrderCodeField | None = None
    timezone: ZoneName = Field("UTC", description="zone of a ymdhms/datetime4 wall clock")

    _words = model_validator(mode="before")(_order_to_words)
    _notation = model_validator(mode="before")(normalise)


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, dict) else value


class SunSpecDiscovery(_Strict):
    """The device is a SunSpec meter: before reading, edged finds the "SunS" marker
    (at 0, 40000 or 50000) and the first of `models` in the model chain; channel and
    measurement `register`s (and scale registers) are offsets from that model's id
    register. Set by `profile: sunspec`."""

    models: tuple[int, ...] = Field(
        (201, 202, 203, 204), min_length=1, description="model ids to look for, in order"
    )


class Device(_Strict):
    id: str = Field(pattern=IDENT_RE)
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
    measurements: Measurements | None = None
    channel_count: int | None = Field(
        None, ge=1, le=1024, description="channels expanded from a channel_template"
    )
    sunspec: SunSpecDiscovery | None = Field(
        None, description="find a SunSpec model first; registers are offsets into it"
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
    name: str = Field(pattern=IDENT_RE)
    add: tuple[str, ...] = Field(min_length=1, description="'device.channel' inputs to sum")
    subtract: tuple[str, ...] = ()
    unit: str = "kWh"


class VirtualMeter(_Strict):
    """Per-interval sums and differences of real channels (e.g. a station total)."""

    id: str = Field(pattern=IDENT_RE)
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
    """Reference time (docs/time.md). edged never sets the system clock."""

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
    site: str = Field(pattern=IDENT_RE)
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
