"""Simulated meters built from golden register tables, never from edged's profiles.

A golden table (``tests/golden/<profile>.yaml``, format in its README) lists the
registers of a meter as the vendor's document gives them: address, function, raw
words and the value they mean. A profile test that serves the profile's own map
back to it cannot notice a wrong address; a meter built here serves the vendor's
registers, so a profile reading the wrong one decodes zeros (or an exception)
instead of the golden value.

    table = load_table(Path("tests/golden/pm8000.yaml"))
    meter = golden_meter(table)          # a SimulatedMeter for MeterServer
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edged.sim.meter import SimulatedMeter, StaticPoint, Table
from edged.sim.modbus_frames import DataType

__all__ = [
    "GoldenError",
    "GoldenRow",
    "GoldenTable",
    "golden_meter",
    "load_table",
    "register_image",
]


class GoldenError(ValueError):
    """A golden file that does not follow the format (tests/golden/README.md)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GoldenRow:
    """One register row of a golden table."""

    name: str
    variant: str | None
    address: int
    function: str  # holding | input
    type: str
    word_order: str  # big | little | n/a
    raw: tuple[int, ...]
    value: Any  # number, ISO date-time text (clocks), a list of flag names, or None
    unit: str | None
    scale: float
    scale_address: int | None
    scale_raw: tuple[int, ...]
    tolerance: float | None
    source_kind: str
    citation: str
    offset: int | None = None  # SunSpec: offset from the model's id register


@dataclass(frozen=True, slots=True, kw_only=True)
class Template:
    """Circuit n is row ``first`` moved by (n-1) x ``stride`` (scale by ``scale_stride``)."""

    pattern: str  # e.g. branch{n:02d}_energy
    first: str
    stride: int
    scale_stride: int
    n_first: int
    n_last: int


@dataclass(frozen=True, slots=True, kw_only=True)
class GoldenTable:
    profile: str
    path: Path
    rows: tuple[GoldenRow, ...]
    profile_rows: Mapping[str, Any]  # profile row -> golden row name | {unverified: why}
    templates: tuple[Template, ...]
    verified_profile: bool
    data: Mapping[str, Any]  # the whole file, for the evidence that is not a row
    # Registers a meter serves besides the rows (the SunSpec marker and model chain).
    extra_registers: Mapping[tuple[str, int], int] = field(default_factory=dict)

    def named(self, name: str) -> list[GoldenRow]:
        """Every row (variants included) called ``name``."""
        return [row for row in self.rows if row.name == name]

    def rows_for(self, profile_row: str) -> list[GoldenRow] | str | None:
        """Golden rows for a profile row, the `unverified` reason, or None (neither)."""
        entry = self.profile_rows.get(profile_row)
        if isinstance(entry, str):
            rows = self.named(entry)
            if not rows:
                raise GoldenError(f"{self.path}: profile row {profile_row} -> unknown row {entry}")
            return rows
        if isinstance(entry, dict):
            reason = entry.get("unverified")
            if not isinstance(reason, str) or not reason.strip():
                raise GoldenError(f"{self.path}: {profile_row}: unverified needs a reason")
            return reason
        for template in self.templates:
            n = _template_index(template.pattern, profile_row)
            if n is not None and template.n_first <= n <= template.n_last:
                return [_shift(row, template, n) for row in self.named(template.first)]
        return None


def _template_index(pattern: str, name: str) -> int | None:
    # "branch{n:02d}_energy" -> ^branch(\d+)_energy$
    parts = re.split(r"\{n[^}]*\}", pattern)
    if len(parts) != 2:
        return None
    match = re.fullmatch(re.escape(parts[0]) + r"(\d+)" + re.escape(parts[1]), name)
    if match is None or pattern.format(n=int(match.group(1))) != name:
        return None
    return int(match.group(1))


def _shift(row: GoldenRow, template: Template, n: int) -> GoldenRow:
    scale = row.scale_address
    return GoldenRow(
        name=template.pattern.format(n=n),
        variant=row.variant,
        address=row.address + (n - 1) * template.stride,
        function=row.function,
        type=row.type,
        word_order=row.word_order,
        raw=row.raw,
        value=row.value,
        unit=row.unit,
        scale=row.scale,
        scale_address=None if scale is None else scale + (n - 1) * template.scale_stride,
        scale_raw=row.scale_raw,
        tolerance=row.tolerance,
        source_kind=row.source_kind,
        citation=f"{row.citation} (template {template.pattern}, n={n})",
        offset=row.offset,
    )


def _words(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(w, int) and 0 <= w <= 0xFFFF for w in value
    ):
        raise GoldenError(f"{where}: raw registers must be a list of 0..65535")
    return tuple(value)


