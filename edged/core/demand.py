"""Demand: block, rolling and billing-period peak (pure).

Block demand
    energy of one interval / hours of the nominal interval (PMC-1 note:
    252.576 kWh / 0.25 h = 1010.304 kW). Irregular (PARTIAL/LONG) records use
    the hours they really cover, so a LONG record closing a gap shows the
    average over the gap, not a false spike. Demand is suspended (null) on
    assumed meter time (AMT), as an AMT meter suspends its demand register.

Rolling demand (``demand: {window: 30m, subintervals: 2}``)
    the window must be exactly ``subintervals x interval``; the value is the
    energy of the last ``subintervals`` intervals (this one included) divided
    by the window in hours, published on the last interval of the window.

Which intervals may feed a demand (`usable_for_demand`)
    only intervals whose quality is ``actual`` (no flag but DST/ROLLOVER) and
    that carry a value and a block demand. A rolling demand with any input that
    is missing, AMT, suspect (PARTIAL, LONG, OUT_OF_RANGE, clock or power
    flags, ...) or estimated (prorated, zero-filled) is null rather than
    computed from a guess: a rolling or peak demand is a billing determinant,
    and a demand computed over a hole or an estimate understates it silently.
    The gaps are visible (null) for the MDM to fill.

Peak demand
    the highest block demand (and, when configured, the highest rolling
    demand) of a billing period, with the interval that set it, from usable
    intervals only (so AMT and suspect intervals are excluded). A billing
    period is a calendar month in the site time zone, or the month starting at
    local midnight on ``billing_reset_day``. An interval belongs to the period
    containing its *start*: the interval ending at 00:00 on the reset day is
    the last of the old period. `PeakState` is a small value the shell
    persists (``to_json``/``from_json``) so a restart does not forget the peak.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from edged.core.flags import quality
from edged.core.model import Event, Interval, Quality

if TYPE_CHECKING:  # only annotations: the engine loads no pydantic at run time
    from edged.config.schema import Device


SECONDS_PER_HOUR = Decimal(3600)


def block_demand(energy: Decimal | float, hours: Decimal | float) -> float:
    """Average demand over `hours` (kWh / h = kW), in decimal arithmetic."""
    energy_d = energy if isinstance(energy, Decimal) else Decimal(repr(energy))
    hours_d = hours if isinstance(hours, Decimal) else Decimal(repr(hours))
    return float(energy_d / hours_d)


def usable_for_demand(record: Interval) -> bool:
    """May this interval feed a rolling or peak demand? (see module docstring)"""
    return (
        record.value is not None
        and record.demand is not None
        and quality(record.flags) is Quality.ACTUAL
    )


# --------------------------------------------------------------------------
# Rolling demand


@dataclass(frozen=True, slots=True)
class RollingSpec:
    subintervals: int
    window_s: int

    @property
    def window_h(self) -> Decimal:
        return Decimal(self.window_s) / SECONDS_PER_HOUR


def rolling_spec(device: Device) -> RollingSpec | None:
    """The device's rolling-demand window, or None when not configured.

    Raises ValueError when the window is not `subintervals` whole intervals:
    a window that does not tile into intervals has no well-defined energy.
    """
    if device.demand is None:
        return None
    window_s = device.demand.subintervals * device.interval_s
    if device.demand.window != window_s:
        raise ValueError(
            f"device {device.id}: demand window {device.demand.window:g}s is not "
            f"{device.demand.subintervals} x {device.interval_s}s intervals"
        )
    return RollingSpec(device.demand.subintervals, window_s)


@dataclass(frozen=True, slots=True)
class RollingEntry:
    """One earlier interval as the rolling window remembers it."""

    start: datetime
    end: datetime
    energy: float | None  # None: the interval may not feed a demand


def push_rolling(
    window: Sequence[RollingEntry], record: Interval, spec: RollingSpec
) -> tuple[tuple[RollingEntry, ...], float | None]:
    """Add `record` to the window; return the new window and its rolling demand.

    The window keeps the latest ``subintervals - 1`` intervals by end. A record
    re-emitted for an earlier end (a prorated estimate) replaces that entry.
    The inputs must be contiguous (each ends where the next starts), so a
    restart that lost some intervals cannot produce a demand over a hole.
    """
    entry = RollingEntry(
        record.start, record.end, record.value if usable_for_demand(record) else None
    )
    by_end = {e.end: e for e in window}
    by_end[record.end] = entry
    keep = spec.subintervals - 1
    latest = sorted(by_end.values(), key=lambda e: e.end)
    new_window = tuple(latest[-keep:]) if keep else ()
    if entry.energy is None:
        return new_window, None
    total = Decimal(repr(entry.energy))
    cursor = record.start
    for _ in range(keep):
        previous = by_end.get(cursor)
        if previous is None or previous.energy is None:
            return new_window, None
        total += Decimal(repr(previous.energy))
        cursor = previous.start
    return new_window, block_demand(total, spec.window_h)


# --------------------------------------------------------------------------
# Billing periods and peak demand


@dataclass(frozen=True, slots=True)
class BillingPeriod:
    start: datetime  # UTC instant of local midnight on the reset day
    end: datetime  # start of the next period


def _period_start(year: int, month: int, reset_day: int, zone: tzinfo) -> datetime:
    # fold=0: where local midnight is repeated the period starts at the first
    # one; where it is skipped, zoneinfo maps it onto the first instant after.
    return datetime(year, month, reset_day, tzinfo=zone).astimezone(UTC)


def _month_before(year: int, month: int) -> tuple[int, int]:
    return (year - 1, 12) if month == 1 else (year, month - 1)


def _month_after(year: int, month: int) -> tuple[int, int]:
    return (year + 1, 1) if month == 12 else (year, month + 1)


def billing_period(at: datetime, zone: tzinfo, reset_day: int = 1) -> BillingPeriod:
    """The billing period containing the instant `at` (site-local months)."""
    if not 1 <= reset_day <= 28:
        raise ValueError("billing_reset_day must be 1..28 (every month has it)")
    local = at.astimezone(zone)
    year, month = local.year, local.month
    start = _period_start(year, month, reset_day, zone)
    # Compare instants, not local dates, so repeated/skipped midnights are exact.
    if at < start:
        year, month = _month_before(year, month)
        start = _period_start(year, month, reset_day, zone)
    end = _period_start(*_month_after(year, month), reset_day, zone)
    return BillingPeriod(start, end)


@dataclass(frozen=True, slots=True)
class Peak:
    demand: float
    start: datetime  # the interval that set the peak
    end: datetime  # its label (the record id's timestamp)


@dataclass(frozen=True, slots=True, kw_only=True)
class PeakState:
    """Peak demand of one channel in the current billing period.

    The shell persists it per (device, channel) after every boundary and passes
    it back in after a restart.
    """

    period_start: datetime | None = None
    period_end: datetime | None = None
    block: Peak | None = None
    rolling: Peak | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "v": 1,
                "period_start": _iso(self.period_start),
                "period_end": _iso(self.period_end),
                "block": _peak_to_json(self.block),
                "rolling": _peak_to_json(self.rolling),
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> PeakState:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("v") != 1:
            raise ValueError("not a PeakState (version 1) document")
        return cls(
            period_start=_parse(data.get("period_start")),
            period_end=_parse(data.get("period_end")),
            block=_peak_from_json(data.get("block")),
            rolling=_peak_from_json(data.get("rolling")),
        )


def _iso(t: datetime | None) -> str | None:
    # Full precision (isoformat), unlike payload timestamps rounded to ms; a
    # "Z" like every other payload time, not "+00:00".
    return None if t is None else t.astimezone(UTC).isoformat()[:-6] + "Z"


def _parse(text: object) -> datetime | None:
    if text is None:
        return None
    if not isinstance(text, str):
        raise ValueError(f"expected an ISO timestamp, got {text!r}")
    return datetime.fromisoformat(text).astimezone(UTC)


def _peak_to_json(peak: Peak | None) -> dict[str, Any] | None:
    if peak is None:
        return None
    return {"demand": peak.demand, "start": _iso(peak.start), "end": _iso(peak.end)}


def _peak_from_json(data: object) -> Peak | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ValueError(f"expected a peak object, got {data!r}")
    start, end = _parse(data["start"]), _parse(data["end"])
    if start is None or end is None:
        raise ValueError("a peak needs its interval's start and end")
    return Peak(float(data["demand"]), start, end)


def _higher(current: Peak | None, value: float | None, record: Interval) -> Peak | None:
    # Strictly higher: on a tie the earlier interval keeps the peak.
    if value is None or (current is not None and value <= current.demand):
        return current
    return Peak(value, record.start, record.end)


def update_peak(
    state: PeakState | None, record: Interval, zone: tzinfo, reset_day: int = 1
) -> tuple[PeakState, PeakState | None]:
    """Fold one interval record into the peak; returns (state, closed period).

    The closed period is the final `PeakState` of the previous billing period,
    returned once, when the first record of a later period arrives (every
    boundary produces a record, MISSING ones included, so the period closes at
    the first boundary after it ends). A record for an already closed period
    (a late re-emission) is ignored: a closed period's peak is final.
    """
    period = billing_period(record.start, zone, reset_day)
    state = state or PeakState()
    closed: PeakState | None = None
    if state.period_start is None:
        state = PeakState(period_start=period.start, period_end=period.end)
    elif period.start < state.period_start:
        return state, None
    elif period.start > state.period_start:
        closed = state
        state = PeakState(period_start=period.start, period_end=period.end)
    if usable_for_demand(record):
        state = PeakState(
            period_start=state.period_start,
            period_end=state.period_end,
            block=_higher(state.block, record.demand, record),
            rolling=_higher(state.rolling, record.rolling_demand, record),
        )
    return state, closed


def update_peaks(
    states: Mapping[str, PeakState],
    records: Iterable[Interval],
    zone: tzinfo,
    reset_day: int = 1,
) -> tuple[dict[str, PeakState], dict[str, PeakState]]:
    """`update_peak` for a device's records, keyed by channel name.

    Returns (new states, periods closed by these records keyed by channel).
    """
    new_states = dict(states)
    closed: dict[str, PeakState] = {}
    for record in sorted(records, key=lambda r: r.end):
        new_states[record.channel], done = update_peak(
            new_states.get(record.channel), record, zone, reset_day
        )
        if done is not None:
            closed[record.channel] = done
    return new_states, closed


def peak_event(
    device: str, closed: Mapping[str, PeakState], demand_units: Mapping[str, str | None]
) -> Event:
    """One event for the billing periods of a device's channels that just closed.

    A single event per device (not per channel) because event ids are
    site/device/kind/time: per-channel events at the same instant would share
    an id and a de-duplicating consumer would drop all but one.
    """
    if not closed:
        raise ValueError("no closed billing period")
    ends = {state.period_end for state in closed.values()}
    at = max(end for end in ends if end is not None)
    details: dict[str, object] = {}
    for channel, state in sorted(closed.items()):
        details[channel] = {
            "period_start": _iso(state.period_start),
            "period_end": _iso(state.period_end),
            "demand_unit": demand_units.get(channel),
            "peak": _peak_to_json(state.block),
            "rolling_peak": _peak_to_json(state.rolling),
        }
    names = ", ".join(sorted(closed))
    return Event(
        device=device,
        kind="billing_period_closed",
        at=at,
        message=f"billing period closed for {names}",
        details={"channels": details},
    )
