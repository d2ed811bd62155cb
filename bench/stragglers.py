"""Stragglers: precision and recall of agents/drift.py on synthetic jobs with injected slowdowns, and healthy jobs.

A job is 64 ranks, 8 to a node; each node's DriftTracker sees its 8 ranks, as that node's agent does (the joined
StepStats + GpuSample, in step order). A rank's compute time carries what real measurements do: 1-3 % jitter a
step, a slow wander of its own, a diurnal 1-2 % common to all ranks, job-wide hiccups (2 % of steps), rare spikes
of one rank, clocks trimmed ~0.1 %/C as GPUs heat, and nodes whose host gets loaded for 20-80 steps (all its ranks
5-20 % slower and noisier: what `make test`'s e2e run sees on a 2-core machine). Half the nodes run at their power
cap, their GPUs showing sw_power_cap most of the time, as many do under full load. An injected job slows one rank
of each node by 3, 5 or 10 % from a random step past the middle, by one of:

  heat         its heat sink fails: its temperature rises for 30-120 steps, then the throttle holds its clock down
               (a thermal reason bit on 4 GPUs of 5, none on the rest, as on some drivers)
  power_cap    a lower power cap than its peers': its clock held down, the sw_power_cap bit, power at the cap
  cpu_starved  its host starves it (a noisy neighbour): clocks fine, GPU utilization down in proportion; on 4 of 5
               its data loader (it waits longer for its batches), on the rest its kernel launches

Reported per kind and size: recall (flagged within 30 steps of the onset; for heat, a thermal flag while it heats
counts, with 0 steps), the share with the right reason (thermal, power, cpu_starved), both together (the goal:
>= 95 % at 5 %), the median steps to detection, false flags (any other rank, or the victim before its onset), and
false thermal trends; on healthy jobs the ranks flagged (the goal: none, nor in any other job). For heat, how often
the thermal trend (temperature rising against its own history, clocks still at max) came before the clock drop,
and by how many steps. The last rows put one rank on each node, as the e2e cluster does: no peers, so only a
slowdown its GPU explains can be flagged (a quarter of the ranks are victims there).

    python -m bench.stragglers [--runs 8] [--healthy 10] [--steps 360] [--seed 0] [--out bench/results/stragglers.json]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from tabulate import tabulate

from agents.drift import CPU_STARVED, POWER, THERMAL, DriftTracker, RankSample, ThermalTrend

ROOT = Path(__file__).resolve().parent.parent
KINDS = {"heat": THERMAL, "power_cap": POWER, "cpu_starved": CPU_STARVED}
SIZES = (0.03, 0.05, 0.10)
MAX_SM, THROTTLE_C, TDP_W = 1980.0, 84.0, 700.0
WITHIN = 30  # steps after onset


@dataclass(frozen=True)
class Injection:
    rank: int
    kind: str
    size: float
    onset: int  # first slow step
    heat_from: int = 0  # heat: first step of the temperature rise
    bits: bool = True  # heat: the driver sets a thermal reason bit; cpu_starved: its data loader (not launches)


@dataclass
class Outcome:
    flags: dict[int, tuple[int, str]]  # rank -> (first step flagged, reason then)
    flag_events: int
    trends: dict[int, int]  # rank -> first step of a thermal trend
    rank_steps: int


def _clock(temp: float) -> float:
    """H100-like DVFS: clocks trimmed ~0.1 %/C above 60 C, in 15 MHz bins."""
    return 15 * round(MAX_SM * (1 - max(0.0, temp - 60) * 0.001) / 15)


def simulate(seed: int, ranks: int, per_node: int, steps: int, victims: dict[int, Injection]) -> Outcome:
    """One job: each node's DriftTracker fed its ranks' samples step by step; `victims` slowed as injected."""
    rng = random.Random(seed)
    n_nodes = (ranks + per_node - 1) // per_node
    trackers = [DriftTracker() for _ in range(n_nodes)]
    capped = [rng.random() < 0.5 for _ in range(n_nodes)]  # at their power cap under full load: the bit is normal
    step_s = rng.uniform(0.8, 2.0)
    offset = [rng.gauss(0, 0.005) for _ in range(ranks)]  # silicon lottery
    jitter = [rng.uniform(0.01, 0.03) for _ in range(ranks)]
    wander = [0.0] * ranks
    base_t = [rng.uniform(62, 72) for _ in range(ranks)]
    base_u = [rng.uniform(93, 99) for _ in range(ranks)]
    base_d = [rng.uniform(0.01, 0.03) for _ in range(ranks)]  # share of a step waiting for its batch
    heat_target = {r: THROTTLE_C + rng.uniform(3, 15) for r, v in victims.items() if v.kind == "heat"}
    amp, period, phase = rng.uniform(0.01, 0.02), steps * rng.uniform(1, 3), rng.random()
    loaded: dict[int, tuple[int, float]] = {}  # node -> (until step, factor)
    flags: dict[int, tuple[int, str]] = {}
    trends: dict[int, int] = {}
    events, now = 0, 1.7e9
    end = max((v.onset for v in victims.values()), default=steps - WITHIN - 10) + WITHIN + 10
    for step in range(min(steps, end)):
        diurnal = math.sin(2 * math.pi * (phase + step / period))
        common = (1 + amp * diurnal) * (rng.uniform(1.1, 1.5) if rng.random() < 0.02 else 1.0)
        for n in range(n_nodes):
            if n not in loaded and rng.random() < 0.005:
                loaded[n] = (step + rng.randint(20, 80), rng.uniform(1.05, 1.2))
            elif n in loaded and step >= loaded[n][0]:
                del loaded[n]
        samples = []
        for r in range(ranks):
            node = r // per_node
            load = loaded.get(node, (0, 1.0))[1]
            wander[r] = 0.98 * wander[r] + rng.gauss(0, 0.0006)
            noise = rng.gauss(0, jitter[r] * (1.5 if load > 1 else 1.0))
            spike = rng.uniform(1.1, 1.6) if rng.random() < 0.005 else 1.0
            t_c = base_t[r] + diurnal + rng.gauss(0, 0.4)  # the room: +-1 C over the run
            reasons: tuple[str, ...] = ("sw_power_cap",) if capped[node] and rng.random() < 0.7 else ()
            util, power = min(100.0, base_u[r] + rng.gauss(0, 1)), TDP_W if reasons else rng.gauss(640, 12)
            slow, v, data = 1.0, victims.get(r), base_d[r] * rng.uniform(0.7, 1.3)
            if v and v.kind == "heat" and step >= v.heat_from:  # first-order rise crossing the throttle point
                frac = (THROTTLE_C - base_t[r]) / (heat_target[r] - base_t[r])
                tau = -max(1, v.onset - v.heat_from) / math.log(1 - frac)
                t_c = base_t[r] + (heat_target[r] - base_t[r]) * (1 - math.exp(-(step - v.heat_from) / tau))
                t_c = min(t_c, THROTTLE_C + 1.5) + rng.gauss(0, 0.4)
            clock = _clock(t_c)
            if v and step >= v.onset:
                slow = 1 + v.size
                if v.kind == "heat":
                    clock = 15 * round(_clock(THROTTLE_C) / slow / 15)
                    if v.bits:
                        reasons += ("hw_slowdown", "hw_thermal") if v.size >= 0.1 else ("sw_thermal",)
                elif v.kind == "power_cap":  # a lower cap than the others'
                    clock, reasons, power = 15 * round(clock / slow / 15), ("sw_power_cap",), 0.8 * TDP_W
                else:  # the GPU idles for its host: a slower data loader, or slower kernel launches
                    util = util / slow
                    data = (data + slow - 1) / slow if v.bits else data / slow
            dvfs = 1 + 0.001 * max(0.0, t_c - 60)
            compute = (step_s * (1 + offset[r]) * math.exp(wander[r]) * (1 + noise) * common * load * spike * dvfs
                       * slow)
            samples.append((r, compute, t_c, clock, reasons, util, power, data * compute))
        now += max(c for _, c, *_ in samples) + step_s * rng.uniform(0.04, 0.06)  # the slowest, then the all-reduce
        for r, compute, t_c, clock, reasons, util, power, data_s in samples:
            trackers[r // per_node].add(RankSample(r, f"node{r // per_node}", step, now, compute, 4096 / compute,
                                                   round(t_c, 1), clock, MAX_SM, reasons, 0, round(util, 1),
                                                   round(power, 1), data_s))
        for tr in trackers:
            for x in tr.pop_started():
                if isinstance(x, ThermalTrend):
                    trends.setdefault(x.rank, step)
                else:
                    events += 1
                    flags.setdefault(x.rank, (step, x.reason))
    return Outcome(flags, events, trends, ranks * min(steps, end))


def injected_cell(kind: str, size: float, runs: int, seed: int, ranks: int, per_node: int, steps: int) -> dict:
    """`runs` jobs, each with one victim per node (per_node > 1) or on every fourth node (one rank a node)."""
    trials = hits = right = false_flags = healthy = trend_false = early = early_flags = 0
    delays, leads = [], []
    for i in range(runs):
        rng = random.Random(f"{seed}-{kind}-{size}-{per_node}-{i}")
        picks = ([n + rng.randrange(per_node) for n in range(0, ranks, per_node)] if per_node > 1
                 else rng.sample(range(ranks), ranks // 4))
        victims = {}
        for r in picks:
            onset = rng.randint(steps * 3 // 5, steps - WITHIN - 20)
            victims[r] = Injection(r, kind, size, onset, onset - rng.randint(30, 120), rng.random() < 0.8)
        out = simulate(rng.randrange(1 << 30), ranks, per_node, steps, victims)
        trials += len(victims)
        healthy += ranks - len(victims)
        for r, v in victims.items():
            first = out.flags.get(r)
            # heat slows a GPU a little (its clock trimmed as it heats) before the throttle holds it down: a thermal
            # flag while it heats is an early detection
            start = v.heat_from if kind == "heat" else v.onset
            if first and (first[0] < start or first[0] < v.onset and first[1] != THERMAL):
                false_flags += 1
            elif first and first[0] - v.onset <= WITHIN:
                hits += 1
                delays.append(max(0, first[0] - v.onset))
                early_flags += first[0] < v.onset
                right += first[1] == KINDS[kind]
            if r in out.trends:
                lead = v.onset - out.trends[r]
                if kind == "heat":
                    leads.append(lead)
                    early += lead > 0
                else:
                    trend_false += 1
        false_flags += sum(1 for r in out.flags if r not in victims)
        trend_false += sum(1 for r in out.trends if r not in victims)
    row = {"kind": kind, "size": size, "per_node": per_node, "runs": runs, "trials": trials,
           "other_ranks": healthy, "recall": hits / trials, "right_reason": right / hits if hits else None,
           "recall_right_reason": right / trials, "median_steps": statistics.median(delays) if delays else None,
           "false_flags": false_flags, "trend_false": trend_false}
    if kind == "heat":
        row.update(flagged_before_drop=early_flags / trials, trend_before_drop=early / trials,
                   trend_median_lead_steps=statistics.median(leads) if leads else None)
    return row


def healthy_cell(runs: int, seed: int, ranks: int, per_node: int, steps: int) -> dict:
    flagged = events = rank_steps = trends = 0
    for i in range(runs):
        out = simulate(random.Random(f"{seed}-healthy-{per_node}-{i}").randrange(1 << 30), ranks, per_node, steps, {})
        flagged += len(out.flags)
        events += out.flag_events
        rank_steps += out.rank_steps
        trends += len(out.trends)
    return {"kind": "healthy", "size": 0.0, "per_node": per_node, "runs": runs, "trials": runs * ranks,
            "flagged_ranks": flagged, "false_positive_rate": flagged / (runs * ranks), "flag_events": events,
            "rank_steps": rank_steps, "trend_false": trends}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f} %"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=8, help="jobs per kind and size (8 victims each)")
    p.add_argument("--healthy", type=int, default=10, help="healthy jobs")
    p.add_argument("--ranks", type=int, default=64)
    p.add_argument("--steps", type=int, default=360)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "stragglers.json"))
    a = p.parse_args()
    t0 = time.perf_counter()
    rows = [healthy_cell(a.healthy, a.seed, a.ranks, 8, a.steps)]
    rows += [injected_cell(k, s, a.runs, a.seed, a.ranks, 8, a.steps) for k in KINDS for s in SIZES]
    # one rank per node (the e2e layout): no peers; a quarter of the ranks slowed in each job
    rows += [healthy_cell(max(1, a.healthy // 2), a.seed, a.ranks, 1, a.steps)]
    rows += [injected_cell(k, s, max(1, a.runs // 2), a.seed, a.ranks, 1, a.steps) for k in KINDS
             for s in (0.05, 0.10)]
    table = []
    for r in rows:
        if r["kind"] == "healthy":
            table.append([r["per_node"], "healthy", "-", r["trials"], f"{r['flagged_ranks']} flagged", "-", "-", "-",
                          r["flagged_ranks"], r["trend_false"], "-"])
            continue
        lead = "-"
        if r["kind"] == "heat":
            lead = f"{_pct(r['trend_before_drop'])}, {r['trend_median_lead_steps']} steps"
        table.append([r["per_node"], r["kind"], f"{100 * r['size']:.0f} %", r["trials"], _pct(r["recall"]),
                      _pct(r["right_reason"]), _pct(r["recall_right_reason"]),
                      "-" if r["median_steps"] is None else r["median_steps"],
                      r["false_flags"], r["trend_false"], lead])
    print(tabulate(table, headers=["ranks/node", "slowdown", "size", "ranks", f"flagged <= {WITHIN} steps",
                                   "right reason", "both", "median steps", "false flags", "false trends",
                                   "trend before clock drop, median lead"]))
    five = [r for r in rows if r["kind"] != "healthy" and r["size"] == 0.05 and r["per_node"] > 1]
    false_flags = sum(r["flagged_ranks"] if r["kind"] == "healthy" else r["false_flags"] for r in rows)
    goals = {"no_healthy_rank_flagged": false_flags == 0,
             "five_percent_flagged_with_reason_ge_95": all(r["recall_right_reason"] >= 0.95 for r in five)}
    print(f"\ngoals: {goals}  ({time.perf_counter() - t0:.0f} s)")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"ranks": a.ranks, "steps": a.steps, "within_steps": WITHIN, "seed": a.seed,
                                       "rows": rows, "goals": goals}, indent=2) + "\n")


if __name__ == "__main__":
    main()
