"""Stragglers and thermal throughput drift: per-rank step time joined with that GPU's temperature and clocks.

Two scores per rank, as in NVRx's straggler report: *relative* (its recent step time over that of the fastest
ranks now) and *individual* (its recent step time over its own usual). A rank over either threshold is a
straggler, with the reason its GPU shows (thermal or power throttling, clocks held low, or unknown).
`fit_drift` regresses throughput on temperature over time: its slope and the swing it explains show a diurnal
1-2% variation as what it is, rather than as noise.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

import numpy as np

from herdsman.events import GpuSample, Reason, StepStats
from agents.gpu import THERMAL_REASONS

POWER_REASONS = ("sw_power_cap", "hw_power_brake")


@dataclass(frozen=True)
class RankSample:
    rank: int
    host: str
    step: int
    time: float
    step_time_s: float
    tokens_per_s: float
    temperature_c: float | None
    sm_clock_mhz: float | None
    max_sm_clock_mhz: float | None
    throttle_reasons: tuple[str, ...]
    attempt: int = 0


@dataclass(frozen=True)
class StragglerScore:
    rank: int
    host: str
    relative: float  # >= 1: recent step time / the fastest ranks' recent step time
    individual: float  # recent step time / this rank's own usual (20th percentile over its history)
    straggler: bool
    reason: str  # thermal | power | clock | unknown | "" when not a straggler
    temperature_c: float | None
    sm_clock_mhz: float | None


@dataclass(frozen=True)
class DriftFit:
    samples: int
    slope_per_c: float  # relative throughput change per degree C (e.g. -0.001 = -0.1 %/C)
    r2: float
    temp_range_c: float
    swing: float  # relative throughput change the fit explains over the observed temperature range

    def line(self) -> str:
        return (f"throughput {100 * self.slope_per_c:+.3f} %/C over {self.temp_range_c:.1f} C "
                f"(swing {100 * self.swing:.2f} %, r2 {self.r2:.2f}, n={self.samples})")


def join(stats: StepStats, gpu: GpuSample | None) -> RankSample:
    # a rank's own compute time when it reports one: the step time includes waiting for the slowest rank
    return RankSample(stats.rank, stats.host, stats.step, stats.time, stats.compute_s or stats.step_time_s,
                      stats.tokens_per_s,
                      gpu.temperature_c if gpu else None, gpu.sm_clock_mhz if gpu else None,
                      gpu.max_sm_clock_mhz if gpu else None, gpu.throttle_reasons if gpu else (), stats.attempt)


def _reason(s: RankSample, peer_temps: list[float]) -> str:
    if any(r in s.throttle_reasons for r in THERMAL_REASONS):
        return Reason.THERMAL.value
    if any(r in s.throttle_reasons for r in POWER_REASONS):
        return "power"
    held = bool(s.sm_clock_mhz and s.max_sm_clock_mhz and s.sm_clock_mhz < 0.97 * s.max_sm_clock_mhz)
    # Hotter than its peers only explains slowness if the clock is actually down (no reason bit on some drivers).
    if held and s.temperature_c is not None and peer_temps and s.temperature_c > statistics.median(peer_temps) + 10:
        return Reason.THERMAL.value
    if s.sm_clock_mhz and s.max_sm_clock_mhz and s.sm_clock_mhz < 0.9 * s.max_sm_clock_mhz:
        return "clock"
    return "unknown"


class DriftTracker:
    def __init__(self, relative_threshold: float = 1.10, individual_threshold: float = 1.10, window: int = 2000,
                 recent: int = 5, fastest_fraction: float = 0.25):
        self.relative_threshold, self.individual_threshold = relative_threshold, individual_threshold
        self.recent, self.fastest_fraction = recent, fastest_fraction
        self.samples: deque[RankSample] = deque(maxlen=window)
        self._by_rank: dict[int, deque[RankSample]] = {}
        self._window = window
        self._attempt = 0

    def add(self, s: RankSample) -> None:
        if s.attempt > self._attempt:
            # A restarted job is a new set of ranks (new placement, cold caches): history of the old one would make
            # every rank of the new attempt look like a straggler or drown a real one.
            self._attempt = s.attempt
            self._by_rank.clear()
        elif s.attempt < self._attempt:
            return  # a late line from a finished attempt
        self.samples.append(s)
        self._by_rank.setdefault(s.rank, deque(maxlen=max(self.recent * 4, self._window // 8))).append(s)

    def scores(self) -> list[StragglerScore]:
        recent = {r: statistics.median(x.step_time_s for x in list(q)[-self.recent:])
                  for r, q in self._by_rank.items() if q}
        if not recent:
            return []
        ordered = sorted(recent.values())
        fastest = statistics.median(ordered[:max(1, int(len(ordered) * self.fastest_fraction))])
        latest = {r: q[-1] for r, q in self._by_rank.items() if q}
        temps = [s.temperature_c for s in latest.values() if s.temperature_c is not None]
        out = []
        for r, t in sorted(recent.items()):
            own = float(np.percentile([x.step_time_s for x in self._by_rank[r]], 20))
            rel = t / fastest if fastest > 0 else 1.0
            ind = t / own if own > 0 else 1.0
            s = latest[r]
            # A rank's first steps (warm-up, restore) say nothing about its usual pace.
            judged = len(self._by_rank[r]) >= 2 * self.recent
            slow = judged and (rel > self.relative_threshold or ind > self.individual_threshold)
            peers = [x for x in temps if x != s.temperature_c]
            out.append(StragglerScore(r, s.host, round(rel, 4), round(ind, 4), slow,
                                      _reason(s, peers) if slow else "", s.temperature_c, s.sm_clock_mhz))
        return out

    def fit(self) -> DriftFit | None:
        return fit_drift(list(self.samples))


def fit_drift(samples: list[RankSample]) -> DriftFit | None:
    """Least squares of relative throughput (each rank against its own mean) on GPU temperature."""
    rows = [(s.rank, s.temperature_c, s.tokens_per_s) for s in samples
            if s.temperature_c is not None and s.tokens_per_s > 0]
    if len(rows) < 10:
        return None
    ranks = np.array([r for r, _, _ in rows])
    temp = np.array([t for _, t, _ in rows], dtype=float)
    tput = np.array([v for _, _, v in rows], dtype=float)
    rel = np.empty_like(tput)
    for r in np.unique(ranks):
        m = ranks == r
        rel[m] = tput[m] / tput[m].mean()
    if np.ptp(temp) < 1e-6:
        return DriftFit(len(rows), 0.0, 0.0, 0.0, 0.0)
    slope, intercept = np.polyfit(temp, rel, 1)
    pred = slope * temp + intercept
    ss_res, ss_tot = float(((rel - pred) ** 2).sum()), float(((rel - rel.mean()) ** 2).sum())
    r2 = 1 - ss_res / ss_tot if ss_tot > 0 else 0.0
    span = float(np.ptp(temp))
    return DriftFit(len(rows), float(slope), r2, span, float(abs(slope) * span))
