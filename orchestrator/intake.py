"""What agents send the controller, folded into its state: heartbeats, evidence, precursors, rank 0's records.

Three doors, one fold: `ingest(blob)` takes a batch of wire frames (herdsman/wire.py) from an agent or a relay,
what a fleet sends through Ray; `report(r)` and `report_batch(rs)` take AgentReports in process (the simulator, the
tests, and the controller's own gathers). A mixin of Controller: it works on the controller's state under its lock.
What it acts on at once: a precursor that makes a host a lemon, and critical hardware evidence on an idle spare
(the responder takes the spare out; the job goes on).
"""

from __future__ import annotations

import logging

from herdsman import wire
from herdsman.events import AgentReport, Evidence, HostState, Severity, TrainerPhase
from orchestrator.diagnose import Failure, diagnose, hardware_cause, precursor

log = logging.getLogger("herdsman.controller")
PRECURSOR_EVERY_S = 3600.0  # the same precursor on the same host counts once in this time


class Intake:
    def ingest(self, blob: bytes) -> int:
        """A batch of report frames; returns how many were taken (malformed frames are counted and skipped)."""
        reports, bad = wire.decode(blob)  # outside the lock: the loop is not held up by decoding
        with self.lock:
            self.frames_refused += bad
            for r in reports:
                try:
                    self._absorb(r)
                except Exception:  # one report the fold cannot take must not cost the rest of the batch
                    self.frames_refused += 1
                    log.exception("report from %r refused", r.heartbeat.host)
        return len(reports)

    def report_batch(self, reports: list[AgentReport]) -> None:
        with self.lock:
            for r in reports:
                self._absorb(r)

    def report(self, r: AgentReport) -> None:
        with self.lock:
            self._absorb(r)

    def _absorb(self, r: AgentReport) -> None:
        hb = r.heartbeat
        self.last_heard[hb.host] = self.clock()  # the controller's clock: immune to host skew and queued reports
        self.seen_at[hb.host] = max(self.seen_at.get(hb.host, 0.0), hb.time)
        if hb.gpus or hb.host not in self.heartbeats:  # a heartbeat without samples keeps the last readings
            self.heartbeats[hb.host] = hb
        self.evidence.extend(r.evidence)
        for e in r.evidence:
            if (e.severity == Severity.CRITICAL and self._idle(e.host) and hardware_cause(e) is not None
                    and e.time >= self.returned_at.get(e.host, 0.0)):  # not what it showed before its repair
                self._spare_failed(e)
        for e in r.evidence:  # precursors: what a lemon shows between its failures
            if precursor(e):
                key = (e.host, e.kind.value, str(e.attrs.get("reason") or e.code or ""))
                if e.time - self._precursor_seen.get(key, -PRECURSOR_EVERY_S) < PRECURSOR_EVERY_S:
                    continue  # a condition that persists is one precursor an hour, not one per report
                self._precursor_seen[key] = e.time
                for h in self.responder.lemons.warn(e.host, e.time):
                    self._quarantine_lemon(h)
        for st in r.steps:
            self.ledger.step(st)
        for ev in r.trainer_events:
            if ev.rank != 0:
                continue
            if ev.phase == TrainerPhase.CHECKPOINT_FAILED:
                self._decide(f"attempt {ev.attempt}: {ev.message}")
            done = self.ledger.event(ev)
            if done is not None:
                self.records.record_interruption(done)
        if wire.urgent(r):  # it may end the attempt: the loop looks now
            self._wake.set()

    def _idle(self, host: str) -> bool:
        """In service (a spare, or a suspect placed last) and in no worker group of the job."""
        return (self.pool.state(host) in (HostState.SPARE, HostState.SUSPECT)
                and not (self.group is not None and host in self.group.hosts))

    def _spare_failed(self, e: Evidence) -> None:
        """Critical hardware evidence on an idle host: diagnosed from its own evidence, taken out for repair by the
        responder and kept in its record; the job is not touched. A warm standby on it is let go of at the next
        warming (orchestrator/fleet.py `warm` keeps only the spares next in line)."""
        h, now = e.host, self.clock()
        since = max(e.time - self.cfg.controller.evidence_window_s, self.returned_at.get(h, 0.0))
        verdict = diagnose(Failure(e.time, (), (h,)), [x for x in self.evidence if x.host == h and x.time >= since])
        response = self.responder.spare_failed(h, verdict, self.pool, now)
        self._persist_hosts()
        self._decide(f"verdict {verdict.cause.value} ({verdict.confidence:.2f}) on idle {h}: {verdict.reason}")
        self._decide(f"decision {response.action.value}: {response.reason}")
        self._warmed_for = -1  # the spares next in line are warmed again, without it

    def _quarantine_lemon(self, host: str) -> None:
        """A host found to be a lemon from its precursors: out at once if idle, else at the job's next restart."""
        self.pool.quarantine(host, f"lemon: {self.responder.lemons.explain(host, self.clock())}", self.clock())
        self._decide(f"quarantine {host}: lemon ({self.responder.lemons.explain(host, self.clock())})")
        self._persist_hosts()
