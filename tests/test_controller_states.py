"""The controller's state machine beyond the happy paths (tests/test_controller.py): the transitions out of
Draining and BackingOff, operator actions in every state where the job is not simply training, and a store that
fails while a controller starts or recovers. One tick at a time, fake fleet and clock, milliseconds each."""

import sys
import threading

import pytest

from herdsman import HerdsmanError
from herdsman.events import AgentReport, Evidence, EvidenceKind, Heartbeat, HostState, Severity, TrainerPhase
from herdsman.taxonomy import RootCause
from orchestrator.states import TRANSITIONS, BackingOff, Draining, Failing, Finished, Running, Scheduling, Stopped
from orchestrator.states import Stopping, legal
from orchestrator.store import Store, StoreError
from tests.controller_fakes import TAKEN, event, heartbeat_all, running, step
from tests.test_store_writer import Flaky


def decided(ctrl, text):
    return any(text in d for d in ctrl.decisions)


def draining(make, **kw):
    """Running at step 6, then a maintenance notice on host-3: the ranks were asked to save and exit."""
    ctrl, fleet, clock = running(make, **kw)
    step(ctrl, clock, 6)
    notice = Evidence("host-3", EvidenceKind.MAINTENANCE, clock(), "maintenance at 02:00", Severity.CRITICAL,
                      attrs={"reason": "PlannedMaintenance"})
    ctrl.report(AgentReport(Heartbeat("host-3", clock(), 2), (notice,)))
    assert ctrl.tick() and isinstance(ctrl.state, Draining) and fleet.groups[0].checkpoints == [True]
    return ctrl, fleet, clock


def failing(make):
    """An Xid 79 on host-2 while every rank still runs: Failing, within the grace period."""
    ctrl, fleet, clock = running(make)
    step(ctrl, clock, 3)
    xid = Evidence("host-2", EvidenceKind.GPU_XID, clock(), "Xid 79: GPU has fallen off the bus", Severity.CRITICAL,
                   code=79)
    ctrl.report(AgentReport(Heartbeat("host-2", clock(), 2), (xid,)))
    assert ctrl.tick() and isinstance(ctrl.state, Failing)
    return ctrl, fleet, clock


def backing_off(make):
    """Two software failures in a row without progress: the second backs off for 1 s."""
    ctrl, fleet, clock = running(make)
    for i in range(2):
        if i:
            assert ctrl.tick() and isinstance(ctrl.state, Scheduling)
            assert ctrl.tick() and isinstance(ctrl.state, Running)
        g = fleet.groups[-1]
        g.fail(0, 1, f"RuntimeError: failure number {i}")
        for r in (1, 2):
            g.fail(r, -15)
        ctrl.tick()
        ctrl.tick()
        assert isinstance(ctrl.state, BackingOff)
    assert ctrl.state.until - clock() == 1.0
    return ctrl, fleet, clock


# --- transitions -------------------------------------------------------------------------------------------
def test_failing_to_running_is_an_in_process_restart(make):
    """A rank died after progress, no host leaves: the others rejoin the next attempt in their own processes
    (more in tests/test_inprocess.py)."""
    ctrl, fleet, clock = running(make, inprocess_restart=True)
    step(ctrl, clock, 3)
    fleet.groups[0].fail(1, -9)
    assert ctrl.tick() and isinstance(ctrl.state, Failing)
    fleet.groups[0].reported.update({0: clock(), 2: clock()})  # the witnesses wait to rejoin
    clock.advance(1.5)
    assert ctrl.tick() and isinstance(ctrl.state, Running) and ctrl.state.group is fleet.groups[0]
    assert ctrl.attempt == 1 and fleet.groups[0].rejoins == [(1, {1})]


def test_a_rank_that_fails_during_a_drain_turns_it_into_a_failure(make):
    ctrl, fleet, clock = draining(make)
    fleet.groups[0].fail(1, -9)
    assert ctrl.tick() and isinstance(ctrl.state, Failing)
    clock.advance(1.5)
    assert ctrl.tick() and isinstance(ctrl.state, BackingOff)
    (it,) = ctrl.ledger.interruptions.values()  # diagnosed as a failure: the maintenance notice explains it
    assert it.verdict.cause == RootCause.HOST_MAINTENANCE and ctrl.responder.restarts == 1
    assert ctrl.pool.state("host-3") == HostState.QUARANTINED and fleet.groups[0].shutdowns == [("host-1", "host-2")]


