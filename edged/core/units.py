"""Durations and sizes as people write them in config files and on the command
line ('15m', '2 GB'): parsed here, once, for the config models and the CLI."""

from __future__ import annotations

import math
import re

DURATION_UNITS_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0}
# ASCII digits only: \d also matches Arabic-Indic, full-width ... digits, which
# float() then reads, so "١٥m" was silently 15 minutes.
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$", re.ASCII)


def parse_duration_s(value: object) -> float:
    """'15m' -> 900.0; bare numbers are seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 15m, 30s or 1h")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"expected a finite duration, got {value!r}")
        return float(value)
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match:
            return float(match.group(1)) * DURATION_UNITS_S[match.group(2)]
    raise ValueError(f"expected a duration such as 15m, 30s or 1h, got {value!r}")


# Decimal units as disk vendors and `df -H` count, binary ones as `df -h` does.
SIZE_UNITS_BYTES = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)\s*$", re.IGNORECASE | re.ASCII)


def parse_size_bytes(value: object) -> int:
    """'2 GB' -> 2_000_000_000, '512MiB' -> 536_870_912; bare integers are bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match:
            return round(float(match.group(1)) * SIZE_UNITS_BYTES[match.group(2).upper()])
    raise ValueError(
        f"expected a size such as 2 GB, 500 MB or 512 MiB (units B, kB, MB, GB, TB, "
        f"KiB, MiB, GiB, TiB), got {value!r}"
    )
