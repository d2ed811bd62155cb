"""What a restarted controller reads back: the job, its interruptions, and rank 0's report streams."""

from herdsman.events import Interruption, TrainerPhase, Verdict
from herdsman.layout import stats_dir
from herdsman.taxonomy import RootCause
from orchestrator.recovery import recover
from orchestrator.store import Store
from herdsman.stats import StatsWriter


def test_nothing_to_recover_for_an_unknown_or_ended_job(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'h.db'}")
    assert recover(store, "nope", tmp_path) is None
    store.upsert_job("done", state="finished", started_at=1.0)
    assert recover(store, "done", tmp_path) is None


def test_progress_is_rebuilt_from_rank0_streams_counting_recomputed_steps_once(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'h.db'}")
    store.upsert_job("j", state="running", started_at=100.0, attempt=1)
    w0 = StatsWriter(stats_dir(tmp_path, "host-1", "j"), 0, "host-1", 0)
    for step in range(1, 8):
        w0.step(step, 1.0, 512, 3.0 - step * 0.1)
        if step == 5:
            w0.event(TrainerPhase.CHECKPOINT, step, duration_s=0.25)
    other = StatsWriter(stats_dir(tmp_path, "host-2", "j"), 1, "host-2", 0)  # not rank 0: ignored
    other.step(1, 99.0, 512, 9.9)
    earlier = StatsWriter(stats_dir(tmp_path, "host-2", "an-earlier-job"), 0, "host-2", 0)  # another job: ignored
    earlier.step(60, 99.0, 512, 9.9)
    w1 = StatsWriter(stats_dir(tmp_path, "host-3", "j"), 0, "host-3", 1)
    w1.event(TrainerPhase.RESTORED, 5, duration_s=0.5)
    for step in (6, 7, 8):  # 6 and 7 recomputed after the restore
        w1.step(step, 2.0, 512, 2.0)
    w1._f.write('{"kind": "step", "attempt": 1, "step": 9, "ti')  # the torn line of a killed rank
    w1._f.flush()

    r = recover(store, "j", tmp_path)
    assert r is not None and r.job.attempt == 1
    led = r.ledger
    assert sorted(led.step_time) == list(range(1, 9))
    assert led.step_time[7] == (1, 2.0) and led.step_time[4] == (0, 1.0)  # each step once, the kept run's time
    assert led.productive_s == 5 * 1.0 + 3 * 2.0
    assert led.ckpt_at.keys() == {5} and led.ckpt_stall_s == 0.25
    assert led.resumed_at[1][1] == 5 and led.last_step == {0: 7, 1: 8} and led.last_loss == 2.0
    assert not r.attempt_recorded and led.attempt == 1  # attempt 1 was running: its end is not recorded yet


def test_a_failure_already_recorded_by_the_dead_controller_is_not_recorded_again(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'h.db'}")
    store.upsert_job("j", state="running", started_at=100.0, attempt=1)
    v = Verdict(RootCause.FAULTY_GPU, 0.95, ("host-2",), (1,), ("Xid 79",))
    store.record_interruption(Interruption("j", 1, v, 150.0, 151.0))
    r = recover(store, "j", tmp_path)
    assert r.attempt_recorded and list(r.ledger.interruptions) == [1]
    assert r.ledger.attempt == 2 and r.ledger.pending.attempt == 1  # its restart is not known yet
