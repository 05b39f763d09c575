"""Counter arithmetic in exact decimal: deltas across wraps, the resolution
of float registers, the plausibility check and the allocation of a gap's
energy (pure).
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Context, Decimal, localcontext
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only annotations: the engine loads no pydantic at run time
    from edged.config.schema import (
        Channel,
    )


# A float counter whose resolution step exceeds this fraction of an interval's
# delta cannot split energy between intervals to billing accuracy (0.2S meters
# are good to 0.2 %).
RESOLUTION_FRACTION = Decimal("0.001")

# Enough digits for a 64-bit counter times a 17-digit multiplier, exactly.
_DECIMAL = Context(prec=80)


# --------------------------------------------------------------------------
# Counter arithmetic


@dataclass(frozen=True, slots=True)
class Delta:
    counts: int | float
    wrapped: bool


def counter_delta(start: int | float, end: int | float, rollover: int | None) -> Delta:
    """Counts between two reads; a decrease is a wrap when the channel has a modulus.

    Pure modular arithmetic, no plausibility judgement (see `check_delta`).
    """
    if end >= start:
        return Delta(end - start, wrapped=False)
    if rollover is None:
        raise ValueError("counter decreased on a channel without a rollover modulus")
    if isinstance(start, int) and isinstance(end, int):
        return Delta((end - start) % rollover, wrapped=True)
    return Delta(float(end) - float(start) + rollover, wrapped=True)


def _to_decimal(value: int | float | Decimal) -> Decimal:
    if isinstance(value, Decimal):
        return value
    return Decimal(value) if isinstance(value, int) else Decimal(repr(value))


def _energy(counts: Decimal, multiplier: float) -> Decimal:
    with localcontext(_DECIMAL):
        return counts * Decimal(repr(multiplier))


def _float32_decimal(value: float) -> Decimal:
    """The shortest decimal that is the same float32 (what the meter meant)."""
    try:
        if struct.unpack("<f", struct.pack("<f", value))[0] != value:
            return Decimal(repr(value))  # not a float32 value: keep every digit
        for digits in range(1, 10):
            text = f"{value:.{digits}g}"
            if struct.unpack("<f", struct.pack("<f", float(text)))[0] == value:
                decimal = Decimal(text)
                if "e+" in text:  # "1e+01" -> 10: keep the units digit as the exponent
                    with localcontext(_DECIMAL):
                        decimal = decimal.quantize(Decimal(1))
                return decimal
    except OverflowError:
        pass
    return Decimal(repr(value))


def counter_decimal(value: int | float, data_type: str) -> Decimal:
    """A raw counter as an exact decimal, floats at their register's precision."""
    if isinstance(value, int):
        return Decimal(value)
    if data_type == "float32":
        return _float32_decimal(value)
    return Decimal(repr(value))


def counter_quantum(magnitude: Decimal, data_type: str) -> Decimal:
    """The register's resolution step (in counts) at this counter magnitude."""
    if data_type not in ("float32", "float64"):
        return Decimal(1)
    m = abs(float(magnitude))
    if m == 0.0 or not math.isfinite(m):
        return Decimal(0)
    if data_type == "float64":
        return Decimal(math.ulp(m))
    exponent = math.frexp(m)[1]  # m = f x 2**exponent with 0.5 <= f < 1
    return Decimal(2) ** max(exponent - 24, -149)


def default_max_demand(channel: Channel, interval_s: int) -> float | None:
    """The demand limit in force for a one-interval span (unit per hour).

    Configured ``max_demand``, else the device's rated power x margin, else
    half the counter modulus per interval
    (see the module docstring for how longer spans are judged), else None.
    """
    return _limit_or_default(channel.plausible_demand, channel.rollover_counts, channel, interval_s)


def _limit_or_default(
    limit: float | None, modulus: int | None, channel: Channel, interval_s: int
) -> float | None:
    if limit is not None:
        return limit
    if modulus is None:
        return None
    return _half_modulus_demand(modulus, channel.multiplier, interval_s)


# Asked at every record, the same for every record of a channel: remembered.
# typed: an int and a float key never share an entry (the multiplier, > 0 by
# the config's validation, has no -0.0 to confuse with 0.0).
@functools.lru_cache(maxsize=1024, typed=True)
def _half_modulus_demand(modulus: int, multiplier: float, interval_s: int) -> float:
    with localcontext(_DECIMAL):
        half = Decimal(modulus) / 2
        return float(_energy(half, multiplier) / (Decimal(interval_s) / 3600))


