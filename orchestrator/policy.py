"""Policies the controller consults: which hosts train, what to do about a verdict, when to stop.

Injected into the controller (and, later, the simulator) as plain objects; each decision carries its reason.
"""

from __future__ import annotations

import math
import re
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from herdsman.config import ControllerConfig
from herdsman.events import HostState, HostStatus, Verdict
from herdsman.taxonomy import Action, RootCause


@dataclass(frozen=True)
class Decision:
    action: Action
    evict: tuple[str, ...]
    backoff_s: float
    reason: str


_USABLE = (HostState.HEALTHY, HostState.SPARE, HostState.SUSPECT)


class HostPool:
    """Every host Herdsman knows and its state. Active hosts are HEALTHY; idle healthy ones are SPARE."""

    def __init__(self) -> None:
        self.status: dict[str, HostStatus] = {}
        self.changes: list[HostStatus] = []  # for the controller to persist

    def _set(self, host: str, state: HostState, reason: str, now: float | None = None) -> None:
        cur = self.status.get(host)
        if cur is None or cur.state != state:
            st = HostStatus(host, state, time.time() if now is None else now, reason)
            self.status[host] = st
            self.changes.append(st)

    def restore(self, statuses: list[HostStatus]) -> None:
        """Resume from the store: quarantine survives a controller restart."""
        for st in statuses:
            self.status[st.host] = st

    def sync(self, alive: list[str], now: float | None = None) -> None:
        alive_set = set(alive)
        for h in alive:
            st = self.status.get(h)
            if st is None or st.state == HostState.UNREACHABLE:
                self._set(h, HostState.SPARE, "joined the cluster", now)
        for h, st in list(self.status.items()):
            if h not in alive_set and st.state not in (HostState.QUARANTINED, HostState.UNREACHABLE):
                self._set(h, HostState.UNREACHABLE, "no longer in the cluster", now)

    def check_heartbeats(self, last_seen: dict[str, float], now: float, timeout_s: float) -> None:
        """A host whose agent has been silent past the window is unreachable; one that speaks again is back.

        Unreachable is not quarantine: a flap costs the host nothing once its agent reports again.
        """
        for h, seen in last_seen.items():
            st = self.status.get(h)
            if st is None or st.state == HostState.QUARANTINED:
                continue
            if now - seen > timeout_s and st.state != HostState.UNREACHABLE:
                self._set(h, HostState.UNREACHABLE, f"no heartbeat for {now - seen:.0f} s", now)
            elif now - seen <= timeout_s and st.state == HostState.UNREACHABLE:
                self._set(h, HostState.SPARE, "heartbeats resumed", now)

    def usable(self) -> list[str]:
        return sorted(h for h, s in self.status.items() if s.state in _USABLE)

    def place(self, n: int, previous: list[str]) -> list[str] | None:
        """n hosts for the next attempt: the previous ones that are still usable (stable ranks), then spares,
        suspects last. Linear in the pool (the simulator calls it with thousands of hosts)."""
        usable = self.usable()
        usable_set = set(usable)
        keep = [h for h in previous if h in usable_set]
        kept = set(keep)
        spares = [h for h in usable if h not in kept and self.status[h].state == HostState.SPARE]
        rest = [h for h in usable if h not in kept and self.status[h].state != HostState.SPARE]
        chosen = (keep + spares + rest)[:n]
        return chosen if len(chosen) == n else None

    def activate(self, hosts: list[str], now: float | None = None) -> None:
        placed = set(hosts)
        for h in hosts:
            if self.status[h].state == HostState.SPARE:
                self._set(h, HostState.HEALTHY, "placed in the job", now)
        for h, st in self.status.items():
            if h not in placed and st.state == HostState.HEALTHY:
                self._set(h, HostState.SPARE, "not placed in the job", now)

    def quarantine(self, host: str, reason: str, now: float | None = None) -> None:
        self._set(host, HostState.QUARANTINED, reason, now)

    def return_to_service(self, host: str, reason: str, now: float | None = None) -> None:
        """After a passed health check: back to the spare pool."""
        if host in self.status:
            self._set(host, HostState.SPARE, reason, now)

    def suspect(self, host: str, reason: str, now: float | None = None) -> bool:
        if self.status.get(host) and self.status[host].state in (HostState.HEALTHY, HostState.SPARE):
            self._set(host, HostState.SUSPECT, reason, now)
            return True
        return False

    def state(self, host: str) -> HostState | None:
        st = self.status.get(host)
        return st.state if st else None


