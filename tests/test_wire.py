"""The agents' wire format and the report relays: what a fleet sends arrives whole, and compact; bad frames are
refused one by one; a relay forwards every frame, in order, and keeps what it could not send."""

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from agents.gpu import xid_evidence
from agents.gpu_sim import SimulatedGpus
from bench.controller_ingest import fleet_reports
from herdsman import wire
from herdsman.config import load_config
from herdsman.events import (
    AgentReport,
    Evidence,
    EvidenceKind,
    Heartbeat,
    Severity,
    StepStats,
    TrainerEvent,
    TrainerPhase,
)
from orchestrator.controller import Controller
from orchestrator.relay import Relay, assign, relay_name
from tests.test_controller import Clock, FakeFleet


def full_report(host="h1", seq=3):
    gpus = tuple(SimulatedGpus(host, 2, seed=1).sample())
    ev = (xid_evidence(host, 1, 79, 10.0),
          Evidence(host, EvidenceKind.HOST_LOG, 11.0, "NicFlap: ib0", Severity.WARNING, rank=2,
                   attrs={"reason": "NicFlap", "lagging": [1, 2], "nested": {"a": 1.5}}))
    steps = (StepStats(0, host, 1, 7, 12.0, 0.5, 4096, 2.25, 0.4), StepStats(1, host, 1, 7, 12.0, 0.5, 4096, 2.5))
    events = (TrainerEvent(0, host, 1, TrainerPhase.CHECKPOINT, 13.0, 5, 0.2, "saved", 123, 0),
              TrainerEvent(1, host, 1, TrainerPhase.FAILED, 14.0, 7, 0.0, "boom", 124, 1))
    return AgentReport(Heartbeat(host, 9.5, seq, "http://127.0.0.1:9/metrics", gpus), ev, steps, events)


def test_a_report_travels_whole_and_heartbeats_alone_are_tiny():
    r = full_report()
    (back,), bad = wire.decode(wire.encode(r, ranks=None))
    assert back == r and bad == 0 and isinstance(back.heartbeat.gpus[0].throttle_reasons, tuple)
    # by default only rank 0's records travel (the ledger's); samples only when asked
    (lean,), _ = wire.decode(wire.encode(r, samples=False))
    assert lean.heartbeat.gpus == () and lean.heartbeat.metrics_url == ""
    assert [s.rank for s in lean.steps] == [0] and [e.rank for e in lean.trainer_events] == [0]
    assert lean.evidence == r.evidence  # evidence always travels
    (fleet,) = fleet_reports(1, 8, 1)
    hb = wire.encode(AgentReport(fleet.heartbeat), samples=False)
    assert len(hb) < 64 and len(wire.encode(fleet)) > 10 * len(hb)


def test_frames_concatenate_and_bad_ones_are_refused_alone():
    frames = [wire.encode(full_report(f"h{i}"), samples=i % 2 == 0) for i in range(5)]
    junk = msgpack.packb([1, 2, 3]) + msgpack.packb([wire.VERSION, "h", "seq", 1.0, None, None, [], [], []])
    newer = msgpack.packb([wire.VERSION + 1, "h9", 1, 1.0, None, None, [], [], []])
    out, bad = wire.decode(frames[0] + junk + frames[1] + newer + b"".join(frames[2:]))
    assert [r.heartbeat.host for r in out] == [f"h{i}" for i in range(5)] and bad == 3
    out, bad = wire.decode(b"".join(frames)[:-5])  # cut short: the whole frames before the cut are kept
    assert len(out) == 4 and bad == 1
    assert wire.decode(b"\xc1 not msgpack") == ([], 1)
    assert wire.decode(b"\x00" * (wire.MAX_BATCH_BYTES + 1)) == ([], 1)
    bad_kind = msgpack.packb([wire.VERSION, "h", 1, 1.0, None, None,
                              [["h", "no-such-kind", 1.0, "m", "warning", None, None, None, {}]], [], []])
    assert wire.decode(bad_kind + frames[0])[1] == 1 and len(wire.decode(bad_kind + frames[0])[0]) == 1


@settings(max_examples=300, deadline=None)
@given(hs.binary(max_size=2048))
def test_any_bytes_decode_to_reports_or_refusals_never_an_exception(blob):
    out, bad = wire.decode(blob)
    assert all(isinstance(r, AgentReport) for r in out) and bad >= 0


_values = hs.recursive(hs.none() | hs.booleans() | hs.integers(-2**63, 2**63 - 1) | hs.floats() | hs.text(max_size=8),
                       lambda inner: hs.lists(inner, max_size=4) | hs.dictionaries(hs.text(max_size=4), inner,
                                                                                   max_size=3), max_leaves=12)


@settings(max_examples=400, deadline=None)
@given(hs.lists(_values, min_size=8, max_size=8))
def test_frames_with_the_right_header_and_wrong_insides_are_refused_not_raised(rest):
    blob = msgpack.packb([wire.VERSION, *rest]) + wire.encode(full_report())
    out, bad = wire.decode(blob)
    assert len(out) + bad == 2 and out[-1].heartbeat.host == "h1"


