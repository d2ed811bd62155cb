"""The failure responder: the one place where a verdict becomes what happens to the job and its hosts.

Verdict + whether the job progressed since the last failure + the host pool in; a Response out (restart, evict,
drain or stop and page, the hosts taken out and why, the backoff); an idle spare that fails is taken out the same
way (`spare_failed`). The controller calls it on a real job and the simulator on a simulated clock, so the
simulator's ETTR is the real policy's ETTR. It keeps what the decision depends on: the job's verdict history
(crash-loop guard), its restart count and failures without progress (backoff), and the lemon detector's record of
each host.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable

from herdsman.config import ControllerConfig
from herdsman.events import Interruption, Verdict
from herdsman.taxonomy import Action, RootCause
from orchestrator.policy import HostPool, LemonDetector, RestartPolicy

# a failure nobody could explain: its hosts stay usable, placed last, until they are cleared or fail again
SUSPECT_CAUSES = (RootCause.UNKNOWN, RootCause.NCCL_WATCHDOG_TIMEOUT)


@dataclass(frozen=True)
class Response:
    action: Action  # RESTART, EVICT (restart without the hosts), DRAIN, or STOP (and page a human)
    evict: tuple[str, ...]  # taken out for this verdict
    lemons: tuple[str, ...]  # taken out for their history
    suspect: tuple[str, ...]
    backoff_s: float
    reason: str

    @property
    def out(self) -> tuple[str, ...]:
        return self.evict + self.lemons

    @property
    def page(self) -> bool:
        return self.action == Action.STOP


class FailureResponder:
    def __init__(self, cfg: ControllerConfig, lemons: LemonDetector | None = None):
        self.policy = RestartPolicy(cfg)
        self.lemons = lemons or LemonDetector(cfg.lemon_window_s, cfg.lemon_threshold)
        self.history: list[Verdict] = []
        self.restarts = 0
        self.failures_without_progress = 0

    def respond(self, verdict: Verdict, progressed: bool, pool: HostPool, now: float) -> Response:
        """An unplanned failure. `progressed`: the failed attempt committed a checkpoint past the one it started
        from (work that survives it); repeated failures without progress back off."""
        self.failures_without_progress = 0 if progressed else self.failures_without_progress + 1
        decision = self.policy.decide(verdict, self.history, self.restarts, self.failures_without_progress)
        self.history.append(verdict)
        lemons = tuple(h for h in self.lemons.implicate(verdict, now) if h not in decision.evict)
        first = verdict.evidence[0] if verdict.evidence else verdict.reason
        for h in decision.evict:
            pool.quarantine(h, f"{verdict.cause.value}: {first}", now)
        for h in lemons:
            pool.quarantine(h, f"lemon: {self.lemons.explain(h, now)}", now)
        suspects: tuple[str, ...] = ()
        if verdict.cause in SUSPECT_CAUSES:
            suspects = tuple(h for h in verdict.hosts if pool.suspect(h, "implicated in an unexplained failure", now))
        if decision.action != Action.STOP:
            self.restarts += 1
        return Response(decision.action, decision.evict, lemons, suspects, decision.backoff_s, decision.reason)

    def drain(self, verdict: Verdict, pool: HostPool, now: float) -> Response:
        """Planned maintenance or a thermally held-down GPU: its hosts leave after a fresh checkpoint. Not a
        failure: no restart is counted and nothing lost."""
        first = verdict.evidence[0] if verdict.evidence else verdict.reason
        for h in verdict.hosts:
            pool.quarantine(h, f"{verdict.cause.value}: {first}", now)
        return Response(Action.DRAIN, verdict.hosts, (), (), 0.0, f"drain {', '.join(verdict.hosts)}: {verdict.reason}")

    def spare_failed(self, host: str, verdict: Verdict, pool: HostPool, now: float) -> Response:
        """An idle spare (in no worker group) failed: its agent saw it, so it goes for repair whatever the verdict
        calls it, and the failure counts in its record (a lemon found so goes to RMA). Not a failure of the job:
        nothing is restarted, counted or lost."""
        lemons = tuple(self.lemons.implicate(replace(verdict, hosts=(host,)), now))
        if host in lemons:
            pool.quarantine(host, f"lemon: {self.lemons.explain(host, now)}", now)
        else:
            first = verdict.evidence[0] if verdict.evidence else verdict.reason
            pool.quarantine(host, f"{verdict.cause.value} while idle: {first}", now)
        evict = () if host in lemons else (host,)
        return Response(Action.EVICT, evict, lemons, (), 0.0,
                        f"{verdict.cause.value}: spare {host} failed while idle; out for repair"
                        f"{' (a lemon)' if lemons else ''}, the job goes on untouched")

    def human_reset(self) -> None:
        """A human answered the page, fixed what stopped the job and restarted it: the budget starts over."""
        self.restarts, self.history, self.failures_without_progress = 0, [], 0

    def remember(self, interruptions: Iterable[Interruption]) -> None:
        """A restarted controller: the job's earlier interruptions count for the crash-loop guard and the budget
        as if this responder had seen them (each host's record comes back from the store's incidents)."""
        for it in sorted(interruptions, key=lambda i: i.failed_at):
            self.history.append(it.verdict)
            if not it.planned:
                self.restarts += 1
