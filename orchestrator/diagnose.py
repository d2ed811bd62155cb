"""Evidence -> Verdict.

Inputs: the failure as the worker group (or a log) saw it: which ranks ended first, how, with what text; and the
evidence from the hosts of the job in a window around it. The ranks' own text goes through the same rule engine
as the agents' kernel logs (evidence/), so a live verdict and `herdsman diagnose` of the same text agree.

How it decides, in three passes of decreasing strength (decides, supports, peer symptoms): in each pass the
stages below are tried in order and the first that has a candidate wins.
  1. planned maintenance;  2. hardware on the job's hosts (the most specific cause on the implicated host);
  3. silent data corruption;  4. the network (a fabric fault, or one host's NIC);  5. a hang (the flight recorder's
  missing ranks, or the watchdog's text);  6. the ranks' own text (dependency before software bug).
A rank killed without a word stops the search after the first pass: weak hints do not explain a SIGKILL, and the
verdict says `unknown` (listing the hints as alternatives). Every verdict quotes the records that decided it and
lists the candidates that lost.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from evidence.engine import text_evidence
from evidence.rules import Strength
from herdsman.events import LINK_DOWN as LINK_DOWN_REASONS
from herdsman.events import IB_LINK_DOWNED, Evidence, EvidenceKind, RankFailure, Reason, Severity, Verdict
from herdsman.taxonomy import RootCause
from herdsman.xid import lookup as xid_lookup

__all__ = ["Failure", "RankFailure", "diagnose", "hardware_cause", "rank_evidence"]


@dataclass(frozen=True)
class Failure:
    time: float  # first sign of trouble
    ranks: tuple[RankFailure, ...]  # failed ranks, earliest first
    hosts: tuple[str, ...]  # hosts of the job


# Evidence from the agents' own probes (sysfs links, NVML) that a link went down: not a flap that recovered.
LINK_DOWN = {r.value for r in LINK_DOWN_REASONS}

_ECC_CAUSE = {"dram": RootCause.GPU_HBM3_MEMORY, "sram": RootCause.GPU_SRAM_MEMORY}
_NOT_HARDWARE = (EvidenceKind.MAINTENANCE, EvidenceKind.SDC, EvidenceKind.NETWORK, EvidenceKind.TRAINER_HANG,
                 EvidenceKind.TRAINER_EXCEPTION, EvidenceKind.TRAINER_EXIT)

# Among several hardware findings on one host, the most specific explains the failure.
# A power or PCIe-board fault explains the GPUs it takes down with it, so it comes first.
_HW_PRIORITY = [RootCause.POWER_SUPPLY, RootCause.IO_EXPANSION_BOARD, RootCause.GPU_HBM3_MEMORY,
                RootCause.GPU_SRAM_MEMORY, RootCause.GPU_SYSTEM_PROCESSOR, RootCause.FAULTY_GPU, RootCause.SYSTEM_MEMORY,
                RootCause.CPU, RootCause.SSD, RootCause.SERVER_CHASSIS, RootCause.GPU_THERMAL_INTERFACE_SENSOR]
_NETWORK = (RootCause.NETWORK_SWITCH_CABLE, RootCause.NIC)
_TEXT = [RootCause.DEPENDENCY, RootCause.SOFTWARE_BUG]
_CRASH_SIGNALS = {"SIGSEGV", "SIGBUS", "SIGABRT", "SIGFPE", "SIGILL"}


def hardware_cause(e: Evidence) -> RootCause | None:
    """The hardware root cause a piece of device/host evidence decides on its own, or None."""
    c = candidate(e)
    return c[0] if c and c[1] == Strength.DECIDES and c[0] in _HW_PRIORITY else None


def precursor(e: Evidence) -> bool:
    """Hardware evidence that fails nothing by itself but that a lemon shows more often than a sound host: a
    correctable ECC error, a recoverable Xid, thermal throttling, a PCIe or NIC hiccup, a corrected memory error."""
    if e.severity != Severity.WARNING or not e.host:
        return False
    if e.kind in (EvidenceKind.GPU_ECC, EvidenceKind.GPU_XID, EvidenceKind.GPU_THERMAL):
        return True
    if e.kind == EvidenceKind.HOST_LOG:
        try:
            return RootCause(e.attrs.get("cause") or "").facts.host_fault
        except ValueError:
            return False
    return False


def candidate(e: Evidence) -> tuple[RootCause, Strength] | None:
    """The cause one piece of evidence points to and how strongly, or None."""
    if "strength" in e.attrs:  # raised by a rule of the shared engine
        try:
            cause, strength = RootCause(e.attrs.get("cause") or ""), Strength(e.attrs["strength"])
        except ValueError:
            return None
        return None if strength == Strength.CONTEXT else (cause, strength)
    # evidence from the agents' own probes (NVML, sysfs, drift, flight recorder)
    d = Strength.DECIDES
    if e.kind == EvidenceKind.GPU_XID and e.code is not None:
        x = xid_lookup(e.code)
        return (x.cause, d) if x and x.fatal else None
    if e.kind == EvidenceKind.GPU_LOST:
        return RootCause.FAULTY_GPU, d
    if e.kind == EvidenceKind.GPU_THERMAL:
        return RootCause.GPU_THERMAL_INTERFACE_SENSOR, d
    if e.kind == EvidenceKind.STRAGGLER and e.attrs.get("reason") == Reason.THERMAL:
        return RootCause.GPU_THERMAL_INTERFACE_SENSOR, d
    if e.kind == EvidenceKind.GPU_ECC and e.severity == Severity.CRITICAL and "memory" in e.attrs:
        c = _ECC_CAUSE.get(str(e.attrs.get("memory")))
        return (c, d) if c else None
    if e.kind == EvidenceKind.MAINTENANCE:
        return RootCause.HOST_MAINTENANCE, d
    if e.kind == EvidenceKind.SDC:
        return RootCause.SILENT_DATA_CORRUPTION, d
    if e.kind == EvidenceKind.TRAINER_HANG:
        return RootCause.NCCL_WATCHDOG_TIMEOUT, d
    if e.kind == EvidenceKind.NETWORK:
        return RootCause.NETWORK_SWITCH_CABLE, Strength.SUPPORTS
    if (e.kind == EvidenceKind.HOST_LOG and e.attrs.get("reason") in LINK_DOWN and not e.attrs.get("cleared")
            and (e.attrs.get("reason") != Reason.IB_ERRORS or e.attrs.get("counter") == IB_LINK_DOWNED)):
        return RootCause.NIC, d
    if e.severity == Severity.CRITICAL and e.attrs.get("cause") and e.kind not in _NOT_HARDWARE:
        try:
            return RootCause(e.attrs["cause"]), d
        except ValueError:
            return None
    return None


def rank_evidence(failures: Sequence[RankFailure]) -> list[Evidence]:
    """The failed ranks' own text (exception, stderr tail) as evidence, through the shared rule engine."""
    out: list[Evidence] = []
    for r in failures:
        if r.message.strip():
            out += text_evidence(r.message, r.host, r.rank if r.rank >= 0 else None, r.time)
        if r.signal_name in _CRASH_SIGNALS:  # the process crashed itself: a software fault unless more is known
            out.append(Evidence(r.host, EvidenceKind.TRAINER_EXIT, r.time, f"rank crashed with {r.signal_name}",
                                code=r.exit_code, rank=r.rank if r.rank >= 0 else None,
                                attrs={"cause": RootCause.SOFTWARE_BUG.value, "strength": Strength.SUPPORTS.value,
                                       "reason": "CrashSignal"}))
    return out


