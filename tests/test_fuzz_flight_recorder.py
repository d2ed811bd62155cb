"""Property: whatever bytes sit in a flight-recorder directory, loading, summarising and analysing them gives a
result or a DumpRefused, never another exception, and quickly. Inputs: random JSON-able structures shaped like
dumps, pickles of random plain data (shared references and all protocols included), soups of real pickle opcodes
(memo sharing, cycles, calls, hash bombs), random bytes, and real-shaped dumps with random mutations. Each example
is bounded in time and memory (tests/bounds.py): 2 s and 64 MiB per dump."""

import json
import pickle

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.flight_recorder import DumpRefused, analyse, collect, load_dump, summarize
from tests.bounds import bounded

PER_EXAMPLE_S = 2.0  # per dump in an example, loaded twice (load_dump, collect) and analysed
PER_EXAMPLE_MIB = 64
fuzz = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fr-fuzz")


def check(directory, blobs: list[bytes]) -> None:
    """Write the blobs as ranks 0.. and run every entry point on them: only DumpRefused may come out."""
    for old in directory.iterdir():
        old.unlink()
    paths = [directory / f"rank{r:05d}-attempt0000.pkl" for r in range(len(blobs))]
    for p, b in zip(paths, blobs):
        p.write_bytes(b)
    with bounded("flight-recorder dump", PER_EXAMPLE_S * len(blobs), PER_EXAMPLE_MIB * len(blobs)):
        summaries = []
        for rank, p in enumerate(paths):
            try:
                dump = load_dump(p)
            except DumpRefused as e:
                assert str(e).startswith(f"dump from rank {rank} refused: {p}: ") and len(str(e)) < 1000
                continue
            summaries.append(summarize(rank, dump))
        lines = analyse(summaries, world_size=len(blobs) + 1).lines()
        assert lines and all(isinstance(line, str) and len(line) < 10_000 for line in lines)
        got, refused = collect([directory])
        assert len(got) + len(refused) == len(blobs)
        analyse(got, len(blobs), refused).lines()


# --- JSON -------------------------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda kids: st.lists(kids, max_size=6) | st.dictionaries(st.text(max_size=8), kids, max_size=6),
    max_leaves=16)
entries = st.fixed_dictionaries({}, optional={
    "process_group": st.lists(st.text(max_size=6), max_size=3) | json_values,
    "pg_id": st.integers(0, 3) | json_values,
    "collective_seq_id": st.integers(0, 6) | st.sampled_from([float("inf"), float("nan"), 2**60, -1]) | json_values,
    "profiling_name": st.sampled_from(["nccl:all_reduce", "gloo:broadcast", "nccl:all_gather"]) | json_values,
    "input_sizes": st.lists(st.lists(st.integers(-3, 2**70), max_size=4), max_size=4) | json_values,
    "state": st.sampled_from(["scheduled", "started", "completed"]) | json_values,
    "is_p2p": st.booleans() | json_values,
    "frames": json_values,
})
dumps = (st.fixed_dictionaries({"entries": st.lists(entries | json_values, max_size=6)},
                               optional={"version": json_values, "pg_config": json_values})
         | json_values)


@fuzz
@given(st.lists(dumps, min_size=1, max_size=2))
def test_random_json_dumps(scratch, objs):
    check(scratch, [json.dumps(o).encode() for o in objs])  # NaN and Infinity literals included


# --- pickles of plain data, with shared references --------------------------------------------------------------------

hashables = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
                         | st.binary(max_size=8), lambda kids: st.tuples(kids, kids) | st.frozensets(kids, max_size=3),
                         max_leaves=8)
plain = st.recursive(hashables, lambda kids: st.lists(kids, max_size=5) | st.tuples(kids, kids)
                     | st.dictionaries(hashables, kids, max_size=5) | st.sets(hashables, max_size=4), max_leaves=12)


