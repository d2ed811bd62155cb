"""The controller's state machine, one tick at a time, with a fake fleet and clock (no Ray, no processes).

Every state, the main transitions, operator actions while the job trains, an idle spare that fails and a store
outage, in milliseconds each; the other transitions, operator actions in the other states and a store that fails at
start-up are in tests/test_controller_states.py. The same paths run end to end in tests/test_e2e.py on a real
cluster.
"""

import dataclasses

import pytest

from herdsman.events import (
    AgentReport,
    Evidence,
    EvidenceKind,
    Heartbeat,
    HostState,
    Severity,
    StepStats,
    TrainerPhase,
)
from herdsman.stats import StatsWriter
from herdsman.layout import stats_dir
from herdsman.taxonomy import RootCause
from orchestrator.states import (
    TRANSITIONS,
    BackingOff,
    Draining,
    Failing,
    Finished,
    Running,
    Scheduling,
    Stopped,
    legal,
)
from orchestrator.store import Store
from tests.controller_fakes import Clock, FakeFleet  # noqa: F401  (tests/test_wire.py imports them from here)
from tests.controller_fakes import HOSTS, event, heartbeat_all, running, step
from tests.test_store_writer import Flaky


def test_schedules_on_the_workers_keeps_a_spare_and_finishes(make):
    ctrl, fleet, clock = running(make)
    assert fleet.groups[0].hosts == ["host-1", "host-2", "host-3"]
    assert ctrl.pool.state("host-4") == HostState.SPARE
    for n in range(1, 20):
        clock.advance(1)
        step(ctrl, clock, n)
    assert not ctrl.tick()  # running, nothing new
    # the last step is written, the ranks exit at once, and their agents have not sent it yet: it is asked for
    clock.advance(1)
    fleet.fresh = [AgentReport(Heartbeat("host-1", clock(), 1),
                               steps=(StepStats(0, "host-1", 0, 20, clock(), 0.5, 512, 2.0),))]
    fleet.groups[0].finish()
    assert ctrl.tick() and isinstance(ctrl.state, Finished)
    assert ctrl.status()["step"] == 20 and ctrl.ledger.productive_s == 10.0
    assert ctrl.records.flush(2) and ctrl.store.job("unit").state == "finished"


def test_rank_actors_are_created_before_the_agents_are_awaited(make):
    """The job's start does not wait for the agents to come up before its rank actors (and their trainer imports)
    begin: the group is made, then the agents are ensured, then the ranks start; with no placement, the agents
    are still ensured."""
    ctrl, fleet, clock = running(make)
    assert fleet.calls == ["group", "agents", "start"]
    ctrl, fleet, clock = make()
    fleet.hosts.pop("host-3"), fleet.hosts.pop("host-4")  # 3 hosts needed, 2 in the cluster
    heartbeat_all(ctrl, clock, ["host-1", "host-2"])
    assert not ctrl.tick() and isinstance(ctrl.state, Scheduling) and fleet.calls == ["agents"]


