"""SunSpec meters (models 201-204), pure part: point layout from the model
definitions and the rules of model discovery.

A SunSpec device marks its register map with "SunS" at one of the base
addresses 0, 40000 or 50000 (PDU addresses) and lists its models after it: each
model is its id, its length L (registers after these two) and L registers; the
chain ends with id 0xFFFF (pysunspec2, ``SunSpecModbusClientDevice.scan``). A
meter model's points sit at fixed offsets from the model's id register, taken
here from the SunSpec model definitions (the JSON files pysunspec2 ships), never
from a hand-written register list. The reads themselves are
:mod:`edged.io.sunspec`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from edged.core.errors import EdgedError
from edged.core.registers import DataType

MARKER: Final = (0x5375, 0x6E53)  # "SunS"
BASE_ADDRESSES: Final = (0, 40000, 50000)
END_MODEL_ID: Final = 0xFFFF
METER_MODELS: Final = (201, 202, 203, 204)
# Longest chain walked before giving up (a device answering garbage must not loop).
MAX_MODELS: Final = 64

# SunSpec point type -> edged register type; sunssf is a signed 16-bit exponent.
_TYPES: Final[dict[str, DataType]] = {
    "uint16": "uint16",
    "int16": "int16",
    "sunssf": "int16",
    "acc16": "uint16",
    "uint32": "uint32",
    "int32": "int32",
    "acc32": "uint32",
    "bitfield16": "uint16",
    "bitfield32": "uint32",
    "enum16": "uint16",
    "uint64": "uint64",
    "int64": "int64",
    "acc64": "uint64",
    "float32": "float32",
    "float64": "float64",
}
# The raw value that means "not implemented" (pysunspec2 mb.py SUNS_UNIMPL_*).
_NOT_IMPLEMENTED: Final[dict[str, int]] = {
    "int16": -32768,
    "sunssf": -32768,
    "uint16": 0xFFFF,
    "acc16": 0,
    "int32": -(2**31),
    "uint32": 0xFFFFFFFF,
    "acc32": 0,
    "acc64": 0,
}


class SunSpecError(EdgedError, ValueError):
    """A model definition or a point name that cannot be used."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PointDef:
    """One point of a model: offset from the model's id register, and how to read it."""

    name: str
    offset: int
    size: int
    sunspec_type: str
    sf: str | None
    units: str | None

    @property
    def data_type(self) -> DataType:
        try:
            return _TYPES[self.sunspec_type]
        except KeyError:
            raise SunSpecError(
                f"point {self.name}: type {self.sunspec_type} is not readable"
            ) from None

    @property
    def not_implemented(self) -> int | None:
        return _NOT_IMPLEMENTED.get(self.sunspec_type)


def model_points(definition: Mapping[str, Any]) -> dict[str, PointDef]:
    """Points of a model definition's top-level group, by name (offset of ID is 0)."""
    group = definition.get("group")
    if not isinstance(group, Mapping) or not isinstance(group.get("points"), list):
        raise SunSpecError("not a SunSpec model definition (no group.points)")
    points: dict[str, PointDef] = {}
    offset = 0
    for point in group["points"]:
        size = int(point["size"])
        points[point["name"]] = PointDef(name=point["name"], offset=offset, size=size,
                                         sunspec_type=point["type"], sf=point.get("sf"),
                                         units=point.get("units"))  # fmt: skip
        offset += size
    return points


def common_point(definitions: Mapping[int, Mapping[str, Any]], name: str) -> PointDef:
    """``name`` in every one of the models, at the same offset and type (meter models
    201-204 share one layout, so a device may carry any of them)."""
    found = {model: model_points(d).get(name) for model, d in definitions.items()}
    missing = sorted(m for m, p in found.items() if p is None)
    if missing:
        raise SunSpecError(f"point {name} is not in model(s) {missing}")
    layouts = {(p.offset, p.sunspec_type, p.sf) for p in found.values() if p is not None}
    if len(layouts) != 1:
        raise SunSpecError(f"point {name} differs between models {sorted(found)}: {layouts}")
    return next(p for p in found.values() if p is not None)


@dataclass(frozen=True, slots=True)
class ModelRef:
    """A model found in the chain: its id, the address of its id register, its length."""

    model_id: int
    address: int
    length: int


def is_marker(words: Sequence[int]) -> bool:
    return tuple(words) == MARKER


def next_model_address(model: ModelRef) -> int:
    return model.address + 2 + model.length


def choose_model(found: Sequence[ModelRef], wanted: Sequence[int]) -> ModelRef | None:
    """The first model of the chain that is one of ``wanted``."""
    return next((m for m in found if m.model_id in wanted), None)


# --------------------------------------------------------------------------
# `profile: sunspec`: config entries from point names


def _models(section: Mapping[str, Any]) -> tuple[int, ...]:
    models = section.get("models", list(METER_MODELS))
    if not isinstance(models, list) or not models or not all(isinstance(m, int) for m in models):
        raise SunSpecError("sunspec.models must list model ids, e.g. [201, 202, 203, 204]")
    return tuple(models)


def _entry(item: Any, definitions: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    if not isinstance(item, dict) or not isinstance(item.get("point"), str):
        raise SunSpecError("an entry is {name: ..., point: SunSpec point name, unit: ...}")
    point = common_point(definitions, item["point"])
    entry = {k: v for k, v in item.items() if k != "point"}
    entry.setdefault("name", point.name)
    entry["register"] = point.offset
    entry["type"] = point.data_type
    if point.not_implemented is not None:
        entry["not_implemented"] = point.not_implemented
    if point.sf is not None:
        entry["scale_register"] = common_point(definitions, point.sf).offset
    return entry


def expand(
    section: Any, definition: Callable[[int], Mapping[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """(channels, measurement points, the device's `sunspec` setting) of a profile's
    `sunspec:` section, as config entries: `register` is the point's offset from the
    model's id register, `scale_register` its scale-factor point's offset.
    ``definition`` gives a model's definition by id. Raises ValueError (SunSpecError
    among them) with the reason."""
    if not isinstance(section, Mapping):
        raise SunSpecError("sunspec must be a mapping with models, channels, measurements")
    models = _models(section)
    definitions = {m: definition(m) for m in models}
    channels = [_entry(item, definitions) for item in section.get("channels") or []]
    points = [_entry(item, definitions) for item in section.get("measurements") or []]
    return channels, points, {"models": list(models)}
