"""In-process restart: the trainer's side (which failures a rank waits out, the rejoin order) and the controller's
(which ranks keep their processes, and the fall back to restarting processes). The real thing, two gloo ranks of
which one dies and the other rejoins in its own process, is in tests/test_trainer.py; on a Ray cluster, in
tests/test_e2e.py."""

import json

import pytest

from herdsman.events import AgentReport, Evidence, EvidenceKind, Heartbeat, Severity, TrainerPhase
from orchestrator.states import BackingOff, Failing, Running
from tests.controller_fakes import event, heartbeat_all, running, step
from trainer import control, rejoin
from trainer.faults import InjectedFault
from trainer.sdc import PeerCorruption


def _raised(outer, inner):
    try:
        try:
            raise inner
        except Exception as e:
            raise outer from e
    except Exception as e:
        return e


@pytest.mark.parametrize("error, witness", [
    (RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:5"), True),
    (RuntimeError("[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:38321: Connection reset by peer"), True),
    (RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 30000ms for recv operation"), True),
    (_raised(ValueError("during the step"), RuntimeError("NCCL communicator was aborted on rank 3")), True),
    (InjectedFault("boom"), False),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), False),
    (ValueError("shapes (4, 128) and (256,) not aligned"), False),
    (PeerCorruption("rank(s) [1] failed their parameter check"), False),
])
def test_only_a_collective_broken_by_a_peer_makes_a_rank_wait_to_rejoin(error, witness):
    assert rejoin.peer_failure(error) is witness


def test_a_rank_reports_its_failure_to_its_rank_actor_for_its_attempt_only(tmp_path):
    """The fast path beside the stats stream: the rank actor's poll (orchestrator/workers.py) reads it."""
    from trainer import control

    import time

    assert control.failed_at(tmp_path / "ctl", 1, 3) is None and control.failed_at(None, 1, 3) is None
    control.report_failed(tmp_path / "ctl", 1, 3)
    assert abs(control.failed_at(tmp_path / "ctl", 1, 3) - time.time()) < 5
    assert control.failed_at(tmp_path / "ctl", 1, 4) is None and control.failed_at(tmp_path / "ctl", 0, 3) is None
    (tmp_path / "file").write_text("")
    control.report_failed(tmp_path / "file" / "ctl", 1, 3)  # cannot be written: never raises, the stream remains
    control.report_failed(None, 1, 3)


def test_a_rejoin_order_is_read_once_and_only_for_a_later_attempt(tmp_path):
    control.write_order(tmp_path, 2, 5, {"MASTER_PORT": "1234", "HERDSMAN_ATTEMPT": "5"}, "/tmp/x.log")
    assert control.pending(tmp_path, 2, 5) is None  # not later than the attempt it is in: stale, and gone
    assert not control.order_path(tmp_path, 2).exists()
    control.write_order(tmp_path, 2, 6, {"MASTER_PORT": "1234"}, "/tmp/x.log")
    assert control.pending(tmp_path, 1, 5) is None  # another rank's
    order = control.pending(tmp_path, 2, 5)
    assert order["attempt"] == 6 and order["env"] == {"MASTER_PORT": "1234"} and order["log"] == "/tmp/x.log"
    assert control.pending(tmp_path, 2, 5) is None  # read once
    for body in ("{not json", json.dumps({"attempt": 9, "env": {"A": 1}}), json.dumps([1, 2]),
                 json.dumps({"attempt": "9", "env": {}})):
        control.order_path(tmp_path, 2).write_text(body)
        assert control.pending(tmp_path, 2, 5) is None and not control.order_path(tmp_path, 2).exists()
    assert rejoin.wait(tmp_path, 2, 5, wait_s=0.1) is None  # none came: the rank exits


def _dies(ctrl, fleet, clock, rank=1, stuck=()):
    """Rank `rank` dies after progress; the others (witnesses) report their broken collective to their rank actors
    and live on, waiting to rejoin; those in `stuck` neither report nor exit."""
    step(ctrl, clock, 7)
    event(ctrl, clock, TrainerPhase.CHECKPOINT, 0, 5)
    ctrl.tick()
    clock.advance(1)
    group = fleet.groups[0]
    group.fail(rank, -9)
    assert ctrl.tick() and isinstance(ctrl.state, Failing)
    clock.advance(0.1)
    group.reported.update({r: clock() for r in range(group.world_size) if r != rank and r not in stuck})
    clock.advance(1.5)
    return ctrl.tick()