def test_fatal_xid_fails_the_job_evicts_the_host_and_restarts_on_the_spare(make):
    ctrl, fleet, clock = running(make)
    assert not ctrl.tick() and fleet.warmed == []  # no spare is warmed while the attempt starts
    step(ctrl, clock, 7)
    event(ctrl, clock, TrainerPhase.CHECKPOINT, 0, 5)
    assert not ctrl.tick() and not ctrl.tick()  # it trains: the spare next in line is warmed, once
    assert fleet.warmed == [(["host-4"], ["host-1", "host-2", "host-3"])]
    clock.advance(1)
    xid = Evidence("host-2", EvidenceKind.GPU_XID, clock(), "NVRM: Xid (PCI:0000:3b:00): 79, GPU has fallen off the bus",
                   Severity.CRITICAL, gpu=0, code=79)
    ctrl.report(AgentReport(Heartbeat("host-2", clock(), 2), (xid,)))
    assert ctrl.tick() and isinstance(ctrl.state, Failing)
    assert not ctrl.tick()  # within the grace period: waiting for the rest of the evidence
    clock.advance(1.5)
    assert ctrl.tick() and isinstance(ctrl.state, BackingOff)
    assert ctrl.verdicts[-1].cause == RootCause.FAULTY_GPU and ctrl.verdicts[-1].hosts == ("host-2",)
    assert ctrl.pool.state("host-2") == HostState.QUARANTINED
    assert fleet.groups[0].shutdowns == [("host-1", "host-3")]  # the rank actors of the healthy hosts are kept
    assert ctrl.tick() and isinstance(ctrl.state, Scheduling)  # first failure after progress: no backoff
    heartbeat_all(ctrl, clock, ["host-1", "host-3", "host-4"])
    assert ctrl.tick() and isinstance(ctrl.state, Running)
    assert fleet.groups[1].hosts == ["host-1", "host-3", "host-4"] and ctrl.attempt == 1
    # the new attempt's rendezvous and restore complete the interruption's time split
    clock.advance(2)
    event(ctrl, clock, TrainerPhase.RENDEZVOUS, 1)
    clock.advance(1)
    event(ctrl, clock, TrainerPhase.RESTORED, 1, 5)
    assert ctrl.records.flush(2)
    (it,) = ctrl.store.interruptions("unit")
    assert it.verdict.cause == RootCause.FAULTY_GPU and it.restart_s is not None and it.restore_s == 1.0
    assert it.resumed_step == 5 and it.last_step == 7


def test_an_idle_spare_that_fails_is_taken_out_and_the_job_goes_on(make):
    ctrl, fleet, clock = running(make)
    ctrl.tick()
    assert fleet.groups[0].refills == 0  # the ranks still start: no standby imports torch beside them
    step(ctrl, clock, 7)
    event(ctrl, clock, TrainerPhase.CHECKPOINT, 0, 5)
    ctrl.tick()
    assert fleet.warmed == [(["host-4"], ["host-1", "host-2", "host-3"])]  # host-4 is the warm spare
    assert fleet.groups[0].refills == 1  # the attempt trains: its rank actors warm their next standbys, once
    ctrl.tick()
    assert fleet.groups[0].refills == 1
    clock.advance(1)
    xid = Evidence("host-4", EvidenceKind.GPU_XID, clock(), "NVRM: Xid 79, GPU has fallen off the bus",
                   Severity.CRITICAL, gpu=0, code=79)
    ctrl.report(AgentReport(Heartbeat("host-4", clock(), 2), (xid,)))
    assert ctrl.pool.state("host-4") == HostState.QUARANTINED
    assert ctrl.responder.lemons.failures["host-4"] == 1
    assert any("on idle host-4" in d and "faulty_gpu" in d for d in ctrl.decisions)
    assert any("decision evict" in d and "spare host-4 failed while idle" in d for d in ctrl.decisions)
    assert not ctrl.tick() and isinstance(ctrl.state, Running)  # the job is not disturbed
    assert ctrl.attempt == 0 and len(fleet.groups) == 1 and fleet.groups[0].shutdowns == []
    assert ctrl.ledger.interruptions == {} and ctrl.responder.restarts == 0 and ctrl.verdicts == []
    assert fleet.warmed[-1] == ([], ["host-1", "host-2", "host-3"])  # its warm standby is let go of
    assert ctrl.records.flush(2)
    assert {h.host: h.state for h in ctrl.store.hosts()}["host-4"] == HostState.QUARANTINED
    assert [(i.host, i.kind, i.cause) for i in ctrl.store.incidents()] == [("host-4", "failure", "faulty_gpu")]
    ctrl.report(AgentReport(Heartbeat("host-4", clock(), 3), (dataclasses.replace(xid, time=clock() + 1),)))
    assert ctrl.responder.lemons.failures["host-4"] == 1  # out already: counted once


