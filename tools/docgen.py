"""Reference documentation generated from the code (pure text out).

    python -m tools.docgen > docs/configuration.md       # from the models in edged.config
    python -m tools.docgen flags > docs/flags.md         # from edged.core.flags.FLAG_TABLE
    python -m tools.docgen --write                       # both, into docs/

tests/test_docs.py regenerates both and fails when a committed file is stale,
so a new config key or flag cannot ship undocumented. A key's description is
its `Field(description=...)`; keys whose model gives none are described in
`DESCRIPTIONS` below (a model description always wins).
"""

from __future__ import annotations

import argparse
import enum
import inspect
import re
import sys
import types
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from edged.config import load
from edged.config import schema as cfg
from edged.core import flags as flag_table
from edged.core import units as unit_parsers
from edged.core.model import Flag, Quality
from edged.core.time import states

UNDOCUMENTED = "(undocumented)"
DOCS_DIR = Path(__file__).resolve().parent.parent / "docs"

# Descriptions of keys whose model has no `description`, by "Model.field"
# (looked up along the model's bases too, so a base class entry serves all).
DESCRIPTIONS: dict[str, str] = {
    "Settings.site": "site name: the second level of every MQTT topic and the first part "
    "of every record id",
    "Settings.timezone": "IANA time zone of the site: interval boundaries count from local "
    "midnight here, and operator commands read local dates and times in it",
    "Settings.storage": "the local SQLite store",
    "Settings.mqtt": "the MQTT broker(s) and how to publish",
    "Settings.log": "logging (structlog, to stdout)",
    "Settings.time": "reference time: where edged gets true time from (docs/time.md)",
    "Settings.status_every": "how often the retained gateway status is refreshed",
    "Settings.devices": "the meters to read",
    "Settings.virtual_meters": "per-interval sums and differences of real channels",
    "Storage.path": "SQLite database (WAL, synchronous=FULL); its directory is created",
    "Storage.retention": "how long each kind of stored row is kept",
    "Mqtt.host": "broker host name or address (when `brokers` is empty)",
    "Mqtt.port": "broker port (when `brokers` is empty)",
    "Mqtt.topic_prefix": "first level(s) of every topic: `{prefix}/{site}/...`",
    "Mqtt.client_id": "MQTT client id; default `edged-{site}-{hostname}`",
    "Mqtt.keepalive": "MQTT keepalive; the broker publishes the last will after 1.5 x this "
    "without traffic",
    "Mqtt.protocol": "MQTT protocol version",
    "Mqtt.username": "user name for the broker",
    "Mqtt.tls": "TLS settings; a `mqtts://` broker URL, or this key with host/port, turns TLS on",
    "Log.level": "lowest level logged",
    "Log.format": "auto: console lines on a terminal, JSON lines otherwise (journald)",
    "TimeSettings.ntp_poll": "how often the NTP servers are asked (source ntp)",
    "TimeSettings.ntp_timeout": "how long one NTP request may take",
    "Device.id": "device id: names its MQTT topics and record ids",
    "Device.profile": "a device profile to inherit a register map from (docs/profiles.md)",
    "Device.interval": "interval length; must divide a day (1s .. 24h)",
    "Device.transport": "how to reach the meter (the `type` key picks the kind)",
    "Device.channels": "energy counters turned into interval records",
    "Device.validation": "amt_rule: the Itron AMT validation rule at the edge (an interval "
    "with CLOCK, IOBOARD, IRREGULAR, POWER or TIMERESET status and no AMT gets AMT + "
    "ESTNEEDED)",
    "Device.estimation": "zero_fill_amt: replace the value of AMT intervals with 0 (ESTIMATED, "
    "original value kept in `original_value`)",
    "Device.demand": "rolling demand over several intervals",
    "Device.status": "meter status registers whose bits become interval flags (a single "
    "mapping is accepted too)",
    "Device.clock": "the meter's own clock, compared with the reference at each read",
    "Device.measurements": "fast polling of instantaneous values between boundaries",
    "TcpTransport.type": "Modbus TCP",
    "TcpTransport.host": "meter or gateway host name or address",
    "TcpTransport.port": "TCP port",
    "TcpTransport.unit_id": "Modbus unit id (slave address) behind the endpoint",
    "RtuTransport.type": "Modbus RTU on a serial port",
    "RtuTransport.baudrate": "serial speed, bit/s",
    "RtuTransport.parity": "E(ven), N(one) or O(dd)",
    "RtuTransport.bytesize": "data bits (RTU framing is always 8)",
    "RtuTransport.stopbits": "stop bits",
    "RtuTransport.unit_id": "Modbus unit id (slave address) on the bus",
    "RtuOverTcpTransport.type": "RTU frames through a TCP serial device server",
    "RtuOverTcpTransport.host": "serial device server host name or address",
    "RtuOverTcpTransport.port": "its TCP port",
    "RtuOverTcpTransport.unit_id": "Modbus unit id (slave address) on the bus behind it",
    "_RegisterMap.name": "name, unique within the device",
    "Channel.name": "channel name: the last level of its interval topic and part of the record id",
    "_RegisterMap.function": "holding: function 3; input: function 4",
    "_RegisterMap.type": "register data type (16/32/64-bit integers, IEEE floats)",
    "_RegisterMap.word_order": "order of 16-bit words in a multi-register value",
    "_RegisterMap.byte_order": "order of the two bytes in each word",
    "_RegisterMap.scale_register": "a register holding a power-of-ten scale factor "
    "(SunSpec style); a bare number is its register",
    "Channel.unit": "unit of the interval value; a unit ending in h (kWh, kvarh) has a demand "
    "unit without it (kW, kvar)",
    "MeasurementPoint.unit": "unit of the value",
    "MeasurementPoint.offset": "added after scaling",
    "Measurements.points": "the values to poll",
    "ScaleRegister.function": "holding: function 3; input: function 4",
    "ScaleRegister.type": "scale factors are signed 16-bit",
    "StatusWord.function": "holding: function 3; input: function 4",
    "StatusWord.type": "register width",
    "StatusWord.word_order": "order of 16-bit words",
    "StatusWord.byte_order": "order of the two bytes in each word",
    "StatusWord.order": "vendor label for word_order/byte_order: ABCD, CDAB, BADC or DCBA",
    "MeterClock.format": "how the clock is encoded (see above)",
    "MeterClock.function": "holding: function 3; input: function 4",
    "MeterClock.type": "register type of an epoch clock",
    "MeterClock.word_order": "order of 16-bit words",
    "MeterClock.byte_order": "order of the two bytes in each word",
    "MeterClock.order": "vendor label for word_order/byte_order: ABCD, CDAB, BADC or DCBA",
    "Limits.min": "lowest plausible interval value",
    "Limits.max": "highest plausible interval value",
    "VirtualMeter.id": "virtual device id: names its topics like a real device's",
    "VirtualMeter.channels": "the computed channels",
    "VirtualChannel.name": "channel name",
    "VirtualChannel.subtract": "'device.channel' inputs to subtract",
    "VirtualChannel.unit": "unit of the result",
}

