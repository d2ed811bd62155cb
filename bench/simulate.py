"""Simulator speed: simulated GPU-days per wall second, and what the real policies cost per interruption.

Runs the 54-day, 16,384-GPU scenario under both profiles for several seeds, and a larger fleet (65,536 GPUs) to show
how the cost grows with the host pool (HostPool.place is linear in it).

    python -m bench.simulate [--seeds 5] [--out bench/results/simulate.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from tabulate import tabulate

from orchestrator.simulate import profile, simulate

ROOT = Path(__file__).resolve().parent.parent


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
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "simulate", "results": results, "time": time.time()}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