def _row(entry: Any, where: str, documents: set[str]) -> GoldenRow:
    if not isinstance(entry, dict):
        raise GoldenError(f"{where}: a row is a mapping")
    for key in ("name", "address", "function", "type", "raw", "value", "source", "source_kind"):
        if key not in entry:
            raise GoldenError(f"{where}: row {entry.get('name')} has no {key}")
    source = entry["source"]
    if not isinstance(source, dict) or source.get("document") not in documents:
        raise GoldenError(f"{where}: row {entry['name']} cites no listed document")
    if entry["function"] not in ("holding", "input"):
        raise GoldenError(f"{where}: row {entry['name']}: function {entry['function']!r}")
    scale_register = entry.get("scale_register")
    scale_address = scale_register.get("address") if isinstance(scale_register, dict) else None
    page = source.get("page")
    citation = f"{source['document']}: {source.get('table')}" + (f", p.{page}" if page else "")
    return GoldenRow(
        name=str(entry["name"]),
        variant=entry.get("variant"),
        address=int(entry["address"]),
        function=entry["function"],
        type=str(entry["type"]),
        word_order=str(entry.get("word_order", "n/a")),
        raw=_words(entry["raw"], where),
        value=entry["value"],
        unit=entry.get("unit"),
        scale=float(entry.get("scale", 1)),
        scale_address=scale_address,
        scale_raw=_words(entry.get("scale_raw", []), where),
        tolerance=entry.get("tolerance"),
        source_kind=str(entry["source_kind"]),
        citation=citation,
        offset=entry.get("offset"),
    )


def load_table(path: Path) -> GoldenTable:
    """Read and check one golden file."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("profile"), str):
        raise GoldenError(f"{path}: a golden file is a mapping with a `profile`")
    documents = {d["id"] for d in data.get("documents") or [] if isinstance(d, dict)}
    rows = tuple(_row(e, str(path), documents) for e in data.get("registers") or [])
    templates = []
    for key, spec in (data.get("template") or {}).items():
        if isinstance(spec, dict) and "first" in spec:
            n_first, n_last = spec["n"]
            templates.append(
                Template(
                    pattern=spec["name"],
                    first=spec["first"],
                    stride=int(spec["stride"]),
                    scale_stride=int(spec.get("scale_stride", 0)),
                    n_first=int(n_first),
                    n_last=int(n_last),
                )
            )
            if not any(r.name == spec["first"] for r in rows):
                raise GoldenError(f"{path}: template {key} names unknown row {spec['first']}")
    extra: dict[tuple[str, int], int] = {}
    discovery = data.get("discovery_vector")
    if isinstance(discovery, dict):
        for entry in discovery.get("registers") or []:
            words = _words(entry.get("raw"), str(path))
            extra.update({("holding", int(entry["address"]) + i): w for i, w in enumerate(words)})
    return GoldenTable(
        profile=data["profile"],
        path=path,
        rows=rows,
        profile_rows=data.get("profile_rows") or {},
        templates=tuple(templates),
        verified_profile=bool(data.get("verified_profile", False)),
        data=data,
        extra_registers=extra,
    )


def register_image(rows: Iterable[GoldenRow]) -> dict[tuple[str, int], int]:
    """(function, address) -> raw word of every row and its scale register.

    Rows are placed in order; a row whose registers another row already set
    differently is skipped (a variant of the same point), so the first vector
    of each point is what a meter built from the image serves."""
    image: dict[tuple[str, int], int] = {}
    for row in rows:
        words = {(row.function, row.address + i): w for i, w in enumerate(row.raw)}
        if row.scale_address is not None and row.scale_raw:
            words.update(
                {(row.function, row.scale_address + i): w for i, w in enumerate(row.scale_raw)}
            )
        if any(image.get(key, word) != word for key, word in words.items()):
            continue
        image.update(words)
    return image


def golden_meter(table: GoldenTable, rows: Sequence[GoldenRow] | None = None) -> SimulatedMeter:
    """A meter serving the golden registers of ``rows`` (default: every row of the
    table), variants excluded; template circuits are served when their expanded
    rows (:meth:`GoldenTable.rows_for`) are passed.

    Unlisted registers between listed ones read as 0 (``fill_gaps``), as on
    meters that answer reads spanning unused registers; above the highest
    listed register a read is an illegal-address exception."""
    chosen = [r for r in (table.rows if rows is None else rows) if r.variant is None]
    image = {**table.extra_registers, **register_image(chosen)}
    points = [
        StaticPoint(
            name=f"{function}.{address}",
            address=address,
            value=word,
            table=Table(function),
            data_type=DataType.UINT16,
        )
        for (function, address), word in sorted(image.items())
    ]
    return SimulatedMeter(points, fill_gaps=True)