# Patterns shown in words.
PATTERNS: dict[str, str] = {
    cfg.IDENT_RE: "letters, digits and `_ . -`, starting with a letter or digit",
    r"^[^#+/][^#+]*[^#+/]$|^[^#+/]$": "no `#` or `+`, no leading or trailing `/`",
}

# `BeforeValidator`s by function name: what they let a YAML file write.
SHORTHANDS: dict[str, str] = {
    "_register_shorthand": "or a register number",
    "_one_or_many": "(or a single mapping)",
}

CONFIG_INTRO = """\
# Configuration reference

<!-- Generated by `python -m tools.docgen` from the models in edged/config.py: do not edit.
     Describe a key with Field(description=...) (or in edged/docgen.py DESCRIPTIONS) and
     regenerate; tests/test_docs.py fails when this file is stale. -->

edged reads one YAML file: `/etc/edged/edged.yaml` unless `-c FILE` says otherwise, for
every command (`run`, `check-config`, `status`, `intervals`). `edged check-config -c FILE`
validates it without touching the network and prints every problem at once, each with its
file, line and key (`edged.yaml:17 devices[0].channels[0].multipler: unknown key`).

- **Unknown keys are errors**, at every level: a misspelt key never silently falls back to a
  default.
- **Durations** are a number and a unit: `500ms`, `30s`, `15m`, `1h`, `1d` (units
  {units}); a bare number is seconds.
- **Sizes** are a number and a unit: `2 GB`, `500 MB`, `1.5 GiB` (decimal units `kB`, `MB`,
  `GB`, `TB`; binary `KiB`, `MiB`, `GiB`, `TiB`; any case); a bare whole number is bytes.
- **Identifiers** (site, device ids, channel names) use letters, digits and `_ . -`, and
  start with a letter or digit; they become MQTT topic levels and record ids.
- **Profiles**: a device may name a profile (`profile: pmc-1`) and inherit its register map;
  see [profiles.md](profiles.md) for the lookup order and the merge rules.
- The example configuration is `config/edged.yaml`; the shipped profiles are in
  `edged/config/profiles/`.

Types below: *duration* as above; *list of X* a YAML sequence; *mapping* a YAML mapping
documented in its own section; *one of* a fixed set of values. Default *required* means
the key must be given; *not set* means it is optional and off unless given.
"""

