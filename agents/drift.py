"""Stragglers and thermal throughput drift: per-rank compute time joined with that GPU's temperature and clocks.

A straggler is slower than its peers *in the same steps*: each step, a rank's compute time (its own work, before it
waits for the others in the step's last collective) over the median of the other ranks' (log ratio). Whatever slows
every rank together (a loaded host, the diurnal 1-2 %, a common hiccup) cancels out of that ratio. A rank is slow
when its recent window's trimmed mean is over its usual ratio (median of its earlier unflagged steps, after a
warm-up) by `min_excess` and by `z` standard errors of its usual noise (MAD; widened while all ranks are noisier
than usual), or by `z_cause` when its GPU shows why; or, until it has a usual, by `relative_threshold` over its
peers. Slower than its own usual alone (no peers, or all slowed together) counts only with its GPU's cause, over
`individual_threshold` or `z_cause` errors. A hardware slowdown (hw_thermal, hw_power_brake) holding its clock
under 90 % of its usual is never a GPU's normal: then any lag behind its usual counts (and, for a rank without
peers, having no usual yet). Slow for `persist` steps in a row flags it; it holds until it falls back under half
of that for `persist` steps.

Reasons (Evidence.attrs["reason"] of STRAGGLER evidence): "thermal" (a thermal throttle bit, or hot with its clock
down), "power" (a power-cap or power-brake bit), "clock" (its clock held below its usual, no bit), "cpu_starved"
(clocks fine; it waits longer for its batches, StepStats.data_s, or its GPU's utilization is down in proportion:
its host starves it), "unknown". A software bit the GPU usually shows (a GPU at its power cap under full load)
counts only with its clock held down; hw_thermal and hw_power_brake always count.

The thermal trend is a precursor: a GPU heating against its own history (and its peers'), its clocks still at max.

`fit_drift` (agents/drift_fit.py) regresses throughput on temperature over time: its slope and the swing it
explains show a diurnal 1-2% variation as what it is, rather than as noise.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

from herdsman.events import GpuSample, Reason, StepStats
from agents.drift_fit import DriftFit, fit_drift
from agents.gpu import THERMAL_REASONS

POWER_REASONS = ("sw_power_cap", "hw_power_brake")
# Straggler reasons (Evidence.attrs["reason"] of STRAGGLER evidence); the thermal trend is a GPU_THERMAL precursor.
THERMAL, POWER, CLOCK, CPU_STARVED, UNKNOWN = Reason.THERMAL.value, "power", "clock", "cpu_starved", "unknown"
GPU_CAUSES = (THERMAL, POWER, CLOCK)
HARD = {THERMAL: ("hw_thermal",), POWER: ("hw_power_brake",)}  # hardware slowdowns: never a GPU's normal
THERMAL_TREND = "thermal_trend"


@dataclass(frozen=True)
class RankSample:
    rank: int
    host: str
    step: int
    time: float
    step_time_s: float  # the rank's own compute time when it reports one (join), else its step time
    tokens_per_s: float
    temperature_c: float | None
    sm_clock_mhz: float | None
    max_sm_clock_mhz: float | None
    throttle_reasons: tuple[str, ...]
    attempt: int = 0
    utilization_pct: float | None = None
    power_w: float | None = None
    data_s: float = 0.0  # of step_time_s, waiting for its batch

    def readings(self) -> tuple[float | None, ...]:
        """Clock, temperature, utilization, share of its compute time spent waiting for data."""
        data = self.data_s / self.step_time_s if self.step_time_s > 0 else None
        return self.sm_clock_mhz, self.temperature_c, self.utilization_pct, data


@dataclass(frozen=True)
class StragglerScore:
    rank: int
    host: str
    relative: float  # recent compute time / its peers' in the same steps (1.0 without peers)
    individual: float  # recent compute time / its own usual (1.0 until it has one)
    straggler: bool
    reason: str  # thermal | power | clock | cpu_starved | unknown | "" when not a straggler
    temperature_c: float | None
    sm_clock_mhz: float | None
    usual: float = 1.0  # its usual ratio to its peers (a rank that always runs 2 % behind has 1.02)
    step: int = 0  # the last step judged


@dataclass(frozen=True)
class ThermalTrend:
    """A GPU heating against its own history while its clocks are still at full speed."""

    rank: int
    host: str
    step: int
    slope_c_per_min: float  # over the last trend_recent_s
    usual_slope_c_per_min: float  # over the history before that
    temperature_c: float
    usual_c: float  # median temperature over the history before the last trend_recent_s
    sm_clock_mhz: float | None

    def line(self) -> str:
        clock = f" ({self.sm_clock_mhz:.0f} MHz)" if self.sm_clock_mhz else ""
        return (f"temperature rising {self.slope_c_per_min:+.1f} C/min against its usual "
                f"{self.usual_slope_c_per_min:+.1f} C/min ({self.temperature_c:.1f} C, usually {self.usual_c:.1f} C), "
                f"clocks still at max{clock}")


def join(stats: StepStats, gpu: GpuSample | None) -> RankSample:
    # a rank's own compute time when it reports one: the step time includes waiting for the slowest rank
    return RankSample(stats.rank, stats.host, stats.step, stats.time, stats.compute_s or stats.step_time_s,
                      stats.tokens_per_s,
                      gpu.temperature_c if gpu else None, gpu.sm_clock_mhz if gpu else None,
                      gpu.max_sm_clock_mhz if gpu else None, gpu.throttle_reasons if gpu else (), stats.attempt,
                      gpu.utilization_pct if gpu else None, gpu.power_w if gpu else None, stats.data_s)


def _trimmed_mean(xs: list[float]) -> float:
    """Mean of the middle of `xs` (a fifth cut at each end): a single hiccup does not move it, a shift does."""
    xs = sorted(xs)
    k = len(xs) // 5
    mid = xs[k:len(xs) - k]
    return sum(mid) / len(mid)


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _med_sigma(xs: list[float], n: int) -> tuple[float | None, float]:
    """Median and robust sigma (MAD, at least 0.4 %) of `xs`; None with fewer than `n`."""
    if len(xs) < n:
        return None, 0.0
    m = statistics.median(xs)
    return m, max(0.004, 1.4826 * statistics.median(abs(x - m) for x in xs))


def _slope(pts: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares slope of (time s, value) in units per minute, and its standard error."""
    n = len(pts)
    mt, mv = sum(t for t, _ in pts) / n, sum(v for _, v in pts) / n
    stt = sum((t - mt) ** 2 for t, _ in pts)
    if stt <= 0:
        return 0.0, math.inf
    b = sum((t - mt) * (v - mv) for t, v in pts) / stt
    resid = sum((v - mv - b * (t - mt)) ** 2 for t, v in pts)
    se = math.sqrt(resid / max(1, n - 2) / stt)
    return 60 * b, 60 * se