def test_a_backoff_waits_its_time_then_schedules(make):
    ctrl, fleet, clock = backing_off(make)
    clock.advance(0.5)
    assert not ctrl.tick() and isinstance(ctrl.state, BackingOff)  # BackingOff -> BackingOff
    clock.advance(0.6)
    assert ctrl.tick() and isinstance(ctrl.state, Scheduling)


def test_failing_never_goes_straight_to_scheduling():
    """Its response ends in BackingOff or Stopped, and an operator's restart is refused while it is diagnosed
    (below): Failing -> Scheduling cannot happen, so the table does not list it."""
    assert not legal(Failing(None, 0.0), Scheduling(0.0))
    assert legal(Draining(None, None, 0.0, 0.0), Stopping(None, "", 0.0, 0.0))


# --- operator actions while the job is failing ---------------------------------------------------------------
def test_an_operator_restart_while_failing_is_refused_and_the_failure_is_handled(make):
    ctrl, fleet, clock = failing(make)
    ctrl.request_restart("impatient")
    assert not ctrl.tick() and isinstance(ctrl.state, Failing)
    assert decided(ctrl, "operator restart refused while failing: a failure is being diagnosed")
    assert fleet.groups[0].shutdowns == [] and ctrl.ledger.interruptions == {}
    clock.advance(1.5)
    assert ctrl.tick() and isinstance(ctrl.state, BackingOff)
    (it,) = ctrl.ledger.interruptions.values()  # one interruption, the failure's, with its verdict
    assert it.verdict.cause == RootCause.FAULTY_GPU and ctrl.pool.state("host-2") == HostState.QUARANTINED


def test_a_host_quarantined_while_failing_is_left_out_of_the_restart(make):
    ctrl, fleet, clock = failing(make)
    ctrl.quarantine("host-3", "bad fan")
    assert not ctrl.tick() and isinstance(ctrl.state, Failing)  # its restart request is refused: one is coming
    fleet.hosts["host-5"] = "node-host-5"  # (two hosts are out: one more joins for the restart)
    clock.advance(1.5)
    heartbeat_all(ctrl, clock, ["host-1", "host-2", "host-3", "host-4", "host-5"])
    assert ctrl.tick() and isinstance(ctrl.state, BackingOff)
    assert ctrl.tick() and isinstance(ctrl.state, Scheduling)
    assert ctrl.tick() and isinstance(ctrl.state, Running)
    assert fleet.groups[-1].hosts == ["host-1", "host-4", "host-5"] and len(ctrl.ledger.interruptions) == 1


@pytest.mark.parametrize("drain", [False, True])
def test_an_operator_stop_while_failing_records_the_failure_then_stops(make, drain):
    """The failure happened whatever the operator wants next: it is diagnosed, its host taken out and the
    interruption recorded (without the grace for the other ranks); then the job stops, nothing saved first."""
    ctrl, fleet, clock = failing(make)
    ctrl.request_stop("enough", drain=drain)  # nothing trains: there is nothing to save first
    assert ctrl.tick() and isinstance(ctrl.state, Stopped) and "stopped by an operator: enough" in ctrl.state.reason
    assert fleet.groups[0].shutdowns[-1] == () and fleet.groups[0].checkpoints == []
    (it,) = ctrl.ledger.interruptions.values()
    assert it.verdict.cause == RootCause.FAULTY_GPU and ctrl.pool.state("host-2") == HostState.QUARANTINED
    assert ctrl.records.flush(2) and [i.verdict.cause for i in ctrl.store.interruptions("unit")] == [
        RootCause.FAULTY_GPU]


