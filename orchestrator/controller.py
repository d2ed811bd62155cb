"""The control loop as an explicit state machine: schedule -> run -> (fail -> diagnose -> act -> back off) -> ...

Each state is a small frozen class (orchestrator/states.py); `_step(state)` returns the next one and all side
effects live in the step functions. Agents push reports into orchestrator/intake.py (`ingest`, `report`) from their own threads; the loop reads
what they pushed.
Every decision is logged with its reason and interruptions are stored with their time split as they complete.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import ray

from herdsman import layout
from herdsman.config import HerdsmanConfig, to_toml
from herdsman.events import (
    Evidence,
    EvidenceKind,
    Heartbeat,
    HostState,
    Reason,
    Severity,
    Verdict,
)
from herdsman.secrets import write_private
from herdsman.taxonomy import Action, RootCause
from orchestrator.diagnose import drain_verdict
from orchestrator.fleet import Fleet, Group, RayFleet
from orchestrator.accounts import account
from orchestrator.hangs import stalled, stuck_signature, suspected
from orchestrator.failures import FailureHandling
from orchestrator.intake import Intake
from orchestrator.ledger import JobLedger
from orchestrator.operations import Operations
from orchestrator.policy import HostPool, LemonDetector
from orchestrator.recovery import Recovered, recover
from orchestrator.responder import FailureResponder
from orchestrator.states import (  # noqa: F401  (Running etc. are imported from here by callers)
    ATTEMPT_EVIDENCE, TERMINAL, BackingOff, Draining, Failing, Finished, Running, Scheduling, State, Stopped,
    Stopping, legal)
from orchestrator.store import HostIncident, Store, StoreError
from orchestrator.store_writer import StoreWriter

log = logging.getLogger("herdsman.controller")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Controller(Intake, Operations, FailureHandling):
    """The control loop; the views and operator actions it serves are in orchestrator/operations.py.

    Its parts are injected: the store, the fleet (hosts, agents, worker groups: RayFleet by default), the failure
    responder and the clock, so a test steps it one `tick()` at a time with fakes (tests/test_controller.py).
    """

    def __init__(self, config: HerdsmanConfig, *, store: Store | None = None, fleet: Fleet | None = None,
                 responder: FailureResponder | None = None, clock: Callable[[], float] = time.time):
        self.cfg = config
        self.clock = clock
        self.run_dir = Path(config.run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.run_dir / "herdsman.resolved.toml"  # what the ranks read: no secret in it
        write_private(self.config_path, to_toml(replace(config, run_dir=str(self.run_dir)), redact=True))
        self.store = store or Store(config.store_url)  # read here; written only through self.records
        self.records = StoreWriter(self.store, spool=layout.store_spool(self.run_dir, config.job), clock=clock)
        self.fleet: Fleet = fleet or RayFleet(config, self.run_dir, str(PROJECT_ROOT))
        self.pool = HostPool()
        c = config.controller
        self.responder = responder or FailureResponder(c, LemonDetector(
            c.lemon_window_s, c.lemon_threshold, factor=c.lemon_factor, warning_factor=c.lemon_warning_factor,
            prior_share=c.lemon_prior_share))
        try:  # no decision is safe without what the store knows: quarantines, host records, a job half done
            self.records.flush(timeout_s=10.0)  # what a stopped controller spooled is in before it is read back
            self.pool.restore(self.store.hosts())
            self._remember_hosts()
            self.recovered = recover(self.store, config.job, self.run_dir)
        except StoreError as e:  # one clear error (the daemon tries again); the spool keeps what was not written
            self.records.close(timeout_s=0.0)
            raise StoreError(f"controller of job {config.job!r} not started, nothing changed: {e}") from e
        self.lock = threading.RLock()
        self.state: State = Scheduling(clock())
        self.decisions: deque[str] = deque(maxlen=500)
        self.evidence: deque[Evidence] = deque(maxlen=20000)
        self.heartbeats: dict[str, Heartbeat] = {}
        self.last_heard: dict[str, float] = {}  # controller clock: immune to host clock skew and queued reports
        self.seen_at: dict[str, float] = {}  # the host's clock: when its latest report was written (hang checks)
        self._hang_look: tuple[float, tuple | None] | None = None  # the last flight-recorder look at a quiet job
        self.nodes: dict[str, str] = {}
        self.previous: list[str] = []
        self.group: Group | None = None
        self.verdicts: list[Verdict] = []
        self.attempt_started_at = 0.0
        self.returned_at: dict[str, float] = {}  # host -> when it last passed its health check back into service
        self._precursor_seen: dict[tuple[str, str, str], float] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by fatal evidence and by stop: the loop acts before its next poll
        self.frames_refused = 0
        self._thread: threading.Thread | None = None
        self._persisted_at = 0.0
        self._requests: list[tuple[str, str]] = []  # operator requests for the loop: (restart | stop, reason)
        self._unplaced_since: float | None = None  # the attempt could not be placed since (waiting for hosts)
        self._warmed_for = -1  # the attempt whose spares were warmed
        self._api = None
        self.api_url = ""
        if self.recovered is not None:
            self._carry_on(self.recovered)
        else:
            self.ledger = JobLedger(config.job, clock())
            self.records.upsert_job(config.job, state="scheduling", started_at=self.ledger.started_at,
                                    target_step=config.trainer.steps, ended_at=None, message="", attempt=0,
                                    last_step=0, productive_s=0.0, checkpoint_s=0.0,
                                    config=to_toml(replace(config, run_dir=str(self.run_dir)), redact=True))

    def _remember_hosts(self) -> None:
        """Each host's failures and precursors from earlier jobs (the lemon detector's record), and from now on
        every new one kept in the store."""
        lemons = self.responder.lemons
        since = self.clock() - max(self.cfg.controller.lemon_window_s, 90 * 86400.0)
        lemons.restore(self.store.hosts_first_seen(),
                       [(i.host, i.time, i.kind, i.cause) for i in self.store.incidents(since)])
        lemons.on_record = lambda host, t, kind, cause: self.records.record_incident(
            HostIncident(host, t, kind, cause, self.cfg.job))

    def _carry_on(self, r: Recovered) -> None:
        """A restarted controller (Ray's max_restarts) picks the job up where the dead one left it.

        The dead controller's rank actors died with it (Ray's ownership), so the attempt it ran is over: that is an
        interruption of its own, unless the dead one had already recorded the attempt's failure."""
        self.ledger = r.ledger
        its = sorted(r.ledger.interruptions.values(), key=lambda i: i.attempt)
        self.responder.remember(its)  # the crash-loop guard and the budget remember (hosts: from the store)
        self.verdicts = [it.verdict for it in its]
        self.previous = sorted(h for h, st in self.pool.status.items() if st.state == HostState.HEALTHY)
        if not r.attempt_recorded:
            now, lost = self.clock(), r.ledger.attempt
            verdict = Verdict(RootCause.UNKNOWN, 1.0, (), (), (
                f"herdsman controller restarted during attempt {lost}; the trainer ranks it owned ended with it",),
                Action.RESTART, "the controller itself failed (no host is blamed)")
            it = self.ledger.interrupt(verdict, r.ledger.last_step_at.get(lost, now), now)
            self.responder.remember([it])
            self.verdicts.append(verdict)
            self.records.record_interruption(it)
        self.records.upsert_job(self.cfg.job, state="scheduling", attempt=self.ledger.attempt)
        self._decide(f"controller restarted: carrying on job {self.cfg.job} at attempt {self.ledger.attempt}, "
                     f"step {self.ledger.step_now}, {len(self.verdicts)} verdict(s) so far, "
                     f"checkpoints up to step {max(self.ledger.ckpt_at) if self.ledger.ckpt_at else '-'}")

    @property
    def attempt(self) -> int:
        return self.ledger.attempt

    # --- the loop -------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="herdsman-controller", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and not isinstance(self.state, TERMINAL):
            changed = self.tick()
            if not changed:  # a transition is acted on at once; only waiting states poll
                # clamped: a wait beyond threading.TIMEOUT_MAX raises OverflowError and would end this thread
                self._wake.wait(min(max(0.0, self.cfg.controller.poll_interval_s), threading.TIMEOUT_MAX))
                self._wake.clear()
        self._persist_progress(final=True)

    def tick(self) -> bool:
        """One pass of the loop: act on the current state, move to the next. Returns whether it changed."""
        try:
            nxt = self._step(self.state)
        except Exception as e:  # one bad pass must not end the loop
            log.exception("control loop pass failed")
            self._decide(f"control loop error: {type(e).__name__}: {e}")
            nxt = self.state
        if not legal(self.state, nxt):
            self._decide(f"refused illegal transition {self.state.name} -> {nxt.name}")
            nxt = self.state
        if type(nxt) is not type(self.state):
            self._decide(f"state {type(self.state).__name__} -> {type(nxt).__name__}")
        changed = nxt is not self.state
        self.state = nxt
        if changed or self.clock() - self._persisted_at > 5.0 or isinstance(nxt, TERMINAL):
            self._persist_progress()  # queued: a store outage cannot stop the loop here
        return changed

    def _step(self, state: State) -> State:
        with self.lock:
            self.pool.check_heartbeats(dict(self.last_heard), self.clock(), self.cfg.controller.heartbeat_timeout_s)
            self._persist_hosts()
        with self.lock:
            requests, self._requests = self._requests, []
        acted = state
        for kind, reason in requests:
            acted = self._operator(kind, reason, acted)
        if acted is not state or isinstance(state, TERMINAL):  # an operator's move is a transition of its own
            return acted
        if isinstance(state, Scheduling):
            return self._schedule(state)
        if isinstance(state, Running):
            return self._watch(state)
        if isinstance(state, Failing):
            return self._handle_failure(state)
        if isinstance(state, Draining):
            return self._drain(state)
        if isinstance(state, BackingOff):
            return Scheduling(self.clock()) if self.clock() >= state.until else state
        if isinstance(state, Stopping):
            return self._stopping(state)
        return state

    def _schedule(self, state: Scheduling) -> State:
        self.nodes = self.fleet.discover()
        with self.lock:
            self.pool.sync(list(self.nodes), self.clock())
            for h in self.nodes:
                self.responder.lemons.enroll(h, self.clock())
            self._persist_hosts()
        n = self.cfg.cluster.worker_hosts
        with self.lock:
            if self.attempt not in self.ledger.marks["scheduled"]:
                self.ledger.mark("scheduled", self.attempt, state.since)
        hosts = self.pool.place(n, self.previous)
        if hosts is None:
            self.fleet.ensure_agents(self.nodes, self.cfg.job, self._decide)
            if self._unplaced_since is None:
                self._unplaced_since = self.clock()
            if self.clock() - state.since > 60:
                return Stopped(f"not enough healthy hosts: need {n}, have {len(self.pool.usable())}")
            return state
        if self._unplaced_since is not None:  # the time no placement was possible: waiting for hosts
            with self.lock:
                self.ledger.mark("waited", self.attempt, self.clock() - self._unplaced_since, add=True)
            self._unplaced_since = None
        self.pool.activate(hosts, self.clock())
        self._persist_hosts()
        env = {layout.ENV_CONFIG: str(self.config_path)}
        if self.cfg.controller.inprocess_restart and not self.cfg.trainer.entrypoint:
            env[layout.ENV_INPROCESS] = "1"  # a rank that sees a peer fail waits for an order to rejoin
        if self.ledger.ckpt_at:  # never silently train from scratch once a checkpoint exists
            env[layout.ENV_RESUME] = layout.RESUME_REQUIRED
        self.attempt_started_at = self.clock()
        with self.lock:
            self.ledger.mark("launched", self.attempt, self.attempt_started_at)
        self._decide(f"attempt {self.attempt}: starting {n * self.cfg.trainer.ranks_per_host} ranks on "
                     f"{', '.join(hosts)}")
        # the rank actors of new hosts come up (and start importing the trainer) while the agents do
        self.group = self.fleet.start_group([(h, self.nodes[h]) for h in hosts], self.attempt, env)
        self.fleet.ensure_agents(self.nodes, self.cfg.job, self._decide)
        self.previous = hosts
        self.group.start()
        self.records.upsert_job(self.cfg.job, state="running", attempt=self.attempt)
        return Running(self.group, self.clock())

    def _watch(self, state: Running) -> State:
        status = state.group.poll()
        if status.finished:
            # the last steps reach the controller through the agents, which may not have read them yet (a rank that
            # finished exits at once): their fresh reports are asked for, as after a failure, before the job is done
            for r in self.fleet.gather(state.group.hosts, self._decide):
                self.report(r)
            state.group.shutdown()  # the job is over: no actor is kept
            self._decide(f"job reached step {self.cfg.trainer.steps}")
            return Finished()
        since = self._failure_time(status, state)
        if since is not None:
            return Failing(state.group, since)
        silent = [h for h in state.group.hosts if self.pool.state(h) == HostState.UNREACHABLE]
        if silent:
            now, window = self.clock(), self.cfg.controller.heartbeat_timeout_s
            with self.lock:
                for h in silent:
                    self.evidence.append(Evidence(h, EvidenceKind.TRAINER_EXIT, now,
                                                  f"agent silent for more than {window:.0f} s", Severity.WARNING,
                                                  attrs={"reason": Reason.AGENT_SILENT.value}))
                for h in silent:  # out until an operator returns it after a health check
                    self.pool.quarantine(h, f"silent for more than {window:.0f} s while in the job", now)
                self._persist_hosts()
            self._decide(f"{', '.join(silent)} unreachable: restarting without {'it' if len(silent) == 1 else 'them'}")
            return Failing(state.group, now)
        self._warm_spares(state)
        with self.lock:
            drain = drain_verdict(self.evidence, state.group.hosts, state.started_at)
        if drain is not None:
            self._decide(f"drain {list(drain.hosts)} after a fresh checkpoint: {drain.reason}")
            state.group.request_checkpoint(then_exit=True)
            now = self.clock()
            return Draining(state.group, drain, now, now + self.cfg.controller.drain_timeout_s)
        # a save follows every checkpoint_every-th step of the embedded trainer: that wait includes its stall
        every = 0 if self.cfg.trainer.entrypoint else self.cfg.trainer.checkpoint_every
        with self.lock:
            quiet = stalled(self.ledger, self.cfg.controller, every, state.started_at,
                            self.seen_at.get(state.group.rank_hosts[0], 0.0), self.clock())
            progress = self.ledger.last_progress() if self.ledger.stepped() else state.started_at
        if quiet is not None:
            self._decide(f"no step completed for {quiet:.0f} s with every rank alive: a hang")
            return Failing(state.group, progress, hang=True)
        if self._hang_confirmed(state, every):
            return Failing(state.group, progress, hang=True)
        return state

    def _hang_confirmed(self, state: Running, every: int) -> bool:
        """Ahead of the hang limit: once the attempt has been quiet long enough (hangs.suspected), look at the
        flight recorder every hang_confirm_s (ask every rank for a dump; read what the previous ask wrote). The same
        ranks missing from the same stuck collective in two looks in a row, and still no step, is a hang; a slow
        step moves someone between the looks."""
        c = self.cfg.controller
        with self.lock:
            quiet = suspected(self.ledger, c, every, self.seen_at.get(state.group.rank_hosts[0], 0.0))
        now, look = self.clock(), self._hang_look
        if quiet is None:
            self._hang_look = None
            return False
        if look is not None and now - look[0] < c.hang_confirm_s:
            return False
        sig = stuck_signature(self.fleet, state.group) if look is not None else None
        if sig is not None and look is not None and look[1] == sig:
            missing = sorted({r for _, _, ranks, _ in sig for r in ranks})
            self._decide(f"no step for {quiet:.1f} s and rank(s) {missing} missing from the same collective in two "
                         f"flight-recorder looks {now - look[0]:.1f} s apart: a hang")
            self._hang_look = None
            return True
        state.group.request_dumps()
        self._hang_look = (now, sig)
        return False

    def _warm_spares(self, state: Running) -> None:
        """Once the attempt trains (not while it starts), the job's rank actors warm their next standbys and the
        spares next in line get warm rank actors."""
        if self._warmed_for == self.attempt or not self.ledger.stepped():
            return
        self._warmed_for = self.attempt
        state.group.refill_standbys()
        with self.lock:
            spares = [h for h in self.pool.usable() if self.pool.state(h) == HostState.SPARE and h in self.nodes]
        spares = spares[:self.cfg.controller.warm_spares]
        self.fleet.warm([(h, self.nodes[h]) for h in spares], list(state.group.hosts))
        if spares:
            self._decide(f"warming spare(s) {', '.join(spares)} for a fast eviction")

    def _drain(self, state: Draining) -> State:
        status = state.group.poll()
        if status.failed or status.unreachable:  # the drain became a failure: diagnose it as one
            return Failing(state.group, min([r.ended_at or self.clock() for r in status.failed] or [self.clock()]))
        with self.lock:
            fresh = [step for step, t in self.ledger.ckpt_at.items() if t >= state.requested_at]
        if not (fresh and status.finished) and self.clock() < state.deadline:
            return state  # until the ranks have saved and exited
        v = state.verdict
        self._decide(f"drained {list(v.hosts)}: " + (f"checkpoint at step {max(fresh)}" if fresh else
                                                     "no fresh checkpoint before the deadline"))
        state.group.shutdown(keep_hosts=[h for h in state.group.hosts if h not in v.hosts])
        with self.lock:
            self.responder.drain(v, self.pool, self.clock())
            self._persist_hosts()
            self._interrupt(v, state.requested_at, state.requested_at, planned=v.cause == RootCause.HOST_MAINTENANCE)
        return Scheduling(self.clock())

    def _stopping(self, state: Stopping) -> State:
        status = state.group.poll()
        with self.lock:
            fresh = [step for step, t in self.ledger.ckpt_at.items() if t >= state.requested_at]
        if not (fresh and status.finished) and not status.failed and self.clock() < state.deadline:
            return state  # until the ranks have saved and exited
        state.group.shutdown()
        if state.drained is not None:  # the drain it took over: those hosts go to their maintenance all the same
            with self.lock:
                self.responder.drain(state.drained, self.pool, self.clock())
                self._persist_hosts()
        done = f"after a checkpoint at step {max(fresh)}" if fresh else "without a fresh checkpoint (deadline)"
        self._decide(f"stopped {done}")
        return Stopped(f"stopped by an operator {done}: {state.reason}")

    # --- records ------------------------------------------------------------------------------------------
    def _interrupt(self, verdict: Verdict, failed_at: float, detected_at: float, planned: bool) -> None:
        """The attempt ended for `verdict`: into the ledger and the store (the next attempt begins)."""
        self.verdicts.append(verdict)
        self.records.record_interruption(self.ledger.interrupt(verdict, failed_at, detected_at, planned))

    def _decide(self, line: str) -> None:
        now = self.clock()
        entry = f"{time.strftime('%H:%M:%S', time.localtime(now))}.{int(now * 1000) % 1000:03d} {line}"
        self.decisions.append(entry)
        log.info(line)

    def _persist_hosts(self) -> None:
        for st in self.pool.changes:
            self.records.set_host_state(st)
        self.pool.changes.clear()

    def _persist_progress(self, final: bool = False) -> None:
        self._persisted_at = now = self.clock()
        ending = final or isinstance(self.state, TERMINAL)
        with self.lock:
            if ending and self.ledger.attempt not in self.ledger.marks["ended"]:
                self.ledger.mark("ended", self.ledger.attempt, now)
            split = account(self.ledger, now, type(self.state).__name__.lower())
            fields: dict[str, Any] = dict(last_step=self.ledger.step_now, productive_s=self.ledger.productive_s,
                                          checkpoint_s=self.ledger.ckpt_stall_s,
                                          accounts=json.dumps({**self.ledger.marks_dict(), "split": split}))
        if ending:
            fields.update(state="finished" if isinstance(self.state, Finished) else "stopped",
                          ended_at=self.ledger.marks["ended"][self.ledger.attempt],
                          message=getattr(self.state, "reason", ""))
        self.records.upsert_job(self.cfg.job, **fields)

    def productive_s(self) -> float:
        with self.lock:
            return self.ledger.productive_s

    def done(self) -> bool:
        return isinstance(self.state, TERMINAL)

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._api is not None:
            self._api.stop()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.group is not None:
            self.group.shutdown()
        self.fleet.close()
        spooled = self.records.close(timeout_s=15.0)
        if spooled:
            log.error("store unavailable at shutdown: %d record(s) spooled for the next controller", spooled)
        self.store.close()


class _RayController(Controller):
    """The controller as a Ray actor. Ray re-runs only the constructor of a restarted one: it serves and loops
    again at once, without waiting for the launcher."""

    def __init__(self, config: HerdsmanConfig):
        from herdsman.config import config_secrets
        from herdsman.secrets import protect_process_logs

        protect_process_logs(config_secrets(config))  # this process's logs hide the token and the store password
        super().__init__(config)
        if self.recovered is not None:
            self.start_api()
            self.start()

    def start_api(self) -> str:
        from herdsman.secrets import protect_process_logs
        from orchestrator.api import load_or_create_token

        url = super().start_api()
        # the operator token (a generated one too), and on the handlers uvicorn has made by now
        protect_process_logs([load_or_create_token(self.cfg.api.token, self.run_dir)])
        return url


ControllerActor = ray.remote(num_cpus=0, max_concurrency=16)(_RayController)
