"""Controller intake through Ray: a 2,048-node, 8-GPU fleet's reports into one real controller, and fatal Xid ->
verdict under that load.

All through real Ray actor calls on a fresh local Ray instance, from two sender processes, into the real
Controller (its intake, loop, diagnosis and failure responder) over a fleet of hosts that exist only in its host
pool (no processes are started: tests/test_controller.py's fake fleet). Each second of the fleet is one report per
node: a heartbeat, rank 0's step on the node that has it, evidence on 1 % of nodes, and 8 GPU samples, which the
wire format carries every 10 s per node (and with evidence) as agents send them. Measured in one run, side by side:

- today's transports: one pickled AgentReport per call (what each agent sent) and 64 per call (a batch);
- the wire format as relays forward it: many agents' frames joined into one `ingest` call;
- one real relay actor taking single-frame calls as agents make them: how many agents one relay can serve;
- fatal Xid -> verdict while the senders keep the fleet's load at its 1 Hz rate x `--load` (default 10): an
  urgent frame sent through a relay, to the controller's verdict (its loop, evidence window, diagnosis; the
  failure_grace_s wait for other ranks to exit is set to 0 here); p50/p99 over `--trials`.
- in process (no transport): what `Controller.report` absorbs from threads, the ceiling.

    python -m bench.controller_ingest [--nodes 2048] [--seconds 5] [--trials 100] [--load 10]
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
from herdsman import RAY_NAMESPACE, controller_name, wire
from herdsman.config import load_config
from herdsman.events import (
    AgentReport,
    Evidence,
    EvidenceKind,
    GpuSample,
    Heartbeat,
    Severity,
    StepStats,
    TrainerEvent,
    TrainerPhase,
)
from orchestrator.controller import Controller

ROOT = Path(__file__).resolve().parent.parent
SPARES = 256
SAMPLES_EVERY = 10  # seconds between a node's GPU samples on the wire (agent.samples_every_s)


def fleet_reports(nodes: int, gpus: int, seq: int) -> list[AgentReport]:
    """One second of the fleet: a report per node, with 8 GPU samples, each rank's step, evidence on 1 %."""
    now = time.time()
    out = []
    for n in range(nodes):
        host = f"node-{n:05d}"
        samples = tuple(GpuSample(g, f"GPU-{n}-{g}", "H100", 70.0, 72.0, 1980.0, 1980.0, 2619.0, 650.0, 9e6, 97.0,
                                  70 << 30, (), {"power": 0.0, "thermal": 0.0}, {"aggregate_dram_uncorrected": 0},
                                  0, 0, False, 0, 0, False, False, 0, {"replay": 0}, {}) for g in range(gpus))
        ev = ((Evidence(host, EvidenceKind.HOST_LOG, now, "NicFlap: ens1 carrier changed 1 time(s)",
                        Severity.WARNING, attrs={"reason": "NicFlap", "cause": "nic"}),) if n % 100 == 0 else ())
        steps = tuple(StepStats(n * gpus + g, host, 0, seq, now, 1.0, 4096, 2.0) for g in range(gpus))
        out.append(AgentReport(Heartbeat(host, now, seq, f"http://{host}:9400/metrics", samples), ev, steps))
    return out


def wire_seconds(reports: list[AgentReport]) -> list[list[bytes]]:
    """SAMPLES_EVERY seconds of the fleet as agents put it on the wire: samples on a node's turn or with evidence."""
    return [[wire.encode(r, samples=(i + s) % SAMPLES_EVERY == 0 or bool(r.evidence))
             for i, r in enumerate(reports)] for s in range(SAMPLES_EVERY)]


def _sender_class(ray):
    @ray.remote(num_cpus=0)
    class Sender:
        """One process standing in for many agents (or the relays in front of them)."""

        def __init__(self, reports: list[AgentReport], frames: list[list[bytes]]):
            self.reports, self.frames = reports, [f for second in frames for f in second]

        def objects(self, ctrl, seconds: float, per_call: int) -> int:
            """Today's transport: pickled AgentReports, one per call or `per_call` in a batch."""
            n, k, t_end, inflight = 0, 0, time.time() + seconds, []
            while time.time() < t_end:
                chunk = [self.reports[(k + j) % len(self.reports)] for j in range(per_call)]
                k += per_call
                inflight.append(ctrl.report_batch.remote(chunk) if per_call > 1 else ctrl.report.remote(chunk[0]))
                if len(inflight) >= 64:  # bounded in flight, as a sender with a queue would be
                    ray.get(inflight[:32])
                    inflight, n = inflight[32:], n + 32 * per_call
            ray.get(inflight)
            return n + len(inflight) * per_call

        def frames_joined(self, ctrl, seconds: float, per_call: int, rate: float = 0.0, in_flight: int = 4) -> int:
            """What relays forward: `per_call` agents' frames joined into one ingest call; at most `rate`
            reports/s from this sender when given (a steady load), else as fast as the controller takes them."""
            n, k, t0, inflight = 0, 0, time.time(), []
            while time.time() < t0 + seconds:
                blob = b"".join(self.frames[(k + j) % len(self.frames)] for j in range(per_call))
                k += per_call
                inflight.append(ctrl.ingest.remote(blob))
                if len(inflight) >= in_flight:
                    n += ray.get(inflight.pop(0))
                if rate:
                    time.sleep(max(0.0, t0 + k / rate - time.time()))
            return n + sum(ray.get(inflight))

        def agent_calls(self, relay, seconds: float) -> int:
            """Agents' own calls: one frame per call into a relay."""
            n, t_end, inflight = 0, time.time() + seconds, []
            while time.time() < t_end:
                inflight.append(relay.send.remote(self.frames[n % len(self.frames)]))
                n += 1
                if len(inflight) >= 64:
                    ray.get(inflight[:32])
                    inflight = inflight[32:]
            ray.get(inflight)
            return n

    return Sender