def test_a_software_exception_restarts_on_the_same_hosts(make):
    ctrl, fleet, clock = running(make)
    step(ctrl, clock, 3)
    fleet.groups[0].fail(0, 1, "Traceback (most recent call last):\nValueError: shapes (4, 128) and (256,) not aligned")
    for g in (1, 2):
        fleet.groups[0].fail(g, -15)
    assert ctrl.tick() and isinstance(ctrl.state, Failing)
    assert ctrl.tick() and isinstance(ctrl.state, BackingOff)  # every rank ended: no need to wait out the grace
    assert ctrl.verdicts[-1].cause == RootCause.SOFTWARE_BUG
    assert "quarantined" not in {s.state.value for s in ctrl.pool.status.values()}
    ctrl.tick()
    ctrl.tick()
    assert fleet.groups[1].hosts == fleet.groups[0].hosts


def test_the_same_crash_three_times_without_progress_stops_and_pages(make):
    ctrl, fleet, clock = running(make)
    for attempt in range(3):
        g = fleet.groups[-1]
        g.fail(0, 1, "AssertionError: grad norm is inf")
        for r in (1, 2):
            g.fail(r, -15)
        ctrl.tick()
        ctrl.tick()
        if attempt < 2:
            assert isinstance(ctrl.state, BackingOff)
            clock.advance(ctrl.state.until - clock() + 0.01)
            ctrl.tick()
            ctrl.tick()
            assert isinstance(ctrl.state, Running)
    assert isinstance(ctrl.state, Stopped) and "crash loop" in ctrl.state.reason
    assert ctrl.pool.state("host-4") == HostState.SPARE  # no spare burnt on a software bug


def test_backoff_grows_only_for_failures_without_progress(make):
    ctrl, fleet, clock = running(make)
    waits = []
    for i in range(3):
        g = fleet.groups[-1]
        g.fail(0, 1, f"RuntimeError: failure number {i}")  # distinct: not a crash loop
        for r in (1, 2):
            g.fail(r, -15)
        ctrl.tick()
        ctrl.tick()
        waits.append(round(ctrl.state.until - clock(), 3))
        clock.advance(waits[-1] + 0.01)
        ctrl.tick()
        ctrl.tick()
    assert waits == [0.0, 1.0, 2.0]


def test_a_hang_is_a_failure_once_no_step_completes_for_the_timeout(make):
    ctrl, fleet, clock = running(make)
    step(ctrl, clock, 4)
    clock.advance(29)
    heartbeat_all(ctrl, clock)  # every agent alive, every rank alive: only the steps stopped
    assert not ctrl.tick()
    clock.advance(2)
    heartbeat_all(ctrl, clock)
    assert ctrl.tick() and isinstance(ctrl.state, Failing) and ctrl.state.hang
    assert ctrl.tick() and isinstance(ctrl.state, BackingOff)
    assert ctrl.verdicts[-1].cause in (RootCause.NCCL_WATCHDOG_TIMEOUT, RootCause.UNKNOWN)


def test_a_hang_is_found_sooner_once_the_attempt_has_a_steady_pace(make):
    ctrl, fleet, clock = running(make)
    for n in range(1, 32):  # 0.5 s steps; after every 5th a checkpoint stall (2 s)
        clock.advance(2.5 if (n - 1) % 5 == 0 and n > 1 else 0.5)
        step(ctrl, clock, n)
    assert ctrl.ledger.longest_interval() == 2.5 and ctrl.ledger.longest_interval(5) == 0.5
    assert ctrl.ledger.longest_interval(5, saving=True) == 2.5
    clock.advance(9)  # after step 31 (no save follows): hang_floor_s (10 s) is the limit, not 10 x 2.5 s
    heartbeat_all(ctrl, clock)
    assert not ctrl.tick()
    clock.advance(1.5)
    heartbeat_all(ctrl, clock)
    assert ctrl.tick() and isinstance(ctrl.state, Failing) and ctrl.state.hang