def test_urgent_means_it_may_end_an_attempt():
    hb = Heartbeat("h", 1.0, 1)
    assert wire.urgent(AgentReport(hb, (xid_evidence("h", 0, 79, 1.0),)))
    assert not wire.urgent(AgentReport(hb, (xid_evidence("h", 0, 13, 1.0),)))  # Xid 13: an application error
    assert wire.urgent(AgentReport(hb, (), (), (TrainerEvent(0, "h", 0, TrainerPhase.FAILED, 1.0),)))
    assert not wire.urgent(AgentReport(hb, (), (StepStats(0, "h", 0, 1, 1.0, 1.0, 1, 1.0),)))


@pytest.fixture
def controller(tmp_path):
    made = []

    def build():
        clock = Clock()
        cfg = load_config(overrides={"run_dir": str(tmp_path / f"run{len(made)}"), "job": "wire"})
        c = Controller(cfg, fleet=FakeFleet(clock, hosts=[f"h{i}" for i in range(40)]), clock=clock)
        made.append(c)
        return c

    yield build
    for c in made:
        c.records.close(timeout_s=1)


def test_the_controller_keeps_readings_between_samples_and_wakes_for_fatal_evidence(controller):
    c = controller()
    r = full_report("h1")
    assert c.ingest(wire.encode(r)) == 1 and c._wake.is_set()  # the Xid 79 in it
    c._wake.clear()
    assert c.heartbeats["h1"].gpus == r.heartbeat.gpus
    later = AgentReport(Heartbeat("h1", 20.0, 4, "", ()), (), (StepStats(0, "h1", 1, 8, 21.0, 0.5, 1, 2.0),))
    assert c.ingest(wire.encode(later, samples=False) + b"\xc1") == 1
    assert c.heartbeats["h1"].gpus == r.heartbeat.gpus and c.heartbeats["h1"].metrics_url  # kept
    assert c.frames_refused == 1 and not c._wake.is_set() and c.ledger.step_now == 8
    assert "h1" in c.last_heard


def test_relays_forward_every_frame_in_order_and_keep_what_failed():
    sent, fail = [], [True]

    def forward(blob):
        if fail[0]:
            raise ConnectionError("controller restarting")
        sent.append(blob)

    relay = Relay("j", forward=forward, start=False, max_buffered_bytes=10_000)
    frames = [wire.encode(AgentReport(Heartbeat(f"h{i}", 1.0, i)), samples=False) for i in range(10)]
    for f in frames[:5]:
        relay.send(f)
    assert relay.flush() == 0 and relay.stats()["buffered"] == 5 and relay.failed_sends == 1  # kept
    fail[0] = False
    for f in frames[5:]:
        relay.send(f)
    assert relay.flush() == 10 and sent == [b"".join(frames)]
    relay.send(frames[0], urgent=True)  # forwarded at once, without waiting for the flush period
    assert len(sent) == 2 and relay.stats() == {"frames_in": 11, "frames_out": 11, "buffered": 0, "dropped": 0,
                                                "failed_sends": 1}
    fail[0] = True  # an outage past the cap drops the oldest frames, counted
    for i in range(2000):
        relay.send(frames[i % 10])
    relay.flush()
    assert relay.dropped > 0 and sum(map(len, relay._frames)) <= 10_000


def test_the_controllers_view_through_relays_is_the_same_as_direct(controller):
    hosts = [f"h{i}" for i in range(40)]
    reports = []
    for seq in range(1, 4):
        for i, h in enumerate(hosts):
            ev = (xid_evidence(h, 0, 79, seq),) if (i, seq) == (7, 2) else ()
            steps = (StepStats(0, h, 0, seq, float(seq), 1.0, 8, 3.0 - seq / 10),) if i == 0 else ()
            reports.append(AgentReport(Heartbeat(h, float(seq), seq, f"http://{h}/metrics",
                                                 tuple(SimulatedGpus(h, 2, seed=i).sample())), ev, steps))
    direct, relayed = controller(), controller()
    for r in reports:
        direct.report(r)
    routes = assign(hosts, "wire", 16)
    assert set(routes.values()) == {relay_name("wire", k) for k in range(3)}
    relays = {name: Relay("wire", forward=relayed.ingest, start=False) for name in set(routes.values())}
    for r in reports:
        relays[routes[r.heartbeat.host]].send(wire.encode(r, ranks=None), urgent=wire.urgent(r))
    for relay in relays.values():
        relay.flush()
    assert relayed.heartbeats == direct.heartbeats and list(relayed.evidence) == list(direct.evidence)
    assert relayed.ledger.step_time == direct.ledger.step_time and set(relayed.last_heard) == set(hosts)
    assert sum(r.frames_out for r in relays.values()) == len(reports)
    assert assign(hosts, "wire", 0) == assign(hosts, "wire", 64) == {h: "" for h in hosts}  # small: direct