@st.composite
def shared(draw):
    """A value reached many times: nested pairs of one object, so its expansion doubles with each level."""
    a = draw(plain)
    for _ in range(draw(st.integers(0, 26))):
        a = draw(st.sampled_from([lambda x: [x, x], lambda x: (x, x), lambda x: {"k": x, "v": x}]))(a)
    return a


@fuzz
@given(st.lists(st.tuples(dumps | plain, shared(), st.sampled_from(["input_sizes", "frames", "profiling_name"]),
                          st.integers(0, pickle.HIGHEST_PROTOCOL)), min_size=1, max_size=3))
def test_pickles_of_plain_data(scratch, specs):
    blobs = []
    for base, value, where, protocol in specs:
        obj = {"entries": [{"collective_seq_id": 1, where: value}], "base": base}
        blobs.append(pickle.dumps(obj, protocol))
    check(scratch, blobs)


# --- opcode programs and soups, random bytes ---------------------------------------------------------------------------

def _u(text: str) -> bytes:
    return b"\x8c" + bytes([len(text)]) + text.encode()


SCALARS = [b"N", b"\x88", b"\x89", b"K\x01", b"K\x07", b"J\xff\xff\xff\x7f", b"\x8a\x09" + b"\xff" * 9,
           b"G\x7f\xf0\x00\x00\x00\x00\x00\x00", b"C\x02ab", _u("x"), _u("nccl:all_reduce"), _u("started")]
KEYS = [_u(k) for k in ("process_group", "collective_seq_id", "profiling_name", "input_sizes", "state", "is_p2p",
                        "pg_id", "frames")]
# Programs that each push one value; DUP makes shared references without the memo, so doubling builds bombs.
values = st.recursive(st.sampled_from(SCALARS), lambda v: st.one_of(
    st.lists(v, max_size=4).map(lambda vs: b"(" + b"".join(vs) + b"l"),  # [...]
    st.lists(v, max_size=4).map(lambda vs: b"(" + b"".join(vs) + b"t"),  # (...)
    st.lists(v, max_size=4).map(lambda vs: b"(" + b"".join(vs) + b"\x91"),  # frozenset (unhashable: unreadable)
    st.lists(st.tuples(v, v), max_size=3).map(lambda kv: b"}(" + b"".join(k + x for k, x in kv) + b"u"),
    st.tuples(v, st.integers(1, 40), st.sampled_from([b"2\x86", b"(2l", b"\x94h\x00\x86"])).map(
        lambda t: t[0] + t[2] * t[1] if t[2] != b"(2l" else b"(" * t[1] + t[0] + b"2l" * t[1]),  # doubled n times
    st.tuples(v, v).map(lambda kv: b"}" + kv[0] + kv[1] + b"s"),  # {k: v}: a tuple key is hashed
    st.sampled_from([b"]2a"] * 4 + [b"]K\x01\x85R"]),  # a list that contains itself; (rarely) a call on data
), max_leaves=12)
SIZES = b"((K\x04K\x08l(K\x04ll"  # [[4, 8], [4]]
plausible = st.fixed_dictionaries({
    "collective_seq_id": st.sampled_from([b"K\x01", b"K\x02", b"K\x03"]) | values,
    "profiling_name": st.sampled_from([_u("nccl:all_reduce"), _u("gloo:gather")]) | values,
    "process_group": st.just(b"(" + _u("0") + _u("default_pg") + b"t") | values,
    "input_sizes": st.just(SIZES) | values, "state": st.sampled_from(SCALARS[-2:]) | values,
    "frames": values}).map(lambda e: b"}(" + b"".join(_u(k) + v for k, v in e.items()) + b"u")
arbitrary = st.lists(st.tuples(st.sampled_from(KEYS) | values, values), max_size=5).map(
    lambda kv: b"}(" + b"".join(k + x for k, x in kv) + b"u")
