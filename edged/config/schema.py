"""The validated, immutable settings: the pydantic models the core reads.

No YAML here: :mod:`edged.config.load` reads the file, merges profiles,
reports every problem with file:line and key, and builds these models.
"""

from __future__ import annotations

import functools
import ipaddress
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
    ValidationInfo,
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
        "more is a COUNTER_RESET. Default: the device's rated power (rated_power_kva, or "
        "meter_rating x CT x VT) x plausibility_margin; without either, half the counter "
        "modulus per interval",
    )
    limits: Limits | None = Field(None, description="interval values outside are OUT_OF_RANGE")

    @model_validator(mode="after")
    def _positive_scale(self) -> Channel:
        if self.scale <= 0:
            raise ValueError("scale of an energy counter must be positive")
        return self

    @field_validator("rollover")
    @classmethod
    def _rollover_fits_the_register(cls, rollover: int | None, info: ValidationInfo) -> int | None:
        # A field validator (not the model's) so the error names the key's line.
        data = info.data
        data_type: Any = data.get("type")
        binary = data.get("encoding") == "binary" and data.get("scale_register") is None
        if rollover is not None and binary and str(data_type).startswith(("uint", "int")):
            full = 1 << (16 * register_count(data_type))
            if rollover > full:
                raise ValueError(
                    f"rollover {rollover} exceeds what a {data_type} register can hold ({full})"
                )
        return rollover

    @property
    def register_range(self) -> int | None:
        """How many values the raw register can hold (2**bits), for integer
        registers read as plain binary; None otherwise."""
        if self.encoding != "binary" or self.scale_register is not None:
            return None
        if self.type.startswith(("uint", "int")):
            return 1 << (16 * register_count(self.type))
        return None

    # Set by the owning Device from its rating: the physical demand limit
    # (unit per hour) used when max_demand is not configured.
    _rated_demand: float | None = PrivateAttr(None)

    @property
    def unit_label(self) -> str:
        return self.unit

    @property
    def plausible_demand(self) -> float | None:
        """The demand limit (unit per hour) a counter step is judged by:
        ``max_demand``, else the device's rated power x margin, else None."""
        return self.max_demand if self.max_demand is not None else self._rated_demand

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
    deadband: float | None = Field(
        None,
        ge=0,
        description="report by exception: publish only when the value moved by more than "
        "this (in `unit`) since last published",
    )
    deadband_percent: float | None = Field(
        None,
        ge=0,
        le=1000,
        description="report by exception: publish only when the value moved by more than "
        "this percentage of the last published value (with `deadband`: beyond either)",
    )

    @property
    def unit_label(self) -> str:
        return self.unit


class Measurements(_Strict):
    """Optional fast polling between boundaries, published on .../measurement (QoS 0)."""

    every: DurationS = Field(1.0, ge=0.1, le=3600, description="poll period, e.g. 1s")
    points: tuple[MeasurementPoint, ...] = Field(min_length=1)
    max_silence: DurationS | None = Field(
        None,
        gt=0,
        description="a deadbanded point is published at least this often, changed or not "
        "(default: only on change)",
    )


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


class MeterRating(_Strict):
    """The meter's own (secondary side) rating from its nameplate or data sheet."""

    voltage_ln_v: float = Field(gt=0, description="highest line-to-neutral voltage, V")
    current_max_a: float = Field(gt=0, description="highest current (Imax), A")
    phases: int = Field(3, ge=1, le=3, description="measuring elements")


# Energy units by the factor from kVAh-family units: demand limits are kept in
# kVA and converted to the channel's unit per hour.
_PER_KILO = {"": 1000.0, "k": 1.0, "M": 0.001}


def _unit_per_kilo(unit: str) -> float | None:
    for base in ("Wh", "varh", "VAh"):
        if unit.endswith(base):
            return _PER_KILO.get(unit[: -len(base)])
    return None