@dataclass(frozen=True)
class _Usual:
    """A rank's usual, from its clean steps: log ratio to its peers (median, sigma), and its readings (medians)."""

    rel: float | None
    rel_sigma: float
    clock: float | None
    temp: float | None
    util: float | None
    data: float | None  # share of compute time waiting for data


class _Rank:
    def __init__(self, hist: int, recent: int):
        self.n = 0  # steps judged in this attempt
        self.rel: deque[float] = deque(maxlen=recent)  # log(compute / peers' median), recent steps
        self.raw: deque[float] = deque(maxlen=recent)  # log(compute), recent steps
        self.usual_rel: deque[float] = deque(maxlen=hist)  # the same, from clean steps once out of the window
        self.steady: deque[float] = deque(maxlen=hist)  # log(compute) of steps its GPU showed no throttling on
        self.steady_cache: tuple[float | None, float] | None = None
        self.steady_added = 0
        self.usual_gpu: deque[tuple[float | None, ...]] = deque(maxlen=hist)  # readings() of its clean steps
        self.bits = [0, 0, 0]  # steps judged, with a thermal reason bit, with a power reason bit
        self.recent: deque[RankSample] = deque(maxlen=recent)
        self.window: deque[tuple[float | None, RankSample]] = deque()  # (rel, sample) of the recent steps
        self.cache: _Usual | None = None
        self.added = 0
        self.streak = self.calm = 0
        self.flagged = False
        self.reason = ""
        # (time, C, C over its peers' median, clock, thermal bit), one reading every trend_recent_s / 30
        self.temps: deque[tuple[float, float, float | None, float | None, bool]] = deque()
        self.trend_streak = 0
        self.trend: ThermalTrend | None = None  # set while its trend episode lasts
        self.last: RankSample | None = None


