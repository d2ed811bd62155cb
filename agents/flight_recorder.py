"""PyTorch flight-recorder dumps: find them, load them without executing code, and analyse them across ranks.

Dumps are JSON (what Herdsman's trainer writes) or pickles (torch's default, NCCL's `_dump_nccl_trace`). A pickle
is read by an unpickler that refuses every global, so a hostile file can build nothing but plain data; it is
refused and reported, never run. The analysis handles gloo and NCCL dumps alike: per process group it finds the
collective the group is stuck on (the highest sequence number any rank entered), the ranks that never joined it,
and collectives whose op or sizes differ between ranks at the same sequence number.
"""

from __future__ import annotations

import io
import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from herdsman import HerdsmanError

MAX_DUMP_BYTES = 256 << 20
KEEP_PER_PG = 64  # entries per process group kept in a summary (enough to find a desync near the end)
_RANK_FILE = re.compile(r"rank_?(\d+)(?:-attempt(\d+))?(?:\.json|\.pkl|\.pickle)?$|(\d+)$")


class DumpRefused(HerdsmanError):
    pass


class _DataOnlyUnpickler(pickle.Unpickler):
    """Plain data only: dicts, lists, tuples, strings, numbers. Any class or function reference is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise DumpRefused(f"it references {module}.{name} (a flight-recorder dump holds plain data only)")

    def persistent_load(self, pid: Any) -> Any:
        raise DumpRefused("it uses persistent ids (a flight-recorder dump holds plain data only)")


def load_dump(path: Path) -> dict[str, Any]:
    """Load one dump; raise DumpRefused (naming the file and the reason) for anything that is not plain data."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_DUMP_BYTES:
            raise DumpRefused(f"{path}: {size} bytes is more than a flight-recorder dump can be")
        data = path.read_bytes()
    except OSError as e:
        raise DumpRefused(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        if data[:1] in (b"{", b"["):
            dump = json.loads(data)
        else:
            dump = _DataOnlyUnpickler(io.BytesIO(data)).load()
    except DumpRefused as e:
        raise DumpRefused(f"{path}: refused: {e}") from None
    except Exception as e:  # truncated, corrupt, not a pickle at all
        raise DumpRefused(f"{path}: not a readable dump: {type(e).__name__}: {e}") from None
    if isinstance(dump, dict) and "entries" not in dump and "version" in dump:
        dump["entries"] = []  # a recorder that has seen no collective yet writes no entries
    if not isinstance(dump, dict) or not isinstance(dump.get("entries"), list):
        raise DumpRefused(f"{path}: not a flight-recorder dump (no 'entries' list)")
    return dump


def rank_of(path: Path) -> tuple[int, int] | None:
    """(rank, attempt) from a file name: Herdsman's rank00003-attempt0001.json or torch's nccl_trace_rank_3."""
    m = _RANK_FILE.search(path.name)
    if not m:
        return None
    if m.group(1) is not None:
        return int(m.group(1)), int(m.group(2) or 0)
    return int(m.group(3)), 0


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


def _sizes(v: Any) -> tuple:
    return tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else ()


def summarize(rank: int, dump: dict[str, Any], keep: int = KEEP_PER_PG) -> RankSummary:
    per_pg: dict[str, dict[int, Collective]] = {}
    desc: dict[str, str] = {}
    for e in dump.get("entries", []):
        if not isinstance(e, dict) or e.get("is_p2p"):
            continue
        try:
            pg_field = e.get("process_group") or (e.get("pg_id", ""), "")
            pg, d = str(pg_field[0]), str(pg_field[1]) if len(pg_field) > 1 else ""
            seq = int(e["collective_seq_id"])
        except (KeyError, TypeError, ValueError, IndexError):
            continue  # a malformed entry is skipped, the rest still count
        desc[pg] = d
        per_pg.setdefault(pg, {})[seq] = Collective(seq, str(e.get("profiling_name", "")),
                                                    _sizes(e.get("input_sizes")), str(e.get("state", "")))
    pgs = {pg: tuple(c for _, c in sorted(cs.items())[-keep:]) for pg, cs in per_pg.items()}
    return RankSummary(rank, pgs, desc)


# Rooted or irregular collectives whose sizes legitimately differ between ranks.
_RANK_DEPENDENT = re.compile(r":(?:gather|scatter|all_to_all|alltoall\w*|send|recv|_allgather_base_coalesced)$|"
                             r"all_to_all|alltoall")


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
        return (f"process group {name}: stuck at collective #{self.seq} {self.op} {list(self.input_sizes)}; "
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

    @property
    def lagging(self) -> tuple[int, ...]:
        return tuple(sorted({r for s in self.stuck for r in s.missing}))

    def lines(self) -> list[str]:
        out = [s.line() for s in self.stuck] + [m.line() for m in self.mismatches[:10]]
        if self.missing_dumps:
            out.append(f"no dump from ranks {_ranks(list(self.missing_dumps))}")
        out += [f"refused dump: {r}" for r in self.refused]
        return out or [f"flight recorder: {len(self.ranks)} rank(s), no stuck collective or mismatch found"]


def analyse(summaries: Iterable[RankSummary], world_size: int | None = None,
            refused: Iterable[str] = ()) -> Analysis:
    by_rank = {s.rank: s for s in summaries}
    pgs = sorted({pg for s in by_rank.values() for pg in s.pgs})
    stuck, mismatches = [], []
    for pg in pgs:
        members = [s for s in by_rank.values() if pg in s.pgs and s.pgs[pg]]
        last = {s.rank: s.pgs[pg][-1].seq for s in members}
        frontier = max(last.values())
        joined = tuple(sorted(r for r, q in last.items() if q == frontier))
        behind = {r: q for r, q in last.items() if q < frontier}
        head = by_rank[joined[0]].pgs[pg][-1]
        desc = next((s.pg_desc.get(pg, "") for s in members if s.pg_desc.get(pg)), "")
        # NCCL marks a collective "started" while it runs; gloo leaves everything "scheduled"
        running = any(s.pgs[pg][-1].state == "started" for s in members)
        if behind or running:
            stuck.append(Stuck(pg, desc, frontier, head.op, head.input_sizes, joined, tuple(sorted(behind)), behind))
        # a desync: the same sequence number is a different collective on different ranks
        sig: dict[int, dict[int, tuple[str, tuple]]] = {}
        for s in members:
            for c in s.pgs[pg]:
                sig.setdefault(c.seq, {})[s.rank] = (c.op, c.input_sizes)
        for seq in sorted(sig):
            per = sig[seq]
            if len({v[0] for v in per.values()}) > 1:
                mismatches.append(Mismatch(pg, seq, "op", {r: v[0] for r, v in per.items()}))
            elif (not _RANK_DEPENDENT.search(next(iter(per.values()))[0]) and all(v[1] for v in per.values())
                  and len({v[1] for v in per.values()}) > 1):
                mismatches.append(Mismatch(pg, seq, "sizes", {r: str(list(v[1])) for r, v in per.items()}))
    missing = tuple(r for r in range(world_size) if r not in by_rank) if world_size else ()
    return Analysis(tuple(sorted(by_rank)), tuple(stuck), tuple(mismatches), tuple(refused), missing)


def collect(dirs: Iterable[Path], attempt: int | None = None) -> tuple[list[RankSummary], list[str]]:
    """Safely load every dump under `dirs` (the latest attempt per rank, or the given one) into summaries."""
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
    return out, refused
