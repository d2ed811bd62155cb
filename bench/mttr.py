"""MTTR: time from a fault to the first completed step after the restart, same-host and by eviction.

Herdsman (controller on a local 4-host Ray cluster, ranks on 3 hosts, one spare) against `torchrun
--max-restarts` on the same tiny model, world size, checkpoint interval and machine, in the same run. Two faults
for Herdsman: a killed rank (on the same hosts, as torchrun does: the surviving ranks rejoin in their own
processes, an in-process restart; and again with `controller.inprocess_restart = false`, every process restarted)
and a fatal Xid 79 (the host evicted, the job restarted on the spare Herdsman keeps warm; goal: within 1.2x the
same-host process restart). Our trainer builds its process
group on a per-attempt PrefixStore, the fix torchrun + gloo needs to restart at all: without it
restarted gloo workers reuse stale peer addresses and fail with `Gloo connectFullMesh failed`.

    python -m bench.mttr [--reps 5] [--out bench/results/mttr.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

ROOT = Path(__file__).resolve().parent.parent
WORLD, EVERY = 3, 5


def _records(stats_dir: Path, rank: int, attempt: int) -> list[dict]:
    f = stats_dir / f"rank{rank:05d}-attempt{attempt:04d}.jsonl"
    if not f.exists():
        return []
    out = []
    for line in f.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def _wait(pred, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise TimeoutError(what)


def _first_step_after(stats_dir: Path, attempt: int, timeout: float = 120) -> tuple[float, int]:
    """(time, attempt) of the first step of the first later attempt that stepped: the next one, or the one after
    it when an in-process restart fell back to restarting processes (that time counts too)."""
    def first():
        for a in range(attempt + 1, attempt + 4):
            steps = [r for r in _records(stats_dir, 0, a) if r["kind"] == "step"]
            if steps:
                return steps[0]["time"], a
        return None
    return _wait(first, timeout, f"no step in an attempt after {attempt}")


def _last_step(stats_dir: Path, attempt: int) -> int:
    steps = [r["step"] for r in _records(stats_dir, 0, attempt) if r["kind"] == "step"]
    return max(steps, default=0)


def _config(d: Path, inprocess: bool = True) -> Path:
    # Lemon detection off: every kill lands on the same host, and after three the policy would (rightly) move
    # the job to the spare; this benchmark measures the restart itself.
    p = d / "h.toml"
    p.write_text(f'run_dir = "{d / "run"}"\njob = "bench"\n[trainer]\nsteps = 100000\ncheckpoint_every = {EVERY}\n'
                 f'[controller]\nlemon_threshold = 1000000\ninprocess_restart = {str(inprocess).lower()}\n')
    return p


def bench_torchrun(reps: int, warm_steps: int, settle_s: float) -> list[float]:
    d = Path(tempfile.mkdtemp(prefix="mttr-torchrun-"))
    stats = d / "stats"
    env = {**os.environ, "HERDSMAN_STATS_DIR": str(stats), "OMP_NUM_THREADS": "1", "HERDSMAN_HOST": "local"}
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.Popen([str(torchrun), "--nproc-per-node", str(WORLD), "--max-restarts", str(reps + 1),
                             "-m", "trainer.train", "--config", str(_config(d))], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    out = []
    try:
        for attempt in range(reps):
            _wait(lambda: _last_step(stats, attempt) >= warm_steps, 180, "torchrun warm-up")
            time.sleep(settle_s)
            pid = next(r["pid"] for r in _records(stats, 1, attempt) if r["kind"] == "event")
            t_kill = time.time()
            os.kill(pid, signal.SIGKILL)
            out.append(_first_step_after(stats, attempt)[0] - t_kill)
            print(f"  torchrun  rep {attempt + 1}: {out[-1]:.2f} s", flush=True)
    finally:
        _stop_torchrun(proc, stats)
    return out


def _stop_torchrun(proc: subprocess.Popen, stats: Path) -> None:
    """SIGTERM lets torchrun end its workers; any it left behind (they run in their own sessions) are killed."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for f in stats.glob("*.jsonl"):
        for r in _records(stats, int(f.name[4:9]), int(f.name[-10:-6])):
            if r.get("pid"):
                try:
                    os.kill(r["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    pass


SAME_HOST, EVICTION, PROCESSES = ("same host (rank killed), in-process", "eviction (Xid 79, warm spare)",
                                   "same host (rank killed), every process restarted")


def _dump_waits(decisions: list[str]) -> dict[int, float]:
    """Seconds each failed attempt's detection waited for flight-recorder dumps, from the controller's decisions."""
    out = {}
    for line in decisions:
        m = re.search(r"flight-recorder dumps of attempt (\d+): .* in ([0-9.]+) s", line)
        if m:
            out[int(m[1])] = float(m[2])
    return out


def bench_herdsman(reps: int, warm_steps: int, settle_s: float, inprocess: bool = True
                   ) -> tuple[dict[str, list[float]], list[dict]]:
    """Alternately, on one job: kill rank 1 (a same-host restart) and a fatal Xid 79 on rank 1's host (an eviction
    onto the spare, which Herdsman keeps warm while the job trains); the evicted host is repaired and returned to
    service, and becomes the next spare. With `inprocess` False: only the kill, every process restarted."""
    import ray

    from herdsman.config import load_config
    from herdsman.layout import stats_dir
    from orchestrator.cluster import LocalCluster, connect
    from orchestrator.job import launch_controller, stop_controller, wait_until
    from orchestrator.store import Store

    d = Path(tempfile.mkdtemp(prefix="mttr-herdsman-"))
    cfg = load_config(_config(d, inprocess))
    out: dict[str, list[float]] = {SAME_HOST: [], EVICTION: []} if inprocess else {PROCESSES: []}
    split, kind_of, dump_waits = [], {}, {}
    with LocalCluster(["host-1", "host-2", "host-3", "host-4"]) as cluster:
        connect(cluster.address)
        ctrl = launch_controller(cfg)
        try:
            attempt = 0
            for rep in range(reps):
                for kind in out:
                    st = wait_until(ctrl, lambda s: s["attempt"] == attempt and s["state"] == "running", 180)
                    host0, victim = st["placement"][0], st["placement"][1]
                    stats = stats_dir(cfg.run_dir, host0, cfg.job)
                    _wait(lambda: _last_step(stats, attempt) >= warm_steps, 180, "herdsman warm-up")
                    time.sleep(settle_s)
                    if kind != EVICTION:
                        t0 = ray.get(ctrl.kill_rank.remote(1))
                    else:
                        t0 = time.time()
                        ray.get(ctrl.inject_gpu_fault.remote(victim, "xid", gpu=0, code=79))
                    t1, stepped = _first_step_after(stats, attempt)
                    dump_waits.update(_dump_waits(ray.get(ctrl.status.remote())["decisions"]))
                    out[kind].append(t1 - t0)
                    kind_of[attempt] = kind
                    print(f"  herdsman  rep {rep + 1} {kind}: {out[kind][-1]:.2f} s"
                          f"{' (a fallback attempt)' if stepped > attempt + 1 else ''}", flush=True)
                    attempt = stepped
                    if kind == EVICTION:  # repaired: the next spare
                        ray.get(ctrl.inject_gpu_fault.remote(victim, "clear"))
                        time.sleep(1.5)  # the health check judges the agent's latest sample
                        problems = ray.get(ctrl.return_to_service.remote(victim))
                        assert not problems, problems
            wait_until(ctrl, lambda s: s["attempt"] == attempt and s["step"] > 0, 60)
        finally:
            stop_controller(ctrl)
    for it in Store(cfg.store_url).interruptions("bench"):
        split.append({"attempt": it.attempt, "kind": kind_of.get(it.attempt, "fallback to processes"),
                      "cause": it.verdict.cause.value,
                      "detection_s": it.detection_s,
                      "restart_s": it.restart_s,
                      "restore_s": it.restore_s,
                      "dump_wait_s": dump_waits.get(it.attempt)})  # None: no live rank was asked for a dump
    return out, split


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warm-steps", type=int, default=8, help="steps each attempt runs before the kill")
    p.add_argument("--settle-s", type=float, default=10.0,
                   help="seconds each attempt trains before the kill (real failures are hours apart; this lets "
                        "Herdsman's warm standby get ready, and costs torchrun nothing)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "mttr.json"))
    a = p.parse_args()
    print(f"MTTR benchmark: {WORLD} gloo ranks, tiny Llama 3, checkpoint every {EVERY} steps, {a.reps} kills each, "
          f"{a.settle_s:.0f} s of training before each kill")
    tr = bench_torchrun(a.reps, a.warm_steps, a.settle_s)
    hm, split = bench_herdsman(a.reps, a.warm_steps, a.settle_s)
    more, more_split = bench_herdsman(a.reps, a.warm_steps, a.settle_s, inprocess=False)
    hm.update(more)
    split += more_split
    med_t = statistics.median(tr)
    rows = [[f"herdsman, {k}", f"{statistics.median(v):.2f}", f"{min(v):.2f}", f"{max(v):.2f}", len(v)]
            for k, v in hm.items()]
    rows.append(["torchrun --max-restarts, rank killed", f"{med_t:.2f}", f"{min(tr):.2f}", f"{max(tr):.2f}", len(tr)])
    print(tabulate(rows, headers=["system, fault", "median s", "min s", "max s", "reps"]))
    same, evict, procs = (statistics.median(hm[k]) for k in (SAME_HOST, EVICTION, PROCESSES))
    print(f"ratio herdsman same-host in-process / torchrun (median): {same / med_t:.2f}; in-process / every "
          f"process restarted: {same / procs:.2f}; eviction / same-host process restart: {evict / procs:.2f} "
          f"(goal <= 1.2); eviction / same-host in-process: {evict / same:.2f}")
    for label in hm:
        keys = ("detection_s", "restart_s", "restore_s", "dump_wait_s")
        xs = [x for x in split if x["kind"] == label]
        if xs:
            medians = {k: [x[k] for x in xs if x[k] is not None] for k in keys}
            print(f"herdsman split, {label} (median of the restarts that had it): " + ", ".join(
                f"{k} {statistics.median(v):.2f} (n={len(v)})" if v else f"{k} - (n=0)" for k, v in medians.items()))
    result = {"benchmark": "mttr", "world_size": WORLD, "checkpoint_every": EVERY, "reps": a.reps,
              "settle_s": a.settle_s, "herdsman_s": hm, "torchrun_s": tr,
              "median_herdsman_same_host_s": same, "median_herdsman_eviction_s": evict, "median_torchrun_s": med_t,
              "median_herdsman_process_restart_s": procs, "ratio_inprocess_vs_process_restart": same / procs,
              "ratio_same_host_vs_torchrun": same / med_t, "ratio_eviction_vs_same_host": evict / same,
              "ratio_eviction_vs_same_host_process_restart": evict / procs,
              "herdsman_split": split, "time": time.time()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
