"""NTP samples and the offset model fitted to them: a robust linear fit of
reference minus system time against the monotonic clock (pure).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from edged.core.time.settings import PPM, TimebaseConfig

# -- NTP samples and the offset model ---------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class NtpSample:
    """One NTP exchange, measured against the system clock edged reads."""

    server: str
    mono_s: float  # monotonic time at the middle of the exchange
    offset_s: float  # true time minus system time
    delay_s: float  # round trip minus the server's processing time
    stratum: int
    leap: int = 0  # leap indicator; 3 = alarm, the server is not synchronised

    @property
    def synchronised(self) -> bool:
        # Stratum 0 is a kiss-o'-death or unspecified, 16 is unsynchronised.
        return 1 <= self.stratum <= 15 and self.leap != 3

    def shifted(self, delta_s: float) -> NtpSample:
        return replace(self, offset_s=self.offset_s + delta_s)


class RejectReason(StrEnum):
    BOGUS = "bogus"  # not a finite offset, or a negative round trip
    UNSYNCHRONISED = "unsynchronised"  # stratum 0/16 or leap alarm
    DELAY = "delay"  # round trip too long (absolute, or against the server's recent minimum)
    FALSETICKER = "falseticker"  # disagrees with the median of the round
    NO_MAJORITY = "no_majority"  # the servers of the round do not agree
    SPIKE = "spike"  # disagrees with the model; waiting out the stepout
    DURING_STEP = "during_step"  # the system clock stepped while it was measured


@dataclass(frozen=True, slots=True)
class LinearOffset:
    """offset_s at mono_ref_s, changing by drift_ppm microseconds per second."""

    offset_s: float
    mono_ref_s: float = 0.0
    drift_ppm: float = 0.0

    def predict_offset(self, mono_s: float) -> float:
        return self.offset_s + self.drift_ppm * PPM * (mono_s - self.mono_ref_s)

    def shifted(self, delta_s: float) -> LinearOffset:
        return replace(self, offset_s=self.offset_s + delta_s)


@dataclass(frozen=True, slots=True, kw_only=True)
class OffsetFit:
    """Least-squares line through recent accepted samples.

    drift_ppm is the rate of change of the offset (true minus system): a
    system clock gaining 50 µs per second gives drift_ppm ≈ -50.
    """

    offset_s: float  # fitted offset at mono_ref_s (the samples' mean time)
    mono_ref_s: float
    drift_ppm: float
    samples: int
    span_s: float
    residual_rms_s: float

    def predict_offset(self, mono_s: float) -> float:
        return self.offset_s + self.drift_ppm * PPM * (mono_s - self.mono_ref_s)

    @property
    def line(self) -> LinearOffset:
        return LinearOffset(self.offset_s, self.mono_ref_s, self.drift_ppm)

    def shifted(self, delta_s: float) -> OffsetFit:
        return replace(self, offset_s=self.offset_s + delta_s)


def fit_offset(
    points: Sequence[tuple[float, float]],
    *,
    min_span_s: float = 60.0,
    max_drift_ppm: float = 500.0,
    prior_drift_ppm: float | None = None,
) -> OffsetFit:
    """Fit offset = a + b·(mono - mean mono) to (mono_s, offset_s) points.

    Below `min_span_s` of span the slope cannot be told from noise, so the
    prior drift (from an earlier fit: the oscillator did not change) or zero is
    used and only the level is fitted. The slope is clamped to ±max_drift_ppm.
    """
    if not points:
        raise ValueError("fit_offset needs at least one point")
    n = len(points)
    mono_mean = math.fsum(m for m, _ in points) / n
    offset_mean = math.fsum(o for _, o in points) / n
    span_s = max(m for m, _ in points) - min(m for m, _ in points)
    slope = (prior_drift_ppm or 0.0) * PPM
    if n >= 2 and span_s >= min_span_s and span_s > 0:
        sxx = math.fsum((m - mono_mean) ** 2 for m, _ in points)
        sxy = math.fsum((m - mono_mean) * (o - offset_mean) for m, o in points)
        slope = sxy / sxx
    limit = max_drift_ppm * PPM
    slope = min(max(slope, -limit), limit)
    # With a fixed slope the least-squares line still passes through the mean.
    residuals = [o - (offset_mean + slope * (m - mono_mean)) for m, o in points]
    rms = math.sqrt(math.fsum(r * r for r in residuals) / n)
    return OffsetFit(
        offset_s=offset_mean,
        mono_ref_s=mono_mean,
        drift_ppm=slope / PPM,
        samples=n,
        span_s=span_s,
        residual_rms_s=rms,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundResult:
    """What one poll round did to the model."""

    accepted: tuple[NtpSample, ...]
    rejected: tuple[tuple[NtpSample, RejectReason], ...]
    fit: OffsetFit | None
    reset: bool = False  # history discarded: the offset moved for stepout_rounds rounds


class NtpModel:
    """Outlier filter plus least-squares offset/drift fit over recent samples."""

    def __init__(self, config: TimebaseConfig | None = None) -> None:
        self._config = config or TimebaseConfig()
        self._samples: deque[NtpSample] = deque(maxlen=self._config.max_fit_samples)
        self._delays: dict[str, deque[float]] = {}
        # Spike rounds that agree with one another, waiting for the stepout.
        self._pending: list[tuple[float, tuple[NtpSample, ...]]] = []
        self._fit: OffsetFit | None = None

    @property
    def fit(self) -> OffsetFit | None:
        return self._fit

    @property
    def samples(self) -> tuple[NtpSample, ...]:
        return tuple(self._samples)

    @property
    def offset_s(self) -> float | None:
        return None if self._fit is None else self._fit.offset_s

    @property
    def drift_ppm(self) -> float | None:
        return None if self._fit is None else self._fit.drift_ppm

    def predict_offset(self, mono_s: float) -> float | None:
        return None if self._fit is None else self._fit.predict_offset(mono_s)

    def shift(self, delta_s: float) -> None:
        """Re-express everything against a system clock that stepped by -delta_s."""
        self._samples = deque((s.shifted(delta_s) for s in self._samples), self._samples.maxlen)
        self._pending = [
            (median + delta_s, tuple(s.shifted(delta_s) for s in round_))
            for median, round_ in self._pending
        ]
        if self._fit is not None:
            self._fit = self._fit.shifted(delta_s)

    def screen(
        self, samples: Iterable[NtpSample]
    ) -> tuple[list[NtpSample], list[tuple[NtpSample, RejectReason]]]:
        """Filter one poll round (one sample per server); updates delay history."""
        cfg = self._config
        rejected: list[tuple[NtpSample, RejectReason]] = []
        candidates: list[NtpSample] = []
        for sample in samples:
            if not (math.isfinite(sample.offset_s) and math.isfinite(sample.delay_s)):
                rejected.append((sample, RejectReason.BOGUS))
                continue
            if not sample.synchronised:
                rejected.append((sample, RejectReason.UNSYNCHRONISED))
                continue
            if sample.delay_s < -cfg.delay_margin_s:
                # A clearly negative round trip means a broken server clock.
                rejected.append((sample, RejectReason.BOGUS))
                continue
            history = self._delays.setdefault(sample.server, deque(maxlen=cfg.delay_history))
            history.append(max(sample.delay_s, 0.0))
            limit_s = min(cfg.max_delay_s, min(history) * cfg.delay_factor + cfg.delay_margin_s)
            if sample.delay_s > limit_s:
                rejected.append((sample, RejectReason.DELAY))
                continue
            candidates.append(sample)
        if not candidates:
            return [], rejected
        median = statistics.median(s.offset_s for s in candidates)
        close = [s for s in candidates if abs(s.offset_s - median) <= cfg.server_tolerance_s]
        if 2 * len(close) <= len(candidates):
            # No majority: with two servers a second apart there is no telling
            # which is right, so neither is believed.
            rejected.extend((s, RejectReason.NO_MAJORITY) for s in candidates)
            return [], rejected
        rejected.extend((s, RejectReason.FALSETICKER) for s in candidates if s not in close)
        return close, rejected

    def add_round(self, samples: Iterable[NtpSample], mono_s: float) -> RoundResult:
        """Screen a poll round taken around `mono_s` and refit; returns what happened."""
        cfg = self._config
        accepted, rejected = self.screen(samples)
        self._prune(mono_s)
        reset = False
        if accepted and self._fit is not None and self._samples:
            round_offset = statistics.median(s.offset_s for s in accepted)
            if abs(round_offset - self._fit.predict_offset(mono_s)) > cfg.spike_threshold_s:
                # Keep only earlier spike rounds that agree with this one: a
                # real change of offset persists, popcorn noise does not.
                self._pending = [
                    p for p in self._pending if abs(p[0] - round_offset) <= cfg.spike_threshold_s
                ]
                self._pending.append((round_offset, tuple(accepted)))
                if len(self._pending) < cfg.stepout_rounds:
                    rejected.extend((s, RejectReason.SPIKE) for s in accepted)
                    return RoundResult(accepted=(), rejected=tuple(rejected), fit=self._fit)
                # The offset really moved (the server or the path changed):
                # restart the history from the rounds that agree on it.
                self._samples.clear()
                for _, round_ in self._pending[:-1]:
                    self._samples.extend(round_)
                reset = True
        if not accepted:
            return RoundResult(accepted=(), rejected=tuple(rejected), fit=self._fit)
        self._pending.clear()
        self._samples.extend(accepted)
        self._fit = fit_offset(
            [(s.mono_s, s.offset_s) for s in self._samples],
            min_span_s=cfg.drift_min_span_s,
            max_drift_ppm=cfg.max_drift_ppm,
            prior_drift_ppm=None if self._fit is None else self._fit.drift_ppm,
        )
        return RoundResult(
            accepted=tuple(accepted), rejected=tuple(rejected), fit=self._fit, reset=reset
        )

    def _prune(self, mono_s: float) -> None:
        oldest_s = mono_s - self._config.fit_window_limit_s
        while self._samples and self._samples[0].mono_s < oldest_s:
            self._samples.popleft()
