"""The time accounts: every second of a job in one bucket, measured by rank 0 and the controller where it happens."""

import pytest

from herdsman.events import TIME_SPLIT, StepStats, TrainerEvent, TrainerPhase, Verdict
from herdsman.taxonomy import RootCause
from orchestrator.accounts import account
from orchestrator.ledger import JobLedger


def ev(phase, attempt, t, step=0, duration=0.0):
    return TrainerEvent(0, "h0", attempt, phase, t, step, duration)


def steps(led, attempt, first, start, n, seconds=1.0, data=0.1, stall_after=None, stall=0.0):
    """n steps of `seconds` (of them `data` waiting for the batch) from `start`; a checkpoint stall after one."""
    t = start
    for k in range(first, first + n):
        t += seconds
        led.step(StepStats(0, "h0", attempt, k, t, seconds, 8, 2.0, data_s=data))
        if k == stall_after:
            led.event(ev(TrainerPhase.CHECKPOINT, attempt, t + stall, k, stall))
            t += stall
    return t


def one_failure_and_a_restart() -> JobLedger:
    led = JobLedger("j", 100.0)
    led.mark("scheduled", 0, 100.0)
    led.mark("launched", 0, 101.0)  # placement 1.0
    led.event(ev(TrainerPhase.STARTED, 0, 101.5))  # process start 0.5
    led.event(ev(TrainerPhase.RENDEZVOUS, 0, 102.0))  # rendezvous 0.5
    led.event(ev(TrainerPhase.RESTORED, 0, 103.0, 0, 0.0))  # model build 1.0, fresh start
    end = steps(led, 0, 1, 103.25, 5, stall_after=2, stall=0.3)  # lead-in 0.25; steps 1-5, a save after 2
    it = led.interrupt(Verdict(RootCause.FAULTY_GPU, 0.9, ("h0",)), failed_at=end + 0.4, detected_at=end + 1.4)
    led.interruptions[0] = it  # partial step 0.4, detection 1.0
    led.mark("scheduled", 1, end + 2.0)  # teardown and backoff 0.6
    led.mark("waited", 1, 0.5, add=True)
    led.mark("launched", 1, end + 3.0)  # placement 0.5 beyond the wait
    led.event(ev(TrainerPhase.STARTED, 1, end + 3.25))
    led.event(ev(TrainerPhase.RENDEZVOUS, 1, end + 3.5))
    led.event(ev(TrainerPhase.RESTORED, 1, end + 4.5, 2, 0.6))  # build 0.4, restore 0.6
    end2 = steps(led, 1, 3, end + 4.6, 8, stall_after=10, stall=0.2)  # steps 3-5 again (3 s lost), 6-10
    led.event(ev(TrainerPhase.FINISHED, 1, end2 + 0.3, 10, 0.25))  # last saves 0.25
    led.mark("ended", 1, end2 + 1.0)
    return led


def test_every_second_of_a_job_with_a_failure_is_in_a_named_bucket():
    led = one_failure_and_a_restart()
    split = account(led, now=10_000.0)
    assert set(split) == set(TIME_SPLIT)
    expected = {
        "productive": 10 * 0.9, "data_loading": 10 * 0.1, "checkpoint": 0.3 + 0.2 + 0.25,
        "startup": 1.0 + 0.5 + 0.5 + 1.0 + 0.25, "detection": 1.0,
        "restart": 0.6 + 0.5 + 0.25 + 0.25 + 0.4 + 0.1, "restore": 0.6,
        "lost_work": 3 * 1.0 + 0.4, "waiting_for_hosts": 0.5, "operator": 0.0,
    }
    for k, v in expected.items():
        assert split[k] == pytest.approx(v), k
    wall = led.marks["ended"][1] - 100.0
    assert sum(split.values()) == pytest.approx(wall)
    # what no record covers: the 0.05 s between the FINISHED event's wait and the last step's save (and the end)
    assert split["shutdown"] == pytest.approx(0.7) and abs(split["unexplained"]) < 0.1


def test_a_missing_measurement_is_unexplained_not_hidden_elsewhere():
    led = one_failure_and_a_restart()
    del led.marks["launched"][1], led.started[1], led.rendezvous[1]  # a third-party trainer, a lost mark
    split = account(led, now=10_000.0)
    # teardown and backoff, then scheduled -> the load began as one leg (less the wait for hosts), the lead-in
    assert split["restart"] == pytest.approx(0.6 + (1.9 - 0.5) + 0.1)
    assert abs(split["unexplained"]) < 0.1
    del led.marks["scheduled"][1]  # nothing says when the restart began: its legs are unexplained
    gap = account(led, now=10_000.0)
    assert gap["restart"] == pytest.approx(0.1) and gap["unexplained"] == pytest.approx(split["unexplained"] + 2.0)


def test_a_live_job_counts_its_open_tail_by_what_the_controller_is_doing():
    led = one_failure_and_a_restart()
    del led.marks["ended"][1], led.finished[1]
    last = led.last_step_at[1]
    now = last + 0.2 + 0.5  # the save after step 10 stalled 0.2 s; a step is in flight since
    running = account(led, now=now, state="running")
    assert running["productive"] == pytest.approx(10 * 0.9 + 0.5)  # the step in flight
    assert abs(running["unexplained"]) < 1e-9 and running["shutdown"] == 0
    backing = account(led, now=now, state="backingoff")  # the same tail, now waiting to restart
    assert backing["restart"] == pytest.approx(running["restart"] + 0.7)
