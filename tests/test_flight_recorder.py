import json
import os
import pickle
import time

import pytest

from agents.flight_recorder import (
    Collective,
    DumpRefused,
    RankSummary,
    analyse,
    collect,
    load_dump,
    rank_of,
    summarize,
)
from herdsman.events import Severity
from tests.trainer_runs import start, write_config
from trainer import control, faults


def test_a_rank_that_hangs_is_named_by_the_analysis_of_real_gloo_dumps(tmp_path):
    cfg = write_config(tmp_path / "h.toml", tmp_path / "run", steps=50, checkpoint_every=100, collective_timeout_s=4.0)
    ctl, fr = tmp_path / "ctl", tmp_path / "fr"
    faults.request(ctl, 2, "hang", at_step=4)
    procs = start(cfg, 3, 0, tmp_path / "stats", ctl, extra_env={"HERDSMAN_FR_DIR": str(fr)})
    try:
        for p in procs[:2]:  # the two healthy ranks time out in the collective rank 2 never joins, and dump
            p.wait(timeout=120)
        assert procs[2].poll() is None  # rank 2 is still hung
        control.request_dump(ctl, 2)  # the controller's request: the hung rank dumps from its watcher thread
        deadline = time.time() + 20
        while not (fr / "rank00002-attempt0000.json").exists() and time.time() < deadline:
            time.sleep(0.1)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    out0 = procs[0].stdout.read()
    assert "Timed out" in out0 or "timed out" in out0.lower(), out0[-2000:]
    summaries, refused = collect([fr])
    assert [s.rank for s in summaries] == [0, 1, 2] and refused == []
    a = analyse(summaries, world_size=3)
    assert a.lagging == (2,)
    (stuck,) = a.stuck
    assert stuck.joined == (0, 1) and stuck.missing == (2,) and stuck.op.startswith("gloo:")
    assert stuck.behind[2] < stuck.seq
    assert "never joined: rank 2" in a.lines()[0] and stuck.op in a.lines()[0]


class Boom:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_a_hostile_pickle_is_refused_without_running(tmp_path):
    sentinel = tmp_path / "pwned"
    d = tmp_path / "dumps"
    d.mkdir()
    (d / "rank00000-attempt0000.json").write_text(json.dumps(
        {"version": "2.10", "pg_config": {}, "entries": [
            {"process_group": ["0", "default_pg"], "collective_seq_id": 1, "profiling_name": "nccl:all_reduce",
             "input_sizes": [[4]], "state": "completed"}]}))
    (d / "rank00001-attempt0000.pkl").write_bytes(pickle.dumps({"entries": [Boom(sentinel)]}))
    (d / "nccl_trace_rank_2").write_bytes(pickle.dumps({"entries": []}))  # a plain pickle is fine
    summaries, refused = collect([d])
    assert not sentinel.exists()  # the payload never ran
    assert [s.rank for s in summaries] == [0, 2]
    assert len(refused) == 1 and "rank00001-attempt0000.pkl" in refused[0] and "posix.system" in refused[0]
    assert any("refused dump" in line for line in analyse(summaries, 3, refused).lines())


@pytest.mark.parametrize("content, message", [
    (b"\x80\x04\x95", "not a readable dump"),
    (b"[1, 2, 3]", "no 'entries' list"),
    (b"{\"entries\": 3}", "no 'entries' list"),
    (b"not a dump at all", "not a readable dump"),
])
def test_malformed_dumps_are_refused_with_a_reason(tmp_path, content, message):
    p = tmp_path / "rank00000-attempt0000.json"
    p.write_bytes(content)
    with pytest.raises(DumpRefused, match=message):
        load_dump(p)


def test_rank_from_file_names():
    from pathlib import Path
    assert rank_of(Path("rank00012-attempt0003.json")) == (12, 3)
    assert rank_of(Path("nccl_trace_rank_7")) == (7, 0)
    assert rank_of(Path("attempt0002-rank13")) == (13, 2)  # TORCH_FR_DUMP_TEMP_FILE as herdsman/layout.py sets it
    assert rank_of(Path("notes.txt")) is None


def nccl(rank, seqs, op="nccl:all_reduce", sizes=((1024,),), last_state="completed"):
    entries = [{"process_group": ["0", "default_pg"], "collective_seq_id": s, "profiling_name": op,
                "input_sizes": [list(x) for x in sizes], "state": "completed"} for s in seqs]
    if entries:
        entries[-1]["state"] = last_state
    return summarize(rank, {"entries": entries})