@dataclass(frozen=True, slots=True, kw_only=True)
class DeltaCheck:
    """A counter step judged for plausibility."""

    counts: Decimal  # forward distance in counts (mod rollover)
    wrapped: bool
    reset: str | None  # None, or "went_back", "jumped", "ambiguous_wraps"
    implied_demand: float | None  # counts x multiplier per hour of the true span
    max_demand: float | None  # the limit applied for a one-interval span
    quantum: Decimal  # register resolution at this magnitude, in counts
    coarse: bool  # quantum > RESOLUTION_FRACTION of the delta


def check_delta(
    start: int | float,
    end: int | float,
    channel: Channel,
    span_s: float,
    nominal_s: float,
) -> DeltaCheck:
    """Judge the step from `start` to `end` over `span_s` true seconds."""
    ds = counter_decimal(start, channel.type)
    de = counter_decimal(end, channel.type)
    modulus = channel.rollover_counts
    quantum = counter_quantum(max(abs(ds), abs(de)), channel.type)
    reset: str | None = None
    wrapped = False
    with localcontext(_DECIMAL):
        if de >= ds:
            counts = de - ds
        elif modulus is not None:
            counts, wrapped = de - ds + modulus, True
        else:
            counts, reset = ds - de, "went_back"
        # Read once: a pydantic private attribute behind it costs a lookup miss.
        limit = channel.plausible_demand
        if reset is None:
            if limit is not None:
                hours = Decimal(repr(max(span_s, nominal_s))) / 3600
                allowance = (
                    Decimal(repr(limit)) * hours / Decimal(repr(channel.multiplier)) + quantum
                )
                if counts > allowance:
                    reset = "went_back" if wrapped else "jumped"
                elif modulus is not None and counts + modulus <= allowance:
                    reset = "ambiguous_wraps"
            elif modulus is not None and 2 * counts >= modulus * _default_spans(span_s, nominal_s):
                reset = "went_back" if wrapped else "jumped"
        implied = None
        if span_s > 0:
            implied = float(_energy(counts, channel.multiplier) / (Decimal(repr(span_s)) / 3600))
        # Integer registers count exactly; only a float register rounds the counter.
        is_float = channel.type in ("float32", "float64")
        coarse = is_float and counts > 0 and quantum > RESOLUTION_FRACTION * counts
    return DeltaCheck(
        counts=counts,
        wrapped=wrapped,
        reset=reset,
        implied_demand=implied,
        max_demand=_limit_or_default(limit, modulus, channel, int(nominal_s)),
        quantum=quantum,
        coarse=coarse,
    )


def _default_spans(span_s: float, nominal_s: float) -> Decimal:
    """How many intervals' worth of M/2 the default rule allows over a span.

    Up to two intervals the reading is unambiguous even at M/2 per interval
    (the next candidate, counts + M, exceeds 2 x M/2), so a span of k <= 2
    intervals allows k x M/2: one missed read on a 16-bit counter no longer
    throws away two intervals of ordinary energy; the price is
    that a meter exchange within one missed read passes as energy. Beyond two
    intervals it stays M/2 (k x M/2 >= M would accept any reading and hide a
    meter exchange during an outage).
    """
    if nominal_s <= 0:
        return Decimal(1)
    k = max(Decimal(1), Decimal(repr(span_s)) / Decimal(repr(nominal_s)))
    return k if k <= 2 else Decimal(1)


def allocate(total: Decimal, weights: Sequence[int], finest: int = 0) -> list[Decimal]:
    """Split `total` in proportion to positive integer `weights`.

    Shares are whole multiples of 10**e, where e is the smaller of `finest`
    and the total's last decimal place (finest=0: whole counts for an integer
    counter), and add up to `total` exactly: the cumulative share is rounded,
    so rounding never accumulates.
    """
    if not weights or any(w <= 0 for w in weights):
        raise ValueError("weights must be positive")
    total_exponent = total.as_tuple().exponent
    if not isinstance(total_exponent, int):
        raise ValueError("total must be finite")
    exponent = min(total_exponent, finest)
    with localcontext(_DECIMAL):
        units = int(total.scaleb(-exponent))
    whole = sum(weights)
    shares: list[Decimal] = []
    cumulative = done = 0
    for weight in weights:
        cumulative += weight
        upto = (2 * units * cumulative + whole) // (2 * whole)  # round half up
        shares.append(Decimal(upto - done).scaleb(exponent))
        done = upto
    return shares