@dataclass(frozen=True)
class _Cand:
    cause: RootCause
    strength: Strength
    e: Evidence

    def line(self) -> str:
        q = self.e.attrs.get("quote")
        if q and self.e.kind == EvidenceKind.TRAINER_EXCEPTION:
            who = self.e.host + (f" rank{self.e.rank}" if self.e.rank is not None else "")
            return f"[{who}] {q}"
        return self.e.line()


def _ecc_units(evidence: list[Evidence]) -> list[Evidence]:
    """The driver logs an ECC Xid (48, 94, 95) in two lines, "Xid 94, pid=..., name=python, channel ..." and then
    "Xid 94, Contained: SM (0x1). RST: No": only the second names the memory that held the error. Both are one event
    of one GPU, so the line without a unit takes the unit its GPU's other line of the same Xid named."""
    def key(e: Evidence) -> tuple:
        return e.host, e.attrs.get("pci"), e.code

    named = {key(e): e.attrs["unit"] for e in evidence if e.kind == EvidenceKind.GPU_XID and e.attrs.get("unit")}
    if not named:
        return evidence
    return [replace(e, attrs={**e.attrs, "cause": named[key(e)]})
            if e.kind == EvidenceKind.GPU_XID and "strength" in e.attrs and not e.attrs.get("unit") and key(e) in named
            else e for e in evidence]