class RestartPolicy:
    """Restart budget with exponential backoff, eviction per root cause, and a crash-loop guard."""

    CRASH_LOOP = 3  # the same software signature this many times in a row stops the job

    def __init__(self, cfg: ControllerConfig):
        self.cfg = cfg

    def decide(self, verdict: Verdict, history: list[Verdict], restarts: int, failures_without_progress: int) -> Decision:
        """`history` holds the earlier verdicts of the job, oldest first (not this one)."""
        facts = verdict.cause.facts
        if facts.action == Action.STOP:
            return Decision(Action.STOP, (), 0.0, f"{verdict.cause.value}: restarting will not help; paging")
        if restarts >= self.cfg.max_restarts:
            return Decision(Action.STOP, (), 0.0, f"restart budget of {self.cfg.max_restarts} exhausted")
        recent = history[-(self.CRASH_LOOP - 1):] + [verdict]
        if (verdict.cause == RootCause.SOFTWARE_BUG and len(recent) == self.CRASH_LOOP
                and len({signature(v) for v in recent}) == 1):
            return Decision(Action.STOP, (), 0.0,
                            f"crash loop: the same {verdict.cause.value} {self.CRASH_LOOP} times in a row "
                            f"({verdict.evidence[0] if verdict.evidence else ''}); stopping and paging instead of "
                            "burning restarts")
        # the first failure after progress restarts at once; repeated failures without progress back off
        n = failures_without_progress
        backoff = 0.0 if n <= 1 else min(60.0, self.cfg.restart_backoff_s * 2 ** min(n - 2, 30))  # no overflow
        if facts.host_fault and verdict.hosts:
            return Decision(facts.action, verdict.hosts, backoff,
                            f"{verdict.cause.value}: evict {', '.join(verdict.hosts)} and restart on healthy hosts")
        return Decision(Action.RESTART, (), backoff, f"{verdict.cause.value}: restart on the same hosts")


def signature(v: Verdict) -> tuple:
    """What makes two failures "the same": the cause and the evidence text, whichever host or rank raised it."""
    return (v.cause, tuple(re.sub(r"^\[[^\]]*\]\s*", "", line) for line in v.evidence))


_CAUSES = {c.value for c in RootCause}