FLAGS_INTRO = """\
# Interval flags and quality

<!-- Generated by `python -m tools.docgen flags` from edged/core/flags.py (FLAG_TABLE): do not
     edit. Change the table and regenerate; tests/test_docs.py fails when this is stale. -->

Every interval record carries `flags`: the reasons its value deserves attention, in the
canonical order below, without duplicates. Two fields summarise them for consumers that do
not want to interpret flags themselves: `quality` (actual, suspect, estimated, missing) and
`iee_status` (the Itron IEE reading status codes of the flags). The other columns of the
table are for integrators mapping edged flags onto another system's vocabulary; edged itself
publishes only `flags`, `iee_status` and `quality`.
"""


@dataclass(frozen=True)
class TypeInfo:
    text: str
    children: tuple[tuple[type[BaseModel], str, str | None], ...] = ()  # model, suffix, tag
    duration: bool = False
    size: bool = False


@dataclass
class Row:
    key: str
    type: str
    default: str
    description: str


@dataclass
class Section:
    path: str
    model: type[BaseModel]
    tag: str | None = None
    rows: list[Row] = field(default_factory=list)

    @property
    def anchor(self) -> str:
        return anchor(self.path, self.tag)

    @property
    def title(self) -> str:
        name = f"`{self.path}`" if self.path else "Top level"
        return f"{name} (type: `{self.tag}`)" if self.tag else name


def anchor(path: str, tag: str | None = None) -> str:
    text = f"{path} {tag}" if tag else path
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "top-level"


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _model_tag(model: type[BaseModel]) -> str | None:
    """The `type: xxx` value of a discriminated union member."""
    tag = model.model_fields.get("type")
    if tag is not None and get_origin(tag.annotation) is Literal:
        values = get_args(tag.annotation)
        if len(values) == 1:
            return str(values[0])
    return None


def _validator_names(metadata: Iterable[Any]) -> list[str]:
    names = []
    for m in metadata:
        func = getattr(m, "func", None)
        if func is not None:
            names.append(getattr(func, "__name__", ""))
    return names


