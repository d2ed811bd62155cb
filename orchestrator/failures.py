"""A failure of the job's attempt, from its first sign to the restart: when it began, the grace for the rest of
the evidence, the flight recorder, the diagnosis and the response, and the in-process restart (only dead, named or
stuck ranks start anew; the others rejoin in their processes). A mixin of Controller, like Intake and Operations: it
works on the controller's state (its ledger, evidence, pool, fleet) under its lock."""

from __future__ import annotations

from typing import Any

from herdsman.events import EvidenceKind, RankFailure, Severity, Verdict
from herdsman.taxonomy import RootCause
from orchestrator.diagnose import Failure, diagnose, hardware_cause
from orchestrator.fleet import Group, GroupStatusLike
from orchestrator.hangs import flight_recorder_evidence
from orchestrator.states import ATTEMPT_EVIDENCE, BackingOff, Failing, Running, State, Stopped


class FailureHandling:
    def _failure_time(self, status: Any, state: Running) -> float | None:
        times = [r.ended_at or self.clock() for r in status.failed]
        times += [r.reported_at for r in status.ranks if r.rank in status.waiting]
        if status.unreachable:
            times.append(self.clock())
        with self.lock:  # critical hardware evidence on a host of the job fails it even if no rank died yet, as
            # does a rank's report of its own failure (it may still wait for a save in flight to land)
            times += [e.time for e in self.evidence
                      if e.time >= state.started_at and e.host in state.group.hosts and (
                          (e.severity == Severity.CRITICAL and hardware_cause(e) is not None)
                          or (e.kind == EvidenceKind.TRAINER_EXCEPTION and e.attrs.get("attempt") == self.attempt))]
        return min(times) if times else None

    def _handle_failure(self, state: Failing, now_: bool = False) -> State:
        """Diagnose, respond, record; `now_` skips the grace for the other ranks (an operator's stop)."""
        group = state.group
        status = group.poll()
        all_done = all(r.exit_code is not None for r in status.ranks)
        if not (state.hang or now_) and not self._grace_over(state, status) \
                and not all_done and not self._all_told(group, status):
            return state  # let the other ranks and the agents catch up
        # Dumps of live ranks tell something only when they are stuck: in a hang, or blocked behind a failed
        # rank. Snapshots of ranks still making progress would differ by a few collectives and look like a hang.
        reported = {r.rank for r in self._reported_failed(group)} | status.waiting
        stuck = not all_done and (state.hang or bool(status.failed) or bool(reported))
        # a rank that reported its own exception is explained: it is not blamed for not joining a collective
        # ...nor asked for a dump: it wrote its own as it failed, and may still be on its way out
        asked = group.request_dumps(frozenset(reported)) if stuck else []
        hang_evidence = flight_recorder_evidence(self.fleet, group, asked, state.hang,
                                                 self.cfg.controller.dump_wait_s, self._decide, frozenset(reported))
        for r in self.fleet.gather(group.hosts, self._decide):
            self.report(r)
        status = group.poll()  # ranks that ended while dumps and evidence were gathered say why, too
        now = self.clock()
        exited = {r.rank for r in status.failed}
        failure = Failure(state.since, tuple(status.failures(now)) + tuple(
            r for r in self._reported_failed(group) if r.rank not in exited), tuple(group.hosts))
        window = state.since - self.cfg.controller.evidence_window_s
        with self.lock:
            self.evidence.extend(hang_evidence)
            # what a host showed before it was repaired and returned to service is not about this failure
            evidence = [e for e in self.evidence if window <= e.time <= now and e.time > self.returned_at.get(e.host, 0)
                        and (e.kind not in ATTEMPT_EVIDENCE or e.time >= self.attempt_started_at)]
        verdict = diagnose(failure, evidence)
        detected_at = self.clock()
        self._decide(f"verdict {verdict.cause.value} ({verdict.confidence:.2f}) hosts={list(verdict.hosts)} "
                     f"ranks={list(verdict.ranks)}: {verdict.reason}")
        for line in verdict.evidence:
            self._decide(f"  evidence: {line}")
        with self.lock:
            response = self.responder.respond(verdict, self.ledger.progressed(), self.pool, detected_at)
            self._persist_hosts()
        anew = None if now_ else self._in_process(state, status, verdict, response)
        if anew is None:
            group.shutdown(keep_hosts=[h for h in group.hosts if h not in response.out])
        self._decide(f"decision {response.action.value}: {response.reason}")
        for h in response.lemons:
            self._decide(f"quarantine {h}: {self.pool.status[h].reason}")
        with self.lock:
            self._interrupt(verdict, state.since, detected_at, planned=verdict.cause == RootCause.HOST_MAINTENANCE)
        if response.page:
            return Stopped(response.reason)
        if anew is not None:
            running = self._rejoin(group, anew)
            if running is not None:
                return running
            group.shutdown()  # the in-process way failed: every process restarts, on the same hosts
        return BackingOff(self.clock() + response.backoff_s)

    def _in_process(self, state: Failing, status: Any, verdict: Verdict, response: Any) -> set[int] | None:
        """The ranks to start anew when the others can rejoin the next attempt in their own processes, or None
        when every process must restart: a host leaves, one is unreachable, the attempt never stepped (an
        in-process restart that failed falls back to processes), or no rank is left to keep."""
        if not self.cfg.controller.inprocess_restart or self.cfg.trainer.entrypoint or response.page \
                or response.out or status.unreachable or not self.ledger.stepped(self.attempt):
            return None
        alive = {r.rank for r in status.ranks if r.running}
        if state.hang and not verdict.ranks:
            return None  # nobody named: a hung rank cannot be told from a waiting one
        # the dead, and those the verdict names (a hung rank; one whose own code failed, on its way out)
        anew = (set(range(state.group.world_size)) - alive) | set(verdict.ranks)
        if status.waiting and not state.hang:
            # A witness already left its gloo group, whose sockets stay open until the collective timeout: a rank
            # still alive that has not reported once the grace is over is most likely stuck in a collective (or a
            # save) with it. Ordered to rejoin, it would come 30 s late and fail the attempt's rendezvous; it
            # starts anew instead. (While nobody has left, the others wait on the dead or named rank, and stopping
            # it frees them; in a hang, the same.)
            anew |= alive - status.waiting - {r.rank for r in self._reported_failed(state.group)}
        if not anew or len(anew) >= state.group.world_size:
            return None
        return anew

    def _rejoin(self, group: Group, anew: set[int]) -> State | None:
        """An in-process restart of the (already counted) next attempt; None if it could not be ordered."""
        now = self.clock()
        with self.lock:
            self.ledger.mark("scheduled", self.attempt, now)
            self.ledger.mark("launched", self.attempt, now)
        self.attempt_started_at = now
        try:
            kept = group.rejoin(self.attempt, anew)
        except Exception as e:  # an actor gone meanwhile: restart processes instead
            self._decide(f"in-process restart failed ({type(e).__name__}: {e}): restarting every process")
            return None
        fresh = sorted(set(range(group.world_size)) - set(kept))
        self._decide(f"attempt {self.attempt}: in-process restart on {', '.join(dict.fromkeys(group.hosts))}: "
                     f"rank(s) {kept} keep their processes, rank(s) {fresh} start anew")
        self.records.upsert_job(self.cfg.job, state="running", attempt=self.attempt)
        return Running(group, self.clock())

    def _grace_over(self, state: Failing, status: Any) -> bool:
        """The failure grace (`failure_grace_s`: for the other ranks' reports and the agents' evidence) is over, or
        cut short: a witness waits to rejoin, and the ranks still silent have had twice the attempt's longest step
        interval since to hear of the failure. A witness keeps its gloo sockets open while it waits (gloo closes them
        only when its process exits: destroying or aborting the group does not, once FSDP has used it), so a rank
        blocked in a collective with it never hears of the failure; any other rank does at its next collective,
        within a step. The silent ones are then started anew (`_in_process`)."""
        now, c = self.clock(), self.cfg.controller
        if now >= state.since + c.failure_grace_s:
            return True
        waited = [r.reported_at for r in status.ranks if r.rank in status.waiting]
        every = self.cfg.trainer.checkpoint_every
        with self.lock:  # the intake threads add steps to the ledger
            paces = [p for p in (self.ledger.longest_interval(every, False),
                                 self.ledger.longest_interval(every, True)) if p is not None]
        return bool(waited and paces) and now >= min(waited) + max(c.poll_interval_s, 2 * max(paces))

    def _all_told(self, group: Group, status: GroupStatusLike) -> bool:
        """Every rank has said its part: exited, or reported its failure (through its rank actor's poll, or its
        report through the agent) and waits to rejoin. The rest of the grace would wait for nothing: what the agents
        saw is asked for next (Fleet.gather, a fresh cycle on each host), not awaited from their next report."""
        if status.unreachable:
            return False
        told = ({r.rank for r in status.ranks if r.exit_code is not None} | status.waiting
                | {r.rank for r in self._reported_failed(group)})
        return len(told) >= len(status.ranks)

    def _reported_failed(self, group: Group) -> list[RankFailure]:
        """Ranks of this attempt that reported their own failure (its traceback) and have not exited yet."""
        with self.lock:
            return [RankFailure(e.rank, e.host, e.time, None, e.message) for e in self.evidence
                    if e.kind == EvidenceKind.TRAINER_EXCEPTION and e.rank is not None and e.host in group.hosts
                    and e.attrs.get("attempt") == self.attempt]
