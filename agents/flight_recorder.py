"""PyTorch flight-recorder dumps across ranks: find them, load them safely (agents/dump_loader.py), analyse them.

Per process group the analysis finds the collective the group is stuck on (the highest sequence number any rank
entered), the ranks that never joined it, and collectives whose op or sizes differ between ranks at the same
sequence number. Nothing in it raises on what a loader returns: a bad dump is a refusal, never an exception."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agents.dump_loader import (  # noqa: F401  (DumpRefused, load_dump, rank_of are used from here)
    KEEP_PER_PG,
    MAX_PGS,
    DumpRefused,
    _clean_entry,
    _clip,
    _text,
    _why,
    load_dump,
    rank_of,
)


@dataclass(frozen=True)
class Collective:
    seq: int
    op: str
    input_sizes: tuple
    state: str


@dataclass(frozen=True)
class RankSummary:
    """What the analysis needs of one rank's dump (small enough to send from an agent to the controller)."""

    rank: int
    pgs: dict[str, tuple[Collective, ...]]  # pg -> its last collectives, by sequence number
    pg_desc: dict[str, str] = field(default_factory=dict)


def summarize(rank: int, dump: dict[str, Any], keep: int = KEEP_PER_PG) -> RankSummary:
    """Never raises on plain data: entries that fail validation are skipped, the rest still count."""
    per_pg: dict[str, dict[int, Collective]] = {}
    desc: dict[str, str] = {}
    entries = dump.get("entries") if isinstance(dump, dict) else None
    for e in map(_clean_entry, entries if isinstance(entries, list) else ()):
        if e is None or e["is_p2p"]:
            continue
        pg, d = e["process_group"]
        if pg not in per_pg and len(per_pg) >= MAX_PGS:
            continue
        desc[pg] = d
        seq = e["collective_seq_id"]
        per_pg.setdefault(pg, {})[seq] = Collective(seq, e["profiling_name"], e["input_sizes"], e["state"])
    pgs = {pg: tuple(c for _, c in sorted(cs.items())[-keep:]) for pg, cs in per_pg.items()}
    return RankSummary(rank, pgs, desc)


# Rooted or irregular collectives whose sizes legitimately differ between ranks.
_RANK_DEPENDENT = re.compile(r":(?:gather|scatter|all_to_all|alltoall\w*|send|recv|_allgather_base_coalesced)$|"
                             r"all_to_all|alltoall")


def _sizes_text(sizes: tuple) -> str:
    return _clip(str(list(sizes)))


@dataclass(frozen=True)
class Stuck:
    pg: str
    desc: str
    seq: int
    op: str
    input_sizes: tuple
    joined: tuple[int, ...]
    missing: tuple[int, ...]  # ranks whose last collective in this group is older: they never joined
    behind: dict[int, int]  # missing rank -> the last sequence number it entered

    def line(self) -> str:
        name = self.desc or self.pg
        who = ", ".join(f"rank {r} (at #{self.behind[r]})" for r in self.missing[:8])
        more = f" and {len(self.missing) - 8} more" if len(self.missing) > 8 else ""
        return (f"process group {name}: stuck at collective #{self.seq} {self.op} {_sizes_text(self.input_sizes)}; "
                f"never joined: {who}{more}")


@dataclass(frozen=True)
class Mismatch:
    pg: str
    seq: int
    what: str  # op | sizes
    by_rank: dict[int, str]

    def line(self) -> str:
        groups: dict[str, list[int]] = {}
        for r, v in self.by_rank.items():
            groups.setdefault(v, []).append(r)
        parts = "; ".join(f"{v} on ranks {_ranks(rs)}" for v, rs in groups.items())
        return f"process group {self.pg}: collective #{self.seq} {self.what} differ: {parts}"


def _ranks(rs: list[int]) -> str:
    rs = sorted(rs)
    return ", ".join(map(str, rs[:6])) + (f" (+{len(rs) - 6})" if len(rs) > 6 else "")


@dataclass(frozen=True)
class Analysis:
    ranks: tuple[int, ...]
    stuck: tuple[Stuck, ...]
    mismatches: tuple[Mismatch, ...]
    refused: tuple[str, ...] = ()
    missing_dumps: tuple[int, ...] = ()
    errors: tuple[str, ...] = ()  # process groups that could not be analysed (summaries not made by summarize)

    @property
    def lagging(self) -> tuple[int, ...]:
        return tuple(sorted({r for s in self.stuck for r in s.missing}))

    def lines(self) -> list[str]:
        out = [s.line() for s in self.stuck] + [m.line() for m in self.mismatches[:10]]
        if self.missing_dumps:
            out.append(f"no dump from ranks {_ranks(list(self.missing_dumps))}")
        out += [f"refused dump: {r}" for r in self.refused] + list(self.errors)
        return out or [f"flight recorder: {len(self.ranks)} rank(s), no stuck collective or mismatch found"]