class CertificatePointConfig(_Strict):
    """One point of an instrument transformer's test certificate (at its burden).
    Give the ratio error as `ratio_error_pct` (IEC 61869) or `rcf` (IEEE C57.13)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    percent: float = Field(gt=0, le=400, description="% of rated primary current/voltage")
    ratio_error_pct: float | None = Field(
        None, ge=-5, le=5, description="ratio error in %, positive when the secondary reads high"
    )
    rcf: float | None = Field(
        None, description="IEEE C57.13 ratio correction factor (true/marked ratio) instead"
    )
    phase_min: float = Field(
        ge=-300,
        le=300,
        description="phase displacement in minutes of arc, positive when the secondary leads",
    )

    @model_validator(mode="after")
    def _one_ratio(self) -> CertificatePointConfig:
        if (self.ratio_error_pct is None) == (self.rcf is None):
            raise ValueError("give exactly one of ratio_error_pct and rcf")
        if self.rcf is not None and not 1 / 1.05 <= self.rcf <= 1 / 0.95:
            raise ValueError(f"rcf {self.rcf} is a ratio error beyond +-5 %")
        return self

    @property
    def error_pct(self) -> float:
        if self.ratio_error_pct is not None:
            return self.ratio_error_pct
        assert self.rcf is not None
        return (1.0 / self.rcf - 1.0) * 100.0


class InstrumentTransformer(_Strict):
    """A CT (rated_current_a) or VT (rated_voltage_v) certificate; errors are
    interpolated linearly between points and held flat beyond the first/last."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    rated_current_a: float | None = Field(None, gt=0, description="CT rated primary current, A")
    rated_voltage_v: float | None = Field(None, gt=0, description="VT rated primary voltage, V")
    burden_va: float | None = Field(None, gt=0, description="burden of the certificate, VA")
    points: tuple[CertificatePointConfig, ...] = Field(
        min_length=1, description="certificate points, strictly increasing in percent"
    )

    @model_validator(mode="after")
    def _monotonic(self) -> InstrumentTransformer:
        if (self.rated_current_a is None) == (self.rated_voltage_v is None):
            raise ValueError("give exactly one of rated_current_a (CT) and rated_voltage_v (VT)")
        percents = [p.percent for p in self.points]
        if any(percents[i + 1] <= percents[i] for i in range(len(percents) - 1)):
            raise ValueError(f"certificate points must be strictly increasing in %: {percents}")
        return self


class TransformerLossConfig(_Strict):
    """Power transformer between the meter and the point of connection."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    no_load_loss_kw: float = Field(ge=0, description="no-load (iron) loss at rated voltage, kW")
    rated_voltage_v: float = Field(gt=0, description="rated voltage on the metered side, V")
    load_loss_kw: float = Field(ge=0, description="load (copper) loss at rated current, kW")
    rated_current_a: float = Field(gt=0, description="rated current on the metered side, A")


class LineLossConfig(_Strict):
    """Line between the meter (or transformer) and the point of connection."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    resistance_ohm: float = Field(ge=0, description="per phase, referred to the metered side")
    phases: Literal[1, 3] = Field(3, description="number of phases carrying the current")


class CompensatedChannel(_Strict):
    name: str = Field(pattern=IDENT_RE, description="a kWh or kvarh channel of this device")
    kind: Literal["active", "reactive"] = Field(
        "active", description="active (kWh) or reactive (kvarh) energy"
    )
    flow: Literal["delivered", "received"] = Field(
        description="delivered: from the grid to the meter (losses added); received: from "
        "the meter to the grid (losses subtracted)"
    )