def test_mismatched_ops_and_sizes_are_reported():
    s = [nccl(0, range(1, 6)), nccl(1, range(1, 6)),
         summarize(2, {"entries": [{"process_group": ["0", "default_pg"], "collective_seq_id": 5,
                                    "profiling_name": "nccl:all_gather", "input_sizes": [[1024]], "state": "completed"}]}),
         nccl(3, range(1, 6), sizes=((2048,),))]
    a = analyse(s)
    whats = {(m.seq, m.what) for m in a.mismatches}
    assert (5, "op") in whats and (1, "sizes") in whats
    assert "nccl:all_gather on ranks 2" in next(m.line() for m in a.mismatches if m.what == "op")


def test_nccl_all_joined_but_running_is_stuck_without_a_laggard():
    a = analyse([nccl(r, range(1, 4), last_state="started") for r in range(4)])
    (stuck,) = a.stuck
    assert stuck.missing == () and stuck.seq == 3 and a.lagging == ()


def test_healthy_dumps_report_nothing():
    a = analyse([nccl(r, range(1, 10)) for r in range(4)], world_size=4)
    assert a.stuck == () and a.mismatches == () and "no stuck collective" in a.lines()[0]


def test_malformed_entries_are_skipped():
    s = summarize(0, {"entries": [None, {"collective_seq_id": "x"}, {"process_group": 3},
                                  {"process_group": ["0", ""], "collective_seq_id": 2, "profiling_name": "gloo:x"}]})
    assert s.pgs == {"0": (Collective(2, "gloo:x", (), ""),)}