def _analyse_group(pg: str, by_rank: dict[int, RankSummary]) -> tuple[list[Stuck], list[Mismatch]]:
    members = [s for s in by_rank.values() if s.pgs.get(pg)]
    if not members:
        return [], []
    last = {s.rank: s.pgs[pg][-1].seq for s in members}
    frontier = max(last.values())
    joined = tuple(sorted(r for r, q in last.items() if q == frontier))
    behind = {r: q for r, q in last.items() if q < frontier}
    head = by_rank[joined[0]].pgs[pg][-1]
    desc = next((s.pg_desc.get(pg, "") for s in members if s.pg_desc.get(pg)), "")
    # NCCL marks a collective "started" while it runs; gloo leaves everything "scheduled"
    running = any(s.pgs[pg][-1].state == "started" for s in members)
    stuck = [Stuck(pg, desc, frontier, head.op, head.input_sizes, joined, tuple(sorted(behind)), behind)
             ] if behind or running else []
    # a desync: the same sequence number is a different collective on different ranks
    sig: dict[int, dict[int, tuple[str, tuple]]] = {}
    for s in members:
        for c in s.pgs[pg]:
            sig.setdefault(c.seq, {})[s.rank] = (c.op, c.input_sizes)
    mismatches = []
    for seq in sorted(sig):
        per = sig[seq]
        if len({v[0] for v in per.values()}) > 1:
            mismatches.append(Mismatch(pg, seq, "op", {r: v[0] for r, v in per.items()}))
        elif (not _RANK_DEPENDENT.search(next(iter(per.values()))[0]) and all(v[1] for v in per.values())
              and len({v[1] for v in per.values()}) > 1):
            mismatches.append(Mismatch(pg, seq, "sizes", {r: _sizes_text(v[1]) for r, v in per.items()}))
    return stuck, mismatches


def analyse(summaries: Iterable[RankSummary], world_size: int | None = None,
            refused: Iterable[str] = ()) -> Analysis:
    """Never raises: summarize validates what it keeps, and a process group that still cannot be analysed (a summary
    made some other way) becomes a line in `errors`."""
    refused = tuple(refused)
    by_rank = {s.rank: s for s in summaries if isinstance(s, RankSummary) and type(s.rank) is int}
    stuck: list[Stuck] = []
    mismatches: list[Mismatch] = []
    errors: list[str] = []
    try:
        pgs = sorted({pg for s in by_rank.values() for pg in s.pgs})
    except Exception as e:  # noqa: BLE001 -- see the docstring
        pgs, errors = [], [f"flight-recorder summaries not analysed ({type(e).__name__})"]
    for pg in pgs:
        try:
            s, m = _analyse_group(pg, by_rank)
        except Exception as e:  # noqa: BLE001 -- see the docstring
            errors.append(f"process group {_text(pg) or '?'}: not analysed ({type(e).__name__})")
            continue
        stuck += s
        mismatches += m
    missing = tuple(r for r in range(world_size) if r not in by_rank) if world_size else ()
    return Analysis(tuple(sorted(by_rank)), tuple(stuck), tuple(mismatches), refused, missing, tuple(errors))


def collect(dirs: Iterable[Path], attempt: int | None = None) -> tuple[list[RankSummary], list[str]]:
    """Safely load every dump under `dirs` (the latest attempt per rank, or the given one) into summaries; a dump
    that cannot be is a refusal (text naming rank, file and reason), never an exception."""
    chosen: dict[int, tuple[int, Path]] = {}
    refused: list[str] = []
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            ra = rank_of(p) if p.is_file() else None
            if ra is None:
                continue
            rank, att = ra
            if attempt is not None and att != attempt:
                continue
            if rank not in chosen or att > chosen[rank][0]:
                chosen[rank] = (att, p)
    out = []
    for rank, (_, p) in sorted(chosen.items()):
        try:
            out.append(summarize(rank, load_dump(p)))
        except DumpRefused as e:
            refused.append(str(e))
        except Exception as e:  # noqa: BLE001 -- belt and braces: one bad file never hides the others
            refused.append(f"dump from rank {rank} refused: {p}: {_why(e)}")
    return out, refused