def _controller_class(ray):
    from tests.test_controller import FakeFleet

    @ray.remote(num_cpus=0, max_concurrency=16)
    class BenchController(Controller):
        """The real controller over hosts that exist only in its pool (no rank processes are started)."""

        def __init__(self, cfg, hosts):
            super().__init__(cfg, fleet=FakeFleet(time.time, hosts))

        def begin(self) -> None:
            self.start()

        def view(self) -> dict:
            with self.lock:
                return {"state": type(self.state).__name__, "attempt": self.ledger.attempt,
                        "placement": list(self.group.hosts) if self.group else [],
                        "interruptions": [(it.attempt, it.detected_at, list(it.verdict.hosts), it.verdict.cause.value)
                                          for it in self.ledger.interruptions.values()]}

        def fresh_budget(self) -> None:
            self.responder.human_reset()  # each trial is one failure, not the 100th in a crash loop

    return BenchController


def through_ray(a, reports: list[AgentReport], frames: list[list[bytes]]) -> dict:
    import ray

    from orchestrator.relay import relay_actor

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        hosts = [r.heartbeat.host for r in reports]
        cfg = load_config(overrides={
            "run_dir": tempfile.mkdtemp(prefix="ingest-ray-"), "job": "ingest",
            "cluster": {"worker_hosts": len(hosts) - SPARES},
            "controller": {"failure_grace_s": 0.0, "restart_backoff_s": 0.05, "max_restarts": 1_000_000,
                           "heartbeat_timeout_s": 600.0, "hang_timeout_s": 3600.0, "startup_timeout_s": 3600.0}})
        ctrl = _controller_class(ray).options(name=controller_name(cfg.job), namespace=RAY_NAMESPACE).remote(cfg, hosts)
        Sender = _sender_class(ray)
        senders = [Sender.remote(reports[i::2], [second[i::2] for second in frames]) for i in range(2)]
        out: dict = {}

        def rate(fn) -> float:
            t0 = time.perf_counter()
            sent = sum(ray.get([fn(s) for s in senders]))
            ray.get(ctrl.view.remote())  # everything sent has been absorbed
            return sent / (time.perf_counter() - t0)

        out["1 pickled report per call (today's agents)"] = rate(lambda s: s.objects.remote(ctrl, a.seconds, 1))
        out["64 pickled reports per call (today's batch)"] = rate(lambda s: s.objects.remote(ctrl, a.seconds, 64))
        for per_call in (64, 256):
            out[f"wire frames, {per_call} per call (relays)"] = rate(
                lambda s: s.frames_joined.remote(ctrl, a.seconds, per_call))
        relay = relay_actor().remote("ingest", 0.1)
        t0 = time.perf_counter()
        calls = sum(ray.get([s.agent_calls.remote(relay, a.seconds) for s in senders]))
        relay_rate = calls / (time.perf_counter() - t0)
        ray.get(relay.stop.remote())
        relay_stats = ray.get(relay.stats.remote())
        assert relay_stats["frames_out"] == calls and relay_stats["dropped"] == 0, relay_stats

        # fatal Xid -> verdict with the fleet's load running at `--load` times its 1 Hz rate, through a relay
        ray.get(ctrl.begin.remote())
        deadline = time.time() + 120
        while ray.get(ctrl.view.remote())["state"] != "Running":
            if time.time() > deadline:
                raise SystemExit("the bench controller did not place the job")
            time.sleep(0.1)
        load = a.load * len(hosts)
        run_for = a.trials * 1.5 + 30
        loading = [s.frames_joined.remote(ctrl, run_for, 64, load / 2, 2) for s in senders]
        relay = relay_actor().remote("ingest", 0.1)
        latencies: list[float] = []
        t_load = time.time()
        for i in range(a.trials):
            v = ray.get(ctrl.view.remote())
            ray.get(ctrl.fresh_budget.remote())
            rank0 = v["placement"][0]
            ckpt = TrainerEvent(0, rank0, v["attempt"], TrainerPhase.CHECKPOINT, time.time(), 10 * (i + 1), 0.1)
            ray.get(ctrl.ingest.remote(wire.encode(AgentReport(Heartbeat(rank0, time.time(), 1), (), (), (ckpt,)),
                                                   samples=False)))  # the attempt made progress before it failed
            host = v["placement"][(i * 37) % len(v["placement"])]
            time.sleep(0.05 + (i % 10) / 10 * cfg.controller.poll_interval_s)  # any phase of the loop's poll
            t0 = time.time()
            relay.send.remote(wire.encode(AgentReport(Heartbeat(host, t0, 2), (xid_evidence(host, 3, 79, t0),)),
                                          samples=True), True)
            while True:
                v = ray.get(ctrl.view.remote())
                new = [it for it in v["interruptions"] if it[0] == v["attempt"] - 1 and it[2] == [host]]
                if new and v["state"] == "Running":
                    break
                if time.time() - t0 > 30:
                    raise SystemExit(f"no verdict for {host} within 30 s: {v['state']}")
                time.sleep(0.01)
            assert new[0][3] == "faulty_gpu", new
            latencies.append(new[0][1] - t0)
        elapsed = time.time() - t_load
        absorbed_under_load = sum(ray.get(loading)) / max(elapsed, run_for)
        ray.get(relay.stop.remote())
        latencies.sort()
        out["decision"] = {"p50_s": statistics.median(latencies), "p99_s": latencies[int(0.99 * (len(latencies) - 1))],
                           "max_s": latencies[-1], "trials": len(latencies), "offered_load_per_s": load,
                           "absorbed_under_load_per_s": absorbed_under_load}
        out["relay"] = {"agent_calls_per_s": relay_rate, **relay_stats}
        return out
    finally:
        ray.shutdown()