def at_collective(**seqs):
    """Flight-recorder summaries: rank -> the last collective it entered in the default group (r0=42, ...)."""
    from agents.flight_recorder import Collective, RankSummary

    return [RankSummary(int(r[1:]), {"0": tuple(Collective(s, "allreduce", ((512,),), "scheduled")
                                                for s in range(seq - 2, seq + 1))}) for r, seq in seqs.items()]


def steady(ctrl, clock, n=31):
    for k in range(1, n + 1):  # 0.5 s steps, no saves in the window: the pace is 0.5 s
        clock.advance(0.5)
        step(ctrl, clock, k)


def test_a_hang_the_flight_recorder_confirms_is_found_before_the_floor(make):
    """No step for 3 s (hang_suspect_s; 3 x the 0.5 s pace is less): the controller looks at the flight recorder
    each second; rank 1 missing from the same collective in two looks in a row is a hang, 5 s in, not 10."""
    ctrl, fleet, clock = running(make)
    steady(ctrl, clock)
    fleet.fr = at_collective(r0=42, r1=41, r2=42)
    clock.advance(2.5)
    heartbeat_all(ctrl, clock)
    assert not ctrl.tick() and fleet.groups[0].dump_requests == 0  # 2.5 s: not yet suspect
    for _ in range(2):
        clock.advance(1.0)
        heartbeat_all(ctrl, clock)
        assert not ctrl.tick() and isinstance(ctrl.state, Running)  # the first look asks; the second reads one
    assert fleet.groups[0].dump_requests == 2
    clock.advance(1.0)
    heartbeat_all(ctrl, clock)
    assert ctrl.tick() and isinstance(ctrl.state, Failing) and ctrl.state.hang
    assert any("rank(s) [1] missing from the same collective in two flight-recorder looks" in d
               for d in ctrl.decisions), ctrl.decisions[-3:]


@pytest.mark.parametrize("moving", [True, False])
def test_a_slow_step_is_not_a_hang_while_the_flight_recorder_moves(make, moving):
    """Between two looks a rank moved on (or every rank is at the same collective: nobody is missing from it): no
    hang before the floor; a step then ends the suspicion."""
    ctrl, fleet, clock = running(make)
    steady(ctrl, clock)
    clock.advance(2.5)
    for k in range(5):  # looks at 3.5, 4.5, ... 7.5 s of quiet
        fleet.fr = at_collective(r0=42 + k, r1=41 + k, r2=42 + k) if moving else at_collective(r0=42, r1=42, r2=42)
        clock.advance(1.0)
        heartbeat_all(ctrl, clock)
        assert not ctrl.tick() and isinstance(ctrl.state, Running)
    assert fleet.groups[0].dump_requests == 5
    step(ctrl, clock, 32)
    assert not ctrl.tick() and ctrl._hang_look is None


def test_a_resumed_attempt_that_hangs_on_its_first_step_is_found_within_the_hang_timeout(make):
    """A restart resumes from the step where the last attempt stopped, and its first step may be the one that
    hangs (the e2e campaign's hang fault): once rank 0 has restored, hang_timeout_s applies, not the startup's."""
    from herdsman.events import TrainerPhase

    ctrl, fleet, clock = running(make, hang_timeout_s=5.0, startup_timeout_s=60.0)
    clock.advance(2)
    event(ctrl, clock, TrainerPhase.RESTORED, 0, 20)  # restored step 20 in 0.1 s
    clock.advance(5)
    heartbeat_all(ctrl, clock)
    assert not ctrl.tick() and isinstance(ctrl.state, Running)  # 5 s: not past hang_timeout_s + the load
    clock.advance(0.5)
    heartbeat_all(ctrl, clock)
    assert ctrl.tick() and isinstance(ctrl.state, Failing) and ctrl.state.hang


