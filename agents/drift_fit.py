"""Thermal throughput drift: relative throughput regressed on GPU temperature, which shows a diurnal 1-2 % swing
as what it is (the room warming the GPUs, their clocks trimmed a little) rather than as noise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from agents.drift import RankSample


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
