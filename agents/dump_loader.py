"""Reading a flight-recorder dump that may be hostile or damaged, without executing anything in it.

JSON (what Herdsman's trainer writes) or pickle (torch's default, NCCL's `_dump_nccl_trace`), the latter through
an unpickler that builds plain data only. Size, nesting depth, expanded element count (a shared reference counts
each time it is reached), pickle operations and reading time are bounded; only the validated fields the analysis
reads are kept; anything else is a DumpRefused naming rank, file and reason, never another exception."""

from __future__ import annotations

import io
import json
import pickle
import pickletools
import re
import time
from itertools import chain
from pathlib import Path
from typing import Any, ClassVar

from herdsman import HerdsmanError

MAX_DUMP_BYTES = 256 << 20
MAX_NODES = 4_000_000  # elements one dump may expand to; a 2000-entry NCCL dump with 30-frame stacks has ~0.5M
MAX_DEPTH = 64  # a real dump nests 5 deep: dump > entries > entry > frames > frame
MAX_LOAD_S = 20.0  # wall-clock bound on loading one dump
MAX_OPS = 3 * MAX_NODES  # pickle opcodes (a real dump runs ~1.6 per element)
MAX_KEY_NODES = 1000  # a dict key or set member is hashed as it is inserted: a tuple that expands far would hang it
MAX_TEXT = 256  # characters kept of an op name, state or process group
MAX_TENSORS, MAX_DIMS, MAX_DIM = 512, 32, 2**63  # input_sizes beyond these are unknown
MAX_SEQ = 2**53
MAX_PGS = 1024  # process groups kept per rank (a real rank is in a handful)
KEEP_PER_PG = 64  # entries per process group kept in a summary (enough to find a desync near the end)
_CHECK_EVERY = 1 << 14  # steps between looks at the clock
_RANK_FILE = re.compile(r"rank_?(\d+)(?:-attempt(\d+))?(?:\.json|\.pkl|\.pickle)?$|(\d+)$")
# what torch writes for a trainer of the user's own: TORCH_FR_DUMP_TEMP_FILE (herdsman/layout.py) + its rank
_TORCH_ATTEMPT_FILE = re.compile(r"attempt(\d+)-rank_?(\d+)$")
_CONTAINERS = frozenset({list, tuple, dict, set, frozenset})
_HASHABLE_LEAVES = frozenset({str, bytes, int, float, bool, type(None)})


class DumpRefused(HerdsmanError):
    pass


def _clip(s: str, n: int = 200) -> str:
    return s if len(s) <= n else s[:n] + "..."


def _why(e: BaseException) -> str:
    """An exception as text without str() of what it carries (the repr of a hostile object can itself explode)."""
    msg = e.args[0] if e.args and isinstance(e.args[0], str) else ""
    return type(e).__name__ + (f": {_clip(msg)}" if msg else "")


def _check_time(deadline: float) -> None:
    if time.monotonic() > deadline:
        raise DumpRefused(f"reading it took more than {MAX_LOAD_S:g} s")


# --- shape: depth and expanded size, without recursion ---------------------------------------------------------

def _width(x: Any) -> int:
    return 2 * len(x) if type(x) is dict else len(x)


def _inner(x: Any) -> list:
    """The containers directly inside x (its scalars are counted by _width, not walked)."""
    items = chain(x.keys(), x.values()) if type(x) is dict else x
    return [c for c in items if type(c) in _CONTAINERS]


def _shape_problem(root: Any, limit: int = MAX_NODES, deadline: float = float("inf")) -> str | None:
    """Why `root` is too deep or too big to walk, or None.

    Iterative (a deep dump cannot exhaust the stack). A container reached again through a shared reference adds its
    whole expanded size again, so a reference-expansion bomb is refused, though each container is walked only once
    (its size is remembered by id): the cost is bounded by `limit` even for a bomb."""
    if type(root) not in _CONTAINERS:
        return None
    too_many = f"it expands to more than {limit:,} elements (a shared reference counts each time it is reached)"
    walked = 1 + _width(root)  # elements met so far, each container once: bounds the work
    if walked > limit:
        return too_many
    sizes: dict[int, int] = {}  # id -> expanded size of a container already walked (all stay alive meanwhile)
    on_path = {id(root)}
    stack = [[root, iter(_inner(root)), walked]]
    while stack:
        frame = stack[-1]
        for kid in frame[1]:
            known = sizes.get(id(kid))
            if known is None:
                if id(kid) in on_path:
                    return "it contains itself (a reference cycle)"
                if len(stack) >= MAX_DEPTH:
                    return f"it is nested more than {MAX_DEPTH} deep"
                known = 1 + _width(kid)
                walked += known
                if walked > limit:
                    return too_many
                if len(sizes) % _CHECK_EVERY == 0:
                    _check_time(deadline)
                inner = _inner(kid)
                if inner:  # walk it first, then come back
                    on_path.add(id(kid))
                    stack.append([kid, iter(inner), known])
                    break
                sizes[id(kid)] = known
            frame[2] += known - 1  # its slot was counted as 1 in this container's width
            if frame[2] > limit:
                return too_many
        else:
            stack.pop()
            on_path.discard(id(frame[0]))
            sizes[id(frame[0])] = frame[2]
            if stack:
                stack[-1][2] += frame[2] - 1
                if stack[-1][2] > limit:
                    return too_many
    return None