def diagnose(failure: Failure, evidence: Sequence[Evidence]) -> Verdict:
    job_hosts = set(failure.hosts)
    evidence = _ecc_units([e for e in evidence if e.host in job_hosts or not e.host] + rank_evidence(failure.ranks))
    cands = []
    for e in evidence:
        c = candidate(e)
        if c is not None:
            cands.append(_Cand(c[0], c[1], e))
    lagging = [c.e for c in cands if c.e.kind == EvidenceKind.TRAINER_HANG and c.e.rank is not None
               and "strength" not in c.e.attrs]  # ranks the flight recorder found missing from a collective
    stragglers = [e for e in evidence if e.kind == EvidenceKind.STRAGGLER]
    implicated = [e.host for e in lagging + stragglers] + [r.host for r in failure.ranks]
    first = failure.ranks[0] if failure.ranks else None
    # Killed from outside (SIGKILL, SIGTERM, ...) with nothing said. A crash signal (SIGSEGV, SIGBUS, SIGABRT, SIGFPE,
    # SIGILL) is the process's own fault: its text is weighed like any other.
    killed_silently = first is not None and first.signal_name not in _CRASH_SIGNALS and (
        first.signal_name is not None or not first.message.strip())

    for level in (Strength.DECIDES, Strength.SUPPORTS, Strength.PEER):
        pool = [c for c in cands if c.strength.rank >= level.rank]
        if level == Strength.PEER:  # a peer's symptom never makes a software bug
            pool = [c for c in pool if c.cause != RootCause.SOFTWARE_BUG or c.strength != Strength.PEER]
        v = _decide(level, pool, failure, implicated, lagging, stragglers)
        if v is not None:
            return _with_alternatives(v, cands)
        if killed_silently:
            break

    # A host that stopped reporting, or a rank that vanished (killed, or exited without saying why).
    silent = [e for e in evidence if e.attrs.get("reason") == Reason.AGENT_SILENT]
    if silent:
        return _with_alternatives(_blame(RootCause.UNKNOWN, 0.5, [_Cand(RootCause.UNKNOWN, Strength.SUPPORTS, e)
                                                                   for e in silent], failure,
                                         "a host of the job stopped reporting"), cands)
    lines = tuple(r.line() for r in failure.ranks[:3])
    if first is not None and killed_silently:
        v = Verdict(RootCause.UNKNOWN, 0.4, (first.host,), (first.rank,), lines, RootCause.UNKNOWN.facts.action,
                    f"rank {first.rank} ended ({first.line()}) with no evidence of why")
        return _with_alternatives(v, cands)
    return _with_alternatives(Verdict(RootCause.UNKNOWN, 0.3, (), tuple(r.rank for r in failure.ranks if r.rank >= 0),
                                      lines, RootCause.UNKNOWN.facts.action, "nothing conclusive"), cands)