# --- ... while it backs off ------------------------------------------------------------------------------------
def test_operator_actions_while_backing_off(make):
    ctrl, fleet, clock = backing_off(make)
    groups, attempt = len(fleet.groups), ctrl.attempt
    ctrl.request_restart("now please")
    assert not ctrl.tick() and isinstance(ctrl.state, BackingOff)
    assert decided(ctrl, "operator restart refused while backingoff: the job restarts when its backoff ends")
    ctrl.quarantine("host-1", "bad fan")  # a host of the last group: out of the next placement, nothing else
    fleet.problems["host-1"] = ["GPU 0 temperature 95 C"]
    assert ctrl.return_to_service("host-1") == ["GPU 0 temperature 95 C"]
    assert not ctrl.tick() and isinstance(ctrl.state, BackingOff)
    assert (len(fleet.groups), ctrl.attempt, len(ctrl.ledger.interruptions)) == (groups, attempt, 2)
    clock.advance(1.1)
    heartbeat_all(ctrl, clock)
    ctrl.tick()
    ctrl.tick()
    assert isinstance(ctrl.state, Running) and fleet.groups[-1].hosts == ["host-2", "host-3", "host-4"]


@pytest.mark.parametrize("drain", [False, True])
def test_an_operator_stop_while_backing_off_stops_at_once(make, drain):
    ctrl, fleet, clock = backing_off(make)
    ctrl.request_stop("enough", drain=drain)
    assert ctrl.tick() and isinstance(ctrl.state, Stopped)
    assert ctrl.records.flush(2) and ctrl.store.job("unit").state == "stopped"


# --- ... while it drains -------------------------------------------------------------------------------------
def test_an_operator_restart_or_quarantine_while_draining_lets_the_drain_finish(make):
    ctrl, fleet, clock = draining(make)
    ctrl.request_restart("impatient")
    ctrl.quarantine("host-1", "bad fan")
    assert not ctrl.tick() and isinstance(ctrl.state, Draining)
    assert decided(ctrl, "operator restart refused while draining")
    assert fleet.groups[0].shutdowns == [] and ctrl.ledger.interruptions == {}
    clock.advance(1)
    event(ctrl, clock, TrainerPhase.CHECKPOINT, 0, 7)
    fleet.groups[0].finish()
    assert ctrl.tick() and isinstance(ctrl.state, Scheduling)
    (it,) = ctrl.ledger.interruptions.values()
    assert it.planned and ctrl.pool.state("host-3") == HostState.QUARANTINED
    assert ctrl.pool.state("host-1") == HostState.QUARANTINED


def test_an_operator_stop_while_draining_stops_at_once_and_the_host_still_goes_to_its_maintenance(make):
    ctrl, fleet, clock = draining(make)
    ctrl.request_stop("enough")
    assert ctrl.tick() and isinstance(ctrl.state, Stopped) and fleet.groups[0].shutdowns == [()]
    assert ctrl.pool.state("host-3") == HostState.QUARANTINED  # the next job is not placed on it


def test_a_drained_stop_while_draining_waits_for_the_save_already_asked_for(make):
    ctrl, fleet, clock = draining(make)
    deadline = ctrl.state.deadline
    ctrl.request_stop("end of the experiment", drain=True)
    assert ctrl.tick() and isinstance(ctrl.state, Stopping) and ctrl.state.deadline == deadline
    assert fleet.groups[0].checkpoints == [True]  # not asked twice
    ctrl.request_stop("again", drain=True)
    assert not ctrl.tick() and isinstance(ctrl.state, Stopping) and decided(ctrl, "already stopping so")
    ctrl.request_restart("no")
    assert not ctrl.tick() and decided(ctrl, "operator restart refused while stopping")
    clock.advance(1)
    event(ctrl, clock, TrainerPhase.CHECKPOINT, 0, 7)
    fleet.groups[0].finish()
    assert ctrl.tick() and isinstance(ctrl.state, Stopped) and "after a checkpoint at step 7" in ctrl.state.reason
    assert ctrl.pool.state("host-3") == HostState.QUARANTINED  # the drain's host still goes to its maintenance


# --- ... after the job ended -----------------------------------------------------------------------------------
def test_operator_actions_on_a_finished_job_change_nothing_of_it(make):
    ctrl, fleet, clock = running(make)
    fleet.groups[0].finish()
    assert ctrl.tick() and isinstance(ctrl.state, Finished)
    for refused in (lambda: ctrl.request_restart("again"), lambda: ctrl.request_stop("x"),
                    lambda: ctrl.request_stop("x", drain=True)):
        with pytest.raises(HerdsmanError, match="the job has already ended"):
            refused()
    ctrl.quarantine("host-2", "bad fan")  # the host's state is the fleet's business; the job is over
    assert ctrl.pool.state("host-2") == HostState.QUARANTINED
    assert ctrl.return_to_service("host-2") == [] and ctrl.pool.state("host-2") == HostState.SPARE
    assert not ctrl.tick() and isinstance(ctrl.state, Finished)  # Finished -> Finished
    assert len(fleet.groups) == 1 and ctrl.attempt == 0 and ctrl.ledger.interruptions == {}
    assert ctrl.records.flush(2) and ctrl.store.job("unit").state == "finished"