class LemonDetector:
    """Finds lemons: hosts that fail far more often than the fleet, though each failure alone looked transient.

    Two rules, either flags a host:
    - count: implicated `threshold` times within `window_s` (works from the first host; the rule of thumb);
    - evidence: a sequential likelihood-ratio test over the host's whole record since it last came back into
      service, once the fleet is large enough to estimate its own rates. Each failure weighs ln(factor), each
      precursor (a correctable ECC burst, a PCIe replay, a link flap, a recoverable Xid: `warn`) ln(warning_factor),
      and every hour without either pays back what a lemon would have shown in it. A host is flagged when its
      posterior odds of being a lemon reach `odds`. Rates are the fleet's own (events over host-time), so the
      test needs no tuning per fleet; the factors and the prior share are the hypothesis, stated in the config.

    The odds are 99:1, not 9:1: a flag sends a host to RMA for weeks, and at 9:1 one flag in ten may be a healthy
    host, which over ~2,100 hosts was about 2 healthy hosts per simulated 54-day run (every one flagged by this test,
    mostly on a run of precursors). At 99:1 it is ~0.2, for 2-7 points of recall (87-89% left). The count rule catches
    what the test is slow to: a fault a wrong verdict left in service (silent data corruption called `unknown`)
    failing again within hours; such a host is broken, not a lemon, and is rightly taken out.

    Not counted: software and dependency failures and maintenance (not the host's doing), and a switch or cable
    fault that names several hosts (the fabric failed under them; the hosts are evicted, their records spared).
    """

    IGNORED = (RootCause.SOFTWARE_BUG, RootCause.DEPENDENCY, RootCause.HOST_MAINTENANCE)
    FABRIC = RootCause.NETWORK_SWITCH_CABLE  # host-attributable only when it names one host

    def __init__(self, window_s: float, threshold: int, *, factor: float = 15.0, warning_factor: float = 5.0,
                 prior_share: float = 0.02, odds: float = 99.0, min_fleet: int = 32):
        self.window_s, self.threshold = window_s, threshold
        self.factor, self.warning_factor, self.prior_share = factor, warning_factor, prior_share
        self.min_fleet = min_fleet
        self.bar = math.log(odds) - math.log(prior_share / (1 - prior_share))  # log-likelihood ratio to flag
        self.events: dict[str, deque[tuple[float, RootCause]]] = {}  # in the count window
        self.since: dict[str, float] = {}  # start of each host's record (enrolled or back from repair)
        self.failures: dict[str, int] = {}
        self.warnings: dict[str, int] = {}
        self.flagged: set[str] = set()
        self.on_record: Callable[[str, float, str, str], None] | None = None  # (host, time, kind, cause): to keep
        # fleet totals, kept incrementally: events and host-time (sum over hosts of now - since)
        self._n_failures = self._n_warnings = 0
        self._since_sum = 0.0

    # --- the record ---------------------------------------------------------------------------------------
    def enroll(self, host: str, now: float) -> None:
        if host not in self.since:
            self.since[host] = now
            self._since_sum += now

    def reset(self, host: str, now: float) -> None:
        """Back from repair or RMA: a new record (the fleet totals keep what it showed)."""
        self.enroll(host, now)
        self._since_sum += now - self.since[host]
        self.since[host] = now
        self.failures[host] = self.warnings[host] = 0
        self.events.pop(host, None)
        self.flagged.discard(host)

    def implicate(self, verdict: Verdict, now: float | None = None) -> list[str]:
        """Record a failure of the verdict's hosts; return those that have just become lemons."""
        if verdict.cause in self.IGNORED or (verdict.cause == self.FABRIC and len(verdict.hosts) > 1):
            return []
        now = time.time() if now is None else now
        out = []
        for h in verdict.hosts:
            self.enroll(h, now)
            q = self.events.setdefault(h, deque())
            q.append((now, verdict.cause))
            while q and q[0][0] < now - self.window_s:
                q.popleft()
            self.failures[h] = self.failures.get(h, 0) + 1
            self._n_failures += 1
            if self.on_record:
                self.on_record(h, now, "failure", verdict.cause.value)
            if self._newly_flagged(h, now, len(q) >= self.threshold):
                out.append(h)
        return out

    def warn(self, host: str, now: float) -> list[str]:
        """Record a precursor on `host`; returns [host] if it has just become a lemon."""
        self.enroll(host, now)
        self.warnings[host] = self.warnings.get(host, 0) + 1
        self._n_warnings += 1
        if self.on_record:
            self.on_record(host, now, "precursor", "")
        return [host] if self._newly_flagged(host, now, False) else []

    def _newly_flagged(self, h: str, now: float, by_count: bool) -> bool:
        if h in self.flagged or not (by_count or self.score(h, now) >= self.bar):
            return False
        self.flagged.add(h)
        return True

    def restore(self, first_seen: dict[str, float], incidents: list[tuple[str, float, str, str]]) -> None:
        """Each host's record as the store kept it across jobs: (host, time, kind, cause), oldest first."""
        hook, self.on_record = self.on_record, None  # replayed, not recorded again
        try:
            for h, t in first_seen.items():
                self.enroll(h, t)
            for h, t, kind, cause in incidents:
                if kind == "failure":
                    self.implicate(Verdict(RootCause(cause) if cause in _CAUSES else RootCause.UNKNOWN, 1.0, (h,)), t)
                else:
                    self.warn(h, t)
        finally:
            self.on_record = hook

    # --- the test -----------------------------------------------------------------------------------------
    def rates(self, now: float) -> tuple[float, float] | None:
        """A normal host's failure and precursor rates per second, from the fleet's record (None: too few hosts)."""
        n = len(self.since)
        exposure = n * now - self._since_sum
        if n < self.min_fleet or exposure <= 0:
            return None
        s = self.prior_share  # the fleet mean is a mix of normal hosts and lemons
        return (max(self._n_failures, 1) / exposure / (1 - s + s * self.factor),
                max(self._n_warnings, 1) / exposure / (1 - s + s * self.warning_factor))

    def score(self, h: str, now: float) -> float:
        """The log-likelihood ratio lemon : normal of the host's record (-inf when the fleet is too small)."""
        r = self.rates(now)
        if r is None:
            return -math.inf
        t = max(0.0, now - self.since.get(h, now))
        f, w = self.factor, self.warning_factor
        return (self.failures.get(h, 0) * math.log(f) - (f - 1) * r[0] * t
                + (self.warnings.get(h, 0) * math.log(w) - (w - 1) * r[1] * t if w > 1 else 0.0))

    def count(self, host: str) -> int:
        return len(self.events.get(host, ()))

    def explain(self, host: str, now: float | None = None) -> str:
        now = time.time() if now is None else now
        days = (now - self.since.get(host, now)) / 86400
        return (f"{self.failures.get(host, 0)} failure(s) and {self.warnings.get(host, 0)} precursor(s) in "
                f"{days:.1f} days of service ({self.count(host)} within {self.window_s:.0f} s)")
