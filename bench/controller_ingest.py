"""Controller ingest: heartbeats and evidence of a synthetic fleet (2,048 nodes x 8 GPUs) at 1 Hz and more.

Measures, in the controller's own process, (1) the sustained AgentReports per second `Controller.report` absorbs
from several threads (each report a heartbeat with 8 GPU samples, a step record and, for 1 % of nodes, a piece of
evidence), against the 2,048/s a 2,048-node fleet sends at 1 Hz (goal: 10x); (2) the time from a fatal Xid
report to the verdict (the loop's poll phase, detection, the evidence window and diagnosis; the configured
failure_grace_s wait for other ranks to exit is excluded), p50/p99 over many trials (goal p99 < 1 s), while
the fleet's 1 Hz load runs. The transport (Ray actor calls) is not included: on a real fleet agents batch or a relay fans in.

    python -m bench.controller_ingest [--nodes 2048] [--seconds 5] [--trials 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

from tabulate import tabulate

from agents.gpu import xid_evidence
from herdsman.config import load_config
from herdsman.events import AgentReport, Evidence, EvidenceKind, GpuSample, Heartbeat, Severity, StepStats
from orchestrator.controller import Controller, Running
from orchestrator.diagnose import Failure, diagnose

ROOT = Path(__file__).resolve().parent.parent


def fleet_reports(nodes: int, gpus: int, seq: int) -> list[AgentReport]:
    now = time.time()
    out = []
    for n in range(nodes):
        host = f"node-{n:05d}"
        samples = tuple(GpuSample(g, f"GPU-{n}-{g}", "H100", 70.0, 72.0, 1980.0, 1980.0, 2619.0, 650.0, 9e6, 97.0,
                                  70 << 30, (), {"power": 0.0, "thermal": 0.0}, {"aggregate_dram_uncorrected": 0},
                                  0, 0, False, 0, 0, False, False, 0, {"replay": 0}, {}) for g in range(gpus))
        ev = ((Evidence(host, EvidenceKind.HOST_LOG, now, "NicFlap: ens1 carrier changed 1 time(s)",
                        Severity.WARNING, attrs={"reason": "NicFlap", "cause": "nic"}),) if n % 100 == 0 else ())
        steps = (StepStats(n * gpus, host, 0, seq, now, 1.0, 4096, 2.0),)
        out.append(AgentReport(Heartbeat(host, now, seq, "", samples), ev, steps))
    return out


class FakeGroup:
    """The worker group's poll, as Running sees it: every rank alive."""

    def __init__(self, hosts: list[str]):
        from orchestrator.workers import GroupStatus

        self.hosts, self.rank_hosts, self.world_size = hosts, hosts, len(hosts)
        self._status = GroupStatus((), ())

    def poll(self):
        return self._status


