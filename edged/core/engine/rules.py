"""Validation rules on finished records: the AMT rule and its zero-fill
estimate, configured limits, and the settings the engine cannot honour
(pure).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING

from edged.core.demand import rolling_spec
from edged.core.flags import AMT_RULE_IEE_CODES, iee_status
from edged.core.model import Flag, Interval

if TYPE_CHECKING:  # only annotations: the engine loads no pydantic at run time
    from edged.config.schema import (
        Channel,
        Device,
    )


# --------------------------------------------------------------------------
# Validation and estimation


def amt_rule_fails(flags: Iterable[Flag]) -> bool:
    """The Itron AMT named formula (module docstring) evaluated on a flag set.

    ``@status($input \\AND, codes...)`` masks the reading's status with the
    listed codes: true when any of them is present.
    """
    present = frozenset(flags)
    if AMT_RULE_IEE_CODES.isdisjoint(iee_status(present)):
        return False
    return Flag.AMT not in present or Flag.ESTNEEDED in present


def validate_amt_rule(record: Interval) -> Interval:
    """Failed intervals get AMT + ESTNEEDED; like any AMT interval, no demand."""
    if not amt_rule_fails(record.flags):
        return record
    return replace(
        record,
        flags=record.flags | {Flag.AMT, Flag.ESTNEEDED},
        demand=None,
        rolling_demand=None,
    )


def zero_fill_amt(record: Interval) -> Interval:
    """Numeric Replacement with 0 of AMT intervals (not the TIME_ADJUSTED one)."""
    if (
        Flag.AMT not in record.flags
        or Flag.TIME_ADJUSTED in record.flags
        or record.value is None
        or record.original_value is not None  # already replaced
    ):
        return record
    return replace(
        record,
        value=0.0,
        original_value=record.value,
        flags=(record.flags - {Flag.ESTNEEDED}) | {Flag.ESTIMATED},
        demand=None,
        rolling_demand=None,
    )


def out_of_range(record: Interval, channel: Channel) -> bool:
    """Is the value, normalised to the nominal interval, outside ``limits``?

    Normalising lets a LONG record closing a three-interval gap carry three
    intervals' worth without being flagged, and holds a PARTIAL one to its
    share.
    """
    limits = channel.limits
    if limits is None or record.value is None or record.duration_s <= 0:
        return False
    nominal_s = (record.end - record.start).total_seconds()
    per_interval = record.value * nominal_s / record.duration_s
    return (limits.min is not None and per_interval < limits.min) or (
        limits.max is not None and per_interval > limits.max
    )


def device_problems(device: Device) -> list[str]:
    """Settings the engine cannot honour (for check-config; config.py does not
    check them yet)."""
    problems: list[str] = []
    try:
        rolling_spec(device)
    except ValueError as exc:
        problems.append(str(exc))
    for channel in device.channels:
        limits = channel.limits
        if limits and limits.min is not None and limits.max is not None and limits.min > limits.max:
            problems.append(f"device {device.id} channel {channel.name}: limits min > max")
    return problems