def describe(annotation: Any, metadata: Sequence[Any] = ()) -> TypeInfo:
    """A key's type in words, and the models documented in their own sections."""
    meta = list(metadata)
    if get_origin(annotation) is Annotated:
        inner, *extra = get_args(annotation)
        return describe(inner, [*meta, *extra])
    validators = _validator_names(meta)
    duration = unit_parsers.parse_duration_s.__name__ in validators
    shorthand = " ".join(SHORTHANDS[n] for n in validators if n in SHORTHANDS)
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        nullable = len(members) < len(get_args(annotation))
        if members and all(_is_model(m) for m in members) and len(members) > 1:
            tags = [_model_tag(m) for m in members]
            text = "mapping, `type` one of " + ", ".join(f"`{t}`" for t in tags)
            children = tuple((m, "", t) for m, t in zip(members, tags, strict=True))
            return TypeInfo(text, children)
        parts = [describe(m, meta) for m in members]
        text = " or ".join(p.text for p in parts)
        if nullable and not any(p.children for p in parts):
            text += " or null"
        children = tuple(c for p in parts for c in p.children)
        return TypeInfo(text, children, any(p.duration for p in parts), any(p.size for p in parts))
    if origin is Literal:
        values = ", ".join(f"`{v}`" for v in get_args(annotation))
        return TypeInfo(f"one of {values}" if len(get_args(annotation)) > 1 else values)
    if origin in (tuple, list):
        inner_info = describe(get_args(annotation)[0])
        children = tuple((m, s + "[]", t) for m, s, t in inner_info.children)
        return TypeInfo(f"list of {inner_info.text}", children, inner_info.duration)
    if origin is dict:
        key_t, value_t = get_args(annotation)
        return TypeInfo(f"mapping of {describe(key_t).text} to {describe(value_t).text}")
    if _is_model(annotation):
        text = f"mapping {shorthand}".rstrip()
        return TypeInfo(text, ((annotation, "", None),))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        if annotation is Flag:
            return TypeInfo("flag name ([flags.md](flags.md))")
        return TypeInfo("one of " + ", ".join(f"`{m.value}`" for m in annotation))
    if duration:
        return TypeInfo("duration", duration=True)
    if unit_parsers.parse_size_bytes.__name__ in validators:
        return TypeInfo("size", size=True)
    names = {int: "integer", float: "number", str: "string", bool: "boolean", Path: "path"}
    if annotation in names:
        return TypeInfo(f"{names[annotation]} {shorthand}".rstrip())
    return TypeInfo(getattr(annotation, "__name__", str(annotation)))


def _number(value: float, duration: bool) -> str:
    if duration and value:
        from edged.core.export import format_duration

        return format_duration(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def format_size(size_bytes: int) -> str:
    """2_000_000_000 -> '2 GB', 536_870_912 -> '512 MiB' (the config's own size syntax)."""
    for unit in ("TB", "TiB", "GB", "GiB", "MB", "MiB", "kB", "KiB"):
        factor = unit_parsers.SIZE_UNITS_BYTES[unit.upper()]
        if size_bytes >= factor and size_bytes % factor == 0:
            return f"{size_bytes // factor} {unit}"
    return f"{size_bytes} B"


def constraints(metadata: Sequence[Any], duration: bool) -> str:
    lower = upper = ""
    words = []
    for m in metadata:
        if isinstance(m, annotated_types.Ge):
            lower = f"≥ {_number(m.ge, duration)}"  # type: ignore[arg-type]
        elif isinstance(m, annotated_types.Gt):
            lower = f"> {_number(m.gt, duration)}"  # type: ignore[arg-type]
        elif isinstance(m, annotated_types.Le):
            upper = f"≤ {_number(m.le, duration)}"  # type: ignore[arg-type]
        elif isinstance(m, annotated_types.Lt):
            upper = f"< {_number(m.lt, duration)}"  # type: ignore[arg-type]
        elif isinstance(m, annotated_types.MinLen):
            if m.min_length:
                words.append(f"at least {m.min_length}")
        elif isinstance(m, annotated_types.MaxLen):
            words.append(f"at most {m.max_length}")
        pattern = getattr(m, "pattern", None)
        if isinstance(pattern, str):
            words.append(PATTERNS.get(pattern, f"matching `{pattern}`"))
    bounds = ", ".join(b for b in (lower, upper) if b)
    return "; ".join(w for w in (bounds, *words) if w)


def render_default(info: FieldInfo, type_info: TypeInfo, section_for: Callable[[Any], str]) -> str:
    if info.is_required():
        return "*required*"
    value = info.default
    if value is PydanticUndefined and info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
    if value is None:
        return "*not set*"
    if isinstance(value, BaseModel):
        return f"[its keys' defaults](#{section_for(value)})"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int) and type_info.size:
        return f"`{format_size(value)}`"
    if isinstance(value, int | float):
        return f"`{_number(value, type_info.duration)}`"
    if isinstance(value, tuple | list):
        return "`[]`" if not value else f"`{list(value)}`"
    if isinstance(value, enum.Enum):
        return f"`{value.value}`"
    text = str(value)
    return f"`{text}`" if text else '`""`'