def test_a_request_that_reaches_an_ended_job_is_ignored(make):
    ctrl, fleet, clock = running(make)
    ctrl.request_stop("first")
    ctrl.request_restart("second, queued before the first was carried out")
    assert ctrl.tick() and isinstance(ctrl.state, Stopped) and "first" in ctrl.state.reason
    assert decided(ctrl, "operator restart ignored: the job has already ended")
    assert not ctrl.tick() and isinstance(ctrl.state, Stopped)  # Stopped -> Stopped
    assert len(fleet.groups) == 1 and ctrl.ledger.interruptions == {}


# --- a store that fails while a controller starts or recovers ----------------------------------------------------
class FailingOn(Flaky):
    """A store that fails only the named calls while `down` is set."""

    def __init__(self, store, names):
        super().__init__(store)
        self.names = names

    def __getattr__(self, name):
        if name in self.names:
            return super().__getattr__(name)
        return getattr(self.store, name)


def writers():
    return sum(t.name == "herdsman-store-writer" for t in threading.enumerate())


def test_a_controller_that_cannot_read_the_store_does_not_start_and_changes_nothing(make, tmp_path):
    """Without the store's host states and the job's record no placement is safe (a quarantined host, a job half
    done started again from step 0): one clear error; the daemon tries again later."""
    store = Flaky(Store(f"sqlite:///{tmp_path / 'h.db'}"))
    store.down.set()
    before = writers()
    with pytest.raises(StoreError, match=r"controller of job 'unit' not started, nothing changed: store .* failed"):
        make(store=store)
    assert writers() == before  # its store writer was closed with it
    store.down.clear()
    assert store.store.job("unit") is None and store.store.hosts() == []
    ctrl, _, _ = make(store=store)  # the store is back: a fresh start
    assert ctrl.recovered is None and ctrl.records.flush(2) and store.store.job("unit").state == "scheduling"


def test_a_store_that_fails_while_a_controller_recovers_fails_it_cleanly_and_the_next_one_carries_on(make, tmp_path):
    store = FailingOn(Store(f"sqlite:///{tmp_path / 'h.db'}"), {"interruptions"})
    ctrl, fleet, clock = running(make, store=store)
    step(ctrl, clock, 4)
    ctrl.records.flush(2)
    ctrl.records.close(1)
    store.down.set()  # the job record reads, the interruptions do not: recovery stops half way
    with pytest.raises(StoreError, match="not started, nothing changed: store "):
        make(store=store)
    assert store.store.job("unit").state == "running" and store.store.job("unit").attempt == 0
    store.down.clear()
    again, fleet2, clock2 = make(store=store)
    assert again.recovered is not None and again.attempt == 1
    heartbeat_all(again, clock2)
    assert again.tick() and isinstance(again.state, Running) and fleet2.groups[0].attempt == 1


# --- the table ---------------------------------------------------------------------------------------------------
def test_every_legal_transition_is_taken_by_the_controller_tests(request):
    """Each (from, to) of orchestrator/states.py's table happens in tests/test_controller.py or here (recorded by
    the controllers tests/controller_fakes.py builds); checked only when both files ran whole, this test last."""
    modules = ("tests.test_controller", "tests.test_controller_states")
    items = request.session.items
    mine = [i for i in items if i.module.__name__ in modules]
    defined = {f"{m}::{n}" for m in modules if m in sys.modules for n in dir(sys.modules[m]) if n.startswith("test_")}
    ran = {f"{i.module.__name__}::{i.originalname}" for i in mine}
    if set(modules) - set(sys.modules) or defined - ran or mine[-1] is not request.node:
        pytest.skip("only when every test of tests/test_controller.py and this file runs, this one last")
    legal_moves = {(a, b) for a, bs in TRANSITIONS.items() for b in bs}
    assert not legal_moves - TAKEN, sorted((a.__name__, b.__name__) for a, b in legal_moves - TAKEN)
    assert not TAKEN - legal_moves