def test_a_dead_rank_is_replaced_and_the_others_rejoin_in_their_processes(make):
    ctrl, fleet, clock = running(make, inprocess_restart=True)
    assert _dies(ctrl, fleet, clock) and isinstance(ctrl.state, Running)
    group = fleet.groups[0]
    assert len(fleet.groups) == 1 and ctrl.state.group is group and group.shutdowns == []
    assert group.rejoins == [(1, {1})] and ctrl.attempt == 1
    assert any("in-process restart" in d and "rank(s) [0, 2] keep their processes" in d for d in ctrl.decisions)
    assert ctrl.ledger.marks["launched"][1] == clock()  # the restart's legs are measured from here
    # the kept rank 0's next attempt completes the interruption as a process restart's would
    clock.advance(0.5)
    event(ctrl, clock, TrainerPhase.STARTED, 1)
    event(ctrl, clock, TrainerPhase.RENDEZVOUS, 1)
    clock.advance(0.2)
    event(ctrl, clock, TrainerPhase.RESTORED, 1, 5)
    step(ctrl, clock, 6, attempt=1)
    assert not ctrl.tick() and isinstance(ctrl.state, Running)
    assert ctrl.records.flush(2)
    (it,) = ctrl.store.interruptions("unit")
    assert it.restart_s is not None and it.resumed_step == 5


def test_a_rank_that_neither_waits_nor_exits_after_the_grace_is_started_anew(make):
    """Rank 1 dies; rank 0 waits to rejoin; rank 2 is stuck (in a collective with rank 0, which left its gloo group
    with its sockets open): ordered to rejoin it would come a collective timeout late, so it starts anew."""
    ctrl, fleet, clock = running(make, inprocess_restart=True)
    assert _dies(ctrl, fleet, clock, stuck=(2,)) and isinstance(ctrl.state, Running)
    assert fleet.groups[0].rejoins == [(1, {1, 2})]
    assert any("rank(s) [0] keep their processes, rank(s) [1, 2] start anew" in d for d in ctrl.decisions)


def test_a_silent_rank_is_taken_for_stuck_two_step_intervals_after_a_witness_waits(make):
    """Steps every 0.2 s: a rank not blocked on the witness (which keeps its gloo sockets open while it waits)
    hears of the failure at its next collective; one still silent 0.4 s after the witness began to wait is stuck,
    and the failure is handled then, not at the end of the 1 s grace."""
    ctrl, fleet, clock = running(make, inprocess_restart=True)
    for n in range(1, 26):
        step(ctrl, clock, n)
        clock.advance(0.2)
    ctrl.tick()
    group = fleet.groups[0]
    group.fail(1, -9)
    assert ctrl.tick() and isinstance(ctrl.state, Failing)
    clock.advance(0.1)
    group.reported[0] = clock()  # rank 0 waits to rejoin; rank 2 says nothing
    clock.advance(0.3)
    assert not ctrl.tick() and isinstance(ctrl.state, Failing)  # rank 2 may still be finishing its step
    clock.advance(0.15)
    assert ctrl.tick() and isinstance(ctrl.state, Running)  # 0.55 s after the failure
    assert group.rejoins == [(1, {1, 2})]


def test_ranks_that_wait_on_the_named_rank_are_kept_while_nobody_has_left(make):
    """Rank 1's own code failed and it is still on its way out (a save in flight), past the grace: the others are
    blocked on it, not on a witness that left; stopping it frees them, so they are kept."""
    ctrl, fleet, clock = running(make, inprocess_restart=True)
    step(ctrl, clock, 7)
    ctrl.tick()
    clock.advance(1)
    ctrl.report(AgentReport(Heartbeat("host-2", clock(), 1), evidence=(Evidence(
        "host-2", EvidenceKind.TRAINER_EXCEPTION, clock(), "Traceback (most recent call last):\nKeyError: 'lr_scale'",
        Severity.CRITICAL, rank=1, attrs={"attempt": 0}),)))
    assert ctrl.tick() and isinstance(ctrl.state, Failing)
    clock.advance(1.5)
    assert ctrl.tick() and isinstance(ctrl.state, Running)
    assert fleet.groups[0].rejoins == [(1, {1})] and ctrl.verdicts[-1].ranks == (1,)