def test_rank0s_agent_falling_quiet_is_not_a_hang(make):
    """Steps reach the controller through rank 0's agent: while it is silent (restarting, partitioned) the trainer
    may well be stepping, so the silence is not counted; its held-back reports, sent late, carry the steps on."""
    ctrl, fleet, clock = running(make, heartbeat_timeout_s=30.0)
    for n in range(1, 32):
        clock.advance(0.5)
        step(ctrl, clock, n)
    clock.advance(15)  # past hang_floor_s, and the other agents still report: rank 0's agent is the one quiet
    heartbeat_all(ctrl, clock, ["host-2", "host-3", "host-4"])
    assert not ctrl.tick() and isinstance(ctrl.state, Running)
    # its backlog arrives: reports written during the silence, the steps in them included
    late = clock() - 14
    ctrl.report(AgentReport(Heartbeat("host-1", late, 2), steps=(StepStats(0, "host-1", 0, 32, late, 0.5, 512, 2.0),)))
    ctrl.report(AgentReport(Heartbeat("host-1", clock(), 3),
                            steps=(StepStats(0, "host-1", 0, 33, clock(), 0.5, 512, 2.0),)))
    assert not ctrl.tick() and isinstance(ctrl.state, Running)
    clock.advance(11)  # now rank 0's agent reports and no step comes: that is a hang
    heartbeat_all(ctrl, clock)
    assert ctrl.tick() and isinstance(ctrl.state, Failing) and ctrl.state.hang


def test_a_save_after_the_last_step_is_given_its_usual_stall_times_the_hang_factor(make):
    ctrl, fleet, clock = running(make)
    for n in range(1, 31):  # the last step (30) is a save step: its stall is part of the wait
        clock.advance(2.5 if (n - 1) % 5 == 0 and n > 1 else 0.5)
        step(ctrl, clock, n)
    clock.advance(24)
    heartbeat_all(ctrl, clock)
    assert not ctrl.tick()  # under 10 x 2.5 s
    clock.advance(2)
    heartbeat_all(ctrl, clock)
    assert ctrl.tick() and isinstance(ctrl.state, Failing) and ctrl.state.hang


def test_planned_maintenance_drains_after_a_fresh_checkpoint(make):
    ctrl, fleet, clock = running(make)
    step(ctrl, clock, 6)
    notice = Evidence("host-3", EvidenceKind.MAINTENANCE, clock(), "maintenance at 02:00", Severity.CRITICAL,
                      attrs={"reason": "PlannedMaintenance"})
    ctrl.report(AgentReport(Heartbeat("host-3", clock(), 2), (notice,)))
    assert ctrl.tick() and isinstance(ctrl.state, Draining)
    assert fleet.groups[0].checkpoints == [True]
    assert not ctrl.tick()  # until the fresh checkpoint lands and the ranks exit
    clock.advance(1)
    event(ctrl, clock, TrainerPhase.CHECKPOINT, 0, 7)
    fleet.groups[0].finish()
    assert ctrl.tick() and isinstance(ctrl.state, Scheduling)
    assert ctrl.pool.state("host-3") == HostState.QUARANTINED
    it = ctrl.ledger.interruptions[0]
    assert it.planned and it.verdict.cause == RootCause.HOST_MAINTENANCE and ctrl.responder.restarts == 0


def test_a_host_whose_agent_falls_silent_is_taken_out(make):
    ctrl, fleet, clock = running(make)
    clock.advance(11)  # heartbeat window 10 s
    heartbeat_all(ctrl, clock, ["host-1", "host-3", "host-4"])
    assert ctrl.tick() and isinstance(ctrl.state, Failing)
    assert ctrl.pool.state("host-2") == HostState.QUARANTINED
    clock.advance(2)
    ctrl.tick()
    assert ctrl.verdicts[-1].hosts == ("host-2",)


