"""A discrete-event simulator of one large training job on a fleet, driving Herdsman's real policies.

The job needs `gpus / gpus_per_host` hosts; a pool of spares stands by. Failures arrive as Poisson processes whose
rates come from Llama 3's Table 5 (counts over 54 days on 16,384 GPUs), scaled to the job's size: hardware causes
strike one host (a few lemon hosts many times more often than the rest), software and collective causes strike the
job. Each failure becomes a Verdict (the true cause, or, with `diagnosis = "measured"`, one drawn from the confusion
matrix `herdsman diagnose --eval` measured: a wrong verdict costs what it costs in the real policy, a healthy host
evicted or a faulty one kept to fail again) and goes through the controller's own FailureResponder (its
`RestartPolicy` and `LemonDetector`) and `HostPool`, on a simulated clock: evicted hosts leave for repair and come
back, spares replace them, a stop pages a human. Idle spares fail too (at the rate of the hosts of the job): the
responder takes them out for repair as the controller does, and the job goes on. Time is split exactly as in the
real reports (README, "How it fits together"): productive, checkpoint stalls, detection, restart, restore, lost
work (whole steps since the last checkpoint), waiting for hosts, a human holding the job (operator).

Failures keep arriving while the job recovers (a restart hit by a failure starts over), so the count of
interruptions is the rate times the wall time, as in the paper. Stated simplifications: a failure during a
checkpoint save loses that checkpoint; the in-memory tier, when on, always holds a copy of the latest checkpoint
(one host lost at a time); an idle spare's failure is always seen (its agent reports it), whatever cause the
verdict names.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import itertools
import json
import math
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable

from herdsman.config import ConfigError, ControllerConfig, SimulateConfig
from herdsman.events import TIME_SPLIT, HostState, Verdict
from herdsman.taxonomy import TABLE5_UNEXPECTED, Action, RootCause
from orchestrator.policy import HostPool, LemonDetector
from orchestrator.responder import FailureResponder
from orchestrator.sim_result import SimInterruption, SimResult

DAY = 86400.0
CONFUSION = Path(__file__).resolve().parent / "diagnosis_confusion.json"
TABLE5_DAYS, TABLE5_GPUS = 54.0, 16384

# How each cause is noticed: which detection time of the config applies.
_DETECT = {
    RootCause.SOFTWARE_BUG: "detect_software_s", RootCause.DEPENDENCY: "detect_software_s",
    RootCause.NETWORK_SWITCH_CABLE: "detect_hang_s", RootCause.NIC: "detect_hang_s",
    RootCause.NCCL_WATCHDOG_TIMEOUT: "detect_hang_s", RootCause.SILENT_DATA_CORRUPTION: "detect_sdc_s",
    RootCause.GPU_THERMAL_INTERFACE_SENSOR: "detect_thermal_s", RootCause.HOST_MAINTENANCE: None,
}
# Causes that strike one host (the rest strike the job as a whole).
HOST_CAUSES = tuple(c for c in RootCause if c.facts.host_fault and c.facts.table5_count)
JOB_CAUSES = tuple(c for c in RootCause if not c.facts.host_fault and c.facts.table5_count)

# Named starting points; the fields they set are the stated assumptions.
PROFILES: dict[str, dict[str, Any]] = {
    # Llama 3 405B as reported and as common practice had it (the config defaults): synchronous checkpoints every
    # 30 min to a fast storage cluster (15 s stall), 3 min to tear down, reschedule and re-initialize NCCL on 16K
    # ranks, 1 min to restore from storage, the 10-minute NCCL timeout for hangs, 64 spare hosts, 1-day repairs.
    "llama3": {},
    # Herdsman's measured figures (bench/mttr.py: detection 0.96 s, restart 0.05 s, restore 1.07 s for 3 ranks),
    # scaled to 16K GPUs: rendezvous and NCCL init grow with the job (assumed 60 s at 2,048 hosts); hangs caught by
    # the 120 s hang timeout plus the flight-recorder dump. Two figures are assumed at scale: the async save
    # (built: it blocks only for the device-to-host snapshot, 0.12x a synchronous DCP save on a CPU box; 2 s assumed
    # for 405B over 16K GPUs), so checkpoints every 5 min are cheap, and a restore from a peer's memory copy (built;
    # 20 s assumed); SDC found by the parameter checksums (built, every step) and caught up within 5 min.
    "herdsman": {
        "checkpoint_interval_s": 300.0, "checkpoint_stall_s": 2.0, "detect_hardware_s": 5.0,
        "detect_software_s": 5.0, "detect_hang_s": 130.0, "detect_sdc_s": 300.0, "detect_thermal_s": 600.0,
        "restart_s": 60.0, "restore_memory_s": 20.0,
    },
}


def profile(name: str, **overrides: Any) -> SimulateConfig:
    if name not in PROFILES:
        raise ConfigError(f"unknown simulation profile {name!r} (known: {', '.join(PROFILES)})")
    return dataclasses.replace(SimulateConfig(), **{**PROFILES[name], **overrides})


def table5_rates(cfg: SimulateConfig) -> dict[RootCause, float]:
    """Failures per second, for the whole job, per cause: Table 5's count over 54 days, scaled by job size."""
    per_s = cfg.failure_scale * (cfg.gpus / TABLE5_GPUS) / (TABLE5_DAYS * DAY)
    return {c: c.facts.table5_count * per_s for c in HOST_CAUSES + JOB_CAUSES}