def description_of(model: type[BaseModel], name: str, info: FieldInfo) -> str:
    if info.description:
        return info.description
    for base in model.__mro__:
        text = DESCRIPTIONS.get(f"{base.__name__}.{name}")
        if text is not None:
            return text
    return UNDOCUMENTED


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def config_sections(root: type[BaseModel] = cfg.Settings) -> list[Section]:
    """Depth-first: each mapping's section, then its sub-mappings' in key order."""
    sections: list[Section] = []

    def visit(model: type[BaseModel], path: str, tag: str | None) -> None:
        section = Section(path, model, tag)
        sections.append(section)
        children: list[tuple[type[BaseModel], str, str | None]] = []
        for name, info in model.model_fields.items():
            key = info.alias or name
            key_path = f"{path}.{key}" if path else key
            type_info = describe(info.annotation, info.metadata)
            text = type_info.text
            for child, suffix, child_tag in type_info.children:
                children.append((child, key_path + suffix, child_tag))
            links: list[tuple[str, str | None]] = []
            for _m, suffix, child_tag in type_info.children:
                if (key_path + suffix, child_tag) not in links:
                    links.append((key_path + suffix, child_tag))
            if links:
                text += (
                    " ("
                    + ", ".join(
                        f"[`{t}`](#{anchor(p, t)})" if t else f"[`{p}`](#{anchor(p)})"
                        for p, t in links
                    )
                    + ")"
                )
            limits = constraints(info.metadata, type_info.duration)
            if limits:
                text += f"; {limits}"

            def section_for(_value: Any, p: str = key_path) -> str:
                return anchor(p)

            section.rows.append(
                Row(
                    key=f"`{key}`",
                    type=text,
                    default=render_default(info, type_info, section_for),
                    description=description_of(model, name, info),
                )
            )
        for child, child_path, child_tag in children:
            visit(child, child_path, child_tag)

    visit(root, "", None)
    return sections


def _model_doc(model: type[BaseModel]) -> str:
    doc = model.__dict__.get("__doc__")
    return inspect.cleandoc(doc) if doc else ""


def config_reference() -> str:
    sections = config_sections()
    units = ", ".join(f"`{u}`" for u in unit_parsers.DURATION_UNITS_S)
    out = [CONFIG_INTRO.format(units=units), "## Contents\n"]
    for s in sections:
        depth = s.path.count(".") + (1 if s.path else 0)
        out.append(f"{'  ' * max(depth - 1, 0)}- [{s.title}](#{s.anchor})")
    out.append("")
    for s in sections:
        out.append(f'<a id="{s.anchor}"></a>\n\n## {s.title}\n')
        doc = _model_doc(s.model)
        if doc:
            out.append(doc + "\n")
        out.append("| key | type | default | description |")
        out.append("|---|---|---|---|")
        for r in s.rows:
            cells = (r.key, r.type, r.default, r.description)
            out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        out.append("")
    out.append(_profile_keys_section())
    return "\n".join(out).rstrip() + "\n"