def test_operator_restart_quarantine_return_and_stop(make):
    ctrl, fleet, clock = running(make)
    ctrl.request_restart("new data mix")
    assert ctrl.tick() and isinstance(ctrl.state, Scheduling)  # the operator's move is a transition of its own
    assert ctrl.ledger.interruptions[0].planned and ctrl.attempt == 1 and len(fleet.groups) == 1
    assert fleet.groups[0].shutdowns == [tuple(HOSTS[:3])]
    assert ctrl.tick() and isinstance(ctrl.state, Running) and len(fleet.groups) == 2
    ctrl.quarantine("host-2", "bad fan")  # a host of the job: it is restarted without it
    assert ctrl.tick() and isinstance(ctrl.state, Scheduling)
    assert ctrl.tick() and isinstance(ctrl.state, Running)
    assert "host-2" not in fleet.groups[-1].hosts and ctrl.attempt == 2
    fleet.problems["host-2"] = ["GPU 0 temperature 95 C"]
    assert ctrl.return_to_service("host-2") == ["GPU 0 temperature 95 C"]
    assert ctrl.pool.state("host-2") == HostState.QUARANTINED
    fleet.problems.clear()
    assert ctrl.return_to_service("host-2") == [] and ctrl.pool.state("host-2") == HostState.SPARE
    ctrl.request_stop("end of the experiment")
    assert ctrl.tick() and isinstance(ctrl.state, Stopped) and "operator" in ctrl.state.reason
    assert fleet.groups[-1].shutdowns


def test_not_enough_hosts_waits_then_stops(make):
    ctrl, fleet, clock = make()
    fleet.hosts = {"host-1": "n1", "host-2": "n2"}
    assert not ctrl.tick() and isinstance(ctrl.state, Scheduling)
    clock.advance(61)
    assert ctrl.tick() and isinstance(ctrl.state, Stopped) and "need 3, have 2" in ctrl.state.reason


def test_the_loop_goes_on_through_a_store_outage_and_loses_no_record(make, tmp_path):
    store = Flaky(Store(f"sqlite:///{tmp_path / 'h.db'}"))
    ctrl, fleet, clock = running(make, store=store)
    ctrl.records.min_backoff_s = ctrl.records.max_backoff_s = 0.01
    store.down.set()
    step(ctrl, clock, 6)
    fleet.groups[0].fail(1, -9)
    ctrl.report(AgentReport(Heartbeat("host-2", clock(), 2), (Evidence(
        "host-2", EvidenceKind.GPU_XID, clock(), "Xid 79: GPU has fallen off the bus", Severity.CRITICAL, code=79),)))
    for _ in range(4):
        ctrl.tick()
        clock.advance(1)
    assert isinstance(ctrl.state, Running) and ctrl.attempt == 1  # evicted and restarted, store down throughout
    assert not ctrl.records.flush(0.2) and ctrl.status()["store"]["degraded"]
    store.down.clear()
    assert ctrl.records.flush(5) and not ctrl.status()["store"]["degraded"]
    (it,) = store.store.interruptions("unit")
    assert it.verdict.cause == RootCause.FAULTY_GPU
    assert {h.host: h.state for h in store.store.hosts()}["host-2"] == HostState.QUARANTINED
    assert len(ctrl.responder.history) == 1 and ctrl.responder.lemons.failures["host-2"] == 1  # counted once


def test_a_restarted_controller_carries_on_the_job(make, tmp_path):
    ctrl, fleet, clock = running(make)
    w = StatsWriter(stats_dir(tmp_path / "run", "host-1", "unit"), 0, "host-1", 0)
    for n in range(1, 8):
        w.step(n, 0.5, 512, 2.0)
    w.event(TrainerPhase.CHECKPOINT, 5, 0.1)
    ctrl.records.flush(2)
    ctrl.records.close(1)
    again, fleet2, clock2 = make()  # the same job, store and run directory: a controller Ray restarted
    assert again.recovered is not None and again.attempt == 1
    assert again.ledger.step_now == 7 and 5 in again.ledger.ckpt_at
    (it,) = again.ledger.interruptions.values()
    assert it.attempt == 0 and it.verdict.cause == RootCause.UNKNOWN and "controller restarted" in it.verdict.evidence[0]
    heartbeat_all(again, clock2)
    again.tick()
    assert isinstance(again.state, Running) and fleet2.groups[0].attempt == 1