@pytest.mark.parametrize("named", [(2,), ()])
def test_a_hung_rank_named_by_the_verdict_is_replaced(make, monkeypatch, named):
    """Every rank alive, no step for the hang timeout: the rank the verdict names is stopped and started anew, the
    others rejoin; with nobody named, a hung rank cannot be told from a waiting one and every process restarts."""
    import orchestrator.failures as failures
    from herdsman.events import Verdict
    from herdsman.taxonomy import RootCause

    monkeypatch.setattr(failures, "diagnose", lambda failure, evidence: Verdict(
        RootCause.NCCL_WATCHDOG_TIMEOUT, 0.9, ("host-3",) if named else (), named, (), reason="a hang"))
    ctrl, fleet, clock = running(make, inprocess_restart=True)
    step(ctrl, clock, 4)
    clock.advance(31)
    heartbeat_all(ctrl, clock)
    assert ctrl.tick() and isinstance(ctrl.state, Failing) and ctrl.state.hang
    assert ctrl.tick()
    if named:
        assert isinstance(ctrl.state, Running) and fleet.groups[0].rejoins == [(1, {2})]
    else:
        assert isinstance(ctrl.state, BackingOff) and fleet.groups[0].rejoins == []


def test_an_in_process_attempt_that_fails_before_its_first_step_falls_back_to_processes(make):
    ctrl, fleet, clock = running(make, inprocess_restart=True)
    assert _dies(ctrl, fleet, clock) and isinstance(ctrl.state, Running) and ctrl.attempt == 1
    clock.advance(1)
    fleet.groups[0].fail(0, 1, "Traceback (most recent call last):\nRuntimeError: TCPStore timed out")
    assert ctrl.tick() and isinstance(ctrl.state, Failing)
    clock.advance(1.5)
    assert ctrl.tick() and isinstance(ctrl.state, BackingOff)
    assert fleet.groups[0].rejoins == [(1, {1})] and fleet.groups[0].shutdowns  # processes this time


def test_an_order_that_cannot_be_given_falls_back_to_processes(make):
    ctrl, fleet, clock = running(make, inprocess_restart=True)
    step(ctrl, clock, 3)
    fleet.groups[0].rejoin_error = RuntimeError("rank actor gone")
    fleet.groups[0].fail(1, -9)
    ctrl.tick()
    fleet.groups[0].reported.update({0: clock(), 2: clock()})  # the witnesses wait to rejoin
    clock.advance(1.5)
    assert ctrl.tick() and isinstance(ctrl.state, BackingOff)
    assert fleet.groups[0].shutdowns == [()] and ctrl.attempt == 1
    assert any("in-process restart failed" in d for d in ctrl.decisions)


def test_an_eviction_restarts_processes(make):
    ctrl, fleet, clock = running(make, inprocess_restart=True)
    step(ctrl, clock, 3)
    xid = Evidence("host-2", EvidenceKind.GPU_XID, clock(), "NVRM: Xid 79, GPU has fallen off the bus",
                   Severity.CRITICAL, gpu=0, code=79)
    ctrl.report(AgentReport(Heartbeat("host-2", clock(), 2), (xid,)))
    fleet.groups[0].fail(1, -9)
    ctrl.tick()
    clock.advance(1.5)
    assert ctrl.tick() and isinstance(ctrl.state, BackingOff) and fleet.groups[0].rejoins == []


def test_the_grace_ends_once_every_rank_has_spoken(make):
    """The failure grace waits for evidence; once each rank has said its part (exited, or reported the collective
    a peer broke, through its host's agent or its rank actor) there is nothing left to wait for: the agents are
    asked for a fresh report (Fleet.gather) instead of awaited."""
    ctrl, fleet, clock = running(make, inprocess_restart=True)
    step(ctrl, clock, 7)
    ctrl.tick()
    clock.advance(1)
    fleet.groups[0].fail(1, 1, "Traceback (most recent call last):\nKeyError: 'lr_scale'")
    assert ctrl.tick() and isinstance(ctrl.state, Failing)
    clock.advance(0.1)
    ctrl.report(AgentReport(Heartbeat("host-1", clock(), 1), evidence=(Evidence(  # rank 0 through its agent
        "host-1", EvidenceKind.TRAINER_EXCEPTION, clock(), "RuntimeError: [gloo/transport/tcp/pair.cc:553] "
        "Connection closed by peer [127.0.0.1]:5", Severity.CRITICAL, rank=0, attrs={"attempt": 0}),)))
    assert not ctrl.tick() and isinstance(ctrl.state, Failing)  # rank 2 has not said anything yet
    assert "gather" not in fleet.calls
    fleet.groups[0].reported[2] = clock()  # rank 2 through its rank actor (trainer/control.py's failed-rank file)
    assert ctrl.tick() and isinstance(ctrl.state, Running)  # 0.1 s after the failure, not the 1 s grace
    assert "gather" in fleet.calls
    assert ctrl.verdicts[-1].cause.value == "software_bug" and ctrl.verdicts[-1].ranks == (1,)
    assert fleet.groups[0].rejoins == [(1, {1})]