class Compensation(_Strict):
    """CT/VT error correction and transformer/line loss compensation, published as
    extra channels `<name><suffix>` beside the raw ones (docs/compensation.md)."""

    channels: tuple[CompensatedChannel, ...] = Field(
        min_length=1, description="the raw channels to compensate, and their direction"
    )
    suffix: str = Field(
        "_compensated",
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="appended to a raw channel's name to name its compensated channel",
    )
    current: str | None = Field(None, description="fast-poll point of the phase current, A")
    voltage: str | None = Field(None, description="fast-poll point of the voltage, V")
    i2h: str | None = Field(None, description="channel counting I^2 h (A^2h), instead of samples")
    v2h: str | None = Field(None, description="channel counting V^2 h (V^2h), instead of samples")
    ct: InstrumentTransformer | None = Field(None, description="the CT's test certificate")
    vt: InstrumentTransformer | None = Field(None, description="the VT's test certificate")
    transformer: TransformerLossConfig | None = Field(
        None, description="power transformer losses to compensate"
    )
    line: LineLossConfig | None = Field(None, description="line losses to compensate")

    @model_validator(mode="after")
    def _consistent(self) -> Compensation:
        if self.ct is not None and self.ct.rated_current_a is None:
            raise ValueError("ct needs rated_current_a")
        if self.vt is not None and self.vt.rated_voltage_v is None:
            raise ValueError("vt needs rated_voltage_v")
        if self.current is not None and self.i2h is not None:
            raise ValueError("give the current as a fast-poll point or an i2h channel, not both")
        if self.voltage is not None and self.v2h is not None:
            raise ValueError("give the voltage as a fast-poll point or a v2h channel, not both")
        has_i = self.current is not None or self.i2h is not None
        has_v = self.voltage is not None or self.v2h is not None
        if (self.ct is not None or self.transformer is not None or self.line is not None) and (
            not has_i
        ):
            raise ValueError("ct, transformer and line losses need `current` or `i2h`")
        if (self.vt is not None or self.transformer is not None) and not has_v:
            raise ValueError("vt and transformer losses need `voltage` or `v2h`")
        seen = set()
        for channel in self.channels:
            key = (channel.kind, channel.flow)
            if key in seen:
                raise ValueError(f"two {channel.kind} channels with flow {channel.flow}")
            seen.add(key)
        return self


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
    rated_power_kva: float | None = Field(
        None,
        gt=0,
        description="highest apparent power the metered connection can carry (primary side, "
        "kVA: transformer or feeder rating); times plausibility_margin it is the default "
        "max_demand of the energy channels",
    )
    meter_rating: MeterRating | None = Field(
        None,
        description="the meter's secondary rating; phases x V x Imax x CT x VT is the rated "
        "power when rated_power_kva is not set",
    )
    plausibility_margin: float = Field(
        1.5, ge=1, le=100, description="rated power x this is the highest plausible demand"
    )
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
    sunspec: SunSpecDiscovery | None = Field(
        None, description="find a SunSpec model first; registers are offsets into it"
    )
    compensation: Compensation | None = Field(
        None, description="instrument-transformer correction and loss compensation"
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
        rated_kva = self.rated_kva
        for channel in self.channels:
            per_kilo = _unit_per_kilo(channel.unit)
            if rated_kva is not None and per_kilo is not None:
                channel._rated_demand = rated_kva * self.plausibility_margin * per_kilo
        return self

    @model_validator(mode="after")
    def _compensation_refs(self) -> Device:
        if self.compensation is not None:
            check_compensation_refs(self)
        return self

    @property
    def rated_kva(self) -> float | None:
        """The connection's rated apparent power (primary side), if known."""
        if self.rated_power_kva is not None:
            return self.rated_power_kva
        r = self.meter_rating
        if r is None:
            return None
        return r.phases * r.voltage_ln_v * r.current_max_a * self.ct_ratio * self.vt_ratio / 1000

    @property
    def interval_s(self) -> int:
        return int(self.interval)


def check_compensation_refs(device: Device) -> None:
    """The compensation block names this device's channels and points, in the
    units the arithmetic assumes."""
    comp = device.compensation
    assert comp is not None
    units = {c.name: c.unit for c in device.channels}
    points = {p.name: p.unit for p in (device.measurements.points if device.measurements else ())}
    problems: list[str] = []
    for channel in comp.channels:
        want = "kWh" if channel.kind == "active" else "kvarh"
        if channel.name not in units:
            problems.append(f"compensation channel {channel.name!r} is not a channel")
        elif units[channel.name] != want:
            problems.append(f"{channel.kind} channel {channel.name!r} is in "
                            f"{units[channel.name]!r}, not {want}")  # fmt: skip
        elif channel.name + comp.suffix in units:
            problems.append(f"{channel.name + comp.suffix!r} is already a channel")
    for key, name, want in (("current", comp.current, "A"), ("voltage", comp.voltage, "V")):
        if name is not None and points.get(name) != want:
            problems.append(f"compensation {key}: {name!r} is not a fast-poll point in {want}")
    for key, name, want in (("i2h", comp.i2h, "A2h"), ("v2h", comp.v2h, "V2h")):
        if name is not None and units.get(name) != want:
            problems.append(f"compensation {key}: {name!r} is not a channel in {want}")
    if problems:
        raise ValueError("; ".join(problems))


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
        60.0,
        ge=0.1,
        le=3600,
        description="how often free space is measured against the disk budget; retention and "
        "the store's size are checked then too if something was stored since the last check "
        "(and at least every 15 minutes)",
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
    topic_prefix: str = Field(
        "edged",
        pattern=r"^[^#+/][^#+]*[^#+/]$|^[^#+/]$",
        description="first topic level(s); not starting with $ (broker-reserved, e.g. $SYS), "
        "no wildcards (+, #), no empty levels",
    )
    client_id: str | None = None
    keepalive: DurationS = Field(30.0, ge=5)

    @field_validator("topic_prefix")
    @classmethod
    def _topic_prefix_publishable(cls, prefix: str) -> str:
        # MQTT 5.0 4.7.2: topics starting with $ are the server's; a broker
        # accepts a publish there and silently drops it. 4.7.1: + and # are
        # wildcards, never part of a published topic; an empty level ("a//b")
        # is legal but always a typo here, and NUL is forbidden (1.5.4).
        if prefix.startswith("$"):
            raise ValueError("topic_prefix must not start with $ (reserved by the broker)")
        if any(not level for level in prefix.split("/")):
            raise ValueError("topic_prefix must not have empty levels (//)")
        if "\0" in prefix:
            raise ValueError("topic_prefix must not contain NUL")
        return prefix

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


class Sparkplug(_Strict):
    """Sparkplug B output beside the JSON topics (docs/sparkplug.md): its own MQTT
    session to the `mqtt` brokers, with NDEATH as its last will. Off by default."""

    enabled: bool = Field(False, description="publish Sparkplug B on `spBv1.0/{group_id}/...`")
    group_id: str = Field(
        "edged", pattern=r"^[^#+/]+$", description="Sparkplug group id (first topic level)"
    )
    edge_node_id: str | None = Field(
        None, pattern=r"^[^#+/]+$", description="Sparkplug edge node id; default: the site"
    )
    primary_host_id: str | None = Field(
        None,
        pattern=r"^[^#+/]+$",
        description="primary host application id: births wait until its STATE says online "
        "(Sparkplug 3.0); none: publish at once",
    )
    client_id: str | None = Field(
        None, description="MQTT client id of the Sparkplug session; default: edged-sp-{site}-{host}"
    )
    json_data: bool = Field(
        True,
        description="also publish interval records and fast-poll values on the JSON topics; "
        "false: Sparkplug instead (statuses, events and commands stay on JSON)",
    )


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


class FacadeBlock(_Strict):
    """A register block a `cache` device keeps fresh for the facade, polled at its
    own rate on the device's link at fast-poll priority (below boundary reads)."""

    function: Literal["holding", "input"] = Field(
        "holding", description="holding (function 3) or input (function 4) registers"
    )
    address: int = Field(alias="register", ge=0, le=65535, description="0-based first register")
    count: int = Field(ge=1, le=125, description="registers in the block (one read)")
    every: DurationS = Field(1.0, ge=0.1, le=3600, description="poll period, e.g. 1s")

    @model_validator(mode="after")
    def _fits(self) -> FacadeBlock:
        if self.address + self.count > 65536:
            raise ValueError(f"block at {self.address}+{self.count} runs past 65535")
        return self


class FacadeDevice(_Strict):
    """A configured device served to other masters through a facade listener."""

    device: str = Field(pattern=IDENT_RE, description="id of a configured device")
    unit_id: int | None = Field(
        None, ge=0, le=255, description="unit id the masters address; default the device's own"
    )
    mode: Literal["cache", "pass_through"] = Field(
        "pass_through",
        description="cache: answer from `blocks` polled by edged; pass_through: forward each "
        "read to the device below boundary reads",
    )
    blocks: tuple[FacadeBlock, ...] = Field((), description="register blocks (mode cache)")
    max_age: DurationS = Field(
        3.0, gt=0, description="a cached block older than this answers exception 0x0B"
    )

    @model_validator(mode="after")
    def _blocks_for_cache(self) -> FacadeDevice:
        if self.mode == "cache" and not self.blocks:
            raise ValueError("mode cache needs at least one entry in blocks")
        if self.mode == "pass_through" and self.blocks:
            raise ValueError("blocks are only polled in mode cache")
        return self


class FacadeListener(_Strict):
    host: str = Field("127.0.0.1", description="address to bind (127.0.0.1: this host only)")
    port: int = Field(1502, ge=0, le=65535, description="TCP port (502 needs privileges)")
    devices: tuple[FacadeDevice, ...] = Field(
        min_length=1, description="the devices served on this listener"
    )


class Facade(_Strict):
    """A Modbus TCP server through which other masters (SCADA, EMS, a PLC) read the
    devices edged polls, so edged stays the one master on the bus
    (docs/multimaster.md). Read-only: functions 3 and 4 are served, every other
    function (writes included) is refused with exception 01. Off by default."""

    enabled: bool = Field(False, description="serve the listeners")
    listeners: tuple[FacadeListener, ...] = Field(
        (), description="TCP listeners, each with its own unit id map"
    )
    allow: tuple[str, ...] = Field(
        ("127.0.0.0/8", "::1/128"),
        description="client networks (CIDR) allowed to connect; others are closed at once",
    )
    max_connections: int = Field(16, ge=1, le=1024, description="open connections, all listeners")
    idle_timeout: DurationS = Field(
        120.0, gt=0, description="a connection silent for this long is closed"
    )
    max_rate: float = Field(
        50.0, gt=0, description="requests/s per client address (burst: one second's worth); "
        "beyond it requests answer exception 0x06",
    )  # fmt: skip
    client_queue: int = Field(
        4, ge=1, le=64,
        description="pass-through reads one client may have waiting for the bus; one more "
        "answers exception 0x06 at once",
    )  # fmt: skip
    answer_within: DurationS = Field(
        2.0, gt=0, description="a pass-through read not answered by then answers 0x0B"
    )

    @field_validator("allow")
    @classmethod
    def _networks(cls, networks: tuple[str, ...]) -> tuple[str, ...]:
        for net in networks:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"{net!r} is not a network (CIDR)") from None
        return networks


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
    sparkplug: Sparkplug = Field(
        Sparkplug(), description="Sparkplug B output (docs/sparkplug.md); off by default"
    )
    facade: Facade = Field(Facade(), description="Modbus TCP server for other masters; off")

    @property
    def zone(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.timezone)


def facade_problems(
    facade: Facade, devices: tuple[Device, ...]
) -> list[tuple[tuple[str | int, ...], str]]:
    """Facade entries naming unknown devices or one upstream unit id twice, each
    with its key path under `facade` (a cross-check of the loader, file:line)."""
    by_id = {d.id: d for d in devices}
    problems: list[tuple[tuple[str | int, ...], str]] = []
    for n, listener in enumerate(facade.listeners):
        seen: dict[int, str] = {}
        for k, entry in enumerate(listener.devices):
            where = ("listeners", n, "devices", k)
            device = by_id.get(entry.device)
            if device is None:
                problems.append((where, f"no device {entry.device!r}"))
                continue
            unit = entry.unit_id if entry.unit_id is not None else device.transport.unit_id
            if unit in seen:
                problems.append((where, f"unit id {unit} is already {seen[unit]!r} on this "
                                        "listener; give one an explicit unit_id"))  # fmt: skip
            seen[unit] = entry.device
    return problems
