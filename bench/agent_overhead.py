"""Agent overhead: CPU time per sampling cycle and per Prometheus scrape, 8 simulated GPUs, 8 ranks reporting.

At 1 Hz sampling (and, pessimistically, one scrape per second) the agent's share of one core is
(cycle CPU + scrape CPU) / 1 s; the goal is <= 1 %. Host sources are this machine's real /sys and kernel log.

    python -m bench.agent_overhead [--cycles 300] [--out bench/results/agent_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from tabulate import tabulate

from agents.agent import NodeAgent
from agents.metrics import AgentCollector
from herdsman.config import load_config
from herdsman.events import TrainerPhase
from herdsman.stats import StatsWriter

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cycles", type=int, default=300)
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "agent_overhead.json"))
    a = p.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="agent-bench-"))
    cfg = load_config(overrides={"run_dir": str(run_dir), "agent": {"gpus_per_host": a.gpus}})
    agent = NodeAgent("bench-host", cfg)
    writers = [StatsWriter(agent.stats_dir, r, "bench-host", 0, gpu=r) for r in range(a.gpus)]
    for w in writers:
        w.event(TrainerPhase.RENDEZVOUS)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent))
    for g in range(a.gpus):
        agent.probe.set_load(g, 0.9)
    cycle_cpu, scrape_cpu, scrape_bytes = [], [], 0
    for i in range(a.cycles):
        for r, w in enumerate(writers):  # one step per rank per second, as a 1 Hz trainer would report
            w.step(i + 1, 1.0 + 0.01 * r, 4096, 2.0)
        t0 = time.process_time()
        agent.cycle()
        t1 = time.process_time()
        body = generate_latest(registry)
        t2 = time.process_time()
        cycle_cpu.append(t1 - t0)
        scrape_cpu.append(t2 - t1)
        scrape_bytes = len(body)
    agent.stop()
    cyc, scr = statistics.median(cycle_cpu), statistics.median(scrape_cpu)
    share = (cyc + scr) / 1.0
    rows = [["sampling cycle", f"{1000 * cyc:.2f}", f"{1000 * max(cycle_cpu):.2f}"],
            ["scrape (/metrics)", f"{1000 * scr:.2f}", f"{1000 * max(scrape_cpu):.2f}"]]
    print(f"Agent overhead: {a.gpus} simulated GPUs, {a.gpus} ranks reporting, {a.cycles} cycles, "
          f"scrape {scrape_bytes} bytes")
    print(tabulate(rows, headers=["phase", "median CPU ms", "max CPU ms"]))
    print(f"share of one core at 1 Hz sampling + 1 scrape/s: {100 * share:.3f} % (goal <= 1 %)")
    result = {"benchmark": "agent_overhead", "gpus": a.gpus, "cycles": a.cycles, "cycle_cpu_s_median": cyc,
              "scrape_cpu_s_median": scr, "scrape_bytes": scrape_bytes, "core_share_1hz": share, "time": time.time()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
