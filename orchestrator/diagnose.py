"""Evidence -> Verdict. The rules are data: tables below, evaluated in order, each testable on its own.

Inputs: the failure as the worker group saw it (which ranks ended first, how, with what message) and the
agents' evidence from the hosts of the job in a window around it. Hardware evidence on the host of a failing
rank decides first; then the exception text of the ranks that failed on their own (not as a consequence of a
peer dying); then whatever remains is `unknown`.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from typing import Sequence

from herdsman.events import Evidence, EvidenceKind, Severity, Verdict
from herdsman.taxonomy import RootCause
from herdsman.xid import lookup as xid_lookup


@dataclass(frozen=True)
class RankFailure:
    rank: int
    host: str
    time: float
    exit_code: int | None = None  # None while still running (e.g. hardware evidence arrived first)
    message: str = ""  # exception text or the tail of stderr

    @property
    def signal_name(self) -> str | None:
        if self.exit_code is not None and self.exit_code < 0:
            try:
                return signal.Signals(-self.exit_code).name
            except ValueError:
                return f"signal {-self.exit_code}"
        return None

    def line(self) -> str:
        how = self.signal_name or (f"exit code {self.exit_code}" if self.exit_code is not None else "running")
        # a killed process said nothing about why: its last log line would mislead
        last = self.message.strip().splitlines()[-1] if self.message.strip() and not self.signal_name else ""
        return f"[{self.host} rank{self.rank}] trainer {how}" + (f": {last}" if last else "")


@dataclass(frozen=True)
class Failure:
    time: float  # first sign of trouble
    ranks: tuple[RankFailure, ...]  # failed ranks, earliest first
    hosts: tuple[str, ...]  # hosts of the job


# --- rules ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TextRule:
    cause: RootCause
    pattern: re.Pattern[str]
    confidence: float


def _re(p: str) -> re.Pattern[str]:
    return re.compile(p, re.IGNORECASE)


# Messages a rank prints when a *peer* died or hung: symptoms, not causes.
PEER_SYMPTOMS = _re(
    r"Connection closed by peer|Connection reset by peer|Broken pipe|remote process exited|"
    r"ECONNRESET|ProcessGroupGloo.*(?:recv|send)|Gloo connectFullMesh failed|NCCL communicator was aborted|"
    r"SIGTERM|Socket Timeout|Connection refused|failed their parameter check"
)

# Exception text that names its own cause, first match wins.
TEXT_RULES: tuple[TextRule, ...] = (
    TextRule(RootCause.DEPENDENCY, _re(r"ImportError|ModuleNotFoundError|undefined symbol|version mismatch|"
                                       r"GLIBC_[0-9.]+' not found|CUDA driver version is insufficient"), 0.85),
    TextRule(RootCause.SILENT_DATA_CORRUPTION, _re(r"parameter checksum mismatch|cross-replica checksum mismatch|"
                                                   r"silent data corruption"), 0.85),
    TextRule(RootCause.GPU_HBM3_MEMORY, _re(r"uncorrectable ECC error encountered"), 0.8),
    TextRule(RootCause.FAULTY_GPU, _re(r"CUDA error: unspecified launch failure|GPU is lost|fallen off the bus"), 0.7),
    TextRule(RootCause.GPU_SYSTEM_PROCESSOR, _re(r"GSP (?:RPC )?timeout|Timeout waiting for RPC from GSP"), 0.7),
    TextRule(RootCause.NCCL_WATCHDOG_TIMEOUT, _re(r"Watchdog caught collective operation timeout|"
                                                  r"Timed out waiting \d+ms for (?:recv|send) operation"), 0.6),
    TextRule(RootCause.SOFTWARE_BUG, _re(r"Traceback \(most recent call last\)|Error: |Exception: "), 0.8),
)

# Evidence that a link went down (not mere error counters or a flap that recovered).
LINK_DOWN = {"NicDown", "IbPortDown", "NicLinkDown", "InfinibandPortDown", "InfinibandErrors"}

_ECC_CAUSE = {"dram": RootCause.GPU_HBM3_MEMORY, "sram": RootCause.GPU_SRAM_MEMORY}


_NOT_HARDWARE = (EvidenceKind.MAINTENANCE, EvidenceKind.SDC, EvidenceKind.NETWORK, EvidenceKind.TRAINER_HANG,
                 EvidenceKind.TRAINER_EXCEPTION, EvidenceKind.TRAINER_EXIT)


def hardware_cause(e: Evidence) -> RootCause | None:
    """The root cause a piece of device/host evidence points to on its own, or None if it decides nothing."""
    if e.kind == EvidenceKind.GPU_XID and e.code is not None:
        x = xid_lookup(e.code)
        return x.cause if x and x.fatal else None
    if e.kind == EvidenceKind.GPU_LOST:
        return RootCause.FAULTY_GPU
    if e.kind == EvidenceKind.GPU_THERMAL:
        return RootCause.GPU_THERMAL_INTERFACE_SENSOR
    if e.kind == EvidenceKind.STRAGGLER and e.attrs.get("reason") == "thermal":
        return RootCause.GPU_THERMAL_INTERFACE_SENSOR
    if e.kind == EvidenceKind.GPU_ECC and e.severity == Severity.CRITICAL and "memory" in e.attrs:
        return _ECC_CAUSE.get(str(e.attrs.get("memory")))
    if e.severity == Severity.CRITICAL and e.attrs.get("cause") and e.kind not in _NOT_HARDWARE:
        try:
            return RootCause(e.attrs["cause"])
        except ValueError:
            return None
    return None


# Among several hardware findings on one host, the most specific explains the failure.
# A power or PCIe-board fault explains the GPUs it takes down with it, so it comes first.
_HW_PRIORITY = [RootCause.POWER_SUPPLY, RootCause.IO_EXPANSION_BOARD, RootCause.GPU_HBM3_MEMORY,
                RootCause.GPU_SRAM_MEMORY, RootCause.GPU_SYSTEM_PROCESSOR, RootCause.FAULTY_GPU, RootCause.SYSTEM_MEMORY,
                RootCause.CPU, RootCause.SSD, RootCause.SERVER_CHASSIS, RootCause.NIC,
                RootCause.GPU_THERMAL_INTERFACE_SENSOR]


def _priority(cause: RootCause) -> int:
    return _HW_PRIORITY.index(cause) if cause in _HW_PRIORITY else len(_HW_PRIORITY)


def diagnose(failure: Failure, evidence: Sequence[Evidence]) -> Verdict:
    """Stages, first decisive one wins: planned maintenance, hardware on an implicated host, silent data
    corruption, network, a hang the flight recorder explains, the failing ranks' own exception text, unknown."""
    job_hosts = set(failure.hosts)
    evidence = [e for e in evidence if e.host in job_hosts or not e.host]
    # ranks the flight recorder found missing from a stuck collective are implicated like ranks that died
    lagging = [e for e in evidence if e.kind == EvidenceKind.TRAINER_HANG and e.rank is not None]
    stragglers = [e for e in evidence if e.kind == EvidenceKind.STRAGGLER]
    implicated = [e.host for e in lagging + stragglers] + [r.host for r in failure.ranks]

    # 1. Planned maintenance: not a fault, the hosts are drained.
    maint = [e for e in evidence if e.kind == EvidenceKind.MAINTENANCE]
    if maint:
        return _blame(RootCause.HOST_MAINTENANCE, 0.9, maint, failure, "planned maintenance on the job's hosts")

    # 2. Hardware evidence on the job's hosts.
    hw: dict[str, list[tuple[RootCause, Evidence]]] = {}
    for e in evidence:
        cause = hardware_cause(e)
        if cause is not None:
            hw.setdefault(e.host, []).append((cause, e))
    if hw:
        on_failed = [h for h in dict.fromkeys(implicated) if h in hw]
        blamed = on_failed or sorted(hw)
        findings = [f for h in blamed for f in hw[h]]
        cause = min((c for c, _ in findings), key=_priority)
        # thermal alone is a warning: it explains a failure only on an implicated host
        if cause != RootCause.GPU_THERMAL_INTERFACE_SENSOR or on_failed or not failure.ranks:
            ranks = tuple(sorted({r.rank for r in failure.ranks if r.host in blamed}
                                 | {e.rank for e in lagging + stragglers if e.host in blamed and e.rank is not None}))
            lines = [e.line() for c, e in findings if c == cause] + [r.line() for r in failure.ranks[:1]]
            return Verdict(cause, 0.95 if on_failed else 0.75, tuple(blamed), ranks, tuple(lines)[:6],
                           cause.facts.action, f"hardware evidence on {', '.join(blamed)}")

    # 3. Silent data corruption found by the trainer's checks.
    sdc = [e for e in evidence if e.kind == EvidenceKind.SDC]
    if sdc:
        return _blame(RootCause.SILENT_DATA_CORRUPTION, 0.85, sdc, failure, "checksum mismatch between replicas")

    # 4. The network: link-level evidence (kernel, sysfs) first, transport errors reported by ranks second.
    links = [e for e in evidence if e.kind == EvidenceKind.HOST_LOG and e.attrs.get("reason") in LINK_DOWN
             and not e.attrs.get("cleared")
             and (e.attrs.get("reason") != "InfinibandErrors" or e.attrs.get("counter") == "link_downed")]
    transport = [e for e in evidence if e.kind == EvidenceKind.NETWORK]
    net = links or transport
    if net:
        hosts = tuple(dict.fromkeys(e.host for e in net))
        conf = 0.85 if links else 0.6
        if len(hosts) >= 2:
            return _blame(RootCause.NETWORK_SWITCH_CABLE, conf, net, failure,
                          f"network errors on {len(hosts)} hosts at once: a switch or cable, not one NIC")
        return _blame(RootCause.NIC, conf, net, failure, f"network errors on {hosts[0]} only")

    # 5. A hang the flight recorder explains: blame the ranks that never joined (their hosts become suspects).
    if lagging:
        ranks = tuple(sorted({e.rank for e in lagging if e.rank is not None}))
        hosts = tuple(dict.fromkeys(e.host for e in lagging))
        c = RootCause.NCCL_WATCHDOG_TIMEOUT
        return Verdict(c, 0.7, hosts, ranks, tuple(dict.fromkeys(e.message for e in lagging))[:3], c.facts.action,
                       f"collective hang: rank(s) {list(ranks)} never joined, no hardware evidence on their hosts")

    # 6. Exception text of the ranks that failed by themselves (not as a peer's symptom).
    own = [r for r in failure.ranks if r.message.strip() and not PEER_SYMPTOMS.search(r.message)]
    for rule in TEXT_RULES:
        hits = [r for r in own if rule.pattern.search(r.message)]
        if hits:
            lines = tuple(_decisive_line(r, rule.pattern) for r in hits[:3])
            return Verdict(rule.cause, rule.confidence, tuple(dict.fromkeys(r.host for r in hits)),
                           tuple(r.rank for r in hits), lines, rule.cause.facts.action,
                           f"{len(hits)} rank(s) failed with {rule.cause.value} text and no hardware evidence")

    # 7. A host that stopped reporting, or a rank that vanished (killed, or exited without saying why).
    silent = [e for e in evidence if e.attrs.get("reason") == "AgentSilent"]
    if silent:
        return _blame(RootCause.UNKNOWN, 0.5, silent, failure, "a host of the job stopped reporting")
    first = failure.ranks[0] if failure.ranks else None
    lines = tuple(r.line() for r in failure.ranks[:3])
    if first is not None and (first.signal_name or not first.message.strip()):
        return Verdict(RootCause.UNKNOWN, 0.4, (first.host,), (first.rank,), lines, RootCause.UNKNOWN.facts.action,
                       f"rank {first.rank} ended ({first.line()}) with no evidence of why")
    return Verdict(RootCause.UNKNOWN, 0.3, (), tuple(r.rank for r in failure.ranks), lines,
                   RootCause.UNKNOWN.facts.action, "nothing conclusive")


def _blame(cause: RootCause, confidence: float, found: list[Evidence], failure: Failure, reason: str) -> Verdict:
    hosts = tuple(dict.fromkeys(e.host for e in found if e.host))
    ranks = tuple(sorted({e.rank for e in found if e.rank is not None} | {r.rank for r in failure.ranks
                                                                          if r.host in hosts and r.rank >= 0}))
    return Verdict(cause, confidence, hosts, ranks, tuple(dict.fromkeys(e.line() for e in found))[:6],
                   cause.facts.action, reason)


def _decisive_line(r: RankFailure, pattern: re.Pattern[str]) -> str:
    lines = [ln.strip() for ln in r.message.splitlines() if ln.strip()]
    # the exception line (last) says more than the traceback header that matched
    last = lines[-1] if lines else ""
    hit = next((ln for ln in reversed(lines) if pattern.search(ln)), last)
    text = last if hit.startswith("Traceback") else hit
    return f"[{r.host} rank{r.rank}] {text}"