def _profile_keys_section() -> str:
    keys = ", ".join(f"`{k}`" for k in sorted(load.PROFILE_KEYS))
    text = (
        '<a id="profile-files"></a>\n\n## Profile files\n\n'
        f"A profile (`edged/config/profiles/NAME.yaml`) may contain only these keys: {keys}. "
        "`name` and `description` are for people; the others have the meaning of the device "
        "keys of the same name and are inherited by every device naming the profile "
        "(docs/profiles.md has the merge rules).\n"
    )
    if "channel_template" in load.PROFILE_KEYS:
        text += (
            "\n`channel_template` (in a profile or on a device) with `channel_count` expands "
            "to channels 1..N before validation: a channel whose `name` contains `{n}` (any "
            "format spec, e.g. `branch{n:02d}`), whose `register` is channel 1's, and whose "
            "`stride` (default 2) is the register distance from one channel to the next. "
            "A `scale_register` in the template moves by `scale_stride` per channel (default "
            "0: one shared scale register; 1 for a power-of-ten register per circuit).\n"
        )
    if "site_must_set" in load.PROFILE_KEYS:
        text += (
            "\n`site_must_set` lists values a profile can only assume, as `{key: "
            "channels.NAME.KEY, why: TEXT}` (or a top-level device key): `edged check-config` "
            "warns, at the device's line, for every device that does not state the value "
            "itself (the PMC-1 pulse value is programmed per site).\n"
        )
    return text


# -- flags ----------------------------------------------------------------------------


def _dash(value: str | None) -> str:
    return value if value else "—"


QUALITY_EXAMPLES: tuple[tuple[Flag, ...], ...] = (
    (),
    (Flag.DST,),
    (Flag.ROLLOVER, Flag.DST),
    (Flag.PARTIAL,),
    (Flag.LONG, Flag.DST),
    (Flag.POWER_FAIL, Flag.MISSING),
    (Flag.AMT,),
    (Flag.AMT, Flag.ESTNEEDED),
    (Flag.AMT, Flag.ESTIMATED),
    (Flag.MISSING, Flag.ESTIMATED),
)


def flags_reference() -> str:
    out = [FLAGS_INTRO, "## The flags\n"]
    out.append(
        "| edged flag | meaning | Itron IEE status | ANSI C12.19 (table 64) | DLMS/COSEM "
        "profile status | IEC 61968-9 | NEM12 reason |"
    )
    out.append("|---|---|---|---|---|---|---|")
    for info in flag_table.FLAG_TABLE:
        cells = (f"`{info.flag}`", info.meaning, _dash(info.iee), _dash(info.c1219),
                 _dash(info.dlms), _dash(info.iec61968_9), _dash(info.nem12))  # fmt: skip
        out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    informational = ", ".join(f"`{f}`" for f in flag_table.ordered(flag_table.INFORMATIONAL_FLAGS))
    out.append(
        "\nColumns: *Itron IEE status* is the reading status code an IEE MDM uses (published "
        "in `iee_status`); *ANSI C12.19 table 64* the interval status nibble or bit; "
        "*DLMS/COSEM* the bit of the load profile status word (IEC 62056); *IEC 61968-9* the "
        "reading quality code (system.category.subcategory; `1.1.x` means any code of the "
        "diagnostics category, `cat. 8` the estimated category); *NEM12* the AEMO "
        "quality/reason code (`E/S/F` are quality flags, not reason codes). — means no "
        "equivalent.\n"
    )
    out.append("## Order\n")
    order = ", ".join(f"`{f}`" for f in Flag)
    out.append(f"Flags are listed in this order, whatever order they were raised in: {order}.\n")
    out.append("## Quality\n")
    out.append(
        "`quality` is derived from the flags, first match wins:\n\n"
        f"1. `{Quality.MISSING}` if `{Flag.MISSING}` is present (no measured value);\n"
        f"2. `{Quality.ESTIMATED}` if `{Flag.ESTIMATED}` is present (the value is not "
        "measured);\n"
        f"3. `{Quality.SUSPECT}` if any other flag is present except the informational ones "
        f"({informational});\n"
        f"4. `{Quality.ACTUAL}` otherwise.\n\n"
        "Examples (computed by `edged.core.flags.quality`):\n"
    )
    out.append("| flags | quality | iee_status |")
    out.append("|---|---|---|")
    for example in QUALITY_EXAMPLES:
        flags = ", ".join(f"`{f}`" for f in example) or "(none)"
        codes = ", ".join(f"`{c}`" for c in flag_table.iee_status(example)) or "(none)"
        out.append(f"| {flags} | `{flag_table.quality(example)}` | {codes} |")
    rule_codes = sorted(flag_table.AMT_RULE_IEE_CODES)
    rule_flags = [
        f"`{info.flag}`"
        for info in flag_table.FLAG_TABLE
        if info.iee in flag_table.AMT_RULE_IEE_CODES
    ]
    out.append("\n## iee_status\n")
    out.append(
        "`iee_status` lists the IEE codes of the flags in flag order, each once (several flags "
        "share a code: both `PARTIAL` and `LONG` are `IRREGULAR`). Flags without an IEE code "
        "add nothing.\n"
    )
    out.append("## The AMT validation rule\n")
    out.append(
        "Itron's user-defined validation rule for assumed meter time (docs/time.md) fails an "
        "interval that has any of the status codes "
        + ", ".join(f"`{c}`" for c in rule_codes)
        + " and no `AMT` yet, marking it `AMT` and `ESTNEEDED`. In edged terms those codes "
        "come from the flags " + ", ".join(rule_flags) + ". With `validation: amt_rule` on a "
        "device the rule is applied at the edge.\n"
    )
    return "\n".join(out).rstrip() + "\n"


