"""Expected values of golden register rows, in a profile's units."""

from __future__ import annotations

from decimal import Decimal

from edged.sim.golden import GoldenRow


def expected_number(row: GoldenRow) -> Decimal:
    return Decimal(repr(row.value)) if isinstance(row.value, float) else Decimal(row.value)


PREFIXES = {("wh", "kwh"): Decimal("0.001"), ("varh", "kvarh"): Decimal("0.001")}


def expected_in(row: GoldenRow, unit: str) -> Decimal | None:
    """The golden value in ``unit`` (the profile's), exactly; None: not implemented."""
    if row.value is None:
        return None
    factor = PREFIXES.get(((row.unit or "").lower(), unit.lower()), Decimal(1))
    return expected_number(row) * factor