def test_only_legal_transitions_are_taken():
    assert legal(Running(None, 0.0), Failing(None, 0.0)) and not legal(Finished(), Running(None, 0.0))
    assert not legal(Scheduling(0.0), Failing(None, 0.0)) and not legal(BackingOff(0.0), Running(None, 0.0))
    assert all(legal(s_cls.__new__(s_cls), Stopped("x")) for s_cls in TRANSITIONS if s_cls is not Finished)


def test_each_hosts_record_outlives_the_job(make, tmp_path):
    """Failures and precursors are kept in the store by host; the next job's controller starts from them."""
    from herdsman.events import Verdict

    ctrl, fleet, clock = running(make, lemon_threshold=3)
    lemons = ctrl.responder.lemons
    for _ in range(2):
        clock.advance(3600)
        lemons.implicate(Verdict(RootCause.FAULTY_GPU, 0.9, ("host-2",)), clock())
    lemons.warn("host-3", clock())
    assert ctrl.records.flush(2)
    ctrl.records.close(1)
    ctrl.store.upsert_job("unit", state="finished")  # the job ended; a new one starts in the same fleet
    nxt, _, clock2 = make()
    assert nxt.recovered is None
    again = nxt.responder.lemons
    assert again.failures["host-2"] == 2 and again.warnings["host-3"] == 1
    # the third failure, in the new job, makes it a lemon by the count rule (3 within the window)
    clock2.t = clock.t + 3600
    assert again.implicate(Verdict(RootCause.FAULTY_GPU, 0.9, ("host-2",)), clock2()) == ["host-2"]


def test_a_persisting_precursor_counts_once_an_hour(make):
    ctrl, fleet, clock = running(make)
    flap = Evidence("host-4", EvidenceKind.HOST_LOG, clock(), "NicFlap: ens1 carrier changed", Severity.WARNING,
                    attrs={"reason": "NicFlap", "cause": "nic"})
    for i in range(121):  # every 30 s for an hour
        ctrl.report(AgentReport(Heartbeat("host-4", clock(), i), (dataclasses.replace(flap, time=clock()),)))
        clock.advance(30)
    assert ctrl.responder.lemons.warnings["host-4"] == 2  # at 0 s and at 3600 s


def test_an_operator_stop_after_a_fresh_checkpoint(make):
    from orchestrator.states import Stopping

    ctrl, fleet, clock = running(make)
    step(ctrl, clock, 6)
    ctrl.request_stop("end of the experiment", drain=True)
    assert ctrl.tick() and isinstance(ctrl.state, Stopping)
    assert fleet.groups[0].checkpoints == [True]
    assert not ctrl.tick()  # until the ranks have saved and exited
    clock.advance(1)
    event(ctrl, clock, TrainerPhase.CHECKPOINT, 0, 7)
    fleet.groups[0].finish()
    assert ctrl.tick() and isinstance(ctrl.state, Stopped)
    assert "after a checkpoint at step 7" in ctrl.state.reason and "end of the experiment" in ctrl.state.reason
    assert ctrl.records.flush(2) and ctrl.store.job("unit").state == "stopped"
    assert ctrl.store.job("unit").config and "[trainer]" in ctrl.store.job("unit").config  # as submitted


def test_a_drained_stop_that_never_saves_stops_at_the_deadline(make):
    from orchestrator.states import Stopping

    ctrl, fleet, clock = running(make, drain_timeout_s=30.0)
    ctrl.request_stop("now-ish", drain=True)
    ctrl.tick()
    assert isinstance(ctrl.state, Stopping)
    clock.advance(31)
    heartbeat_all(ctrl, clock)
    assert ctrl.tick() and isinstance(ctrl.state, Stopped) and "without a fresh checkpoint" in ctrl.state.reason