class Simulation:
    """One run. `Simulation(cfg).run()`; failures go through the controller's own FailureResponder and HostPool."""

    def __init__(self, cfg: SimulateConfig, confusion: dict[RootCause, list[tuple[RootCause, float]]] | None = None):
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.n_job = cfg.gpus // cfg.gpus_per_host
        n_all = self.n_job + cfg.spare_hosts
        self.hosts = [f"h{i:05d}" for i in range(n_all)]
        lemons = set(self.rng.sample(self.hosts, round(cfg.lemon_share * n_all))) if cfg.lemon_share else set()
        self.base_weight = 1.0 / (1 - cfg.lemon_share + cfg.lemon_share * cfg.lemon_factor)
        self.weight = {h: self.base_weight * (cfg.lemon_factor if h in lemons else 1.0) for h in self.hosts}
        self.lemons = lemons  # the truth: hosts that are lemons now (one back from RMA is not)
        self.pool = HostPool()
        self.pool.sync(self.hosts, 0.0)
        ctl = ControllerConfig(max_restarts=cfg.restart_budget, lemon_window_s=cfg.lemon_window_s,
                               lemon_threshold=cfg.lemon_threshold)
        self.responder = FailureResponder(ctl, LemonDetector(
            ctl.lemon_window_s, ctl.lemon_threshold, factor=ctl.lemon_factor, warning_factor=ctl.lemon_warning_factor,
            prior_share=ctl.lemon_prior_share))
        for h in self.hosts:  # each host's record starts with the fleet's history (see _history)
            self.responder.lemons.enroll(h, -cfg.history_days * DAY)
        self.confusion = confusion if confusion is not None else (
            measured_confusion() if cfg.diagnosis == "measured" else {})
        rates = table5_rates(cfg)
        # per host at weight 1 (the fleet's mean): the job's rate shared by its hosts
        self.host_rate = {c: rates[c] / self.n_job for c in HOST_CAUSES}
        self.host_rate_sum = sum(self.host_rate.values())
        self.job_rate = {c: rates[c] for c in JOB_CAUSES}
        self.job_rate_sum = sum(self.job_rate.values())
        self.planned_rate = cfg.planned_per_day / DAY
        self.warn_rate = cfg.precursor_per_day / DAY
        self.returns: list[tuple[float, int, str, str]] = []  # (when, tiebreak, host, why) for hosts in repair
        self.refails: dict[str, tuple[float, RootCause]] = {}  # faulty hosts a wrong verdict left in service
        self.faulty: set[str] = set()  # hosts with a hardware fault not repaired yet
        self.rma: set[str] = set()  # lemons away for replacement
        self._tick = itertools.count()
        self.split = dict.fromkeys(TIME_SPLIT, 0.0)
        self.result = SimResult(cfg, cfg.days * DAY, self.split, [], lemon_hosts=len(lemons))
        self.active: list[str] = []
        self._dirty = True
        self.hold_until = 0.0  # a paged human holds the restart until then
        self.n_events = 0
        steps = max(1, round(cfg.checkpoint_interval_s / cfg.step_s))
        self.interval_s = steps * cfg.step_s  # checkpoints land on step boundaries

    # --- the fleet --------------------------------------------------------------------------------------------
    def _place(self, previous: list[str], now: float) -> list[str] | None:
        hosts = self._timed(self.pool.place, self.n_job, previous)
        if hosts is None:
            return None
        self.result.spares_used += len(set(hosts) - set(previous)) if previous else 0
        self._timed(self.pool.activate, hosts, now)
        self.pool.changes.clear()
        self.active = hosts
        self.cum = list(itertools.accumulate(self.weight[h] for h in hosts))
        self._dirty = True
        return hosts

    def _service(self) -> None:
        """The idle hosts in service (spares, suspects) and every host's precursor weight, when they changed."""
        if not self._dirty:
            return
        active = set(self.active)
        self.idle = [h for h in self.pool.usable() if h not in active]
        self.idle_cum = list(itertools.accumulate(self.weight[h] for h in self.idle))
        service = self.active + self.idle
        f = self.cfg.lemon_precursor_factor
        self.warn_hosts = service
        self.warn_cum = list(itertools.accumulate(f if h in self.lemons else 1.0 for h in service))
        self._dirty = False

    def _return_due(self, now: float) -> None:
        while self.returns and self.returns[0][0] <= now:
            t, _, h, why = heapq.heappop(self.returns)
            self._timed(self.pool.return_to_service, h, why, t)
            if h in self.rma:  # a new host as far as its record goes
                self.rma.discard(h)
                self.responder.lemons.reset(h, t)
            self._dirty = True

    def _out(self, hosts: Iterable[str], cause: RootCause, now: float, lemons: Iterable[str] = ()) -> None:
        """Hosts the responder took out go for repair (a lemon to RMA) and come back when it is done."""
        lemons = set(lemons)
        for h in hosts:
            self.refails.pop(h, None)  # repaired, whatever was wrong with it
            if h in lemons:
                self.result.lemons_flagged += 1
                self.result.lemons_found += h in self.lemons
                self.result.healthy_flagged += h not in self.lemons and h not in self.faulty
                self.lemons.discard(h)
                self.rma.add(h)
                self.weight[h] = self.base_weight  # RMA: comes back as a normal host
                back = self.cfg.lemon_repair_s
            elif cause in (RootCause.HOST_MAINTENANCE,):
                back = self.cfg.maintenance_s
            elif cause == RootCause.NETWORK_SWITCH_CABLE:
                back = self.cfg.network_repair_s
            else:
                back = self.cfg.repair_s
            heapq.heappush(self.returns, (now + back, next(self._tick), h, f"repaired after {cause.value}"))
            self.faulty.discard(h)
        self._dirty = True

    def _timed(self, fn: Callable[..., Any], *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.result.policy_s += time.perf_counter() - t0
            self.result.policy_calls += 1

    # --- what happens ---------------------------------------------------------------------------------------
    def _next_event(self, now: float) -> tuple[float, str, RootCause, tuple[str, ...]]:
        """The next event: ("job", cause, hosts) strikes the job; ("spare", ...) an idle host; ("warn", ...) a
        precursor; ("planned", ...) maintenance. Poisson processes, raced; a scheduled re-failure wins if sooner."""
        self._service()
        active_total = self.host_rate_sum * self.cum[-1]
        idle_total = self.host_rate_sum * (self.idle_cum[-1] if self.idle_cum else 0.0)
        warn_total = self.warn_rate * (self.warn_cum[-1] if self.warn_cum else 0.0)
        total = active_total + idle_total + self.job_rate_sum + self.planned_rate + warn_total
        t = now + self.rng.expovariate(total) if total > 0 else math.inf
        if self.refails:
            h, (tr, cause) = min(self.refails.items(), key=lambda kv: kv[1][0])
            if tr <= t:
                del self.refails[h]
                return tr, ("job" if h in self.active else "spare"), cause, (h,)
        if t == math.inf:
            return t, "none", RootCause.UNKNOWN, ()
        u = self.rng.random() * total
        if u < self.planned_rate:
            return t, "planned", RootCause.HOST_MAINTENANCE, (self.rng.choice(self.active),)
        u -= self.planned_rate
        if u < self.job_rate_sum:
            return t, "job", _pick(self.job_rate, u), ()
        u -= self.job_rate_sum
        if u < warn_total:
            return t, "warn", RootCause.UNKNOWN, (self._draw(self.warn_hosts, self.warn_cum),)
        u -= warn_total
        cause = _pick(self.host_rate, self.rng.random() * self.host_rate_sum * (1 - 1e-12))
        if u < active_total:
            return t, "job", cause, (self._draw(self.active, self.cum),)
        return t, "spare", cause, (self._draw(self.idle, self.idle_cum),)

    def _draw(self, hosts: list[str], cum: list[float]) -> str:
        i = bisect.bisect_left(cum, self.rng.random() * cum[-1])
        return hosts[min(i, len(hosts) - 1)]

    def _detection(self, cause: RootCause) -> float:
        key = _DETECT.get(cause, "detect_hardware_s")
        return 0.0 if key is None else getattr(self.cfg, key)

    def _diagnose(self, cause: RootCause, hosts: tuple[str, ...]) -> Verdict:
        """The verdict the controller reaches: right, or drawn from the measured confusion. A wrong one costs what
        it costs in the real policy: a cause blamed on a host that is not at fault takes that host out; a host
        fault taken for something else leaves the host in, to fail again."""
        said = cause
        row = self.confusion.get(cause)
        if row:
            u = self.rng.random()
            for predicted, p in row:
                if u < p:
                    said = predicted
                    break
                u -= p
        if said != cause:
            self.result.misdiagnosed += 1
        blamed = hosts
        if said.facts.host_fault and not hosts:  # a job-level fault blamed on a host of the job
            blamed = (self.rng.choice(self.active),)
        self.n_events += 1
        # distinct text per event: a crash loop is the same failure again, not the same cause again
        return Verdict(said, 1.0, blamed, (), (f"simulated {said.value} #{self.n_events}",), said.facts.action,
                       "simulated failure")

    # --- the run --------------------------------------------------------------------------------------------
    def _history(self) -> None:
        """The fleet's record before the job (other jobs, same hosts): every host's failures and precursors of
        the last `history_days`, as the store keeps them across jobs. Lemons found then are at RMA."""
        span = self.cfg.history_days * DAY
        if span <= 0:
            return
        causes = list(self.host_rate)
        weights = [self.host_rate[c] for c in causes]
        events: list[tuple[float, str, str, RootCause | None]] = []
        for h in self.hosts:
            lam_f = self.host_rate_sum * self.weight[h] * span
            lam_w = self.warn_rate * (self.cfg.lemon_precursor_factor if h in self.lemons else 1.0) * span
            for _ in range(_poisson(self.rng, lam_f)):
                events.append((-span * self.rng.random(), "fail", h, self.rng.choices(causes, weights)[0]))
            for _ in range(_poisson(self.rng, lam_w)):
                events.append((-span * self.rng.random(), "warn", h, None))
        for t, kind, h, cause in sorted(events, key=lambda e: e[0]):
            if self.pool.state(h) == HostState.QUARANTINED:
                continue  # at RMA: what it shows there is not seen
            if kind == "warn":
                flagged = self.responder.lemons.warn(h, t)
            else:
                assert cause is not None
                flagged = self.responder.lemons.implicate(Verdict(cause, 1.0, (h,)), t)
            for f in flagged:
                self._lemon_out(f, t)
        self._return_due(0.0)
        self.result.lemons_before_job = self.result.lemons_found

    def run(self) -> SimResult:
        t0 = time.perf_counter()
        end = self.cfg.days * DAY
        self._history()
        ready = 0.0
        while self._place([], ready) is None:  # hosts the history sent away are not all back yet
            if not self.returns:
                raise ConfigError("simulate: not enough hosts for the job")
            ready = self.returns[0][0]
            self._return_due(ready)
        self.split["waiting_for_hosts"] += min(ready, end)
        clock = up_at = ready  # the last event; when the job trains again (after detection, restart, restore)
        while True:
            t, kind, cause, hosts = self._next_event(clock)
            if t >= end:
                if up_at < end:
                    self._add(self._segment(up_at, end, lost=False))
                elif self.result.interruptions:  # (else the job never started: the wall is all idle)
                    self._cut_recovery(up_at - end)
                break
            self._return_due(t)
            clock = t
            if kind == "warn":
                for h in self._timed(self.responder.lemons.warn, hosts[0], t):
                    self._lemon_out(h, t)
                continue
            if kind == "spare":
                self._spare_failure(t, cause, hosts[0])
                continue
            up_at = self._interruption(t, kind == "planned", cause, hosts, up_at)
        self.result.sim_wall_s = time.perf_counter() - t0
        self.result.lemons_still_in = len(self.lemons)
        return self.result

    def _spare_failure(self, t: float, cause: RootCause, host: str) -> None:
        """An idle host fails: its agent says so, the responder takes it out for repair; the job goes on."""
        self.result.spare_failures += 1
        verdict = self._diagnose(cause, (host,))
        response = self._timed(self.responder.spare_failed, host, verdict, self.pool, t)
        if cause.facts.host_fault:
            self.faulty.add(host)
        self._out(response.out, cause, t, response.lemons)

    def _lemon_out(self, h: str, t: float) -> None:
        """Flagged from its precursors: out of the next placement, and off to RMA (an idle one at once)."""
        self._timed(self.pool.quarantine, h, f"lemon: {self.responder.lemons.explain(h, t)}", t)
        self._out([h], RootCause.UNKNOWN, t, [h])

    def _interruption(self, t: float, planned: bool, cause: RootCause, hosts: tuple[str, ...], up_at: float) -> float:
        cfg = self.cfg
        drained = planned or cause.facts.action == Action.DRAIN
        if t < up_at:  # it struck the job while it was recovering: that recovery stops here and starts over
            self._cut_recovery(up_at - t)
            acc: dict[str, float] = {}
            progressed = False
        else:
            acc = self._segment(up_at, t, lost=not drained)
            if drained:  # a fresh checkpoint before going down: nothing lost, one more stall
                acc["checkpoint"] = acc.get("checkpoint", 0.0) + cfg.checkpoint_stall_s
            progressed = t - up_at >= self.interval_s + cfg.checkpoint_stall_s
        self._add(acc)
        detect = 0.0 if planned else self._detection(cause)
        stall = cfg.checkpoint_stall_s if drained and "checkpoint" in acc else 0.0
        now = t + stall + detect
        if planned:
            self.n_events += 1
            verdict = Verdict(RootCause.HOST_MAINTENANCE, 1.0, hosts, (), (f"planned #{self.n_events}",),
                              Action.DRAIN, "planned maintenance")
            response = self._timed(self.responder.drain, verdict, self.pool, now)
        else:
            verdict = self._diagnose(cause, hosts)
            response = self._timed(self.responder.respond, verdict, progressed, self.pool, now)
            if response.page:  # a human looks, fixes, and restarts by hand; the budget starts over
                self.result.human_interventions += 1
                self.hold_until = max(self.hold_until, now + cfg.human_response_s)
                self.responder.human_reset()
        if cause.facts.host_fault:  # broken now, whatever the verdict says (a flag on it is not a healthy one)
            self.faulty.update(hosts)
        self._out(response.out, verdict.cause, now, response.lemons)
        for h in hosts:  # a faulty host the verdict left in service fails again
            if cause.facts.host_fault and h not in response.out:
                self.refails[h] = (now + self.rng.expovariate(1 / cfg.refail_s), cause)
        # a human already on it holds the restart, whatever else breaks meanwhile
        held = max(response.backoff_s, self.hold_until - now)
        ready = now + held  # absolute times: `now + (t - now)` can round below t and never arrive
        while True:  # wait for enough hosts (repairs coming back) before the restart can be placed
            self._return_due(ready)
            if self._place(self.active, ready) is not None:
                break
            if not self.returns:
                raise ConfigError("simulate: the job can never be placed again (no host in repair)")
            self.result.waits_for_hosts += 1
            ready = max(ready, self.returns[0][0])
        idle = ready - now
        # the wait in three: the backoff (part of the restart), a human holding the job beyond it, no hosts
        operator = max(0.0, held - response.backoff_s)
        waiting = max(0.0, idle - held)
        restore = cfg.restore_memory_s if cfg.restore_memory_s > 0 and not response.page else cfg.restore_disk_s
        for k, v in (("detection", detect), ("restart", idle - operator - waiting), ("operator", operator),
                     ("waiting_for_hosts", waiting), ("restart", cfg.restart_s), ("restore", restore)):
            self.split[k] += v
        lost = acc.get("lost_work", 0.0)
        self.result.interruptions.append(SimInterruption(
            t, cause, planned, response.out, detect, cfg.restart_s, restore, lost, idle, response.action,
            response.reason, stall, verdict.cause, int(lost // cfg.step_s), hosts, waiting, operator))
        return now + idle + cfg.restart_s + restore

    def _segment(self, start: float, t: float, lost: bool) -> dict[str, float]:
        """Training from `start` to `t`: checkpoints every interval of work (whole steps), each blocking for the
        stall; the steps since the last checkpoint, and the one in flight, are lost if the job fails at `t`."""
        cfg = self.cfg
        e = max(0.0, t - start)
        cycle = self.interval_s + cfg.checkpoint_stall_s
        k = math.floor(e / cycle)
        r = e - k * cycle
        work, stall = min(r, self.interval_s), max(0.0, r - self.interval_s)
        out = {"productive": k * self.interval_s, "checkpoint": k * cfg.checkpoint_stall_s + stall}
        if lost:
            out["lost_work"] = work
        else:
            out["productive"] += work
        return out

    def _cut_recovery(self, excess: float) -> None:
        """The last recovery did not run to its end: take the unused tail off its restore, restart, wait (for
        hosts, a human, the backoff), detection and drain checkpoint, in that order (latest first), in the split
        and in its record."""
        last = self.result.interruptions[-1]
        backoff = last.idle_s - last.waiting_s - last.operator_s
        parts = [("restore", "restore", last.restore_s), ("restart", "restart", last.restart_s),
                 ("waiting", "waiting_for_hosts", last.waiting_s), ("operator", "operator", last.operator_s),
                 ("backoff", "restart", backoff), ("detection", "detection", last.detection_s),
                 ("checkpoint", "checkpoint", last.drain_stall_s)]
        left = {}
        for name, bucket, v in parts:
            cut = min(excess, v)
            left[name] = v - cut
            self.split[bucket] -= cut
            excess -= cut
        self.result.interruptions[-1] = dataclasses.replace(
            last, restore_s=left["restore"], restart_s=left["restart"],
            idle_s=left["waiting"] + left["operator"] + left["backoff"], waiting_s=left["waiting"],
            operator_s=left["operator"], detection_s=left["detection"], drain_stall_s=left["checkpoint"])

    def _add(self, acc: dict[str, float]) -> None:
        for k, v in acc.items():
            self.split[k] += v


def _poisson(rng: random.Random, lam: float) -> int:
    """Knuth's method (lam is small here: a host's events in a few weeks)."""
    if lam <= 0:
        return 0
    limit, k, p = math.exp(-lam), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def measured_confusion(path: Path = CONFUSION) -> dict[RootCause, list[tuple[RootCause, float]]]:
    """Each true cause -> [(verdict, probability)], from `herdsman diagnose --eval` on the public corpus."""
    counts: dict[RootCause, Counter[RootCause]] = {}
    for row in json.loads(Path(path).read_text())["confusion"]:
        counts.setdefault(RootCause(row["label"]), Counter())[RootCause(row["predicted"])] += int(row["count"])
    return {c: [(p, n / sum(row.values())) for p, n in row.most_common()] for c, row in counts.items()}


def _pick(rates: dict[RootCause, float], u: float) -> RootCause:
    for c, r in rates.items():
        if u < r:
            return c
        u -= r
    return next(reversed(rates))


def simulate(cfg: SimulateConfig) -> SimResult:
    return Simulation(cfg).run()


def expected_unexpected(cfg: SimulateConfig) -> float:
    """Unexpected interruptions the rates predict for the window, ignoring downtime (about TABLE5_UNEXPECTED)."""
    return sum(table5_rates(cfg).values()) * cfg.days * DAY


__all__ = ["PROFILES", "SimResult", "SimInterruption", "Simulation", "TABLE5_UNEXPECTED", "expected_unexpected",
           "profile", "simulate", "table5_rates"]