# -- the time state table (a generated section of docs/time.md) --------------------------

TIME_STATES_BEGIN = "<!-- BEGIN GENERATED: time-states (python -m tools.docgen --write) -->"
TIME_STATES_END = "<!-- END GENERATED: time-states -->"


def time_state_table() -> str:
    rows = ["| state | input | meaning of the input | next state |", "|---|---|---|---|"]
    for (state, event), after in states.TIME_STATE_TRANSITIONS.items():
        rows.append(f"| `{state}` | `{event}` | {states.INPUT_MEANING[event]} | `{after}` |")
    rows.append("")
    rows.append(f"The state at start-up is `{states.INITIAL_TIME_STATE}`.")
    return "\n".join(rows)


def time_reference() -> str:
    """docs/time.md as committed, with its state table regenerated."""
    text = (DOCS_DIR / "time.md").read_text(encoding="utf-8")
    head, found, rest = text.partition(TIME_STATES_BEGIN + "\n")
    _, found_end, tail = rest.partition(TIME_STATES_END)
    if not (found and found_end):
        raise SystemExit(
            f"docs/time.md lacks the markers {TIME_STATES_BEGIN} ... {TIME_STATES_END}"
        )
    return f"{head}{TIME_STATES_BEGIN}\n{time_state_table()}\n{TIME_STATES_END}{tail}"


# -- command line ---------------------------------------------------------------------

GENERATED = {"config": ("configuration.md", config_reference),
             "flags": ("flags.md", flags_reference),
             "time": ("time.md", time_reference)}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.docgen",
        description="Print a generated reference document, or --write them all.",
    )
    parser.add_argument("which", nargs="?", choices=sorted(GENERATED), default="config")
    parser.add_argument("--write", nargs="?", const=DOCS_DIR, type=Path, default=None,
                        metavar="DIR", help=f"write every generated file into DIR "
                        f"(default {DOCS_DIR})")  # fmt: skip
    args = parser.parse_args(argv)
    if args.write is not None:
        for filename, build in GENERATED.values():
            target = args.write / filename
            target.write_text(build(), encoding="utf-8")
            print(f"wrote {target}", file=sys.stderr)
        return 0
    sys.stdout.write(GENERATED[args.which][1]())
    return 0


if __name__ == "__main__":
    sys.exit(main())
