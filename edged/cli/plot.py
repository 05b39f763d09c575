"""`edged intervals --plot FILE.png`: interval demand over a range, flags marked.

matplotlib is an optional extra (`pip install 'edged[plot]'`); nothing else in
edged imports it. One step line per device/channel shows each interval's block
demand across the interval it covers (energy for channels without a demand
unit); intervals with a quality other than `actual` get a marker, MISSING
intervals a shaded band.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any

from edged.core.errors import EdgedError
from edged.core.model import parse_iso_utc

INSTALL_HINT = "pip install 'edged[plot]'  (or: pip install matplotlib)"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
QUALITY_COLOURS = {"suspect": "tab:orange", "estimated": "tab:purple", "missing": "tab:red"}


class PlotUnavailable(EdgedError):
    pass


def require_matplotlib() -> None:
    """Fail early, before a long query, when the extra is not installed."""
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        raise PlotUnavailable(
            f"--plot needs matplotlib, which is not installed: {INSTALL_HINT}"
        ) from None


def _series_value(payload: Mapping[str, Any]) -> tuple[float | None, str]:
    if payload.get("demand_unit"):
        return payload.get("demand"), str(payload["demand_unit"])
    return payload.get("value"), str(payload.get("unit", ""))


def _date_number(t: datetime) -> float:
    """matplotlib's date number: days since 1970-01-01 UTC (its default epoch)."""
    return (t - _EPOCH).total_seconds() / 86_400


def plot_intervals(
    payloads: Sequence[Mapping[str, Any]], path: Path, zone: tzinfo, title: str
) -> None:
    """Write a PNG of the records' demand; raises PlotUnavailable without matplotlib."""
    require_matplotlib()
    # Without the extra installed mypy cannot see matplotlib: hence the ignores.
    import matplotlib  # type: ignore[import-not-found,unused-ignore]

    matplotlib.use("Agg")  # files only: no display needed on a gateway
    import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]

    series: dict[str, list[Mapping[str, Any]]] = {}
    for p in payloads:
        series.setdefault(f"{p['device']}/{p['channel']}", []).append(p)
    fig, ax = plt.subplots(figsize=(12, 5), dpi=100)
    units: set[str] = set()
    flagged_label = missing_label = False
    for name, records in sorted(series.items()):
        records = sorted(records, key=lambda r: str(r["end"]))
        xs: list[float] = []
        ys: list[float] = []
        for r in records:
            value, unit = _series_value(r)
            units.add(unit)
            start = _date_number(parse_iso_utc(str(r["start"])))
            end = _date_number(parse_iso_utc(str(r["end"])))
            y = math.nan if value is None else float(value)
            # A step per interval: level from its start to its end, a gap for null.
            if xs and xs[-1] != start:
                xs.append(start)
                ys.append(math.nan)
            xs.extend([start, end])
            ys.extend([y, y])
            quality = str(r.get("quality", "actual"))
            if quality == "missing":
                ax.axvspan(
                    start,
                    end,
                    color="tab:red",
                    alpha=0.15,
                    lw=0,
                    label=None if missing_label else "missing",
                )
                missing_label = True
            elif quality != "actual" and value is not None:
                ax.plot(
                    [end],
                    [y],
                    marker="o",
                    ls="none",
                    ms=5,
                    color=QUALITY_COLOURS.get(quality, "tab:orange"),
                    label=None if flagged_label else "flagged (not actual)",
                )
                flagged_label = True
        ax.plot(xs, ys, lw=1.2, label=name)
    ax.set_title(title)
    ax.set_ylabel(" / ".join(sorted(u for u in units if u)) or "value")
    ax.set_xlabel(f"local time ({zone})")
    ax.xaxis_date(zone)  # date numbers shown as local times
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(loc="best", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no intervals in this range", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
