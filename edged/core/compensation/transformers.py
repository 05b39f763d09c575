"""Instrument-transformer (CT/VT) error correction (pure; docs/compensation.md).

Definitions (IEC 61869-2 for CTs, IEC 61869-3 for VTs; IEEE C57.13 agrees on
the sign of the phase angle):

* ratio error ``e = (Kn * Xs - Xp) / Xp * 100 %``: positive when the secondary,
  times the rated ratio Kn, is larger than the primary (the meter reads high);
* phase displacement ``d`` (minutes): positive when the secondary phasor
  leads the primary phasor.

An IEEE C57.13 certificate gives the ratio correction factor instead,
``RCF = true ratio / marked ratio = Xp / (Kn * Xs)``, so ``e = (1 / RCF - 1) * 100``.

With ``s = (1 + e_v)(1 + e_i)`` and ``delta = d_i - d_v`` (radians), the power a
meter measures behind the transformers is the true complex power rotated by
``-delta`` and scaled by ``s``. So the true power is, exactly,

    P = (P_m cos(delta) - Q_m sin(delta)) / s
    Q = (P_m sin(delta) + Q_m cos(delta)) / s

with P and Q signed in the meter's load convention (import and lagging vars
positive). It is linear in (P_m, Q_m), so it holds for interval energies too.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

MINUTES_PER_RADIAN = 180.0 * 60.0 / math.pi


@dataclass(frozen=True, slots=True)
class CertificatePoint:
    """One test point of a certificate, at the certificate's burden."""

    percent: float  # of rated current (CT) or rated voltage (VT)
    ratio_error_pct: float
    phase_min: float  # minutes of arc, secondary leading positive


@dataclass(frozen=True, slots=True)
class TransformerError:
    """A transformer's errors at one operating point."""

    ratio_error_pct: float = 0.0
    phase_min: float = 0.0


NO_ERROR = TransformerError()


def ratio_error_from_rcf(rcf: float) -> float:
    """IEEE C57.13 ratio correction factor -> IEC ratio error in percent."""
    return (1.0 / rcf - 1.0) * 100.0


def interpolate(points: Sequence[CertificatePoint], percent: float) -> TransformerError:
    """Errors at `percent` of rated, piecewise-linear between the certificate
    points (sorted by percent, strictly increasing) and flat beyond the first
    and last point: a transformer is never extrapolated into a region nobody
    tested; the nearest tested error is the honest figure."""
    if not points:
        return NO_ERROR
    first, last = points[0], points[-1]
    if percent <= first.percent:
        return TransformerError(first.ratio_error_pct, first.phase_min)
    if percent >= last.percent:
        return TransformerError(last.ratio_error_pct, last.phase_min)
    i = bisect.bisect_right([p.percent for p in points], percent)
    lo, hi = points[i - 1], points[i]
    t = (percent - lo.percent) / (hi.percent - lo.percent)
    return TransformerError(
        lo.ratio_error_pct + t * (hi.ratio_error_pct - lo.ratio_error_pct),
        lo.phase_min + t * (hi.phase_min - lo.phase_min),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Correction:
    """The result at one operating point: the true power from the measured."""

    active: float  # corrected P (or energy), meter sign convention
    reactive: float  # corrected Q
    ratio_scale: float  # s = (1 + e_v)(1 + e_i)
    delta_rad: float  # d_i - d_v


def correct(
    active_measured: float,
    reactive_measured: float,
    ct: TransformerError,
    vt: TransformerError,
) -> Correction:
    """True (P, Q) from measured (P_m, Q_m), see the module docstring."""
    scale = (1.0 + vt.ratio_error_pct / 100.0) * (1.0 + ct.ratio_error_pct / 100.0)
    delta = (ct.phase_min - vt.phase_min) / MINUTES_PER_RADIAN
    cos_d, sin_d = math.cos(delta), math.sin(delta)
    return Correction(
        active=(active_measured * cos_d - reactive_measured * sin_d) / scale,
        reactive=(active_measured * sin_d + reactive_measured * cos_d) / scale,
        ratio_scale=scale,
        delta_rad=delta,
    )


def factors(
    active_measured: float,
    reactive_measured: float,
    ct: TransformerError,
    vt: TransformerError,
) -> tuple[float, float]:
    """Multiplicative correction factors (k_P, k_Q) at this operating point.

    k = true / measured. Where the measured quantity is zero the factor of the
    ratio errors alone, 1/s, is given (the quantity stays zero: see
    docs/compensation.md, "limits")."""
    c = correct(active_measured, reactive_measured, ct, vt)
    k_p = c.active / active_measured if active_measured else 1.0 / c.ratio_scale
    k_q = c.reactive / reactive_measured if reactive_measured else 1.0 / c.ratio_scale
    return k_p, k_q