_CONF = {Strength.DECIDES: 1.0, Strength.SUPPORTS: 0.65, Strength.PEER: 0.5}


def _decide(level: Strength, pool: list[_Cand], failure: Failure, implicated: list[str], lagging: list[Evidence],
            stragglers: list[Evidence]) -> Verdict | None:
    k = _CONF[level]
    by = lambda *causes: [c for c in pool if c.cause in causes]  # noqa: E731

    # 1. Planned maintenance: not a fault, the hosts are drained.
    maint = by(RootCause.HOST_MAINTENANCE)
    if maint:
        return _blame(RootCause.HOST_MAINTENANCE, 0.9 * k, maint, failure, "planned maintenance on the job's hosts")

    # 2. Hardware evidence on the job's hosts.
    hw: dict[str, list[_Cand]] = {}
    for c in by(*_HW_PRIORITY):
        hw.setdefault(c.e.host, []).append(c)
    if hw:
        on_failed = [h for h in dict.fromkeys(implicated) if h in hw]
        blamed = on_failed or sorted(hw)
        findings = [f for h in blamed for f in hw[h]]
        cause = min((f.cause for f in findings), key=_HW_PRIORITY.index)
        # thermal alone is a warning: it explains a failure only on an implicated host
        if cause != RootCause.GPU_THERMAL_INTERFACE_SENSOR or on_failed or not failure.ranks:
            blamed = [h for h in blamed if any(f.cause == cause for f in hw[h])]
            ranks = tuple(sorted({r.rank for r in failure.ranks if r.host in blamed and r.rank >= 0}
                                 | {e.rank for e in lagging + stragglers if e.host in blamed and e.rank is not None}))
            lines = [f.line() for f in findings if f.cause == cause] + [r.line() for r in failure.ranks[:1]]
            return Verdict(cause, (0.95 if on_failed else 0.75) * k, tuple(blamed), ranks,
                           tuple(dict.fromkeys(lines))[:6], cause.facts.action,
                           f"hardware evidence on {', '.join(blamed)}" + _how(level))

    # 3. Silent data corruption found by the trainer's checks.
    sdc = by(RootCause.SILENT_DATA_CORRUPTION)
    if sdc:
        return _blame(RootCause.SILENT_DATA_CORRUPTION, 0.85 * k, sdc, failure, "checksum mismatch between replicas")

    # 4. The network: a fabric fault (or the same link trouble on several hosts) is a switch or cable; one host's
    #    own NIC trouble is that NIC.
    net = by(*_NETWORK)
    if net:
        down = [c for c in net if c.e.attrs.get("reason") in LINK_DOWN]
        conf = (0.85 if any(c.strength == Strength.DECIDES for c in net) else 0.6) * k
        hosts = tuple(dict.fromkeys(c.e.host for c in (down or net)))
        fabric = [c for c in net if c.cause == RootCause.NETWORK_SWITCH_CABLE and c not in down]
        nic = [c for c in net if c.cause == RootCause.NIC]
        if len(hosts) >= 2 and (down or not fabric):
            return _blame(RootCause.NETWORK_SWITCH_CABLE, conf, down or net, failure,
                          f"network errors on {len(hosts)} hosts at once: a switch or cable, not one NIC")
        if down:  # one host's own link went down: the transport errors around it are its consequence
            return _blame(RootCause.NIC, conf, down, failure, f"a link of {hosts[0]} went down")
        if nic and (not fabric or nic[0].strength.rank > fabric[0].strength.rank):
            return _blame(RootCause.NIC, conf, nic, failure, f"network errors on {nic[0].e.host} only")
        return _blame(RootCause.NETWORK_SWITCH_CABLE, conf, fabric, failure,
                      "the fabric failed (switch, cable or the path to a peer)")

    # 5. A hang. The flight recorder's missing ranks are blamed (their hosts become suspects), not the ranks
    #    whose watchdog fired: those were waiting for them.
    hang = by(RootCause.NCCL_WATCHDOG_TIMEOUT)
    if hang:
        c = RootCause.NCCL_WATCHDOG_TIMEOUT
        if lagging:
            ranks = tuple(sorted({e.rank for e in lagging if e.rank is not None}))
            hosts = tuple(dict.fromkeys(e.host for e in lagging))
            return Verdict(c, 0.7 * k, hosts, ranks, tuple(dict.fromkeys(e.message for e in lagging))[:3], c.facts.action,
                           f"collective hang: rank(s) {list(ranks)} never joined, no hardware evidence on their hosts")
        lines = tuple(dict.fromkeys(x.line() for x in hang))[:4]
        ranks = tuple(sorted({x.e.rank for x in hang if x.e.rank is not None}))
        return Verdict(c, 0.65 * k, (), ranks, lines, c.facts.action,
                       "a collective timed out (watchdog); no evidence names the rank that stopped")

    # 6. The ranks' own text: a broken environment, then a bug.
    for cause in _TEXT:
        hits = by(cause)
        if hits:
            hosts = tuple(dict.fromkeys(x.e.host for x in hits if x.e.host))
            ranks = tuple(dict.fromkeys(x.e.rank for x in hits if x.e.rank is not None))
            conf = (0.85 if cause == RootCause.DEPENDENCY else 0.8) * k
            return Verdict(cause, conf, hosts, ranks, tuple(dict.fromkeys(x.line() for x in hits))[:3], cause.facts.action,
                           f"{len(hits)} record(s) of {cause.value} text and no hardware evidence" + _how(level))
    return None