programs = st.lists(plausible | arbitrary, max_size=4).map(
    lambda es: b"\x80\x04}(" + _u("entries") + b"(" + b"".join(es) + b"lu.")


@fuzz
@given(st.lists(programs, min_size=1, max_size=3))
def test_pickle_programs(scratch, blobs):
    check(scratch, blobs)


SNIPPETS = [b"]", b"}", b")", b"(", b"a", b"e", b"s", b"u", b"t", b"l", b"d", b"\x85", b"\x86", b"\x87", b"2", b"0",
            b"1", b"\x8f", b"\x90", b"\x91", b"\x94", b"h\x00", b"h\x01", b"h\x02", b"h\x05", b"q\x00", b"q\x01",
            b"R", b"b", b"\x81", b"\x93", b"c__builtin__\neval\n", b"P", b"Q", b"\x82\x01", b"\x97", b".",
            b"\x95\x10\x00\x00\x00\x00\x00\x00\x00", *SCALARS, *KEYS]


@fuzz
@given(st.lists(st.lists(st.sampled_from(SNIPPETS), max_size=80), min_size=1, max_size=3))
def test_opcode_soups(scratch, soups):
    check(scratch, [b"\x80\x04" + b"".join(s) + b"." for s in soups])


@fuzz
@given(st.lists(st.tuples(st.sampled_from([b"", b"\x80\x02", b"\x80\x04", b"{", b"["]), st.binary(max_size=300)),
                min_size=1, max_size=3))
def test_random_bytes(scratch, blobs):
    check(scratch, [head + body for head, body in blobs])


# --- real-shaped dumps, mutated ----------------------------------------------------------------------------------------

def real_dump(rank: int) -> dict:
    frames = [{"name": f"fn{j}", "filename": f"/torch/f{j}.py", "line": j} for j in range(4)]
    return {"version": "2.4", "pg_config": {"0": {"name": "0", "desc": "default_pg", "ranks": "[0, 1, 2]"}},
            "entries": [{"record_id": s, "pg_id": 0, "process_group": ("0", "default_pg"), "collective_seq_id": s,
                         "profiling_name": "nccl:all_reduce", "input_sizes": [[1024, 8]], "output_sizes": [[1024, 8]],
                         "state": "completed" if s < 6 - rank else "started", "is_p2p": False, "frames": frames}
                        for s in range(1, 7 - rank)]}


REAL = [json.dumps(real_dump(r)).encode() for r in range(3)] + [pickle.dumps(real_dump(r), p)
                                                                 for r in range(3) for p in (2, 4)]


@st.composite
def mutated(draw):
    """A real-shaped dump with some fields replaced (then serialised), or some bytes changed."""
    if draw(st.booleans()):
        dump, as_json = real_dump(draw(st.integers(0, 2))), draw(st.booleans())
        for _ in range(draw(st.integers(1, 4))):
            e = draw(st.sampled_from(dump["entries"]))
            e[draw(st.sampled_from(sorted(e)))] = draw(json_values if as_json else json_values | plain | shared())
        return json.dumps(dump).encode() if as_json else pickle.dumps(dump, draw(st.integers(0, 5)))
    data = bytearray(draw(st.sampled_from(REAL)))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["flip", "insert", "delete", "repeat", "truncate"]))
        if kind == "flip" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8) | st.sampled_from(SNIPPETS))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif kind == "repeat":
            data[at:at] = data[at:at + draw(st.integers(1, 64))] * draw(st.integers(1, 8))
        elif kind == "truncate":
            del data[at:]
    return bytes(data)


@fuzz
@given(st.lists(mutated(), min_size=1, max_size=3))
def test_mutated_real_dumps(scratch, blobs):
    check(scratch, blobs)


def test_the_unmutated_real_dumps_are_read_and_name_the_lagging_ranks(scratch):
    check(scratch, REAL[:3])
    summaries, refused = collect([scratch])
    assert refused == [] and analyse(summaries, 3).lagging == (1, 2)
