"""The rule set: loading, checking and compiling `rules.toml` (or an operator's own file of the same shape).

A rule is data: an id, one or more patterns (RE2 syntax: no backreferences or look-arounds, so matching is linear
in the input), the cause it points to, the evidence kind it raises, how decisive it is and the public page that
documents the message. All patterns go into one RE2 set, so a record is matched against every rule in one pass;
only the rules that hit are run again for their named groups.
"""

from __future__ import annotations

import enum
import itertools
import tomllib
from dataclasses import dataclass
from pathlib import Path

import re2

from herdsman.config import ConfigError
from herdsman.events import EvidenceKind, Severity
from herdsman.taxonomy import RootCause

DEFAULT_RULES = Path(__file__).with_name("rules.toml")
DECODERS = ("xid", "mce")  # causes decoded from a code in the text, through a catalogue


class Strength(str, enum.Enum):
    """How much one piece of evidence says about the cause."""

    DECIDES = "decides"  # names the cause on its own
    SUPPORTS = "supports"  # points at the cause when nothing decides
    PEER = "peer"  # a symptom of another rank's or host's failure: last resort, and it mutes generic text
    CONTEXT = "context"  # worth showing, says nothing about the cause

    @property
    def rank(self) -> int:
        return {"decides": 3, "supports": 2, "peer": 1, "context": 0}[self.value]


@dataclass(frozen=True)
class Rule:
    id: str
    patterns: tuple[str, ...]
    cause: str  # a RootCause value, a decoder ("xid", "mce") or "" (context only)
    kind: EvidenceKind
    strength: Strength
    severity: Severity
    doc: str = ""
    group: str = ""  # within one record only the first rule of a group fires (e.g. a specific form before a generic one)
    compiled: tuple = ()

    def search(self, text: str):
        for p in self.compiled:
            m = p.search(text)
            if m:
                return m
        return None

    def matches(self, text: str, limit: int = 64) -> list:
        """Up to `limit` matches of every pattern, in text order (a record may name several Xids)."""
        out = []
        for p in self.compiled:
            out += itertools.islice(p.finditer(text), limit)
        return sorted(out, key=lambda m: m.start())[:limit]


_OPTS = re2.Options()
_OPTS.max_mem = 256 << 20
_OPTS.log_errors = False  # a bad pattern is reported as a ConfigError, not on stderr


class RuleSet:
    def __init__(self, rules: list[Rule], path: Path):
        self.rules, self.path = rules, path
        self.by_id = {r.id: r for r in rules}
        self._set = re2.Set.SearchSet(_OPTS)
        self._owner: list[int] = []
        for i, r in enumerate(rules):
            for p in r.patterns:
                self._set.Add(p)
                self._owner.append(i)
        if not self._owner:
            raise ConfigError(f"rules {path}: no rules")
        self._set.Compile()

    def hits(self, text: str) -> list[Rule]:
        """The rules whose patterns occur in `text`, in file order, one per group."""
        idx = self._set.Match(text)
        if not idx:
            return []
        seen: set[str] = set()
        out = []
        for i in sorted({self._owner[j] for j in idx}):
            r = self.rules[i]
            g = r.group or r.id
            if g not in seen:
                seen.add(g)
                out.append(r)
        return out

    def any(self, text: str) -> bool:
        return bool(self._set.Match(text))


def load(path: Path | str | None = None) -> RuleSet:
    path = Path(path) if path else DEFAULT_RULES
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"rules {path}: {type(e).__name__}: {e}") from None
    rules, ids = [], set()
    causes = {c.value for c in RootCause}
    for n, r in enumerate(data.get("rule", [])):
        where = f"rules {path}: rule {r.get('id', n)}"
        try:
            pats = r["patterns"] if "patterns" in r else [r["pattern"]]
            rule = Rule(id=str(r["id"]), patterns=tuple(str(p) for p in pats), cause=str(r.get("cause", "")),
                        kind=EvidenceKind(r.get("kind", "host_log")), strength=Strength(r.get("strength", "supports")),
                        severity=Severity(r.get("severity", "warning")), doc=str(r.get("doc", "")),
                        group=str(r.get("group", "")))
        except KeyError as e:
            raise ConfigError(f"{where}: missing {e}") from None
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        if rule.id in ids:
            raise ConfigError(f"{where}: duplicate id")
        if rule.cause not in causes and rule.cause not in DECODERS and rule.cause != "":
            raise ConfigError(f"{where}: unknown cause {rule.cause!r}")
        if not rule.patterns:
            raise ConfigError(f"{where}: no patterns")
        try:
            compiled = tuple(re2.compile(p, options=_OPTS) for p in rule.patterns)
        except re2.error as e:
            raise ConfigError(f"{where}: pattern is not RE2 (linear-time) syntax: {e}") from None
        ids.add(rule.id)
        rules.append(Rule(**{**rule.__dict__, "compiled": compiled}))
    return RuleSet(rules, path)


_DEFAULT: RuleSet | None = None


def default() -> RuleSet:
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = load()
    return _DEFAULT
