"""The control loop as an explicit state machine: schedule -> run -> (fail -> diagnose -> act -> back off) -> ...

Each state is a small frozen class (orchestrator/states.py); `_step(state)` returns the next one and all side
effects live in the step functions. Agents push AgentReports into `report()` from their own threads; the loop reads what they pushed.
Every decision is logged with its reason and interruptions are stored with their time split as they complete.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray

from herdsman import RAY_NAMESPACE
from herdsman import layout
from herdsman.config import HerdsmanConfig, to_toml
from herdsman.secrets import write_private
from herdsman.events import (
    AgentReport,
    Evidence,
    EvidenceKind,
    Heartbeat,
    HostState,
    Interruption,
    Severity,
    TrainerPhase,
    Verdict,
)
from herdsman.taxonomy import Action, RootCause
from orchestrator.cluster import discover_hosts
from orchestrator.diagnose import Failure, diagnose, hardware_cause
from orchestrator.hangs import flight_recorder_evidence
from orchestrator.operations import Operations
from orchestrator.policy import HostPool, LemonDetector, RestartPolicy
from orchestrator.recovery import carry_on, recover
from orchestrator.store import Store
from orchestrator.store_writer import StoreWriter
from orchestrator.states import (  # noqa: F401  (Running etc. are imported from here by callers)
    ATTEMPT_EVIDENCE, TERMINAL, BackingOff, Draining, Failing, Finished, Running, Scheduling, Stopped)
from orchestrator.workers import GroupStatus, WorkerGroup, close_actor

log = logging.getLogger("herdsman.controller")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Controller(Operations):
    """The control loop; the views and operator actions it serves are in orchestrator/operations.py."""

    def __init__(self, config: HerdsmanConfig):
        self.cfg = config
        self.run_dir = Path(config.run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.run_dir / "herdsman.resolved.toml"  # what the ranks read: no secret in it
        write_private(self.config_path, to_toml(replace(config, run_dir=str(self.run_dir)), redact=True))
        self.store = Store(config.store_url)  # read here; written only through self.records
        self.records = StoreWriter(self.store, spool=layout.store_spool(self.run_dir, config.job))
        self.records.flush(timeout_s=10.0)  # what a stopped controller spooled is in before it is read back
        self.pool = HostPool()
        self.pool.restore(self.store.hosts())
        self.policy = RestartPolicy(config.controller)
        self.lemons = LemonDetector(config.controller.lemon_window_s, config.controller.lemon_threshold)
        self.lock = threading.RLock()
        self.state: Any = Scheduling(time.time())
        self.decisions: deque[str] = deque(maxlen=500)
        self.evidence: deque[Evidence] = deque(maxlen=20000)
        self.heartbeats: dict[str, Heartbeat] = {}
        self.last_heard: dict[str, float] = {}  # controller clock: immune to host clock skew and queued reports
        self.nodes: dict[str, str] = {}
        self.agents: dict[str, Any] = {}
        self.attempt = 0
        self.previous: list[str] = []
        self.group: WorkerGroup | None = None
        self.rank_actors: dict[tuple[str, int], Any] = {}  # reused across attempts on the same hosts
        self.restarts = 0
        self.failures_without_progress = 0
        self.verdicts: list[Verdict] = []
        self.interruptions: dict[int, Interruption] = {}  # attempt -> its record (the views read this, not the store)
        self.attempt_started_at = 0.0
        self.returned_at: dict[str, float] = {}  # host -> when it last passed its health check back into service
        # progress, from rank 0's reports
        self.step_time: dict[int, tuple[int, float]] = {}  # step -> (attempt, seconds): recomputed steps count once
        self.last_step: dict[int, int] = {}  # attempt -> last completed step
        self.last_loss: float | None = None
        self.last_step_at: dict[int, float] = {}  # attempt -> when its latest step completed
        self.ckpt_at: dict[int, float] = {}  # step -> commit time
        self.ckpt_stall_s = 0.0
        self.resumed_at: dict[int, tuple[float, int]] = {}  # attempt -> (time, step)
        self.pending: Interruption | None = None
        self.started_at = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._persisted_at = 0.0
        self._requests: list[tuple[str, str]] = []  # operator requests for the loop: (restart | stop, reason)
        self._api = None
        self.api_url = ""
        self.recovered = recover(self.store, config.job, self.run_dir)
        if self.recovered is not None:
            carry_on(self, self.recovered)
        else:
            self.records.upsert_job(config.job, state="scheduling", started_at=self.started_at,
                                  target_step=config.trainer.steps, ended_at=None, message="", attempt=0,
                                  last_step=0, productive_s=0.0, checkpoint_s=0.0)

    # --- agents push here -----------------------------------------------------------------------------------
    def report_batch(self, reports: list[AgentReport]) -> None:
        """Several reports in one actor call: what a relay in front of a large fleet sends."""
        for r in reports:
            self.report(r)

    def report(self, r: AgentReport) -> None:
        with self.lock:
            self.heartbeats[r.heartbeat.host] = r.heartbeat
            self.last_heard[r.heartbeat.host] = time.time()
            self.evidence.extend(r.evidence)
            for st in r.steps:
                if st.rank != 0:
                    continue
                prev = self.step_time.get(st.step)
                if prev is None or st.attempt >= prev[0]:
                    self.step_time[st.step] = (st.attempt, st.step_time_s)
                self.last_step[st.attempt] = max(self.last_step.get(st.attempt, 0), st.step)
                self.last_step_at[st.attempt] = max(self.last_step_at.get(st.attempt, 0.0), st.time)
                self.last_loss = st.loss
            for ev in r.trainer_events:
                if ev.rank != 0:
                    continue
                if ev.phase == TrainerPhase.CHECKPOINT:
                    self.ckpt_at[ev.step] = ev.time
                    self.ckpt_stall_s += ev.duration_s
                elif ev.phase == TrainerPhase.CHECKPOINT_FAILED:
                    self._decide(f"attempt {ev.attempt}: {ev.message}")
                elif ev.phase == TrainerPhase.RENDEZVOUS:
                    self._complete_pending(ev.attempt, restarted_at=ev.time)
                elif ev.phase == TrainerPhase.RESTORED:
                    self.resumed_at[ev.attempt] = (ev.time, ev.step)
                    self.last_step[ev.attempt] = max(self.last_step.get(ev.attempt, 0), ev.step)
                    self._complete_pending(ev.attempt, resumed_at=ev.time, resumed_step=ev.step)

    def _complete_pending(self, attempt: int, **fields: Any) -> None:
        p = self.pending
        if p is None or attempt != p.attempt + 1:
            return
        p = replace(p, **fields)
        if p.resumed_step is not None:
            ckpt = self.ckpt_at.get(p.resumed_step, 0.0)
            began = self.resumed_at.get(p.attempt, (self.started_at, 0))[0]
            p = replace(p, lost_work_s=max(0.0, p.failed_at - max(ckpt, began)))
        self.record(p)
        if p.restarted_at is not None and p.resumed_at is not None:
            self.pending = None
        else:
            self.pending = p

    # --- the loop -------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="herdsman-controller", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and not isinstance(self.state, TERMINAL):
            try:
                nxt = self._step(self.state)
            except Exception as e:  # one bad pass must not end the loop
                log.exception("control loop pass failed")
                self._decide(f"control loop error: {type(e).__name__}: {e}")
                nxt = self.state
            if type(nxt) is not type(self.state):
                self._decide(f"state {type(self.state).__name__} -> {type(nxt).__name__}")
            changed = nxt is not self.state
            self.state = nxt
            if changed or time.time() - self._persisted_at > 5.0:
                self._persist_progress()  # queued: a store outage cannot stop the loop here
            if not changed:  # a transition is acted on at once; only waiting states poll
                self._stop.wait(self.cfg.controller.poll_interval_s)
        self._persist_progress(final=True)

    def _step(self, state: Any) -> Any:
        with self.lock:
            self.pool.check_heartbeats(dict(self.last_heard), time.time(), self.cfg.controller.heartbeat_timeout_s)
            self._persist_hosts()
        with self.lock:
            requests, self._requests = self._requests, []
        for kind, reason in requests:
            state = self._operator(kind, reason, state)
        if isinstance(state, TERMINAL):
            return state
        if isinstance(state, Scheduling):
            return self._schedule(state)
        if isinstance(state, Running):
            return self._watch(state)
        if isinstance(state, Failing):
            return self._handle_failure(state)
        if isinstance(state, Draining):
            return self._drain(state)
        if isinstance(state, BackingOff):
            return Scheduling(time.time()) if time.time() >= state.until else state
        return state

    def _schedule(self, state: Scheduling) -> Any:
        self.nodes = discover_hosts()
        with self.lock:
            self.pool.sync(list(self.nodes))
            self._persist_hosts()
        self._ensure_agents()
        n = self.cfg.cluster.worker_hosts
        hosts = self.pool.place(n, self.previous)
        if hosts is None:
            if time.time() - state.since > 60:
                return Stopped(f"not enough healthy hosts: need {n}, have {len(self.pool.usable())}")
            return state
        self.pool.activate(hosts)
        self._persist_hosts()
        env = {layout.ENV_CONFIG: str(self.config_path)}
        if self.ckpt_at:  # never silently train from scratch once a checkpoint exists
            env[layout.ENV_RESUME] = layout.RESUME_REQUIRED
        group = WorkerGroup([(h, self.nodes[h]) for h in hosts], self.cfg.trainer.ranks_per_host, self.attempt,
                            env, self.run_dir, self.cfg.job, str(PROJECT_ROOT), self.rank_actors,
                            self.cfg.controller.warm_standby)
        self.group, self.previous = group, hosts
        self.attempt_started_at = time.time()
        self._decide(f"attempt {self.attempt}: starting {group.world_size} ranks on {', '.join(hosts)}")
        group.start()
        self.records.upsert_job(self.cfg.job, state="running", attempt=self.attempt)
        return Running(group, time.time())

    def _watch(self, state: Running) -> Any:
        status = state.group.poll()
        if status.finished:
            state.group.shutdown()  # the job is over: no actor is kept
            self._decide(f"job reached step {self.cfg.trainer.steps}")
            return Finished()
        since = self._failure_time(status, state)
        if since is not None:
            return Failing(state.group, since)
        silent = [h for h in state.group.hosts if self.pool.state(h) == HostState.UNREACHABLE]
        if silent:
            now = time.time()
            with self.lock:
                for h in silent:
                    self.evidence.append(Evidence(h, EvidenceKind.TRAINER_EXIT, now,
                                                  f"agent silent for more than {self.cfg.controller.heartbeat_timeout_s:.0f} s",
                                                  Severity.WARNING, attrs={"reason": "AgentSilent"}))
                for h in silent:  # out until an operator returns it after a health check
                    self.pool.quarantine(h, f"silent for more than {self.cfg.controller.heartbeat_timeout_s:.0f} s "
                                            "while in the job")
                self._persist_hosts()
            self._decide(f"{', '.join(silent)} unreachable: restarting without {'it' if len(silent) == 1 else 'them'}")
            return Failing(state.group, now)
        drain = self._drain_verdict(state)
        if drain is not None:
            self._decide(f"drain {list(drain.hosts)} after a fresh checkpoint: {drain.reason}")
            state.group.request_checkpoint(then_exit=True)
            now = time.time()
            return Draining(state.group, drain, now, now + self.cfg.controller.drain_timeout_s)
        with self.lock:
            stepped = self.attempt in self.last_step_at
            progress = max(state.started_at, self.last_step_at.get(self.attempt, 0.0))
        c = self.cfg.controller
        if time.time() - progress > (c.hang_timeout_s if stepped else max(c.hang_timeout_s, c.startup_timeout_s)):
            self._decide(f"no step completed for {time.time() - progress:.0f} s with every rank alive: a hang")
            return Failing(state.group, progress, hang=True)
        return state

    def _failure_time(self, status: GroupStatus, state: Running) -> float | None:
        times = [r.ended_at or time.time() for r in status.failed]
        if status.unreachable:
            times.append(time.time())
        with self.lock:  # critical hardware evidence on a host of the job fails it even if no rank died yet
            times += [e.time for e in self.evidence
                      if e.time >= state.started_at and e.host in state.group.hosts
                      and e.severity == Severity.CRITICAL and hardware_cause(e) is not None]
        return min(times) if times else None

    def _drain_verdict(self, state: Running) -> Verdict | None:
        """Planned maintenance or a thermally straggling GPU on a host of the job: drain it (DRAIN action)."""
        with self.lock:
            found = [e for e in self.evidence if e.time >= state.started_at and e.host in state.group.hosts and (
                e.kind == EvidenceKind.MAINTENANCE
                or (e.kind == EvidenceKind.STRAGGLER and e.attrs.get("reason") == "thermal"))]
        if not found:
            return None
        maint = [e for e in found if e.kind == EvidenceKind.MAINTENANCE]
        cause = RootCause.HOST_MAINTENANCE if maint else RootCause.GPU_THERMAL_INTERFACE_SENSOR
        chosen = maint or found
        hosts = tuple(dict.fromkeys(e.host for e in chosen))
        return Verdict(cause, 1.0 if maint else 0.8, hosts, tuple(e.rank for e in chosen if e.rank is not None),
                       tuple(e.line() for e in chosen)[:4], cause.facts.action,
                       "planned maintenance" if maint else "a GPU held down by heat is slowing the job")

    def _drain(self, state: Draining) -> Any:
        status = state.group.poll()
        if status.failed or status.unreachable:  # the drain became a failure: diagnose it as one
            return Failing(state.group, min([r.ended_at or time.time() for r in status.failed] or [time.time()]))
        with self.lock:
            fresh = [step for step, t in self.ckpt_at.items() if t >= state.requested_at]
        if not (fresh and status.finished) and time.time() < state.deadline:
            return state  # until the ranks have saved and exited
        v = state.verdict
        self._decide(f"drained {list(v.hosts)}: " + (f"checkpoint at step {max(fresh)}" if fresh else
                                                     "no fresh checkpoint before the deadline"))
        state.group.shutdown(keep_hosts=[h for h in state.group.hosts if h not in v.hosts])
        with self.lock:
            for h in v.hosts:
                self.pool.quarantine(h, f"{v.cause.value}: {v.evidence[0] if v.evidence else v.reason}")
            self._persist_hosts()
            it = Interruption(self.cfg.job, self.attempt, v, state.requested_at, state.requested_at,
                              last_step=self.last_step.get(self.attempt, 0),
                              planned=v.cause == RootCause.HOST_MAINTENANCE)
            self.record(it)
            self.pending = it
            self.verdicts.append(v)
        self.attempt += 1
        return Scheduling(time.time())

    def _handle_failure(self, state: Failing) -> Any:
        group = state.group
        status = group.poll()
        all_done = all(r.exit_code is not None for r in status.ranks)
        if not state.hang and time.time() < state.since + self.cfg.controller.failure_grace_s and not all_done:
            return state  # let the other ranks and the agents catch up
        # Dumps of live ranks tell something only when they are stuck: in a hang, or blocked behind a failed
        # rank. Snapshots of ranks still making progress would differ by a few collectives and look like a hang.
        stuck = not all_done and (state.hang or bool(status.failed))
        hang_evidence = flight_recorder_evidence(self.agents, group, group.request_dumps() if stuck else [], state.hang,
                                                 self.cfg.controller.dump_wait_s, self._decide)
        self._gather(group.hosts)
        status = group.poll()  # ranks that ended while dumps and evidence were gathered say why, too
        now = time.time()
        failure = Failure(state.since, tuple(status.failures(now)), tuple(group.hosts))
        window = state.since - self.cfg.controller.evidence_window_s
        with self.lock:
            self.evidence.extend(hang_evidence)
            # what a host showed before it was repaired and returned to service is not about this failure
            evidence = [e for e in self.evidence if window <= e.time <= now and e.time > self.returned_at.get(e.host, 0)
                        and (e.kind not in ATTEMPT_EVIDENCE or e.time >= self.attempt_started_at)]
        verdict = diagnose(failure, evidence)
        detected_at = time.time()
        self._decide(f"verdict {verdict.cause.value} ({verdict.confidence:.2f}) hosts={list(verdict.hosts)} "
                     f"ranks={list(verdict.ranks)}: {verdict.reason}")
        for line in verdict.evidence:
            self._decide(f"  evidence: {line}")
        progressed = self.last_step.get(self.attempt, 0) > self.resumed_at.get(self.attempt, (0, 0))[1]
        self.failures_without_progress = 0 if progressed else self.failures_without_progress + 1
        decision = self.policy.decide(verdict, self.verdicts, self.restarts, self.failures_without_progress)
        self.verdicts.append(verdict)
        lemons = [h for h in self.lemons.implicate(verdict) if h not in decision.evict]
        group.shutdown(keep_hosts=[h for h in group.hosts if h not in decision.evict and h not in lemons])
        self._decide(f"decision {decision.action.value}: {decision.reason}")
        with self.lock:
            for h in decision.evict:
                self.pool.quarantine(h, f"{verdict.cause.value}: {verdict.evidence[0] if verdict.evidence else ''}")
            for h in lemons:
                reason = (f"lemon: implicated {self.lemons.count(h)} times within "
                          f"{self.cfg.controller.lemon_window_s:.0f} s")
                self.pool.quarantine(h, reason)
                self._decide(f"quarantine {h}: {reason}")
            if verdict.cause in (RootCause.UNKNOWN, RootCause.NCCL_WATCHDOG_TIMEOUT):
                for h in verdict.hosts:
                    self.pool.suspect(h, "implicated in an unexplained failure")
            self._persist_hosts()
            it = Interruption(self.cfg.job, self.attempt, verdict, state.since, detected_at,
                              last_step=self.last_step.get(self.attempt, 0),
                              planned=verdict.cause == RootCause.HOST_MAINTENANCE)
            self.record(it)
            self.pending = it
        if decision.action == Action.STOP:
            return Stopped(decision.reason)
        self.restarts += 1
        self.attempt += 1
        return BackingOff(time.time() + decision.backoff_s)

    def _operator(self, kind: str, reason: str, state: Any) -> Any:
        """An operator's restart or stop, carried out by the loop (the API only queues it)."""
        group = state.group if isinstance(state, (Running, Failing, Draining)) else None
        if kind == "stop":
            if group is not None:
                group.shutdown()
            self._decide(f"operator stop: {reason}")
            return Stopped(f"stopped by an operator: {reason}")
        if group is None:
            self._decide(f"operator restart ignored: no trainer is running ({reason})")
            return state
        now = time.time()
        self._decide(f"operator restart: {reason}")
        usable = self.pool.usable()
        group.shutdown(keep_hosts=[h for h in group.hosts if h in usable])
        verdict = Verdict(RootCause.UNKNOWN, 1.0, (), (), (f"operator: {reason}",), Action.RESTART,
                          f"restart requested by an operator: {reason}")
        it = Interruption(self.cfg.job, self.attempt, verdict, now, now, last_step=self.last_step.get(self.attempt, 0),
                          planned=True)
        with self.lock:
            self.record(it)
            self.pending = it
        self.attempt += 1
        return Scheduling(time.time())

    def _gather(self, hosts: list[str]) -> None:
        """Pull a fresh report from the agents of the failing job, not waiting for their next heartbeat."""
        refs = {h: self.agents[h].collect_now.remote() for h in hosts if h in self.agents}
        for h, ref in refs.items():
            try:
                self.report(ray.get(ref, timeout=3))
            except Exception as e:
                self._decide(f"agent on {h} did not answer: {type(e).__name__}")

    def _ensure_agents(self) -> None:
        """An agent on every host; one that died (or never answers) is replaced."""
        from agents.ray_agent import AgentActor, agent_name
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        def create(host: str, node_id: str) -> Any:
            return AgentActor.options(  # a crashed agent is started again, like a DaemonSet's pod
                name=agent_name(host), namespace=RAY_NAMESPACE, get_if_exists=True, lifetime="detached",
                max_restarts=-1,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote(host, self.cfg)

        for host, node_id in self.nodes.items():
            if host not in self.agents:
                self.agents[host] = create(host, node_id)
        refs = {h: a.ready.remote(self.cfg.job) for h, a in self.agents.items() if h in self.nodes}
        for host, ref in refs.items():
            try:
                ray.get(ref, timeout=60)
            except Exception as e:
                self._decide(f"agent on {host} is gone ({type(e).__name__}): starting a new one")
                self.agents[host] = create(host, self.nodes[host])

    # --- records ------------------------------------------------------------------------------------------
    def _decide(self, line: str) -> None:
        now = time.time()
        entry = f"{time.strftime('%H:%M:%S', time.localtime(now))}.{int(now * 1000) % 1000:03d} {line}"
        self.decisions.append(entry)
        log.info(line)

    def record(self, it: Interruption) -> None:
        """Keep an interruption (a newer record of the same attempt replaces the older) and queue its write."""
        with self.lock:
            self.interruptions[it.attempt] = it
        self.records.record_interruption(it)

    def _persist_hosts(self) -> None:
        for st in self.pool.changes:
            self.records.set_host_state(st)
        self.pool.changes.clear()

    def _persist_progress(self, final: bool = False) -> None:
        self._persisted_at = time.time()
        with self.lock:
            last = max(self.step_time) if self.step_time else 0
        fields: dict[str, Any] = dict(last_step=last, productive_s=self.productive_s(), checkpoint_s=self.ckpt_stall_s)
        if final or isinstance(self.state, TERMINAL):
            fields.update(state="finished" if isinstance(self.state, Finished) else "stopped", ended_at=time.time(),
                          message=getattr(self.state, "reason", ""))
        self.records.upsert_job(self.cfg.job, **fields)

    def productive_s(self) -> float:
        """Kept step time: each step once, in the attempt that kept it."""
        with self.lock:
            return sum(t for _, t in self.step_time.values())

    def done(self) -> bool:
        return isinstance(self.state, TERMINAL)

    def shutdown(self) -> None:
        self._stop.set()
        if self._api is not None:
            self._api.stop()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.group is not None:
            self.group.shutdown()
        for a in self.rank_actors.values():
            close_actor(a)
        self.rank_actors.clear()
        for a in self.agents.values():
            try:
                ray.get(a.stop.remote(), timeout=5)
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        self.agents.clear()
        spooled = self.records.close(timeout_s=15.0)
        if spooled:
            self._decide(f"store unavailable at shutdown: {spooled} record(s) spooled for the next controller")
        self.store.close()


ControllerActor = ray.remote(num_cpus=0, max_concurrency=16)(Controller)
