"""Scale registers between reads (pure).

A meter that keeps a power-of-ten scale register per value (BCPM circuits,
SunSpec models) may change it while running: a counter that outgrows its
16/32 bits is rescaled, or a technician changes a CT size. Each read applies
the exponent it read, so the values are right read by read, but an interval
whose two ends were read with different exponents spans the change: its
record is flagged SCALE_CHANGED (docs/flags.md) so a person looks at it.
"""

from __future__ import annotations

from collections.abc import Mapping


def rescaled(previous: Mapping[str, int], current: Mapping[str, int]) -> frozenset[str]:
    """Names read with a different exponent than the last time they were read.

    A name read for the first time (start-up, a new channel) is not a change."""
    return frozenset(
        name for name, exponent in current.items() if previous.get(name, exponent) != exponent
    )