def through_ray(batch: list[AgentReport], seconds: float) -> dict[str, float]:
    """Reports/s a real controller actor absorbs over Ray actor calls: one call per report (what each agent
    sends) and 64 reports per call (a relay), from two sender processes, on a fresh local Ray instance."""
    import ray

    from orchestrator.controller import ControllerActor

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        run_dir = Path(tempfile.mkdtemp(prefix="ingest-ray-"))
        ctrl = ControllerActor.remote(load_config(overrides={"run_dir": str(run_dir), "job": "ingest-ray"}))
        ray.get(ctrl.status.remote())

        @ray.remote(num_cpus=0)
        class Sender:
            def __init__(self, reports: list[AgentReport]):
                self.reports = reports

            def send(self, seconds: float, per_call: int) -> int:
                n, t_end, k, inflight = 0, time.time() + seconds, 0, []
                while time.time() < t_end:
                    chunk = [self.reports[(k + j) % len(self.reports)] for j in range(per_call)]
                    k += per_call
                    inflight.append(ctrl.report_batch.remote(chunk) if per_call > 1 else ctrl.report.remote(chunk[0]))
                    if len(inflight) >= 256:  # bounded in flight, as an agent with a send queue would be
                        ray.get(inflight[:128])
                        inflight = inflight[128:]
                        n += 128 * per_call
                ray.get(inflight)
                return n + len(inflight) * per_call

        senders = [Sender.remote(batch[i::2]) for i in range(2)]
        out = {}
        for label, per_call in (("1 report per call", 1), ("64 reports per call", 64)):
            t0 = time.perf_counter()
            sent = sum(ray.get([s.send.remote(seconds, per_call) for s in senders]))
            ray.get(ctrl.status.remote())  # everything sent has been absorbed
            out[label] = sent / (time.perf_counter() - t0)
        ray.get(ctrl.shutdown.remote())
        return out
    finally:
        ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=2048)
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "controller_ingest.json"))
    p.add_argument("--no-ray", action="store_true", help="Skip the measurement through Ray actor calls.")
    a = p.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    ctrl = Controller(load_config(overrides={"run_dir": str(run_dir), "job": "ingest"}))
    batch = fleet_reports(a.nodes, a.gpus, 1)

    # 1. sustained ingest from several threads
    count = [0] * a.threads
    stop = threading.Event()

    def feed(i: int) -> None:
        k = i
        while not stop.is_set():
            ctrl.report(batch[k % len(batch)])
            count[i] += 1
            k += a.threads

    threads = [threading.Thread(target=feed, args=(i,)) for i in range(a.threads)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(a.seconds)
    stop.set()
    for t in threads:
        t.join()
    rate = sum(count) / (time.perf_counter() - t0)

    # 2. fatal event -> failure decision, with the fleet's 1 Hz load running beside it
    hosts = [f"node-{n:05d}" for n in range(a.nodes)]
    group = FakeGroup(hosts)
    latencies = []
    background = threading.Event()

    def fleet_at_1hz() -> None:
        while not background.is_set():
            t = time.perf_counter()
            for r in batch:
                ctrl.report(r)
            background.wait(max(0.0, 1.0 - (time.perf_counter() - t)))

    bg = threading.Thread(target=fleet_at_1hz, daemon=True)
    bg.start()
    poll = ctrl.cfg.controller.poll_interval_s
    for i in range(a.trials):
        state = Running(group, time.time() - 1)  # type: ignore[arg-type]
        host = hosts[(i * 37) % len(hosts)]
        t_event = time.perf_counter()
        # the loop wakes up to poll_interval later; modelled by a uniformly random phase
        phase = (i % 10) / 10 * poll
        ctrl.report(AgentReport(Heartbeat(host, time.time(), 2), (xid_evidence(host, 3, 79, time.time()),)))
        time.sleep(phase)
        nxt = ctrl._watch(state)  # the control loop's Running step
        assert type(nxt).__name__ == "Failing", nxt
        with ctrl.lock:  # then what _handle_failure does after its grace wait: the window and the verdict
            window = [e for e in ctrl.evidence if e.time >= nxt.since - ctrl.cfg.controller.evidence_window_s]
        verdict = diagnose(Failure(nxt.since, (), tuple(hosts)), window)
        assert verdict.cause.value == "faulty_gpu" and verdict.hosts == (host,), verdict
        latencies.append(time.perf_counter() - t_event)
        with ctrl.lock:  # the next trial starts from a clean evidence window
            ctrl.evidence.clear()
    background.set()
    bg.join(timeout=5)
    latencies.sort()
    p50, p99 = statistics.median(latencies), latencies[int(0.99 * (len(latencies) - 1))]
    load = a.nodes  # reports per second at 1 Hz
    rows = [["reports/s absorbed", f"{rate:,.0f}", f"{load:,}/s at 1 Hz", f"{rate / load:.1f}x (goal 10x)"],
            ["fatal Xid -> verdict p50", f"{1000 * p50:.0f} ms", f"poll every {1000 * poll:.0f} ms", ""],
            ["fatal Xid -> verdict p99", f"{1000 * p99:.0f} ms", "", "goal < 1000 ms"]]
    print(f"Controller ingest: {a.nodes} nodes x {a.gpus} GPUs, {a.threads} feeding threads, {a.seconds:.0f} s; "
          f"{a.trials} fatal-event trials under the 1 Hz fleet load")
    print(tabulate(rows, headers=["measure", "value", "reference", "ratio"]))
    ctrl.store.close()
    ray_rates = {} if a.no_ray else through_ray(batch, a.seconds)
    if ray_rates:
        print(tabulate([[f"through Ray, {k}", f"{v:,.0f} reports/s", f"{v / load:.1f}x"] for k, v in ray_rates.items()],
                       headers=["transport (a real ControllerActor, 2 sending processes)", "absorbed", "vs 1 Hz load"]))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"benchmark": "controller_ingest", "nodes": a.nodes, "gpus": a.gpus,
                                       "reports_per_s": rate, "fleet_load_per_s": load, "ratio": rate / load,
                                       "decision_p50_s": p50, "decision_p99_s": p99,
                                       "through_ray_reports_per_s": ray_rates, "time": time.time()}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
