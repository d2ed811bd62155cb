"""Detection latency: from an injected fault to the controller's verdict, per fault kind, on a real job.

A local 4-host Ray cluster (3 hosts in the job, 1 spare), the embedded trainer on gloo, the real agents and
controller. For each kind, `--trials` faults, one per attempt, each after the attempt has trained `--steps`:

- xid79: a fatal Xid 79 on rank 1's GPU (the host is evicted, then repaired and returned as the next spare);
- exception: a Python exception in rank 1;
- kill: rank 1's process SIGKILLed;
- hang: rank 1 stops joining collectives (no rank dies: found by the pace of the steps and the flight recorder).

The time is from the injection to the verdict (the interruption's detected_at), p50 and p90; a verdict is right
when it names the expected cause (and, for a hang, rank 1). Goals: hang <= 15 s p90 (the NCCL watchdog's default
is 600 s; Mycroft reports 15 s at p90), fatal Xid <= 2 s p90.

    python -m bench.detection [--trials 10] [--kinds xid79,exception,kill,hang]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = {"xid79": ("faulty_gpu",), "exception": ("software_bug",), "kill": ("unknown", "software_bug"),
            "hang": ("nccl_watchdog_timeout",)}


def _p(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    import ray

    from herdsman.config import load_config
    from orchestrator.cluster import LocalCluster, connect
    from orchestrator.job import launch_controller, stop_controller, wait_until
    from orchestrator.store import Store

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--kinds", default="xid79,exception,kill,hang")
    p.add_argument("--steps", type=int, default=40, help="steps each attempt trains before its fault")
    p.add_argument("--settle-s", type=float, default=1.0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "detection.json"))
    a = p.parse_args()
    kinds = a.kinds.split(",")
    d = Path(tempfile.mkdtemp(prefix="detection-"))
    cfg = load_config(overrides={
        "run_dir": str(d / "run"), "job": "detect",
        "trainer": {"steps": 1_000_000, "checkpoint_every": 5, "step_delay_s": 0.05},
        "controller": {"lemon_threshold": 1_000_000, "max_restarts": 1_000_000, "restart_backoff_s": 0.2}})
    injected: dict[int, tuple[str, float]] = {}  # attempt -> (kind, injection time)
    with LocalCluster(["host-1", "host-2", "host-3", "host-4"]) as cluster:
        connect(cluster.address)
        ctrl = launch_controller(cfg)
        try:
            attempt = 0
            for trial in range(a.trials):
                for kind in kinds:
                    # an interruption nobody injected (a false alarm) moves the attempt on: counted, not awaited
                    st = wait_until(ctrl, lambda s: s["attempt"] >= attempt and s["state"] == "running", 300)
                    attempt = st["attempt"]
                    # mid-run, as real faults are: the attempt has a steady pace (its first steps warm up)
                    wait_until(ctrl, lambda s: s["step"] >= st["step"] + a.steps, 300)
                    time.sleep(a.settle_s)
                    st = ray.get(ctrl.status.remote())
                    if st["attempt"] != attempt or st["state"] != "running":
                        continue  # interrupted meanwhile (counted below as nobody's): this trial is skipped
                    victim = st["placement"][1]
                    if kind == "xid79":
                        t0 = time.time()
                        ray.get(ctrl.inject_gpu_fault.remote(victim, "xid", gpu=0, code=79))
                    elif kind == "kill":
                        t0 = ray.get(ctrl.kill_rank.remote(1))
                    else:  # the fault fires when rank 1 starts its next step: timed from then
                        ray.get(ctrl.inject_trainer_fault.remote(1, kind, "RuntimeError: bench", st["step"] + 1))
                        t0 = time.time()
                    injected[attempt] = (kind, t0)
                    wait_until(ctrl, lambda s: s["attempt"] > attempt, 300)
                    print(f"  trial {trial + 1} {kind}: verdict in attempt {attempt}", flush=True)
                    attempt += 1
                    if kind == "xid79":  # repaired: the next spare
                        ray.get(ctrl.inject_gpu_fault.remote(victim, "clear"))
                        time.sleep(1.5)
                        assert not ray.get(ctrl.return_to_service.remote(victim))
        finally:
            stop_controller(ctrl)
    rows, result = [], {}
    its = {it.attempt: it for it in Store(cfg.store_url).interruptions("detect")}
    for kind in kinds:
        lat, right = [], 0
        for att, (k, t0) in injected.items():
            it = its.get(att)
            if k != kind or it is None:
                continue
            lat.append(it.detected_at - t0)
            ok = it.verdict.cause.value in EXPECTED[kind] and (kind != "hang" or tuple(it.verdict.ranks) == (1,))
            right += ok
        if not lat:
            continue
        result[kind] = {"trials": len(lat), "p50_s": _p(lat, 0.5), "p90_s": _p(lat, 0.9), "max_s": max(lat),
                        "right": right, "latencies_s": lat}
        rows.append([kind, len(lat), f"{_p(lat, 0.5):.2f}", f"{_p(lat, 0.9):.2f}", f"{max(lat):.2f}",
                     f"{right}/{len(lat)}"])
    unprompted = [f"attempt {att}: {it.verdict.cause.value}" for att, it in sorted(its.items()) if att not in injected]
    print(tabulate(rows, headers=["fault", "trials", "p50 s", "p90 s", "max s", "right verdict"]))
    print(f"interruptions nobody injected: {len(unprompted)}" + (f" ({'; '.join(unprompted)})" if unprompted else ""))
    print("goals: hang <= 15 s p90 (naming the rank), fatal Xid <= 2 s p90")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"benchmark": "detection", "results": result, "unprompted": unprompted,
                                       "mean_restart_cycle_s": statistics.mean(
                                           [it.restart_s or 0.0 for it in its.values()] or [0.0]),
                                       "time": time.time()}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