# --- the pickle reader ---------------------------------------------------------------------------------------------

_OP_NAMES = {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes}
# Opcodes that build plain data. GLOBAL, STACK_GLOBAL and INST name a class: find_class refuses it by name.
_DATA_OPS = frozenset({
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP", "NONE", "NEWTRUE", "NEWFALSE", "INT", "BININT",
    "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT", "STRING", "BINSTRING", "SHORT_BINSTRING",
    "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
    "BYTEARRAY8", "EMPTY_LIST", "APPEND", "APPENDS", "LIST", "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
    "EMPTY_DICT", "DICT", "SETITEM", "SETITEMS", "EMPTY_SET", "ADDITEMS", "FROZENSET", "GET", "BINGET",
    "LONG_BINGET", "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "GLOBAL", "STACK_GLOBAL", "INST"})


def _op(code: int) -> Any:
    """The unpickler's handler for one opcode byte: counted if it builds plain data, refused otherwise."""
    name, fn = _OP_NAMES.get(code), pickle._Unpickler.dispatch.get(code)

    def counted(u: _DataOnlyUnpickler) -> None:
        u.ops += 1
        if u.ops >= u.check_at:
            u.checkpoint()
        fn(u)

    def hashing(u: _DataOnlyUnpickler) -> None:  # after MARK, u.stack holds only the marked items
        keys = u.stack[0::2] if name in ("SETITEMS", "DICT") else u.stack[-2:-1] if name == "SETITEM" else u.stack
        for k in keys:
            if type(k) not in _HASHABLE_LEAVES and _shape_problem(k, MAX_KEY_NODES, u.deadline):
                raise DumpRefused("a dict key or set member is too big to hash (a reference-expansion bomb)")
        counted(u)

    def refused(u: _DataOnlyUnpickler) -> None:
        if name is None:
            raise pickle.UnpicklingError(f"invalid pickle opcode {code:#04x}")
        raise DumpRefused(f"it uses pickle opcode {name} (a flight-recorder dump holds plain data only)")
    if name not in _DATA_OPS or fn is None:
        return refused
    return hashing if name in ("SETITEM", "SETITEMS", "DICT", "ADDITEMS", "FROZENSET") else counted


class _DataOnlyUnpickler(pickle._Unpickler):
    """Plain data only: dicts, lists, tuples, sets, strings, bytes, numbers; a class or function reference, or an
    opcode that calls something, is refused. The Python unpickler, not the C one: only here can each opcode be
    counted and each key checked before it is hashed (C would hash a tuple that expands to 2**40 elements forever)."""

    dispatch: ClassVar[dict] = {code: _op(code) for code in range(256)}

    def __init__(self, data: bytes, deadline: float):
        super().__init__(io.BytesIO(data))
        self.ops, self.check_at, self.deadline = 0, _CHECK_EVERY, deadline

    def checkpoint(self) -> None:
        self.check_at += _CHECK_EVERY
        if self.ops > MAX_OPS:
            raise DumpRefused(f"it takes more than {MAX_OPS:,} pickle operations to read")
        _check_time(self.deadline)

    def find_class(self, module: str, name: str) -> Any:
        raise DumpRefused(f"it references {_clip(module, 80)}.{_clip(name, 80)} "
                          "(a flight-recorder dump holds plain data only)")

    def persistent_load(self, pid: Any) -> Any:
        raise DumpRefused("it uses persistent ids (a flight-recorder dump holds plain data only)")


# --- loading -------------------------------------------------------------------------------------------------------

def _read(path: Path) -> bytes:
    try:
        too_big = path.stat().st_size > MAX_DUMP_BYTES
        with path.open("rb", buffering=0) as f:
            data = b"" if too_big else _read_at_most(f, MAX_DUMP_BYTES + 1)  # it may have grown since stat()
    except OSError as e:
        raise DumpRefused(f"cannot read it: {e.strerror or type(e).__name__}") from None
    if too_big or len(data) > MAX_DUMP_BYTES:
        raise DumpRefused(f"it is more than {MAX_DUMP_BYTES:,} bytes, more than a flight-recorder dump can be")
    return data


def _read_at_most(f: Any, limit: int, chunk: int = 1 << 20) -> bytes:
    """Up to `limit` bytes, read a chunk at a time: f.read(limit) would allocate `limit` bytes (256 MiB) up front
    for every dump, however small."""
    parts: list[bytes] = []
    total = 0
    while total < limit:
        part = f.read(min(chunk, limit - total))
        if not part:
            break
        parts.append(part)
        total += len(part)
    return b"".join(parts)


def _decode(data: bytes, deadline: float) -> Any:
    if data[:1] in (b"{", b"["):
        # JSON shares nothing, so its element count is bounded before parsing: every element but the first of a
        # container follows a comma or a colon (those inside strings count too, hence the slack)
        if sum(map(data.count, (b",", b":", b"[", b"{"))) > 2 * MAX_NODES:
            raise DumpRefused(f"it has more than {MAX_NODES:,} elements")
        try:
            return json.loads(data)
        except RecursionError:
            raise DumpRefused(f"it is nested too deeply (more than {MAX_DEPTH} levels)") from None
    return _DataOnlyUnpickler(data, deadline).load()


def load_dump(path: Path) -> dict[str, Any]:
    """Load one dump as validated plain data: {'entries': [...], 'version': ...} with only the fields the analysis
    reads (see _clean_entry). Raise DumpRefused naming rank, file and reason for anything else."""
    path = Path(path)
    ra = rank_of(path)
    who = f"dump from rank {ra[0]}" if ra else "dump"
    try:
        return _load(path, time.monotonic() + MAX_LOAD_S)
    except DumpRefused as e:
        raise DumpRefused(f"{who} refused: {path}: {e}") from None


def _load(path: Path, deadline: float) -> dict[str, Any]:
    try:
        dump = _decode(_read(path), deadline)
    except DumpRefused:
        raise
    except Exception as e:  # noqa: BLE001 -- truncated, corrupt, not a pickle at all, out of memory
        raise DumpRefused(f"not a readable dump ({_why(e)})") from None
    problem = _shape_problem(dump, MAX_NODES, deadline)
    if problem:
        raise DumpRefused(problem)
    if not isinstance(dump, dict):
        raise DumpRefused("not a flight-recorder dump (no 'entries' list)")
    # a recorder that has seen no collective yet writes no entries
    entries = dump.get("entries", [] if "version" in dump else None)
    if not isinstance(entries, list):
        raise DumpRefused("not a flight-recorder dump (no 'entries' list)")
    out: dict[str, Any] = {"entries": [c for c in map(_clean_entry, entries) if c is not None]}
    if "version" in dump:
        out["version"] = _text(dump["version"]) or ""
    return out


# --- the schema of what is kept --------------------------------------------------------------------------------------

def _text(v: Any) -> str | None:
    """A bounded, printable string (an int such as an old pg_id becomes one); None for anything else."""
    if v is None:
        return ""
    if type(v) is int and -MAX_SEQ <= v <= MAX_SEQ:
        v = str(v)
    if type(v) is not str:
        return None
    v = v[:MAX_TEXT]
    return v if v.isprintable() else "".join(c if c.isprintable() else "?" for c in v)


def _pg(e: dict) -> tuple[str, str] | None:
    v = e.get("process_group")
    if v is None or (type(v) in (str, list, tuple) and not v):  # older dumps name the group by pg_id alone
        name = _text(e.get("pg_id", ""))
        return None if name is None else (name, "")
    if type(v) not in (list, tuple) or not v:
        return None
    name, desc = _text(v[0]), (_text(v[1]) if len(v) > 1 else "")
    return None if name is None or desc is None else (name, desc)


def _sizes(v: Any) -> tuple:
    """input_sizes as per-tensor shapes; anything but a list of lists of bounded ints is unknown: ()."""
    if type(v) not in (list, tuple) or len(v) > MAX_TENSORS:
        return ()
    out = []
    for shape in v:
        if (type(shape) not in (list, tuple) or len(shape) > MAX_DIMS
                or not all(type(d) is int and 0 <= d <= MAX_DIM for d in shape)):
            return ()
        out.append(tuple(shape))
    return tuple(out)


def _clean_entry(e: Any) -> dict[str, Any] | None:
    """The fields the analysis reads, validated; None for an entry that cannot be placed (no sane sequence number,
    process group, op name or state). Odd input_sizes only make the sizes unknown."""
    if not isinstance(e, dict):
        return None
    seq = e.get("collective_seq_id")
    if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
        return None
    pg, op, state = _pg(e), _text(e.get("profiling_name")), _text(e.get("state"))
    if pg is None or op is None or state is None:
        return None
    return {"process_group": pg, "collective_seq_id": seq, "profiling_name": op, "state": state,
            "input_sizes": _sizes(e.get("input_sizes")), "is_p2p": e.get("is_p2p") is True}


def rank_of(path: Path) -> tuple[int, int] | None:
    """(rank, attempt) from a file name: Herdsman's rank00003-attempt0001.json, torch's nccl_trace_rank_3, or
    attempt0001-rank3 (torch's dump under the prefix Herdsman gives any trainer)."""
    t = _TORCH_ATTEMPT_FILE.search(path.name)
    if t:
        return int(t.group(2)), int(t.group(1))
    m = _RANK_FILE.search(path.name)
    if not m:
        return None
    if m.group(1) is not None:
        return int(m.group(1)), int(m.group(2) or 0)
    return int(m.group(3)), 0
