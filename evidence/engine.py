"""Records -> Evidence, and the failed ranks a log shows. The one path from text to evidence: the agent's kernel
log, the controller's rank stderr and `herdsman diagnose` all call `scan` / `evidence_of`.

Each piece of evidence carries, in `attrs`: `reason` (the rule id), `cause` (a RootCause value or ""), `strength`
(decides / supports / peer / context), `source` and `doc`. Numbers read from text (Xid codes, ranks, MCA status
words) are bounded before they are converted, so a 5,000-digit "Xid" is just text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

import re

import re2

from evidence import mce
from evidence.records import MAX_LINE, Grouper, Record, records
from evidence.rules import RuleSet, Strength, default
from herdsman.events import Evidence, RankFailure, Severity
from herdsman.taxonomy import RootCause
from herdsman.xid import XID_DOC, lookup_or_default, unit_cause

MAX_EVIDENCE_PER_RULE_HOST = 20  # a log that repeats one message a million times is one finding, counted
MAX_FAILURES = 1000  # failed ranks kept from one log (the earliest: diagnosis starts from the first)
MAX_XIDS_PER_RECORD = 8  # distinct Xids read from one record (a prose summary may name a cascade)
_TORCHRUN_FIELD = re2.compile(r"(?m)^\s*(host|rank|exitcode|traceback|error_file)\s*:\s*(.*)$")
_ELASTIC_FAILED = re.compile(r"failed \(exitcode: (-?\d{1,5})\) local_rank: (\d{1,7})")
_EXC_ONLY = re.compile(r"^(?:[A-Za-z_][\w.]{0,200}\.)?[A-Z]\w{0,100}(?:Error|Exception)(?:\[\w+\])?: \S")


def _int(text: str | None, digits: int = 9) -> int | None:
    if text is None:
        return None
    t = text.strip()
    if not t or len(t) > digits or not t.lstrip("-").isdigit():
        return None
    return int(t)


def _quote(text: str, start: int, m) -> str:
    """The line of the record that shows the match (or the rule's `quote` group)."""
    q = m.groupdict().get("quote") if m is not None else None
    if q:
        return q.strip()[:400]
    a = text.rfind("\n", 0, start) + 1
    b = text.find("\n", start)
    return text[a:b if b >= 0 else len(text)].strip()[:400]


def _matches(hits: list, text: str) -> Iterator[tuple]:
    """(rule, match) for each rule that matched: its first match; for an Xid rule, the first match of each distinct
    Xid the record names ("Xid 137 ... followed by Xid 94"), up to MAX_XIDS_PER_RECORD. The set and a single pattern
    disagree only on pathological inputs: such a rule is skipped, never failed on."""
    for r in hits:
        if r.cause != "xid":
            m = r.search(text)
            if m is not None:
                yield r, m
            continue
        seen: set[str] = set()
        for m in r.matches(text):
            code = m.groupdict().get("code")
            if code not in seen and len(seen) < MAX_XIDS_PER_RECORD:
                seen.add(code)
                yield r, m


def evidence_of(rec: Record, rules: RuleSet | None = None, when: float | None = None,
                source: str = "log") -> list[Evidence]:
    """Every rule that matches the record raises one piece of evidence (the first of each group; an Xid rule one per
    distinct Xid)."""
    rules = rules or default()
    text = rec.text
    hits = rules.hits(text)
    if not hits:
        return []
    t = rec.order if when is None else when
    peer_symptom = any(r.strength == Strength.PEER for r in hits)
    out = []
    for r, m in _matches(hits, text):
        groups = {k: v for k, v in m.groupdict().items() if v is not None and k != "quote"}
        host = groups.get("node") or rec.host
        line = _quote(text, m.start(), m)
        attrs = {"reason": r.id, "source": source, "doc": r.doc, "quote": line}
        attrs.update({k: v[:64] for k, v in groups.items() if k in ("pci", "iface", "device", "port", "status")})
        cause, strength, severity, code = r.cause, r.strength, r.severity, None
        message = f"{r.id}: {line}"
        if r.cause == "xid":
            code = _int(groups.get("code"), 4)
            if code is None:
                continue
            x = lookup_or_default(code)
            # the unit an ECC Xid names may be on a later line of the same code ("Xid 94, pid=..." first)
            unit = unit_cause(code, line) or unit_cause(code, text)
            cause = (unit or (RootCause.SOFTWARE_BUG if x.application else x.cause)).value
            if unit is not None:
                attrs["unit"] = unit.value  # diagnosis lends it to the same GPU's other lines of this Xid
            strength = Strength.DECIDES if x.fatal else Strength.SUPPORTS
            severity = Severity.CRITICAL if x.fatal else Severity.WARNING
            attrs["doc"] = r.doc or XID_DOC
            message = f"Xid {code}: {x.meaning} ({line})"
        elif r.cause == "mce":
            status = mce.parse_hex(groups.get("status", ""))
            decoded = mce.decode_status(status) if status is not None else None
            if decoded is None:
                cause, strength = RootCause.CPU.value, Strength.SUPPORTS
            else:
                c, uncorrected, what = decoded
                cause = c.value
                strength = Strength.DECIDES if uncorrected else Strength.SUPPORTS
                severity = Severity.CRITICAL if uncorrected else Severity.WARNING
                message = f"{r.id}: {what}, {'uncorrected' if uncorrected else 'corrected'} ({line})"
        if peer_symptom and cause == RootCause.SOFTWARE_BUG.value and strength != Strength.PEER:
            strength = Strength.PEER  # the exception a rank raised because a peer went away
        attrs["cause"], attrs["strength"] = cause, strength.value
        rank = rec.rank if rec.rank is None or rec.rank >= 0 else None
        out.append(Evidence(host, r.kind, t, message, severity, code=code, rank=rank, attrs=attrs))
    return out


@dataclass
class Scan:
    """What a log shows: evidence from every record, and the ranks that failed (tracebacks, exception lines,
    torchrun summaries). A rank failure's own text is not scanned into `evidence`; diagnosis does that, the same
    way for a log as for a live rank's stderr."""

    evidence: list[Evidence] = field(default_factory=list)
    failures: list[RankFailure] = field(default_factory=list)
    hosts: dict[str, None] = field(default_factory=dict)
    counts: dict[tuple[str, str], int] = field(default_factory=dict)  # (rule, host) -> matches
    records: int = 0


def _torchrun_failure(rec: Record, default_host: str) -> RankFailure | None:
    fields = {k: v.strip() for k, v in _TORCHRUN_FIELD.findall(rec.text)}
    if "rank" not in fields or "exitcode" not in fields:
        return None
    rank = _int(fields["rank"].split(" ")[0], 7)
    code = _int(fields["exitcode"].split(" ")[0], 5)
    if rank is None or code is None:
        return None
    tb = fields.get("traceback", "")
    msg = "" if tb.startswith(("Signal", "<N/A>", "To enable traceback")) else tb
    return RankFailure(rank, fields.get("host") or default_host, rec.order, code, msg)


def failure_of(rec: Record, default_host: str) -> RankFailure | None:
    """The rank failure a record shows, if it is one."""
    if rec.kind == "traceback":
        return RankFailure(rec.rank if rec.rank is not None else -1, rec.host, rec.order, 1, rec.text)
    first = rec.lines[0].strip()
    m = _ELASTIC_FAILED.search(first) if "exitcode" in first else None
    if m:  # torch elastic's one-line report of a worker that died: "failed (exitcode: -9) local_rank: 0 (pid: ..)"
        return RankFailure(int(m.group(2)), rec.host, rec.order, int(m.group(1)), "")
    if _EXC_ONLY.match(first):  # an exception printed without its traceback
        return RankFailure(rec.rank if rec.rank is not None else -1, rec.host, rec.order, 1, rec.text)
    if len(rec.lines) > 2 and "exitcode" in rec.text:
        return _torchrun_failure(rec, default_host)
    return None


BLOCK, SUB_BLOCK = 64, 8  # lines looked at together by the pre-filter


def scan(lines: Iterable[str], default_host: str = "unknown-host", rules: RuleSet | None = None,
         source: str = "log", prefilter: bool = True) -> Scan:
    """Records -> evidence and failed ranks. Blocks of lines in which no rule matches anywhere (one RE2 pass over
    the block, then over smaller blocks of a block that matched) are not grouped line by line: most of a large log
    is such noise. A block is skipped only while no multi-line record (traceback, section, JSON, mcelog block) is
    open, and single-line records still open are closed first, so no record spans a skipped block; the last lines
    of a skipped block are fed after all when the lines after them match, so a record's first lines are not lost."""
    rules = rules or default()
    out = Scan()
    g = Grouper(default_host)

    def take(rec: Record) -> None:
        out.records += 1
        f = failure_of(rec, default_host)
        if f is not None:
            if len(out.failures) < MAX_FAILURES:
                out.failures.append(f)
                out.hosts[f.host] = None
            return
        for ev in evidence_of(rec, rules, source=source):
            key = (ev.attrs["reason"], ev.host)
            n = out.counts.get(key, 0) + 1
            out.counts[key] = n
            if n <= MAX_EVIDENCE_PER_RULE_HOST:
                out.evidence.append(ev)
                out.hosts[ev.host] = None

    block: list[str] = []
    skipped: list[str] = []  # the last lines skipped, fed after all if the lines after them match (context)
    skipped_at = 0.0

    def run(lines_: list[str]) -> None:
        nonlocal skipped_at
        if skipped:
            g.order = skipped_at
            for line in skipped:
                for rec in g.feed(line):
                    take(rec)
            skipped.clear()
        for line in lines_:
            for rec in g.feed(line):
                take(rec)

    def skip(lines_: list[str]) -> None:
        nonlocal skipped_at
        for rec in g.close():
            take(rec)
        skipped[:] = lines_[-SUB_BLOCK:]
        skipped_at = g.order + len(lines_) - len(skipped)
        g.order += len(lines_)

    def feed(lines_: list[str], sub: int) -> None:
        if not prefilter:
            run(lines_)
        elif lines_ and not g.in_block() and not rules.any("\n".join(skipped + lines_)):  # nothing for any rule
            skip(lines_)
        elif sub and len(lines_) > sub:  # something matched: look closer, a few lines at a time
            for i in range(0, len(lines_), sub):
                feed(lines_[i:i + sub], 0)
        else:
            run(lines_)

    for line in lines:
        block.append(line[:MAX_LINE])
        if len(block) >= BLOCK:
            feed(block, SUB_BLOCK)
            block.clear()
    feed(block, SUB_BLOCK)
    for rec in g.close():
        take(rec)
    out.failures.sort(key=lambda r: r.time)
    return out


def text_evidence(text: str, host: str, rank: int | None, when: float, rules: RuleSet | None = None,
                  source: str = "rank") -> list[Evidence]:
    """Evidence from one rank's own output (its exception or stderr tail), attributed to that rank."""
    out = []
    for rec in records(text.splitlines(), host):
        if rank is not None and rec.rank is None:
            rec.rank = rank
        out += evidence_of(rec, rules, when, source)
    return out


def iter_lines(stream, chunk: int = 1 << 20) -> Iterator[str]:
    """Lines of a binary stream, decoded leniently, read in bounded chunks (a 50 MB line costs 50 MB of reading,
    not 50 MB of memory per copy)."""
    rest = b""
    while True:
        data = stream.read(chunk)
        if not data:
            break
        data = rest + data
        parts = data.split(b"\n")
        rest = parts.pop()
        if len(rest) > chunk:  # a line longer than a chunk: keep its head, which is all that is looked at
            rest = rest[:chunk]
        for p in parts:
            yield p.decode("utf-8", errors="replace")
    if rest:
        yield rest.decode("utf-8", errors="replace")
