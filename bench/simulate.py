"""Simulator speed: simulated GPU-days per wall second, and what the real policies cost per interruption.

Runs the 54-day, 16,384-GPU scenario under both profiles for several seeds, and a larger fleet (65,536 GPUs, goal:
under 60 s). Also times the real policies at fleet scale: an eviction plus the next placement (HostPool.place,
linear in the pool) at 2,048 active hosts and 256 spares, median and p99 of 200.

    python -m bench.simulate [--seeds 5] [--out bench/results/simulate.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from tabulate import tabulate

from orchestrator.policy import HostPool
from orchestrator.simulate import profile, simulate

ROOT = Path(__file__).resolve().parent.parent


def placement(active: int = 2048, spares: int = 256, trials: int = 200) -> dict[str, float]:
    """Evict one host of the job and place the next attempt, on a pool of `active` + `spares` hosts."""
    pool = HostPool()
    hosts = [f"h{i:05d}" for i in range(active + spares)]
    pool.sync(hosts, 0.0)
    job = pool.place(active, [])
    pool.activate(job, 0.0)
    took = []
    for i in range(trials):
        t0 = time.perf_counter()
        pool.quarantine(job[(i * 37) % len(job)], "bench: Xid 79", float(i))
        job = pool.place(active, job)
        pool.activate(job, float(i))
        took.append(time.perf_counter() - t0)
    took.sort()
    return {"active": active, "spares": spares, "trials": trials, "median_ms": 1000 * statistics.median(took),
            "p99_ms": 1000 * took[int(0.99 * (trials - 1))]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "simulate.json"))
    a = p.parse_args()
    cases = [("llama3", 16384, 64), ("herdsman", 16384, 64), ("llama3", 65536, 256)]
    rows, results = [], []
    for name, gpus, spares in cases:
        runs = [simulate(profile(name, gpus=gpus, spare_hosts=spares, seed=s)) for s in range(a.seeds)]
        wall = [r.sim_wall_s for r in runs]
        gpu_days = gpus * runs[0].cfg.days
        res = {
            "profile": name, "gpus": gpus, "days": runs[0].cfg.days, "seeds": a.seeds,
            "interruptions_mean": statistics.mean(len(r.interruptions) for r in runs),
            "ettr_mean": statistics.mean(r.ettr for r in runs), "ettr_min": min(r.ettr for r in runs),
            "sim_wall_s_median": statistics.median(wall),
            "gpu_days_per_s": gpu_days / statistics.median(wall),
            "policy_us_per_event": statistics.median(r.policy_us_per_event for r in runs),
            "policy_share": statistics.median(r.policy_s / r.sim_wall_s for r in runs),
        }
        results.append(res)
        rows.append([name, f"{gpus:,}", f"{res['interruptions_mean']:.0f}", f"{100 * res['ettr_mean']:.2f}",
                     f"{res['sim_wall_s_median']:.2f}", f"{res['gpu_days_per_s']:,.0f}",
                     f"{res['policy_us_per_event']:.0f}", f"{100 * res['policy_share']:.0f}%"])
    print(tabulate(rows, headers=["profile", "GPUs", "interruptions", "ETTR %", "wall s (median)", "GPU-days/s",
                                  "policy us/event", "policy share"]))
    place = placement()
    print(f"eviction + placement at {place['active']:,} active hosts + {place['spares']} spares: "
          f"{place['median_ms']:.2f} ms median, {place['p99_ms']:.2f} ms p99 ({place['trials']} evictions)")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "simulate", "results": results, "placement": place,
                               "time": time.time()}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
