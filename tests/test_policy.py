import math

from herdsman.config import ControllerConfig
from herdsman.events import HostState, Verdict
from herdsman.taxonomy import Action, RootCause
from orchestrator.policy import HostPool, RestartPolicy


def pool(*hosts):
    p = HostPool()
    p.sync(list(hosts))
    return p


def test_placement_keeps_previous_hosts_and_uses_spares():
    p = pool("a", "b", "c", "d")
    first = p.place(3, [])
    assert first == ["a", "b", "c"]
    p.activate(first)
    assert p.state("d") == HostState.SPARE
    p.quarantine("b", "Xid 79")
    second = p.place(3, first)
    assert second == ["a", "c", "d"]
    p.activate(second)
    assert p.state("b") == HostState.QUARANTINED and p.state("d") == HostState.HEALTHY
    p.quarantine("a", "x")
    assert p.place(3, second) is None  # not enough healthy hosts


def test_quarantine_survives_restore_and_sync():
    p = pool("a", "b")
    p.quarantine("a", "Xid 48")
    q = HostPool()
    q.restore(list(p.status.values()))
    q.sync(["a", "b"])
    assert q.state("a") == HostState.QUARANTINED


def test_vanished_host_is_unreachable_then_comes_back_as_spare():
    p = pool("a", "b")
    p.sync(["a"])
    assert p.state("b") == HostState.UNREACHABLE
    p.sync(["a", "b"])
    assert p.state("b") == HostState.SPARE


def test_silent_agent_is_unreachable_until_it_reports_again():
    p = pool("a", "b")
    p.activate(["a"])
    p.check_heartbeats({"a": 100.0, "b": 95.0}, now=101.0, timeout_s=5.0)
    assert p.state("a") == HostState.HEALTHY and p.state("b") == HostState.UNREACHABLE
    assert p.place(2, ["a"]) is None
    p.check_heartbeats({"a": 102.0, "b": 102.0}, now=103.0, timeout_s=5.0)  # a flap: back, not evicted
    assert p.state("b") == HostState.SPARE and p.place(2, ["a"]) == ["a", "b"]
    p.quarantine("a", "Xid 79")
    p.check_heartbeats({"a": 0.0}, now=103.0, timeout_s=5.0)
    assert p.state("a") == HostState.QUARANTINED


def policy(**kw):
    return RestartPolicy(ControllerConfig(**kw))


def test_hardware_cause_evicts_and_software_bug_restarts():
    gpu = Verdict(RootCause.FAULTY_GPU, 0.95, ("h2",), (1,), ("Xid 79",))
    d = policy().decide(gpu, [], 0, 0)
    assert d.action == Action.EVICT and d.evict == ("h2",)
    bug = Verdict(RootCause.SOFTWARE_BUG, 0.8, ("h1",), (0,), ("ValueError",))
    d = policy().decide(bug, [], 0, 0)
    assert d.action == Action.RESTART and d.evict == ()


def test_budget_backoff_and_crash_loop():
    bug = Verdict(RootCause.SOFTWARE_BUG, 0.8, ("h1",), (0,), ("[h1 rank0] ValueError: x",))
    assert policy(max_restarts=2).decide(bug, [], 2, 0).action == Action.STOP
    p = policy(restart_backoff_s=1.0)
    assert [p.decide(bug, [], 0, n).backoff_s for n in (0, 1, 2, 3, 4)] == [0.0, 0.0, 1.0, 2.0, 4.0]
    assert p.decide(bug, [], 0, 5000).backoff_s == 60.0  # capped, and 2**5000 does not overflow (found by the simulator)
    assert p.decide(bug, [bug], 1, 1).action == Action.RESTART  # twice is not yet a loop
    same_elsewhere = Verdict(RootCause.SOFTWARE_BUG, 0.8, ("h3",), (2,), ("[h3 rank2] ValueError: x",))
    d = p.decide(same_elsewhere, [bug, bug], 2, 2)  # the third time, whichever rank raised it
    assert d.action == Action.STOP and "crash loop" in d.reason and d.evict == ()
    other = Verdict(RootCause.SOFTWARE_BUG, 0.8, ("h1",), (0,), ("[h1 rank0] KeyError: y",))
    assert p.decide(other, [bug, bug], 2, 0).action == Action.RESTART


def test_lemon_host_is_found_in_its_window_only():
    from orchestrator.policy import LemonDetector
    lemon = LemonDetector(window_s=100.0, threshold=3)
    unknown = Verdict(RootCause.UNKNOWN, 0.4, ("h2",), (1,))
    assert lemon.implicate(unknown, 0.0) == [] and lemon.implicate(unknown, 50.0) == []
    assert lemon.implicate(unknown, 90.0) == ["h2"]  # third time within 100 s
    assert lemon.implicate(Verdict(RootCause.SOFTWARE_BUG, 0.8, ("h1",)), 91.0) == []  # not the host's fault
    spaced = LemonDetector(window_s=100.0, threshold=3)
    assert [spaced.implicate(unknown, t) for t in (0.0, 150.0, 300.0)] == [[], [], []]


def test_lemon_evidence_flags_at_99_to_1_odds_not_9_to_1():
    """A flag sends a host to RMA: 9:1 odds let one flag in ten be a healthy host (2-3 per simulated run)."""
    from orchestrator.policy import LemonDetector

    def three_failures(**kw):
        d = LemonDetector(window_s=100.0, threshold=100, **kw)  # the count rule out of the way
        for i in range(100):
            d.enroll(f"h{i}", 0.0)
        gpu = Verdict(RootCause.FAULTY_GPU, 0.9, ("h0",))
        return [d.implicate(gpu, t) for t in (86400.0, 86500.0, 86600.0)], d

    flags, d = three_failures()
    posterior_log_odds = d.score("h0", 86600.0) - math.log(49)  # the prior: 2 lemons in 100 hosts
    assert flags == [[], [], []] and math.log(9) < posterior_log_odds < math.log(99)
    assert three_failures(odds=9.0)[0][-1] == ["h0"]  # enough for 9:1, not for 99:1
    assert [d.implicate(Verdict(RootCause.FAULTY_GPU, 0.9, ("h0",)), 86700.0)] == [["h0"]]  # a fourth is


def test_a_switch_that_fails_under_several_hosts_is_not_their_record():
    from orchestrator.policy import LemonDetector
    d = LemonDetector(window_s=100.0, threshold=1)
    assert d.implicate(Verdict(RootCause.NETWORK_SWITCH_CABLE, 0.8, ("h1", "h2", "h3")), 0.0) == []
    assert d.failures == {}
    assert d.implicate(Verdict(RootCause.NETWORK_SWITCH_CABLE, 0.8, ("h1",)), 1.0) == ["h1"]  # its own cable