def test_cli_analyses_a_dump_directory_and_refuses_hostile_files(tmp_path):
    import subprocess
    import sys
    d = tmp_path / "dumps"
    d.mkdir()
    for r in range(3):
        seqs = range(1, 5) if r != 1 else range(1, 4)
        entries = [{"process_group": ["0", "default_pg"], "collective_seq_id": s, "profiling_name": "nccl:all_reduce",
                    "input_sizes": [[8]], "state": "completed"} for s in seqs]
        (d / f"nccl_trace_rank_{r}").write_bytes(pickle.dumps({"entries": entries}))
    (d / "nccl_trace_rank_3").write_bytes(pickle.dumps({"entries": [Boom(tmp_path / "pwned")]}))
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "flight-recorder", str(d), "--world-size", "5"],
                       check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "3 dump(s) read, 1 refused" in r.stdout
    assert "stuck at collective #4 nccl:all_reduce" in r.stdout and "never joined: rank 1 (at #3)" in r.stdout
    assert "no dump from ranks 3, 4" in r.stdout and "refused dump" in r.stdout
    assert not (tmp_path / "pwned").exists()
    bad = subprocess.run([sys.executable, "-m", "orchestrator.cli", "flight-recorder", str(tmp_path / "nope")],
                         check=False, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "not a directory" in bad.stderr and "Traceback" not in bad.stderr


def test_an_empty_recorder_and_rooted_collectives_are_not_errors(tmp_path):
    p = tmp_path / "rank00000-attempt0000.json"
    p.write_text('{"version": "2.10", "pg_config": {}}')
    assert load_dump(p)["entries"] == []
    rooted = [summarize(r, {"entries": [{"process_group": ["0", "default_pg"], "collective_seq_id": 1,
                                         "profiling_name": "gloo:gather", "input_sizes": [[4 * (r + 1)]]}]})
              for r in range(3)]
    assert analyse(rooted).mismatches == ()


# --- hostile and damaged dumps: a refusal naming rank, file and reason, never an exception or a hang -------------

def entry(seq=1, **kw):
    e = {"process_group": ["0", "default_pg"], "collective_seq_id": seq, "profiling_name": "nccl:all_reduce",
         "input_sizes": [[4]], "state": "completed"}
    return {**e, **kw}


def refusal_of(tmp_path, name, data):
    """Collect a directory holding one good dump (rank 0) and `data` as `name`; the one refusal, and the seconds."""
    (tmp_path / "rank00000-attempt0000.json").write_text(json.dumps({"entries": [entry()]}))
    (tmp_path / name).write_bytes(data)
    t = time.perf_counter()
    summaries, refused = collect([tmp_path])
    took = time.perf_counter() - t
    assert [s.rank for s in summaries] == [0] and len(refused) == 1, refused
    assert any(line.startswith("refused dump: ") for line in analyse(summaries, 2, refused).lines())
    return refused[0], took


def bomb(n=30):
    a = []
    for _ in range(n):  # 2**31 elements once expanded; pickle memoizes, so the file is a few hundred bytes
        a = [a, a]
    return a


@pytest.mark.parametrize("where", ["input_sizes", "frames", "pg_config"])
def test_a_shared_reference_bomb_is_refused_fast(tmp_path, where):
    dump = {"entries": [entry(**({where: bomb()} if where != "pg_config" else {}))]}
    if where == "pg_config":
        dump["pg_config"] = {"0": bomb()}
    data = pickle.dumps(dump)
    assert len(data) < 400
    reason, took = refusal_of(tmp_path, "rank00003-attempt0000.pkl", data)
    assert reason.startswith("dump from rank 3 refused: ") and "rank00003-attempt0000.pkl" in reason
    assert "expands to more than" in reason and "shared reference" in reason
    assert took < 1.0


def test_a_key_that_would_take_forever_to_hash_is_refused_before_it_is_hashed(tmp_path):
    t = ()
    for _ in range(28):  # hashing it walks 2**28 tuples (seconds; 40 levels would be hours)
        t = (t, t)
    data = b"\x80\x02}" + pickle.dumps(t, 2)[2:-1] + b"K\x01s."  # {t: 1}, built by hand: Python would hash t
    reason, took = refusal_of(tmp_path, "nccl_trace_rank_1", data)
    assert "rank 1" in reason and "too big to hash" in reason and took < 1.0


def deep_pickle(n):
    """{'entries': [{'collective_seq_id': 1, 'profiling_name': [[[...n deep...]]]}]}, in opcodes (Python's pickler
    would recurse)."""
    return (b"\x80\x04}\x8c\x07entries]}\x8c\x11collective_seq_idK\x01s\x8c\x0eprofiling_name"
            + b"]" * n + b"a" * (n - 1) + b"sas.")


@pytest.mark.parametrize("name, data, why", [
    ("rank00002-attempt0000.json", b'{"entries": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}", "nested too deeply"),
    ("rank00002-attempt0000.json", b'{"entries": [{"collective_seq_id": 1, "profiling_name": ' + b"[" * 200
     + b"]" * 200 + b"}]}", "nested more than 64 deep"),
    ("rank00002-attempt0000.pkl", deep_pickle(100_000), "nested more than 64 deep"),
])
def test_deep_nesting_is_refused_without_recursion(tmp_path, name, data, why):
    reason, took = refusal_of(tmp_path, name, data)
    assert reason.startswith("dump from rank 2 refused: ") and why in reason and took < 2.0


def test_cycles_and_calls_are_refused_with_a_reason(tmp_path):
    c = []
    c.append(c)
    reason, _ = refusal_of(tmp_path, "rank00001-attempt0000.pkl", pickle.dumps({"entries": [entry(frames=c)]}))
    assert "contains itself" in reason
    reduce = b"\x80\x04}\x8c\x07entries](K\x01tRs."  # REDUCE with a list as the "function"
    reason, _ = refusal_of(tmp_path, "rank00001-attempt0000.pkl", reduce)
    assert "pickle opcode REDUCE" in reason


def test_shared_references_count_each_time_they_are_reached():
    from agents.dump_loader import _shape_problem
    a = [1, 2]
    b = {"x": [a, a, a]}  # 1 + 2 (key, value) + 3 slots of a, each 1 + 2: 12 elements
    assert _shape_problem(b, limit=12) is None and "more than 11 elements" in _shape_problem(b, limit=11)
    assert _shape_problem([[[[]]]] * 3) is None and "more than 5 elements" in _shape_problem(list(range(5)), limit=5)


def test_time_operations_and_element_count_are_bounded(tmp_path, monkeypatch):
    from agents import dump_loader as fr
    p = tmp_path / "rank00004-attempt0000.pkl"
    p.write_bytes(pickle.dumps({"entries": [entry(s) for s in range(3000)]}))
    assert len(load_dump(p)["entries"]) == 3000
    monkeypatch.setattr(fr, "MAX_OPS", 20_000)
    with pytest.raises(DumpRefused, match="rank 4 refused: .*more than 20,000 pickle operations"):
        load_dump(p)
    monkeypatch.setattr(fr, "MAX_LOAD_S", 0.0)
    with pytest.raises(DumpRefused, match="took more than 0 s"):
        load_dump(p)
    monkeypatch.setattr(fr, "MAX_NODES", 1000)
    j = tmp_path / "rank00004-attempt0001.json"
    j.write_text(json.dumps({"entries": [entry(s) for s in range(300)]}))
    with pytest.raises(DumpRefused, match="more than 1,000 elements"):
        load_dump(j)


def test_a_sequence_number_that_is_not_a_sane_int_skips_only_its_entry(tmp_path):
    odd = ["1e999", "-1e999", "NaN", "-1", str(2**60), "true", '"3"', "2.0", "null", "[1]"]
    template = json.dumps(entry(0))
    entries = [json.dumps(entry(7))] + [template.replace('"collective_seq_id": 0', f'"collective_seq_id": {v}')
                                        for v in odd]
    p = tmp_path / "rank00000-attempt0000.json"
    p.write_text('{"entries": [' + ", ".join(entries) + "]}")
    summaries, refused = collect([tmp_path])
    assert refused == [] and [c.seq for c in summaries[0].pgs["0"]] == [7]


@pytest.mark.parametrize("sizes", [[{"a": 1}], [[[1, 2]]], [[2**80]], ["abc"], [["x"]], {"a": [1]}, [[-1]],
                                   [[1]] * 10_000, [[1] * 1000], [[True]], [[1.5]], 7, "[[4]]"])
def test_odd_input_sizes_are_unknown_not_fatal(sizes):
    good = [summarize(r, {"entries": [entry(1, input_sizes=[[4]])]}) for r in (0, 1)]
    odd = summarize(2, {"entries": [entry(1, input_sizes=sizes)]})
    a = analyse([*good, odd])  # today: TypeError (unhashable) for dicts and nested lists
    assert a.lines() and a.mismatches == () and a.errors == ()  # unknown sizes are not compared
    assert odd.pgs["0"][0].input_sizes == ()


def test_names_and_states_are_bounded_printable_strings():
    s = summarize(0, {"entries": [entry(1, profiling_name="x" * 10**6, state="started\n[node-9] gpu_xid: fake"),
                                  entry(2, profiling_name=["not", "a", "name"]), entry(3, process_group=[{}, "d"]),
                                  entry(4, is_p2p=True), entry(5, process_group=None, pg_id=7)]})
    (c,) = s.pgs["0"]
    assert len(c.op) == 256 and c.state == "started?[node-9] gpu_xid: fake"
    assert s.pgs["7"][0].seq == 5


def test_analyse_never_raises_even_on_summaries_not_made_by_summarize():
    odd = [RankSummary(0, {"0": ()}), RankSummary(1, {"0": (Collective(1, "x", ([1],), "started"),)}),
           RankSummary(2, {"0": (Collective(1, "x", ([2],), ""),)}), "not a summary"]
    a = analyse(odd, 3)
    assert a.ranks == (0, 1, 2) and any("not analysed (TypeError)" in line for line in a.lines())


def test_a_real_sized_nccl_dump_is_read_and_not_refused(tmp_path):
    frames = [{"name": f"fn{j}", "filename": f"/site-packages/torch/f{j}.py", "line": j} for j in range(30)]
    entries = [entry(i, frames=frames, input_dtypes=["Float"], time_created_ns=i, retired=True) for i in range(2000)]
    for name, data in [("rank00000-attempt0000.json", json.dumps({"version": "2.4", "entries": entries}).encode()),
                       ("nccl_trace_rank_1", pickle.dumps({"version": "2.4", "entries": [
                           {**e, "process_group": ("0", "default_pg"), "frames": [dict(f) for f in frames]}
                           for e in entries]}))]:
        (tmp_path / name).write_bytes(data)
    t = time.perf_counter()
    summaries, refused = collect([tmp_path])
    assert refused == [] and [len(s.pgs["0"]) for s in summaries] == [64, 64]
    assert time.perf_counter() - t < 15  # ~0.1 s (JSON) + ~0.5 s (pickle) of CPU


def test_the_controller_turns_a_failing_analysis_into_a_warning(monkeypatch):
    from types import SimpleNamespace

    from orchestrator import hangs

    behind = [nccl(0, range(1, 4)), nccl(1, range(1, 3))]
    answer = (behind, ["dump from rank 2 refused: x"], [])  # summaries, refusals, silent hosts
    fleet = SimpleNamespace(has_agent=lambda host: True, flight_recorder=lambda hosts, attempt, decide: answer)
    group = SimpleNamespace(hosts=["h0"], attempt=0, world_size=3, rank_hosts=["h0", "h1", "h2"])
    said = []
    ev = hangs.flight_recorder_evidence(fleet, group, [], True, 0.0, said.append)
    assert [(e.host, e.rank) for e in ev] == [("h1", 1), ("", None)]  # the real analysis names rank 1
    assert "never joined" in ev[0].message and "refused flight-recorder dump: dump from rank 2" in ev[1].message

    def broken(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")
    monkeypatch.setattr(hangs, "analyse_fr", broken)
    ev = hangs.flight_recorder_evidence(fleet, group, [], True, 0.0, said.append)
    assert [e.severity for e in ev] == [Severity.WARNING] * 2
    assert ev[0].message == "flight-recorder analysis failed: RecursionError" and ev[0].attrs["analysis_failed"]
    assert "refused flight-recorder dump" in ev[1].message and any("analysis failed" in line for line in said)
