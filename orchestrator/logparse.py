"""Evidence from text, for `herdsman diagnose`: any mix of kernel log, PyTorch / NCCL stderr, torchrun failure
summaries, nvidia-smi output and scheduler logs.

Lines are attributed to a host and rank from their prefixes (syslog "Nov 23 12:00:01 node-7 kernel: ...",
torchrun "[rank3]:", "node-7: [rank3]: ..."), then matched against the kernel rules (agents/host_rules.toml) and
the job rules (orchestrator/job_rules.toml); Python tracebacks and torchrun's per-rank failure blocks become the
failed ranks. Nothing here decides a cause: that is diagnose()'s job.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from herdsman.config import ConfigError
from herdsman.events import Evidence, EvidenceKind, Severity
from agents.host import load_rules, match_line
from orchestrator.diagnose import RankFailure

JOB_RULES = Path(__file__).with_name("job_rules.toml")

_SYSLOG = re.compile(r"^(?:<\d+>)?(?:\w{3}\s+\d+\s+[\d:]+|\d{4}-\d\d-\d\d[T ][\d:.,]+(?:Z|[+-][\d:]+)?)\s+"
                     r"(?P<host>[A-Za-z0-9][\w.-]*)\s+(?:kernel:\s*|[\w./-]+(?:\[\d+\])?:\s*)?")
_HOST_RANK = re.compile(r"^(?P<host>[A-Za-z0-9][\w.-]*):\s+\[(?:rank|default)(?P<rank>\d+)\]:\s?")
_RANK = re.compile(r"^\[(?:rank|default)(?P<rank>\d+)\]:\s?")
# pdsh/clush style "node-61: text": a lower-case name with a digit, so "RuntimeError: ..." is never a host
_PDSH = re.compile(r"^(?P<host>[a-z][a-z0-9.-]*[0-9][a-z0-9.-]*):\s")
_DMESG_TS = re.compile(r"^\[\s*\d+\.\d+\]\s*")
_EXC_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*)(?:Error|Exception|Exit|Interrupt|Fault|Warning)\b.*|"
                       r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*Error$")
_TORCHRUN_FIELD = re.compile(r"^\s*(?P<key>host|rank|exitcode|traceback)\s*:\s*(?P<value>.*)$")


@dataclass(frozen=True)
class JobRule:
    reason: str
    pattern: re.Pattern[str]
    kind: EvidenceKind
    cause: str
    severity: Severity


def load_job_rules(path: Path = JOB_RULES) -> list[JobRule]:
    try:
        data = tomllib.loads(Path(path).read_text())
        return [JobRule(r["reason"], re.compile(r["pattern"]), EvidenceKind(r["kind"]), r.get("cause", ""),
                        Severity(r.get("severity", "warning"))) for r in data.get("job", [])]
    except (OSError, tomllib.TOMLDecodeError, KeyError, ValueError, re.error) as e:
        raise ConfigError(f"job rules {path}: {type(e).__name__}: {e}") from None


@dataclass(frozen=True)
class Parsed:
    evidence: list[Evidence]
    failures: list[RankFailure]
    hosts: list[str]


def split_prefix(line: str, default_host: str) -> tuple[str, int | None, str]:
    """(host, rank, text) of one line."""
    host, rank = default_host, None
    m = _SYSLOG.match(line)
    if m:
        host, line = m.group("host"), line[m.end():]
    m = _HOST_RANK.match(line)
    if m:
        host, rank, line = m.group("host"), int(m.group("rank")), line[m.end():]
    else:
        m = _RANK.match(line) or _PDSH.match(line)
        if m and "rank" in m.groupdict():
            rank, line = int(m.group("rank")), line[m.end():]
        elif m:
            host, line = m.group("host"), line[m.end():]
    return host, rank, _DMESG_TS.sub("", line)


def parse(lines: Iterable[str], default_host: str = "unknown-host") -> Parsed:
    kernel, job = load_rules(), load_job_rules()
    evidence: list[Evidence] = []
    failures: list[RankFailure] = []
    hosts: dict[str, None] = {}
    tracebacks: dict[tuple[str, int | None], list[str]] = {}
    block: dict[str, str] = {}  # a torchrun failure summary being read
    order = 0.0

    def close_block() -> None:
        if "rank" in block and "exitcode" in block:
            try:
                rank = int(block["rank"].split()[0])
                code = int(block["exitcode"].split()[0])
            except ValueError:
                block.clear()
                return
            msg = block.get("traceback", "")
            failures.append(RankFailure(rank, block.get("host", default_host), order, code,
                                        "" if msg.startswith(("Signal", "<N/A>")) else msg))
        block.clear()

    for raw in lines:
        order += 1.0
        line = raw.rstrip("\n")
        if not line.strip():
            continue
        host, rank, text = split_prefix(line, default_host)
        hosts[host] = None
        f = _TORCHRUN_FIELD.match(text)
        if f:
            if f.group("key") == "host" and block.get("host"):
                close_block()
            block[f.group("key")] = f.group("value").strip()
            if f.group("key") == "host":
                hosts[block["host"]] = None
            continue
        if block and text.strip().startswith(("time", "error_file", "[", "-", "=")):
            if text.strip().startswith("["):
                close_block()
            continue
        key = (host, rank)
        if text.startswith("Traceback (most recent call last)"):
            tracebacks[key] = [text]
            continue
        if key in tracebacks:
            tracebacks[key].append(text)
            if _EXC_LINE.match(text.strip()):
                failures.append(RankFailure(rank if rank is not None else -1, host, order, 1,
                                            "\n".join(tracebacks.pop(key))))
            continue
        ev = match_line(kernel, host, text, order)
        if ev is None:
            for r in job:
                m = r.pattern.search(text)
                if m:
                    ev = Evidence(m.groupdict().get("node") or host, r.kind, order, f"{r.reason}: {text.strip()[:400]}", r.severity, rank=rank,
                                  attrs={"reason": r.reason, "cause": r.cause, "source": "job"})
                    break
        if ev is not None:
            evidence.append(ev)
            hosts[ev.host] = None
        elif _EXC_LINE.match(text.strip()) and ":" in text:  # an exception printed without its traceback
            failures.append(RankFailure(rank if rank is not None else -1, host, order, 1, text.strip()))
    close_block()
    for key, tb in tracebacks.items():  # a traceback cut short still tells something
        failures.append(RankFailure(key[1] if key[1] is not None else -1, key[0], order, 1, "\n".join(tb)))
    failures.sort(key=lambda r: r.time)
    return Parsed(evidence, failures, [h for h in hosts if h])
