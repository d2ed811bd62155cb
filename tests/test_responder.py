"""One failure responder: the controller and the simulator make the same decisions from the same verdicts."""

import pytest

from herdsman.config import ControllerConfig, load_config
from herdsman.events import AgentReport, Evidence, EvidenceKind, Heartbeat, HostState, Severity, TrainerPhase, Verdict
from herdsman.taxonomy import Action, RootCause
from orchestrator import failures as failures_module
from orchestrator.controller import Controller
from orchestrator.policy import HostPool
from orchestrator.responder import FailureResponder
from orchestrator.simulate import Simulation, profile
from orchestrator.states import BackingOff, Running, Stopped
from tests.controller_fakes import Clock, FakeFleet, event, heartbeat_all

SPARE = "spare"  # the failure strikes an idle spare, not the job
# (cause, index of the blamed host in the placement or None or SPARE, evidence, did the failed attempt commit a
# checkpoint)
SEQUENCE = [
    (RootCause.SOFTWARE_BUG, 0, "ValueError: a", True),
    (RootCause.FAULTY_GPU, 1, "Xid 79", False),
    (RootCause.FAULTY_GPU, SPARE, "NVRM: Xid (PCI:0000:3b:00): 79, GPU has fallen off the bus", False),
    (RootCause.SOFTWARE_BUG, 0, "KeyError: b", False),
    (RootCause.UNKNOWN, 2, "rank 2 exited with signal 9", True),
    (RootCause.NETWORK_SWITCH_CABLE, None, "NCCL WARN NET/IB : Got completion with error 12", False),
    (RootCause.SOFTWARE_BUG, 0, "AssertionError: loss is nan", False),
    (RootCause.SOFTWARE_BUG, 0, "AssertionError: loss is nan", False),
    (RootCause.SOFTWARE_BUG, 0, "AssertionError: loss is nan", False),  # the same crash a third time: stop
]
LIMITS = dict(lemon_window_s=14 * 86400.0, lemon_threshold=3)  # the simulator's defaults, for both


def verdict(cause, blamed, evidence, placement):
    hosts = () if blamed is None else (placement[blamed],)
    return Verdict(cause, 0.9, hosts, (), (evidence,), cause.facts.action, "test")


@pytest.fixture
def spy(monkeypatch):
    """Every response the shared responder gives, to failures of the job and of idle spares, hosts counted."""
    seen = []
    real, real_spare = FailureResponder.respond, FailureResponder.spare_failed

    def respond(self, v, progressed, pool, now):
        r = real(self, v, progressed, pool, now)
        seen.append(("job", v.cause, progressed, r.action, r.backoff_s, len(r.evict), len(r.lemons), len(r.suspect)))
        return r

    def spare_failed(self, host, v, pool, now):
        r = real_spare(self, host, v, pool, now)
        seen.append((SPARE, v.cause, None, r.action, r.backoff_s, len(r.evict), len(r.lemons), len(r.suspect)))
        return r

    monkeypatch.setattr(FailureResponder, "respond", respond)
    monkeypatch.setattr(FailureResponder, "spare_failed", spare_failed)
    return seen


def idle_spare(pool, in_job):
    return sorted(h for h in pool.usable() if pool.state(h) == HostState.SPARE and h not in in_job)[0]


def through_the_controller(tmp_path, monkeypatch):
    clock = Clock()
    cfg = load_config(overrides={"run_dir": str(tmp_path / "run"), "job": "same",
                                 "cluster": {"worker_hosts": 3, "spare_hosts": 3},
                                 "controller": {"max_restarts": 1000, "failure_grace_s": 0.0, **LIMITS}})
    fleet = FakeFleet(clock, [f"host-{i}" for i in range(1, 7)])
    ctrl = Controller(cfg, fleet=fleet, clock=clock)
    step = 0
    try:
        for cause, blamed, evidence, progressed in SEQUENCE:
            heartbeat_all(ctrl, clock, list(fleet.hosts))
            while not isinstance(ctrl.state, (Running, Stopped)):
                clock.advance(0.5)
                heartbeat_all(ctrl, clock, list(fleet.hosts))
                ctrl.tick()
            assert isinstance(ctrl.state, Running)
            group = fleet.groups[-1]
            if blamed == SPARE:  # its agent reports the fault; the controller diagnoses it from that evidence
                h, attempt = idle_spare(ctrl.pool, group.hosts), ctrl.attempt
                xid = Evidence(h, EvidenceKind.GPU_XID, clock(), evidence, Severity.CRITICAL, gpu=0, code=79)
                ctrl.report(AgentReport(Heartbeat(h, clock(), 1), (xid,)))
                ctrl.tick()
                assert isinstance(ctrl.state, Running) and ctrl.attempt == attempt
                continue
            event(ctrl, clock, TrainerPhase.RESTORED, ctrl.attempt, step)
            if progressed:
                step += 5
                clock.advance(1)
                event(ctrl, clock, TrainerPhase.CHECKPOINT, ctrl.attempt, step)
            v = verdict(cause, blamed, evidence, group.hosts)
            monkeypatch.setattr(failures_module, "diagnose", lambda failure, evidence, v=v: v)
            for r in group.exit:
                group.fail(r, 1)
            ctrl.tick()
            ctrl.tick()
            assert isinstance(ctrl.state, (BackingOff, Stopped))
        return ctrl
    finally:
        ctrl.records.close(1)


