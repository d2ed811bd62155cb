"""Policies the controller consults: which hosts train, what to do about a verdict, when to stop.

Injected into the controller (and, later, the simulator) as plain objects; each decision carries its reason.
"""

from __future__ import annotations

import re
import time
from collections import deque
from dataclasses import dataclass

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

    def sync(self, alive: list[str]) -> None:
        for h in alive:
            st = self.status.get(h)
            if st is None or st.state == HostState.UNREACHABLE:
                self._set(h, HostState.SPARE, "joined the cluster")
        for h, st in list(self.status.items()):
            if h not in alive and st.state not in (HostState.QUARANTINED, HostState.UNREACHABLE):
                self._set(h, HostState.UNREACHABLE, "no longer in the Ray cluster")

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

    def suspect(self, host: str, reason: str) -> None:
        if self.status.get(host) and self.status[host].state in (HostState.HEALTHY, HostState.SPARE):
            self._set(host, HostState.SUSPECT, reason)

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


class LemonDetector:
    """A host implicated `threshold` times within `window_s` is a lemon: kept out even if each event alone looked
    transient (an unknown failure, a hang it lagged in, a flap)."""

    IGNORED = (RootCause.SOFTWARE_BUG, RootCause.DEPENDENCY, RootCause.HOST_MAINTENANCE)

    def __init__(self, window_s: float, threshold: int):
        self.window_s, self.threshold = window_s, threshold
        self.events: dict[str, deque[tuple[float, RootCause]]] = {}

    def implicate(self, verdict: Verdict, now: float | None = None) -> list[str]:
        """Record the verdict's hosts; return those that have just become lemons."""
        if verdict.cause in self.IGNORED:
            return []
        now = time.time() if now is None else now
        lemons = []
        for h in verdict.hosts:
            q = self.events.setdefault(h, deque())
            q.append((now, verdict.cause))
            while q and q[0][0] < now - self.window_s:
                q.popleft()
            if len(q) == self.threshold:
                lemons.append(h)
        return lemons

    def count(self, host: str) -> int:
        return len(self.events.get(host, ()))
