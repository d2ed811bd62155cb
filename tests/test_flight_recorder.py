import json
import os
import pickle
import time

import pytest

from agents.flight_recorder import (DumpRefused, Collective, analyse, collect, load_dump, rank_of,
                                    summarize)
from tests.trainer_runs import start, write_config
from trainer import faults
from trainer import flight_recorder as trainer_fr


def test_a_rank_that_hangs_is_named_by_the_analysis_of_real_gloo_dumps(tmp_path):
    cfg = write_config(tmp_path / "h.toml", tmp_path / "run", steps=50, checkpoint_every=100, collective_timeout_s=4.0)
    ctl, fr = tmp_path / "ctl", tmp_path / "fr"
    faults.request(ctl, 2, "hang", at_step=4)
    procs = start(cfg, 3, 0, tmp_path / "stats", ctl, extra_env={"HERDSMAN_FR_DIR": str(fr)})
    try:
        for p in procs[:2]:  # the two healthy ranks time out in the collective rank 2 never joins, and dump
            p.wait(timeout=120)
        assert procs[2].poll() is None  # rank 2 is still hung
        trainer_fr.request(ctl, 2)  # the controller's request: the hung rank dumps from its watcher thread
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
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "3 dump(s) read, 1 refused" in r.stdout
    assert "stuck at collective #4 nccl:all_reduce" in r.stdout and "never joined: rank 1 (at #3)" in r.stdout
    assert "no dump from ranks 3, 4" in r.stdout and "refused dump" in r.stdout
    assert not (tmp_path / "pwned").exists()
    bad = subprocess.run([sys.executable, "-m", "orchestrator.cli", "flight-recorder", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "not a directory" in bad.stderr and "Traceback" not in bad.stderr


def test_an_empty_recorder_and_rooted_collectives_are_not_errors(tmp_path):
    p = tmp_path / "rank00000-attempt0000.json"
    p.write_text('{"version": "2.10", "pg_config": {}}')
    assert load_dump(p)["entries"] == []
    rooted = [summarize(r, {"entries": [{"process_group": ["0", "default_pg"], "collective_seq_id": 1,
                                         "profiling_name": "gloo:gather", "input_sizes": [[4 * (r + 1)]]}]})
              for r in range(3)]
    assert analyse(rooted).mismatches == ()
