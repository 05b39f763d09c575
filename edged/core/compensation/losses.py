"""Transformer and line loss compensation (pure, decimal; docs/compensation.md).

Per interval, from the interval's V²·h and I²·h (the integral of the squared
voltage and current over the interval, in the units of the rated values):

* transformer no-load (iron) loss  = P_fe * V²h / V_r²   (P_fe at rated voltage)
* transformer load (copper) loss   = P_cu * I²h / I_r²   (P_cu at rated current)
* line loss                        = phases * R * I²h / 1000  (kWh; R per phase,
  referred to the metered side)

Transformer and line are entered separately (as the ION 8600 allows); either
may be absent. The figures are decimal so that the kWh an auditor recomputes
by hand are the kWh published.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

ZERO = Decimal(0)


def dec(value: float | int | Decimal) -> Decimal:
    """A float as the decimal its repr shows (0.1 -> Decimal('0.1'))."""
    if isinstance(value, Decimal):
        return value
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class TransformerLoss:
    no_load_loss_kw: Decimal  # iron loss at rated voltage
    rated_voltage_v: Decimal
    load_loss_kw: Decimal  # copper loss at rated current
    rated_current_a: Decimal


@dataclass(frozen=True, slots=True)
class LineLoss:
    resistance_ohm: Decimal  # per phase, referred to the metered side
    phases: int = 3


@dataclass(frozen=True, slots=True)
class Losses:
    iron_kwh: Decimal = ZERO
    copper_kwh: Decimal = ZERO
    line_kwh: Decimal = ZERO

    @property
    def total_kwh(self) -> Decimal:
        return self.iron_kwh + self.copper_kwh + self.line_kwh


NO_LOSSES = Losses()


def losses(
    transformer: TransformerLoss | None,
    line: LineLoss | None,
    *,
    v2h: Decimal,
    i2h: Decimal,
) -> Losses:
    """Loss energy of one interval from its V²h (V²·h) and I²h (A²·h)."""
    iron = copper = line_kwh = ZERO
    if transformer is not None:
        iron = transformer.no_load_loss_kw * v2h / transformer.rated_voltage_v**2
        copper = transformer.load_loss_kw * i2h / transformer.rated_current_a**2
    if line is not None:
        line_kwh = line.phases * line.resistance_ohm * i2h / 1000
    return Losses(iron, copper, line_kwh)
