"""Lines -> records. A record is what one event printed: a Python traceback, a multi-line NVRM message, an
nvidia-smi -q section, an mcelog block, the lines one kernel driver printed about one device, a JSON event, or a
single line. Rules match records, so a message split over several lines still matches, and a record is evidence
whether or not a traceback surrounds it.

Each line is first attributed to a host and rank from its prefixes (syslog and journald "Nov 23 12:00:01 node-7
kernel: ...", ISO timestamps, dmesg "[ 12.345]", torchrun "[rank3]:", pdsh "node-7: "), then grouped with the open
record of the same host and rank. The prefix patterns here are anchored and every repetition in them is bounded
(no `*` or `+`), so each match does a bounded amount of work whatever the line (Python's `re` is used for them
because it is cheaper per call than RE2's wrapper; tests run them on adversarial lines). Lines are cut at MAX_LINE
characters and records at MAX_RECORD_LINES lines / MAX_RECORD_CHARS characters, so hostile input costs time in
proportion to its size and memory bounded by those limits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

import re

MAX_LINE = 16 << 10  # characters of one line that are looked at (the rest is cut)
MAX_RECORD_LINES = 400
MAX_RECORD_CHARS = 64 << 10
MAX_OPEN = 256  # records open at once (one per host and rank)



def _re(p: str) -> re.Pattern[str]:
    return re.compile(p)


# syslog / journald / ISO-timestamped lines: "<6>Nov 23 12:00:01 node-7 kernel: ..."; "2024-05-01T10:00:00.123+00:00
# node-7 kernel: ..."; the host must look like a host name (a journald "-- Logs begin" line is not one)
_SYSLOG = _re(r"^(?:<\d{1,3}>)?(?:[A-Z][a-z]{2} {1,2}\d{1,2} \d\d:\d\d:\d\d(?:\.\d{1,9})?|\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d"
              r"(?:[.,]\d{1,9})?(?:Z|[+-]\d\d:?\d\d)?) {1,8}(?P<host>[A-Za-z0-9][\w.-]{0,62}) {1,8}"
              r"(?:kernel: {0,8}|[\w./@-]{1,64}(?:\[\d{1,10}\])?: {0,8})?")
_HOST_RANK = _re(r"^(?P<host>[A-Za-z0-9][\w.-]{0,62}): {1,8}\[(?:rank|default)(?P<rank>\d{1,7})\]: ?")
_RANK = _re(r"^\[(?:rank|default)(?P<rank>\d{1,7})\]: ?")
# pdsh/clush "node-61: text": a lower-case name with a digit, so "RuntimeError: ..." is never a host
_PDSH = _re(r"^(?P<host>[a-z][a-z0-9-]{0,62}\d(?:\.[a-z0-9-]{1,63}){0,6}): ")
# ...but a kernel device's own prefix ("nvme0: controller is down", "ata1.00: failed command", "eth0: link down")
# names the device, not a host
_KERNEL_DEVICE = _re(r"^(?:nvme\d{1,4}(?:n\d{1,4})?|ata\d{1,4}(?:\.\d{1,3})?|sd[a-z]{1,3}\d{0,3}|vd[a-z]{1,3}\d{0,3}|"
                     r"md\d{1,4}|dm-\d{1,4}|loop\d{1,4}|nbd\d{1,4}|mmcblk\d{1,3}|eth\d{1,4}|ib\d{1,4}|bond\d{1,4}|"
                     r"usb\d{1,4}|nvidia\d{1,3}|mc\d{1,3}|cpu\d{1,4}|edac-?\w{0,10}\d)$")
_DMESG_TS = _re(r"^\[ {0,12}\d{1,10}\.\d{1,9}\] ?")
# the device a kernel line is about: "pcieport 0000:00:01.0:", "EDAC sbridge MC0:", "mce:", "{1}[Hardware Error]:"
_KSOURCE = _re(r"^(?P<src>[\w-]{1,32} [0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]:|EDAC [\w ]{0,24}?MC\d{1,3}:|"
               r"mce: \[Hardware Error\]:|\{\d{1,6}\}\[Hardware Error\]:|\[Hardware Error\]:|mlx5_core [\w:.]{1,32}:)")
_EXC_LINE = _re(r"^(?:[A-Za-z_][\w.]{0,200})?(?:Error|Exception|Exit|Interrupt|Fault|Warning)\b")
_MCELOG_START = _re(r"^(?:Hardware event\. This is not a software error\.|MCE \d{1,6}$|mcelog: )")


@dataclass
class Record:
    host: str
    rank: int | None
    kind: str  # line | traceback | nvrm | mcelog | kernel | json | section
    lines: list[str] = field(default_factory=list)
    order: float = 0.0  # line number of its first line
    source: str = ""  # kernel device prefix, for grouping
    depth: int = 0  # open braces, for JSON
    chars: int = 0

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def add(self, text: str) -> bool:
        if len(self.lines) >= MAX_RECORD_LINES or self.chars + len(text) > MAX_RECORD_CHARS:
            return False
        self.lines.append(text)
        self.chars += len(text) + 1
        return True


def split_prefix(line: str, default_host: str) -> tuple[str, int | None, str]:
    """(host, rank, text) of one line."""
    host, rank = default_host, None
    c = line[:1]
    if c == "<" or c.isalnum():
        m = _SYSLOG.match(line)
        if m:
            host, line = m.group("host"), line[m.end():]
            c = line[:1]
    if c == "[":
        m = _DMESG_TS.match(line)
        if m:
            line = line[m.end():]
            c = line[:1]
        m = _RANK.match(line) if c == "[" else None
        if m:
            return host, int(m.group("rank")), _strip_ts(line[m.end():])
    if c.isalnum():
        m = _HOST_RANK.match(line)
        if m:
            return m.group("host"), int(m.group("rank")), _strip_ts(line[m.end():])
        if c.islower():
            m = _PDSH.match(line)
            if m and not _KERNEL_DEVICE.match(m.group("host")):
                host, line = m.group("host"), line[m.end():]
    return host, rank, _strip_ts(line)


def _strip_ts(line: str) -> str:
    if line[:1] == "[":
        m = _DMESG_TS.match(line)
        if m:
            return line[m.end():]
    return line


def _braces(text: str) -> int:
    return text.count("{") + text.count("[") - text.count("}") - text.count("]")


class Grouper:
    """Feeds lines, yields records as they close. Interleaved ranks keep separate open records."""

    def __init__(self, default_host: str = "unknown-host"):
        self.default_host = default_host
        self.open: dict[tuple[str, int | None], Record] = {}
        self.order = 0.0

    def feed(self, raw: str) -> Iterator[Record]:
        self.order += 1.0
        line = raw[:MAX_LINE].rstrip("\r\n")
        if "\x00" in line:
            line = line.replace("\x00", "")
        host, rank, text = split_prefix(line, self.default_host)
        key = (host, rank)
        cur = self.open.get(key)
        stripped = text.strip()
        if not stripped:  # a blank line ends blocks and single lines, not a traceback or JSON in progress
            if cur is not None and cur.kind not in ("traceback", "json"):
                yield self.open.pop(key)
            return
        if cur is not None and self._continues(cur, text, stripped):
            if cur.add(text):
                if cur.kind == "json":
                    cur.depth += _braces(text)
                    if cur.depth <= 0:
                        yield self.open.pop(key)
                elif cur.kind == "traceback" and text[:1] not in (" ", "\t") and _EXC_LINE.match(stripped):
                    yield self.open.pop(key)  # the exception line ends it
                return
        if cur is not None:
            yield self.open.pop(key)
        rec = self._start(host, rank, text, stripped)
        if len(self.open) >= MAX_OPEN:  # many interleaved hosts/ranks: flush the oldest rather than grow
            yield self.open.pop(next(iter(self.open)))  # dicts keep insertion order: the first is the oldest
        self.open[key] = rec  # even a plain line: indented lines may follow (nvidia-smi -q, ibstat, torchrun)

    def _start(self, host: str, rank: int | None, text: str, stripped: str) -> Record:
        rec = Record(host, rank, "line", order=self.order)
        rec.add(text)
        if stripped.startswith("Traceback (most recent call last)"):
            rec.kind = "traceback"
        elif stripped.startswith("NVRM:"):
            rec.kind = "line" if stripped.startswith("NVRM: Xid") else "nvrm"
        elif _MCELOG_START.match(stripped):
            rec.kind = "mcelog"
        elif stripped[:1] in "{[" and _braces(stripped) > 0 and not _RANK.match(stripped):
            rec.kind, rec.depth = "json", _braces(stripped)
        else:
            m = _KSOURCE.match(stripped)
            if m:
                rec.kind, rec.source = "kernel", m.group("src")
        return rec

    @staticmethod
    def _continues(cur: Record, text: str, stripped: str) -> bool:
        indented = text[:1] in (" ", "\t")
        k = cur.kind
        if k == "json":
            return True
        if k == "traceback":
            return indented or stripped.startswith(("Traceback (most recent call last)", "During handling of the",
                                                    "The above exception")) or _EXC_LINE.match(stripped) is not None
        if k == "nvrm":
            return stripped.startswith("NVRM:") and not stripped.startswith("NVRM: Xid")
        if k == "mcelog":  # until a blank line or the next event
            return not stripped.startswith(("Hardware event", "mcelog: "))
        if k == "kernel":
            return indented or stripped.startswith(cur.source)
        return indented  # a line, or a section: indented lines belong to it

    def in_block(self) -> bool:
        """Whether a multi-line record is being read (its next lines must not be skipped)."""
        return any(r.kind in ("traceback", "json", "mcelog", "nvrm") or len(r.lines) > 1 for r in self.open.values())

    def close(self) -> Iterator[Record]:
        recs = sorted(self.open.values(), key=lambda r: r.order)
        self.open.clear()
        yield from recs


def records(lines: Iterable[str], default_host: str = "unknown-host") -> Iterator[Record]:
    g = Grouper(default_host)
    for line in lines:
        yield from g.feed(line)
    yield from g.close()
