"""The peer campaign's pure parts (bench/campaign.py): the schedule, its mapping onto ranks, ETTR and MTTR from the
trainer's own step records. No job runs here."""

import argparse
import json

import pytest

from bench import campaign as c


def step(attempt, n, t, dt=0.5):
    return {"kind": "step", "attempt": attempt, "step": n, "time": t, "step_time_s": dt, "rank": 0}


def test_the_schedule_repeats_the_xid_on_one_host_and_has_one_crash_and_one_hang():
    fs = c.schedule(200, xid_first_s=30, xid_every_s=60, crash_at_s=75, hang_at_s=135)
    assert [(f.at_s, f.kind, f.host) for f in fs] == [
        (30, "xid", "host-2"), (75, "crash", "host-1"), (90, "xid", "host-2"), (135, "hang", "host-3"),
        (150, "xid", "host-2")]
    # a negative time leaves a fault out; nothing at or after the end
    assert [f.kind for f in c.schedule(100, xid_first_s=-1, crash_at_s=10, hang_at_s=100)] == ["crash"]
    # ties: the Xid first
    assert [f.kind for f in c.schedule(50, xid_first_s=10, xid_every_s=100, crash_at_s=10, hang_at_s=-1)] == [
        "xid", "crash"]


def test_a_host_maps_to_its_rank_in_the_current_placement():
    assert c.rank_of("host-2", c.HOSTS) == 1
    assert c.rank_of("host-3", ["host-1", "host-3", "host-4"]) == 1  # after host-2 was evicted onto the spare
    assert c.rank_of("host-2", ["host-1", "host-3", "host-4"]) is None


def test_steps_redone_after_a_restart_count_once():
    # attempt 0: steps 1-7 (checkpoint at 5), dies; attempt 1 resumes at 5 and redoes 6, 7
    steps = c.steps_of([step(0, i, 100 + i) for i in range(1, 8)] + [step(1, i, 120 + i, 0.25) for i in range(6, 11)]
                       + [{"kind": "event", "attempt": 1, "time": 119, "phase": "started", "pid": 1}])
    assert c.productive_s(steps, 10) == pytest.approx(5 * 0.5 + 5 * 0.25)
    assert c.productive_s(steps, 6) == pytest.approx(5 * 0.5 + 0.25)
    assert c.attempt_at(steps, 99) == -1 and c.attempt_at(steps, 110) == 0 and c.attempt_at(steps, 200) == 1
    assert c.recovered_at(steps, 107.5, 0) == 126
    assert c.recovered_at(steps, 127.5, 1) is None
    assert c.step_reached_at(steps, 10) == 130 and c.step_reached_at(steps, 11) is None


def test_a_fault_is_due_only_once_the_job_trains_again_after_the_last_one():
    steps = c.steps_of([step(0, 1, 10), step(0, 2, 11)])
    assert c.training_since([], None) is None
    assert c.training_since(steps, None) == 10
    assert c.training_since(steps, (10.5, 0)) is None  # step 2 of the same attempt is no recovery
    assert c.training_since(steps + [step(1, 1, 20), step(1, 2, 21)], (10.5, 0)) == 20


def test_outcome_ettr_wall_and_mttr_per_kind():
    t0 = 90.0
    steps = c.steps_of([step(0, i, 100 + i) for i in range(1, 8)] + [step(1, i, 120 + i) for i in range(6, 11)])
    inj = [{"kind": "crash", "rank": 0, "t": 107.5, "attempt": 0},
           {"kind": "xid", "rank": None, "t": 110.0, "effect": "host out of the job"},
           {"kind": "hang", "rank": 2, "t": 128.5, "attempt": 1}]  # never recovered from
    out = c.outcome(steps, inj, t0, 200.0, 10)
    assert out["finished"] and out["wall_s"] == 40 and out["attempts"] == 2 and out["steps_reached"] == 10
    assert out["ettr"] == pytest.approx(10 * 0.5 / 40)
    assert inj[0]["mttr_s"] == pytest.approx(126 - 107.5) and "mttr_s" not in inj[1] and inj[2]["mttr_s"] is None
    assert out["mttr"] == {"crash": {"n": 1, "median_s": pytest.approx(18.5), "p90_s": pytest.approx(18.5),
                                     "unrecovered": 0},
                           "hang": {"n": 0, "median_s": None, "p90_s": None, "unrecovered": 1}}
    # not finished: the wall is the time to the cap
    short = c.outcome(steps, [], t0, 200.0, 50)
    assert not short["finished"] and short["wall_s"] == 110 and short["steps_reached"] == 10


def test_mttr_median_and_p90():
    inj = [{"kind": "xid", "rank": 1, "mttr_s": x} for x in (5.0, 1.0, 3.0, 2.0, 4.0)]
    m = c.mttr_by_kind(inj)["xid"]
    assert m["n"] == 5 and m["median_s"] == 3.0 and m["p90_s"] == 5.0
    assert c.percentile([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0], 0.9) == 10.0


def result(name, ettr, crash, finished=True, wall=100.0):
    return {"system": name, "finished": finished, "wall_s": wall, "ettr": ettr, "attempts": 3, "steps_reached": 600,
            "median_step_s": 0.25,
            "mttr": {"crash": {"n": 1, "median_s": crash, "p90_s": crash, "unrecovered": 0}}}


def test_ratios_against_the_better_peer_and_the_table():
    rs = [result("torchrun", 0.5, 8.0, wall=200), result("ray-train", 0.4, 16.0, wall=250),
          result("herdsman", 0.7, 3.0, wall=150)]
    r = c.ratios(rs)
    assert r["ettr_vs_better_peer"] == pytest.approx(1.4)
    assert r["crash_mttr_vs_better_peer"] == pytest.approx(3.0 / 8.0)
    assert r["wall_vs_better_peer"] == pytest.approx(0.75)
    assert c.ratios(rs[:2]) == {}
    rows = c.table_rows(rs)
    assert len(rows) == 3 and all(len(row) == len(c.HEADERS) for row in rows)
    assert rows[2][:4] == ["herdsman", "yes", "150.0", "0.700"] and rows[2][4] == "0.250" and rows[2][7] == "3.0 / 3.0 (n=1)"


def test_one_config_for_all_three_systems(tmp_path):
    from herdsman.config import load_config

    a = argparse.Namespace(steps=600, checkpoint_every=10, step_delay_s=0.1, collective_timeout_s=30.0,
                           max_restarts=100)
    cfg = load_config(c.write_config(tmp_path, a))
    assert (cfg.job, cfg.trainer.steps, cfg.trainer.checkpoint_every, cfg.trainer.collective_timeout_s,
            cfg.controller.max_restarts) == ("campaign", 600, 10, 30.0, 100)
    assert cfg.trainer.memory_dir == "{run_dir}/memory/{host}"


def test_records_survive_a_torn_last_line(tmp_path):
    f = tmp_path / "rank00000-attempt0000.jsonl"
    f.write_text(json.dumps(step(0, 1, 1.0)) + "\n" + '{"kind": "st')
    assert c.steps_of(c.read_records([f, tmp_path / "missing.jsonl"])) == [step(0, 1, 1.0)]