def in_process(a, reports: list[AgentReport]) -> float:
    """`Controller.report` from threads, no transport: the ceiling."""
    ctrl = Controller(load_config(overrides={"run_dir": tempfile.mkdtemp(prefix="ingest-bench-"), "job": "ingest"}))
    count = [0] * a.threads
    stop = threading.Event()

    def feed(i: int) -> None:
        k = i
        while not stop.is_set():
            ctrl.report(reports[k % len(reports)])
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
    ctrl.records.close(timeout_s=5)
    ctrl.store.close()
    return sum(count) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=2048)
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--load", type=float, default=10.0, help="fleet load during the trials, in multiples of 1 Hz")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "controller_ingest.json"))
    a = p.parse_args()
    if a.trials > SPARES:
        raise SystemExit(f"--trials at most {SPARES}: each evicts a host onto a spare")
    reports = fleet_reports(a.nodes, a.gpus, 1)
    frames = wire_seconds(reports)
    sizes = [len(f) for second in frames for f in second]
    ceiling = in_process(a, reports)
    r = through_ray(a, reports, frames)
    decision, relay = r.pop("decision"), r.pop("relay")
    fleet = a.nodes  # reports per second at 1 Hz
    rows = [[k, f"{v:,.0f}", f"{v / fleet:.1f}x"] for k, v in r.items()]
    rows.append(["in process, no transport (ceiling)", f"{ceiling:,.0f}", f"{ceiling / fleet:.1f}x"])
    print(f"Controller intake: {a.nodes} nodes x {a.gpus} GPUs ({SPARES} of them spares), 2 sender processes, "
          f"{a.seconds:.0f} s per row; a wire frame is {statistics.mean(sizes):.0f} B on average "
          f"(pickled AgentReport: {len(__import__('pickle').dumps(reports[1])):,} B)")
    print(tabulate(rows, headers=["transport into one controller", "reports/s", f"vs {fleet:,}/s (goal 10x)"]))
    print(tabulate([
        ["one relay, agents' single-frame calls", f"{relay['agent_calls_per_s']:,.0f} calls/s",
         f"{relay['agent_calls_per_s']:,.0f} agents at 1 Hz (fanout 64)"],
        [f"fatal Xid -> verdict p50 (load {decision['offered_load_per_s']:,.0f}/s)",
         f"{1000 * decision['p50_s']:.0f} ms", ""],
        ["fatal Xid -> verdict p99", f"{1000 * decision['p99_s']:.0f} ms", "goal < 1000 ms"],
        ["reports absorbed during the trials", f"{decision['absorbed_under_load_per_s']:,.0f}/s",
         f"{decision['absorbed_under_load_per_s'] / fleet:.1f}x"]], headers=["measure", "value", "note"]))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({
        "benchmark": "controller_ingest", "nodes": a.nodes, "gpus": a.gpus, "spares": SPARES,
        "fleet_load_per_s": fleet, "wire_frame_bytes_mean": statistics.mean(sizes),
        "through_ray_reports_per_s": r, "in_process_reports_per_s": ceiling, "relay": relay,
        "decision": decision, "time": time.time()}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
