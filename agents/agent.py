"""The per-node agent: sample the probes, turn changes into evidence, report to the controller, serve /metrics.

One cycle (`cycle()`) reads the GPUs, the Xid/lost events, and the trainer ranks' report streams on this node,
and returns an AgentReport. `start()` runs cycles on a thread and hands each report to a sink (the controller
on Ray, or a list in tests). A fatal GPU fault ends the trainer processes on that device, as on real hardware.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any, Callable

from prometheus_client import CollectorRegistry, start_http_server

from herdsman.config import HerdsmanConfig
from herdsman.events import (
    AgentReport,
    Evidence,
    EvidenceKind,
    GpuSample,
    Heartbeat,
    Reason,
    Severity,
    StepStats,
    TrainerEvent,
    TrainerPhase,
    step_stats_from_dict,
    trainer_event_from_dict,
)
from agents.gpu import GpuProbe, make_probe
from agents.gpu_sim import SimulatedGpus
from agents.drift import THERMAL_TREND, DriftTracker, StragglerScore, ThermalTrend, join
from agents.drift_fit import DriftFit
from agents.flight_recorder import RankSummary
from agents.flight_recorder import collect as fr_collect
from agents.host import HostMonitor
from agents.metrics import AgentCollector
from herdsman import layout
from herdsman.stats import StatsTailer

log = logging.getLogger("herdsman.agent")


def _code(e: Evidence) -> str:
    """The label that sorts evidence within its kind: the Xid number, the host rule, the straggler reason."""
    if e.code is not None:
        return str(e.code)
    return str(e.attrs.get("reason", ""))


def _same_process(pid: int, seen_at: float) -> bool:
    """Whether `pid` is still the process that reported at `seen_at` (not a later one that reuses the number)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    except (OSError, ValueError, IndexError, StopIteration):
        return False
    return boot + started_ticks / os.sysconf("SC_CLK_TCK") <= seen_at + 1.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class NodeAgent:
    def __init__(self, host: str, config: HerdsmanConfig, sink: Callable[[AgentReport], None] | None = None,
                 probe: GpuProbe | None = None):
        self.host, self.config, self.sink = host, config, sink
        self.dir = layout.node_dir(config.run_dir, host)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.job, self.run_dir = config.job, str(config.run_dir)
        self.stats_dir = layout.stats_dir(config.run_dir, host, self.job)
        self.stats_dir.mkdir(parents=True, exist_ok=True)
        self.probe = probe or make_probe(config.agent.gpu_backend, host, config.agent.gpus_per_host,
                                         on_fatal=self._on_fatal)
        a = config.agent
        # "{node_dir}" in these paths gives each host of an embedded cluster its own kernel log and /sys tree
        self.kernel_log = a.kernel_log.replace("{node_dir}", str(self.dir))
        self.sys_root = a.sys_root.replace("{node_dir}", str(self.dir))
        self.host_monitor = HostMonitor(host, self.kernel_log, self.sys_root, (str(config.checkpoint_dir.parent),),
                                        a.host_rules, a.min_disk_free_ratio)
        self.seq = 0
        self.metrics_url = ""
        self._lock = threading.RLock()  # one cycle at a time (the thread, collect_now and faults)
        self._tailer = StatsTailer(self.stats_dir)
        self._pids: dict[int, set[int]] = {}  # gpu -> trainer pids
        self._latest: dict[int, StepStats] = {}
        self._throttled: dict[int, bool] = {}
        self._ecc_seen: dict[tuple[int, str], int] = {}
        self._evidence_counts: Counter[tuple[str, str]] = Counter()
        self._rank_gpu: dict[int, int] = {}
        self._attempt_pids: dict[int, dict[int, float]] = {}  # attempt -> {pid of a rank here: when it reported}
        self.drift = self._drift_tracker()
        self.maintenance_notice = self.dir / layout.MAINTENANCE_NOTICE  # written by the scheduler's or provider's hook
        self._maintenance_seen = ""
        self._stop = threading.Event()
        self._silent_until = 0.0
        self._held: deque[AgentReport] = deque(maxlen=1000)
        self._thread: threading.Thread | None = None
        self._server = None

    # --- one cycle ---------------------------------------------------------------------------------------
    def cycle(self) -> AgentReport:
        with self._lock:
            steps, events = self._read_trainer()
            if isinstance(self.probe, SimulatedGpus):
                self._simulate_load()
            samples = self.probe.sample()
            if isinstance(self.probe, SimulatedGpus):
                self._publish_clocks(samples)
            evidence = self.probe.poll_events() + self._derive(samples) + self.host_monitor.cycle()
            evidence += [self._trainer_evidence(e) for e in events if e.phase == TrainerPhase.FAILED]
            evidence += self._track_drift(steps, samples)
            evidence += self._maintenance()
            for e in evidence:
                self._evidence_counts[(e.kind.value, _code(e))] += 1
            self.seq += 1
            hb = Heartbeat(self.host, time.time(), self.seq, self.metrics_url, tuple(samples))
            return AgentReport(hb, tuple(evidence), tuple(steps), tuple(events))

    def _simulate_load(self) -> None:
        """A simulated GPU is busy while a trainer process that reported it is alive (drives the thermal model)."""
        assert isinstance(self.probe, SimulatedGpus)
        for gpu in range(self.probe.device_count()):
            pids = self._pids.get(gpu, set())
            alive = {p for p in pids if _alive(p)}
            self._pids[gpu] = alive
            self.probe.set_load(gpu, 0.9 if alive else 0.0)

    def _publish_clocks(self, samples: list[GpuSample]) -> None:
        """Tell the ranks how much slower each simulated GPU runs (trainer.train.SimulatedClock reads it)."""
        factors = {str(s.index): round(s.max_sm_clock_mhz / s.sm_clock_mhz, 4) for s in samples
                   if s.sm_clock_mhz and s.max_sm_clock_mhz}
        tmp = self.dir / (layout.SIM_CLOCKS + ".tmp")
        tmp.write_text(json.dumps(factors))
        os.replace(tmp, self.dir / layout.SIM_CLOCKS)

    def _derive(self, samples: list[GpuSample]) -> list[Evidence]:
        """Edge-triggered evidence from readings: thermal slowdown starting, ECC counts rising."""
        out, now = [], time.time()
        for s in samples:
            hot = "hw_thermal" in s.throttle_reasons or "sw_thermal" in s.throttle_reasons
            if hot and not self._throttled.get(s.index):
                out.append(Evidence(self.host, EvidenceKind.GPU_THERMAL, now,
                                    f"thermal slowdown at {s.temperature_c} C, SM clock {s.sm_clock_mhz} MHz",
                                    Severity.WARNING, gpu=s.index,
                                    attrs={"temperature_c": s.temperature_c, "sm_clock_mhz": s.sm_clock_mhz}))
            self._throttled[s.index] = hot
            for mem in ("sram", "dram"):
                v = getattr(s, f"ecc_{mem}_uncorrected")
                prev = self._ecc_seen.get((s.index, mem), 0)
                if v is not None and v > prev:
                    out.append(Evidence(self.host, EvidenceKind.GPU_ECC, now,
                                        f"{mem.upper()} uncorrectable ECC errors rose {prev} -> {v}",
                                        Severity.CRITICAL, gpu=s.index, attrs={"memory": mem, "count": v}))
                if v is not None:
                    self._ecc_seen[(s.index, mem)] = v
        return out

    def _read_trainer(self) -> tuple[list[StepStats], list[TrainerEvent]]:
        steps, events = [], []
        for rec in self._tailer.read_new():
            try:
                if rec.get("kind") == "step":
                    st = step_stats_from_dict(rec)
                    steps.append(st)
                    self._latest[st.rank] = st
                elif rec.get("kind") == "event":
                    ev = trainer_event_from_dict(rec)
                    events.append(ev)
                    if ev.pid and ev.gpu is not None:
                        self._pids.setdefault(ev.gpu, set()).add(ev.pid)
                    if ev.gpu is not None:
                        self._rank_gpu[ev.rank] = ev.gpu
                    if ev.pid:
                        self._attempt_pids.setdefault(ev.attempt, {}).setdefault(ev.pid, ev.time)
            except (KeyError, TypeError, ValueError):
                log.warning("ignoring malformed trainer record on %s: %r", self.host, rec)
        self._end_older_attempts()
        return steps, events

    def _end_older_attempts(self) -> None:
        """Two attempts of one job never train at once: ranks of an earlier attempt still alive when a later one
        reports (left behind when the head or a rank actor died without stopping them) are killed."""
        if len(self._attempt_pids) < 2:
            return
        newest = max(self._attempt_pids)
        for attempt in [a for a in self._attempt_pids if a < newest]:
            for pid, seen_at in self._attempt_pids.pop(attempt).items():
                if pid in self._attempt_pids[newest]:  # kept by an in-process restart: it runs the new attempt
                    continue
                if not _same_process(pid, seen_at):  # gone, or its pid now belongs to another process
                    continue
                try:
                    os.killpg(pid, signal.SIGKILL)  # a rank leads its own process group (start_new_session)
                except ProcessLookupError:
                    os.kill(pid, signal.SIGKILL)
                except PermissionError:
                    continue
                log.warning("%s: killed rank pid %d left over from attempt %d (attempt %d runs)",
                            self.host, pid, attempt, newest)

    def _drift_tracker(self) -> DriftTracker:
        a = self.config.agent
        return DriftTracker(a.straggler_relative, a.straggler_individual, a.drift_window)

    def _track_drift(self, steps: list[StepStats], samples: list[GpuSample]) -> list[Evidence]:
        """Join each step with its GPU's reading, in step order (a step's ranks are judged together); evidence when
        a rank starts straggling (or its GPU starts showing another reason), and when a GPU's temperature starts
        rising against its own history while its clocks are still at max (a precursor: context, not a cause)."""
        by_index = {s.index: s for s in samples}
        for st in sorted(steps, key=lambda st: (st.attempt, st.step, st.rank)):
            self.drift.add(join(st, by_index.get(self._rank_gpu.get(st.rank, -1))))
        out, now = [], time.time()
        for x in self.drift.pop_started():
            gpu = self._rank_gpu.get(x.rank)
            if isinstance(x, ThermalTrend):
                out.append(Evidence(self.host, EvidenceKind.GPU_THERMAL, now, x.line(), Severity.INFO, gpu=gpu,
                                    rank=x.rank, attrs={"reason": THERMAL_TREND, "strength": "context",
                                                        "slope_c_per_min": x.slope_c_per_min,
                                                        "usual_slope_c_per_min": x.usual_slope_c_per_min,
                                                        "temperature_c": x.temperature_c, "usual_c": x.usual_c}))
                continue
            out.append(Evidence(self.host, EvidenceKind.STRAGGLER, now,
                                f"rank {x.rank} straggling ({x.reason}): {x.relative:.2f}x its peers in the same "
                                f"steps (usually {x.usual:.2f}x), {x.individual:.2f}x its usual, "
                                f"{x.temperature_c} C, {x.sm_clock_mhz} MHz",
                                Severity.WARNING, gpu=gpu, rank=x.rank,
                                attrs={"reason": x.reason, "relative": x.relative, "individual": x.individual,
                                       "usual": x.usual, "step": x.step}))
        return out

    def _maintenance(self) -> list[Evidence]:
        """A planned-maintenance notice (a file a scheduler or cloud hook writes) becomes evidence once."""
        try:
            text = self.maintenance_notice.read_text(errors="replace").strip() or "maintenance"
        except OSError:
            self._maintenance_seen = ""
            return []
        if text == self._maintenance_seen:
            return []
        self._maintenance_seen = text
        return [Evidence(self.host, EvidenceKind.MAINTENANCE, time.time(), f"planned maintenance: {text[:300]}",
                         Severity.CRITICAL, attrs={"reason": Reason.PLANNED_MAINTENANCE.value, "cause": "host_maintenance"})]

    def straggler_scores(self) -> list[StragglerScore]:
        with self._lock:
            return self.drift.scores()

    def drift_fit(self) -> DriftFit | None:
        with self._lock:
            return self.drift.fit()

    def _trainer_evidence(self, ev: TrainerEvent) -> Evidence:
        return Evidence(self.host, EvidenceKind.TRAINER_EXCEPTION, ev.time, ev.message.strip(), Severity.WARNING,
                        gpu=ev.gpu, rank=ev.rank, attrs={"attempt": ev.attempt, "step": ev.step})

    def _on_fatal(self, gpu: int, message: str) -> None:
        """A fatal GPU fault takes down the processes using that GPU (as a real Xid 79/48 does)."""
        with self._lock:
            self._read_trainer_pids_only()
            for pid in self._pids.get(gpu, set()):
                try:
                    os.kill(pid, signal.SIGKILL)
                    log.warning("%s gpu%d: %s; killed trainer pid %d", self.host, gpu, message, pid)
                except ProcessLookupError:
                    pass

    def _read_trainer_pids_only(self) -> None:
        # A fresh look at the report streams without consuming them for the next cycle.
        for rec in StatsTailer(self.stats_dir).read_new():
            if rec.get("kind") == "event" and rec.get("pid") and rec.get("gpu") is not None:
                self._pids.setdefault(int(rec["gpu"]), set()).add(int(rec["pid"]))

    def follow(self, job: str, run_dir: str | None = None) -> None:
        """Read the report streams of `job` (in `run_dir`) from now on: an agent outlives jobs, and each job has
        its own streams."""
        with self._lock:
            run_dir = run_dir or self.run_dir
            if (job, run_dir) == (self.job, self.run_dir):
                return
            self.job, self.run_dir = job, run_dir
            self.stats_dir = layout.stats_dir(run_dir, self.host, job)
            self.stats_dir.mkdir(parents=True, exist_ok=True)
            self._tailer = StatsTailer(self.stats_dir)
            self._latest.clear()
            self._rank_gpu.clear()
            self._attempt_pids.clear()
            # a new job's ranks start at attempt 0: the last job's history (its attempt numbers, its ranks' usual
            # pace) would drop their steps as late lines or judge them against another job's
            self.drift = self._drift_tracker()

    # --- what the metrics and the controller read ---------------------------------------------------------
    def latest_steps(self) -> list[StepStats]:
        with self._lock:
            return sorted(self._latest.values(), key=lambda s: s.rank)

    def evidence_counts(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._evidence_counts)

    def flight_recorder(self, attempt: int) -> tuple[list[RankSummary], list[str]]:
        """Summaries of this node's flight-recorder dumps for one attempt, loaded safely; refusals as text."""
        return fr_collect([layout.flight_recorder_dir(self.run_dir, self.host, self.job)], attempt)

    def health_check(self) -> list[str]:
        """Problems that keep this host out of service (empty: healthy). Run before returning it to service."""
        problems = []
        samples = self.probe.sample()
        if len(samples) < self.probe.device_count():
            problems.append(f"{self.probe.device_count() - len(samples)} GPU(s) missing")
        for s in samples:
            where = f"gpu{s.index} ({s.uuid})"
            if s.lost:
                problems.append(f"{where} is lost")
                continue
            if s.row_remap_failure:
                problems.append(f"{where}: row remapping failed (repair the GPU)")
            if s.row_remap_pending or s.retired_pages_pending:
                problems.append(f"{where}: a row remap or page retirement waits for a GPU reset")
            if s.ecc_count("dram", counter="volatile") or s.ecc_count("sram", counter="volatile"):
                problems.append(f"{where}: uncorrectable ECC errors since the last reset")
            if any(r in s.throttle_reasons for r in ("hw_thermal", "hw_power_brake")):
                problems.append(f"{where}: held down by {', '.join(s.throttle_reasons)}")
        problems += [f"{name}: {msg}" for name, msg in sorted(self.host_monitor.snapshot.conditions.items())]
        return problems

    def collect_now(self) -> AgentReport:
        """A cycle on demand: the controller calls this on the hosts of a failure, not waiting for the next beat."""
        return self.cycle()

    # --- fault injection (simulated GPUs only) --------------------------------------------------------------
    def inject(self, fault: str, gpu: int = 0, **args: Any) -> str:
        """Inject a fault into a simulated GPU (see agents.gpu_sim.FAULTS), or announce maintenance."""
        if fault == "maintenance":
            self.maintenance_notice.write_text(str(args.get("reason", "planned maintenance")))
            return f"{self.host}: maintenance announced"
        if fault in ("kernel", "nic"):
            return self._inject_host(fault, **args)
        if fault == "silence":  # the controller hears nothing from this host for a while (a network partition)
            seconds = float(args.get("seconds", 5.0))
            self._silent_until = time.time() + seconds
            return f"{self.host}: reports held back for {seconds:.0f} s"
        if not isinstance(self.probe, SimulatedGpus):
            raise ValueError("faults can only be injected into simulated GPUs")
        return self.probe.inject(gpu, fault, **args)

    def _inject_host(self, fault: str, line: str = "", iface: str = "eth0", state: str = "down") -> str:
        """Host faults for an embedded cluster whose kernel log and /sys are per-host files ("{node_dir}/..."):
        a kernel-log line, or a NIC's link state (its carrier_changes count goes up on every change)."""
        node = str(self.dir)
        if fault == "kernel":
            if not self.kernel_log.startswith(node):
                raise ValueError("kernel-log lines can only be injected into a per-host log under the node dir")
            with open(self.kernel_log, "a") as f:
                f.write(f"[{time.monotonic():12.6f}] {line}\n")
            return f"{self.host}: kernel: {line}"
        if not self.sys_root.startswith(node):
            raise ValueError("NIC state can only be injected into a per-host /sys tree under the node dir")
        d = Path(self.sys_root) / "class" / "net" / iface
        (d / "device").mkdir(parents=True, exist_ok=True)
        (d / "statistics").mkdir(exist_ok=True)
        changes = d / "carrier_changes"
        n = int(changes.read_text()) if changes.exists() else 0
        (d / "operstate").write_text(state + "\n")
        (d / "carrier").write_text(("1" if state == "up" else "0") + "\n")
        changes.write_text(f"{n + 1}\n")
        return f"{self.host}: {iface} link {state}"

    # --- lifecycle -------------------------------------------------------------------------------------------
    def start_metrics(self) -> str:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(AgentCollector(self))
        cfg = self.config.agent
        self._server, _ = start_http_server(cfg.metrics_port, addr=cfg.metrics_host, registry=registry)
        self.metrics_url = f"http://{cfg.metrics_host}:{self._server.server_port}/metrics"
        return self.metrics_url

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"agent-{self.host}", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.config.agent.interval_s):
            try:
                report = self.cycle()
                if self.sink is None:
                    continue
                if time.time() < self._silent_until:  # an injected partition: held back, sent when it heals
                    self._held.append(report)
                    continue
                while self._held:
                    self.sink(self._held.popleft())
                self.sink(report)
            except Exception:  # one bad cycle must not end the agent
                log.exception("agent cycle failed on %s", self.host)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self.probe.close()
        self.host_monitor.close()