def through_the_simulator(monkeypatch):
    sim = Simulation(profile("llama3", gpus=24, gpus_per_host=8, spare_hosts=3, history_days=0, **LIMITS))
    sim._place([], 0.0)
    up_at = 0.0
    for cause, blamed, evidence, progressed in SEQUENCE:
        if blamed == SPARE:
            h = idle_spare(sim.pool, sim.active)
            v = Verdict(cause, 1.0, (h,), (), (evidence,), cause.facts.action, "test")
            monkeypatch.setattr(sim, "_diagnose", lambda c, hosts, v=v: v)
            sim._spare_failure(up_at + 1.0, cause, h)
            continue
        v = verdict(cause, blamed, evidence, sim.active)
        monkeypatch.setattr(sim, "_diagnose", lambda c, h, v=v: v)
        t = up_at + (sim.interval_s + sim.cfg.checkpoint_stall_s + 1 if progressed else 1.0)
        up_at = sim._interruption(t, False, cause, v.hosts, up_at)
    return sim


def test_the_same_verdicts_get_the_same_decisions_in_the_controller_and_the_simulator(tmp_path, monkeypatch, spy):
    ctrl = through_the_controller(tmp_path, monkeypatch)
    in_controller = list(spy)
    spy.clear()
    sim = through_the_simulator(monkeypatch)
    in_simulator = list(spy)
    assert len(in_controller) == len(SEQUENCE)
    assert in_controller == in_simulator
    assert in_controller[2] == (SPARE, RootCause.FAULTY_GPU, None, Action.EVICT, 0.0, 1, 0, 0)
    actions = [a for _, _, _, a, *_ in in_controller]
    assert actions[1] == Action.EVICT and actions[-1] == Action.STOP and Action.RESTART in actions
    backoffs = [b for *_, b, _, _, _ in in_controller]
    # the second failure of the job in a row without progress backs off (the spare's between them is not the job's)
    assert backoffs[0] == 0.0 and backoffs[3] > 0
    assert isinstance(ctrl.state, Stopped) and sim.result.interruptions[-1].action == Action.STOP
    assert len(sim.result.interruptions) == len(SEQUENCE) - 1 and sim.result.spare_failures == 1
    # both suspect the host of the unexplained failure and quarantine the faulty GPU's host and the failed spare
    assert sum(s for *_, s in in_controller) == 1
    assert sorted(s.state for s in ctrl.pool.status.values()).count(HostState.QUARANTINED) == 2
    assert sorted(s.state for s in sim.pool.status.values()).count(HostState.QUARANTINED) == 2


def test_progress_resets_the_backoff_and_a_drain_is_not_a_restart():
    r = FailureResponder(ControllerConfig(restart_backoff_s=1.0))
    pool = HostPool()
    pool.sync(["a", "b", "c"], 0.0)
    bug = [Verdict(RootCause.SOFTWARE_BUG, 0.8, ("a",), (), (f"E{i}",)) for i in range(4)]
    assert [r.respond(v, p, pool, 1.0).backoff_s for v, p in zip(bug, (False, False, True, False))] == \
        [0.0, 1.0, 0.0, 0.0]
    d = r.drain(Verdict(RootCause.HOST_MAINTENANCE, 1.0, ("b",)), pool, 2.0)
    assert d.action == Action.DRAIN and d.evict == ("b",) and pool.state("b") == HostState.QUARANTINED
    assert r.restarts == 4
    r.human_reset()
    assert r.restarts == 0 and r.history == []