class DriftTracker:
    def __init__(self, relative_threshold: float = 1.10, individual_threshold: float = 1.10, window: int = 2000,
                 recent: int = 24, min_excess: float = 0.02, z: float = 5.0, z_cause: float = 3.5, persist: int = 5,
                 warmup: int = 5, min_usual: int = 96, usual_steps: int = 300, trend_recent_s: float = 60.0,
                 trend_history_s: float = 900.0, trend_min_slope: float = 0.5, trend_min_rise_c: float = 3.0,
                 hard_clock: float = 0.9):
        self.relative_threshold, self.individual_threshold = relative_threshold, individual_threshold
        self.recent, self.min_excess, self.z, self.z_cause, self.persist = recent, min_excess, z, z_cause, persist
        self.warmup, self.min_usual, self.usual_steps, self.hard_clock = warmup, min_usual, usual_steps, hard_clock
        self._min_recent = max(persist, recent // 3)  # steps in its recent window before it is judged
        self.trend_recent_s, self.trend_history_s = trend_recent_s, trend_history_s
        self.trend_min_slope, self.trend_min_rise_c = trend_min_slope, trend_min_rise_c
        self.samples: deque[RankSample] = deque(maxlen=window)
        self._ranks: dict[int, _Rank] = {}
        self._steps: dict[int, dict[int, RankSample]] = {}  # steps not yet judged: rank -> sample
        self._judged = -1  # the last step judged
        self._attempt = 0
        self._started: list[StragglerScore | ThermalTrend] = []
        self._spread: deque[float] = deque(maxlen=recent)  # squared spread of the ranks' ratios, recent steps
        self._rms: deque[float] = deque(maxlen=usual_steps)  # its root mean over the recent window, step by step
        self._inflation = 1.0

    # --- input ------------------------------------------------------------------------------------------------
    def add(self, s: RankSample) -> None:
        if s.attempt > self._attempt:
            # A restarted job is a new set of ranks (new placement, cold caches): history of the old one would make
            # every rank of the new attempt look like a straggler or drown a real one.
            self._attempt, self._judged, self._inflation = s.attempt, -1, 1.0
            for x in (self._ranks, self._steps, self._spread, self._rms):
                x.clear()
        elif s.attempt < self._attempt:
            return  # a late line from a finished attempt
        self.samples.append(s)
        rk = self._ranks.get(s.rank)
        if rk is None:
            rk = self._ranks[s.rank] = _Rank(self.usual_steps, self.recent)
        rk.last = s
        if s.step <= self._judged:
            return  # its peers' samples of that step have been judged without it
        self._steps.setdefault(s.step, {})[s.rank] = s
        latest = max(self._steps)
        for step in sorted(self._steps):  # a step is judged once every rank reported it, or three steps on
            if len(self._steps[step]) < len(self._ranks) and latest - step < 3:
                break
            self._judge(step, self._steps.pop(step))
            self._judged = step

    def pop_started(self) -> list[StragglerScore | ThermalTrend]:
        """Stragglers flagged (or whose reason changed) and thermal trends begun since the last call."""
        out, self._started = self._started, []
        return out

    # --- judging one step ---------------------------------------------------------------------------------------
    def _judge(self, step: int, entries: dict[int, RankSample]) -> None:
        logs = {r: math.log(s.step_time_s) for r, s in entries.items() if s.step_time_s > 0}
        rels = {r: v - statistics.median([w for q, w in logs.items() if q != r]) if len(logs) > 1 else None
                for r, v in logs.items()}
        self._noise(rels)
        temps = {r: s.temperature_c for r, s in entries.items() if s.temperature_c is not None}
        for r, s in entries.items():
            rk = self._ranks[r]
            rk.n += 1
            others = [c for q, c in temps.items() if q != r]
            self._judge_trend(r, rk, s, statistics.median(others) if len(others) >= 2 else None)
            if r not in logs or rk.n <= self.warmup:  # a rank's first steps (warm-up, restore) say nothing
                continue
            rel = rels[r]
            if len(rk.window) == self.recent:
                # The oldest step leaves the recent window: it joins the usual if nothing was wrong by then (the
                # steps between a slowdown's onset and its flag leave after the flag, and stay out of the usual).
                old_rel, old = rk.window.popleft()
                if not rk.flagged and rk.streak == 0:
                    if old_rel is not None:
                        rk.usual_rel.append(old_rel)
                    rk.usual_gpu.append(old.readings())
                    rk.added += 1
                    if rk.added % 8 == 0:  # the usual moves slowly: recomputed every 8 steps
                        rk.cache = None
            # its steady pace: steps with no thermal throttling or power brake (a power cap is many GPUs' normal)
            if not rk.flagged and not any(x in s.throttle_reasons for x in THERMAL_REASONS + ("hw_power_brake",)):
                rk.steady.append(logs[r])
                rk.steady_added += 1
                if rk.steady_added % 8 == 0 or rk.steady_added < self.min_usual:
                    rk.steady_cache = None
            rk.window.append((rel, s))
            if rel is not None:
                rk.rel.append(rel)
            rk.raw.append(logs[r])
            rk.recent.append(s)
            rk.bits[0] += 1
            rk.bits[1] += any(x in s.throttle_reasons for x in THERMAL_REASONS)
            rk.bits[2] += any(x in s.throttle_reasons for x in POWER_REASONS)
            self._judge_rank(r, rk, step)

    def _noise(self, rels: dict[int, float | None]) -> None:
        """How much noisier the ranks are now than usual (a loaded host widens every rank's spread): the spread
        of this step's ratios across the ranks (past their warm-up), over the window ranks are judged on, against
        its median so far."""
        devs = [v for r, v in rels.items() if v is not None and self._ranks[r].n >= self.warmup]
        if len(devs) < 4:
            return
        mid = statistics.median(devs)
        self._spread.append(statistics.median(abs(d - mid) for d in devs) ** 2)
        if len(self._spread) >= self.recent // 2:
            self._rms.append(math.sqrt(statistics.fmean(self._spread)))
        if len(self._rms) >= self.recent // 2:
            usual = statistics.median(self._rms)
            self._inflation = max(1.0, self._rms[-1] / usual) if usual > 0 else 1.0

    def _usual(self, rk: _Rank) -> _Usual:
        if rk.cache is None:
            gpu = [_median([g[i] for g in rk.usual_gpu if g[i] is not None]) for i in range(4)]
            rk.cache = _Usual(*_med_sigma(list(rk.usual_rel), self.min_usual), *gpu)
        return rk.cache

    def _own(self, rk: _Rank) -> tuple[float | None, float, float]:
        """Its last steps' compute time over its usual (log), from the steps its GPU showed no throttling on (from
        its first few: a GPU that throttles early in an attempt must not become its own usual), and the standard
        error of that."""
        tail = list(rk.raw)[-self._min_recent:]
        if len(rk.steady) < self.persist or len(tail) < self.persist:
            return None, 0.0, 0.0
        if rk.steady_cache is None:
            rk.steady_cache = _med_sigma(list(rk.steady), self.persist)
        usual, sigma = rk.steady_cache
        assert usual is not None
        return _trimmed_mean(tail) - usual, usual, 1.1 * sigma * math.sqrt(1 / len(tail) + 1 / len(rk.steady))

    def _judge_rank(self, r: int, rk: _Rank, step: int) -> None:
        u = self._usual(rk)
        peers = [p for q, p in self._ranks.items() if q != r and p.recent]
        enough = bool(peers) and len(rk.rel) >= self._min_recent
        rel = _trimmed_mean(list(rk.rel)) if enough else 0.0
        own, _, own_se = self._own(rk)
        raw = own or 0.0
        floor = math.log1p(self.min_excess)
        level = 0.5 if rk.flagged else 1.0  # once flagged, it holds until it is back under half the thresholds
        # against its peers: over its usual ratio to them (z standard errors; fewer if its GPU shows why), or far
        # over them while it has no usual yet
        slow = u.rel is None and rel > level * math.log(self.relative_threshold)
        dev = rel - u.rel if enough and u.rel is not None else 0.0
        if not slow and dev > 0:
            # (a rank's pace wanders: its usual's steps count as half as many independent ones)
            se = 1.1 * u.rel_sigma * self._inflation * math.sqrt(1 / len(rk.rel) + 2 / len(rk.usual_rel))
            slow = dev > level * max(floor, self.z * se)
            if not slow and dev > level * max(floor, self.z_cause * se):
                slow = self._reason(rk, peers, dev) != UNKNOWN
        # against its own usual alone (no peers, or all of them slowed too): only with its GPU's cause
        if not slow and raw > 0:
            if raw > level * min(math.log(self.individual_threshold), max(floor, self.z_cause * own_se)):
                slow = self._reason(rk, peers, raw) in GPU_CAUSES
        behind = (dev if u.rel is not None else rel) if enough else raw  # how far behind, for the reason
        # a hardware slowdown holding its clock well down is never a GPU's normal: behind at all is enough (its
        # work may be mostly off the GPU, as in a CPU test run, and within its noise), and so is no usual pace to
        # be behind of (a GPU that overheats within its attempt's first steps, before it has one)
        if not slow and (behind > 0 or own is None and not enough) and self._hard_held(rk):
            slow = True
        if slow:
            rk.streak, rk.calm = rk.streak + 1, 0
        else:
            rk.calm, rk.streak = rk.calm + 1, 0
        if not rk.flagged and rk.streak >= self.persist:
            rk.flagged, rk.reason = True, self._reason(rk, peers, behind)
            self._started.append(self._score(r, rk, step))
        elif rk.flagged and rk.calm >= self.persist:
            rk.flagged, rk.reason = False, ""
        elif rk.flagged:
            reason = self._reason(rk, peers, behind)
            if reason != rk.reason and reason in GPU_CAUSES:  # its GPU now shows why (or another why)
                rk.reason = reason
                self._started.append(self._score(r, rk, step))

    def _hard_held(self, rk: _Rank) -> bool:
        """Its last steps: most with a hardware slowdown bit (hw_thermal, hw_power_brake), its clock under
        `hard_clock` of its usual (or of the GPU's maximum)."""
        tail = list(rk.recent)[-self._min_recent:]
        if len(tail) < self._min_recent:
            return False
        bits = HARD[THERMAL] + HARD[POWER]
        if sum(any(x in s.throttle_reasons for x in bits) for s in tail) * 2 <= len(tail):
            return False
        clock = _median([s.sm_clock_mhz for s in tail if s.sm_clock_mhz])
        ref = self._usual(rk).clock or _median([s.max_sm_clock_mhz for s in tail if s.max_sm_clock_mhz])
        return bool(clock and ref and clock < self.hard_clock * ref)

    def _reason(self, rk: _Rank, peers: list[_Rank], slowdown: float) -> str:
        """What the rank's GPU shows over its last steps, against its own usual readings (or its peers'). A reason
        bit it showed before as well (a GPU at its power cap under full load, as many are) counts only with its
        clock held below its usual."""
        tail = list(rk.recent)[-self._min_recent:]

        def med(samples: list[RankSample], i: int) -> float | None:
            return _median([v for v in (s.readings()[i] for s in samples) if v is not None])

        def peer(i: int) -> float | None:
            return _median([v for v in (med(list(p.recent)[-len(tail):], i) for p in peers) if v is not None])

        u = self._usual(rk)
        clock, temp, util = med(tail, 0), med(tail, 1), med(tail, 2)
        # its own usual clock, or (less precise) its peers' or the GPU's maximum
        ref_clock = u.clock or peer(0) or _median([s.max_sm_clock_mhz for s in tail if s.max_sm_clock_mhz])
        held = bool(clock and ref_clock and clock < 0.98 * ref_clock)
        # a trimmed clock (0.5 %) with its own usual and peers as warm as they usually are; alone, held (2 %)
        tol = 0.995 if u.clock and peers else 0.98
        before = rk.bits[0] - len(tail)  # its steps before the last ones: did they show the bit as well?
        shown = {}
        for i, reason, bits in ((1, THERMAL, THERMAL_REASONS), (2, POWER, POWER_REASONS)):
            now = sum(any(x in s.throttle_reasons for x in bits) for s in tail)
            shown[reason] = now * 2 > len(tail)
            hard = sum(any(x in s.throttle_reasons for x in HARD[reason]) for s in tail) * 2 > len(tail)
            if hard or shown[reason] and before >= self.recent and (rk.bits[i] - now) * 5 < before:
                return reason  # a hardware slowdown, or a bit it (almost) never showed before
        # Hot only explains slowness if the clock is actually down (a hot GPU's clock is trimmed before the
        # throttle holds it; no reason bit on some drivers). A rank without peers is hot only against its own
        # history, which may have begun cold: a freshly placed GPU warming from idle to its working temperature
        # trims its clock ~1 % on the way (the detection bench drained a healthy one for that), so it needs more.
        ref_temp = u.temp if u.temp is not None else peer(1)  # hotter than it usually runs (or than its peers)
        hot = temp is not None and ref_temp is not None and temp >= ref_temp + 8
        if hot and clock and ref_clock and clock < tol * ref_clock:
            return THERMAL
        if held:
            return THERMAL if shown[THERMAL] else POWER if shown[POWER] else CLOCK
        # its host starves it: it waits longer for its batches, or its GPU idles between kernels
        data, ref_data = med(tail, 3), u.data if u.data is not None else peer(3)
        if data is not None and ref_data is not None and data - ref_data >= max(0.01, -0.5 * math.expm1(-slowdown)):
            return CPU_STARVED
        ref_util = u.util if u.util is not None else peer(2)
        if util is not None and ref_util is not None:
            expected = ref_util * -math.expm1(-max(slowdown, 0.0))  # points of utilization that slowdown costs
            if ref_util - util >= max(1.5, 0.4 * expected):
                return CPU_STARVED
        return UNKNOWN

    def _judge_trend(self, r: int, rk: _Rank, s: RankSample, peers_c: float | None) -> None:
        """Its temperature against its own history; with peers, its temperature over theirs (a room warming up
        heats them all: that is not this GPU's heat sink)."""
        # ~30 readings a window, however fast the steps come
        if s.temperature_c is None or rk.temps and s.time - rk.temps[-1][0] < self.trend_recent_s / 30:
            return
        over = s.temperature_c - peers_c if peers_c is not None else None
        rk.temps.append((s.time, s.temperature_c, over, s.sm_clock_mhz,
                         any(x in s.throttle_reasons for x in THERMAL_REASONS)))
        while rk.temps and rk.temps[0][0] < s.time - self.trend_history_s:
            rk.temps.popleft()
        k = 1 if over is None else 2
        cut = s.time - self.trend_recent_s
        n = next((i for i, x in enumerate(reversed(rk.temps)) if x[0] < cut), len(rk.temps))
        recent = [x for x in list(rk.temps)[-n:] if x[k] is not None] if n else []
        if len(recent) < 8 or s.time - rk.temps[0][0] < 3 * self.trend_recent_s:
            rk.trend_streak = 0
            return
        slope, se = _slope([(x[0], x[k]) for x in recent])
        if rk.trend is None and slope < max(self.trend_min_slope, 4 * se):  # the usual case: not rising
            rk.trend_streak = 0
            return
        base = [x for x in list(rk.temps)[:len(rk.temps) - n] if x[k] is not None]
        if len(base) < 15:
            rk.trend_streak = 0
            return
        usual_slope, _ = _slope([(x[0], x[k]) for x in base])
        usual, spread = _med_sigma([x[k] for x in base], 1)
        assert usual is not None
        now = statistics.fmean(x[k] for x in recent[-3:])
        clocks = [x[3] for x in base if x[3]]
        at_max = not any(x[4] for x in recent) and (
            not clocks or not s.sm_clock_mhz or s.sm_clock_mhz >= 0.98 * statistics.median(clocks))
        rising = (slope >= max(self.trend_min_slope, 4 * se, usual_slope + self.trend_min_slope)
                  and now - usual >= max(self.trend_min_rise_c, 4 * spread))
        if rk.trend is not None:
            if now - usual < self.trend_min_rise_c / 2:  # back to its usual (or its usual caught up): episode over
                rk.trend = None
            return
        rk.trend_streak = rk.trend_streak + 1 if rising and at_max else 0
        if rk.trend_streak >= 3:
            own, own_usual = _slope([(x[0], x[1]) for x in recent])[0], _slope([(x[0], x[1]) for x in base])[0]
            rk.trend = ThermalTrend(r, s.host, s.step, round(own, 2), round(own_usual, 2),
                                    round(statistics.fmean(x[1] for x in recent[-3:]), 1),
                                    round(statistics.median(x[1] for x in base), 1), s.sm_clock_mhz)
            self._started.append(rk.trend)

    # --- output ---------------------------------------------------------------------------------------------------
    def _score(self, r: int, rk: _Rank, step: int) -> StragglerScore:
        u = self._usual(rk)
        peers = any(q != r and p.recent for q, p in self._ranks.items()) and len(rk.rel) >= self._min_recent
        rel = _trimmed_mean(list(rk.rel)[-self._min_recent:]) if peers else 0.0  # its last steps, as the raw
        raw = self._own(rk)[0] or 0.0
        s = rk.last
        assert s is not None
        return StragglerScore(r, s.host, round(math.exp(rel), 4), round(math.exp(raw), 4), rk.flagged,
                              rk.reason if rk.flagged else "", s.temperature_c, s.sm_clock_mhz,
                              round(math.exp(u.rel or 0.0), 4), step)

    def scores(self) -> list[StragglerScore]:
        return [self._score(r, rk, self._judged) for r, rk in sorted(self._ranks.items()) if rk.last is not None]

    def fit(self) -> DriftFit | None:
        return fit_drift(list(self.samples))