def _how(level: Strength) -> str:
    return "" if level == Strength.DECIDES else f" (nothing decisive: {level.value}-level evidence)"


def _blame(cause: RootCause, confidence: float, found: list[_Cand], failure: Failure, reason: str) -> Verdict:
    hosts = tuple(dict.fromkeys(c.e.host for c in found if c.e.host))
    ranks = tuple(sorted({c.e.rank for c in found if c.e.rank is not None}
                         | {r.rank for r in failure.ranks if r.host in hosts and r.rank >= 0}))
    return Verdict(cause, round(confidence, 3), hosts, ranks, tuple(dict.fromkeys(c.line() for c in found))[:6],
                   cause.facts.action, reason)


def _with_alternatives(v: Verdict, cands: list[_Cand]) -> Verdict:
    """The candidates that lost, strongest first, one line per cause."""
    seen: dict[RootCause, str] = {}
    for c in sorted(cands, key=lambda c: -c.strength.rank):
        if c.cause != v.cause and c.cause not in seen:
            seen[c.cause] = f"{c.cause.value} ({c.strength.value}): {c.line()[:200]}"
    from dataclasses import replace
    return replace(v, confidence=round(v.confidence, 3), alternatives=tuple(seen.values())[:5])


def drain_verdict(evidence: Sequence[Evidence], hosts: Sequence[str], since: float) -> Verdict | None:
    """Planned maintenance or a thermally straggling GPU on a host of the job since `since`: a DRAIN verdict (the
    hosts leave after a fresh checkpoint), or None."""
    found = [e for e in evidence if e.time >= since and e.host in hosts and (
        e.kind == EvidenceKind.MAINTENANCE or (e.kind == EvidenceKind.STRAGGLER and e.attrs.get("reason") == "thermal"))]
    if not found:
        return None
    maint = [e for e in found if e.kind == EvidenceKind.MAINTENANCE]
    cause = RootCause.HOST_MAINTENANCE if maint else RootCause.GPU_THERMAL_INTERFACE_SENSOR
    chosen = maint or found
    return Verdict(cause, 1.0 if maint else 0.8, tuple(dict.fromkeys(e.host for e in chosen)),
                   tuple(e.rank for e in chosen if e.rank is not None), tuple(e.line() for e in chosen)[:4],
                   cause.facts.action, "planned maintenance" if maint else "a GPU held down by heat is slowing the job")
