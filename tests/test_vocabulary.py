import dataclasses
from pathlib import Path

import pytest

from herdsman.events import (IB_LINK_DOWNED, Evidence, EvidenceKind, Interruption, Reason, Severity, StepStats,
                             Verdict, to_dict, verdict_from_dict)
from herdsman.taxonomy import FACTS, TABLE5_UNEXPECTED, Action, RootCause
from herdsman.xid import XIDS

ROOT = Path(__file__).resolve().parent.parent


def test_all_table5_categories_plus_unknown():
    assert len(RootCause) == 19
    assert RootCause.UNKNOWN in RootCause
    assert set(FACTS) == set(RootCause)
    assert sum(f.table5_count for f in FACTS.values()) == TABLE5_UNEXPECTED


def test_cause_facts_drive_actions():
    assert RootCause.FAULTY_GPU.facts.host_fault and RootCause.FAULTY_GPU.facts.action == Action.EVICT
    assert not RootCause.SOFTWARE_BUG.facts.host_fault and RootCause.SOFTWARE_BUG.facts.action == Action.RESTART
    assert RootCause.DEPENDENCY.facts.action == Action.STOP


@pytest.mark.parametrize("cause", list(RootCause))
def test_every_cause_has_a_runbook(cause):
    text = (ROOT / "runbooks" / cause.runbook).read_text()
    for section in ("How Herdsman detects it", "What a human must do", "Returning the host to service",
                    "When to escalate"):
        assert section in text


def test_xid_catalogue_points_at_table5_causes():
    assert XIDS[79].cause == RootCause.FAULTY_GPU and XIDS[79].fatal
    assert XIDS[48].cause == RootCause.GPU_HBM3_MEMORY
    assert XIDS[119].cause == RootCause.GPU_SYSTEM_PROCESSOR


def test_events_are_frozen_and_round_trip():
    v = Verdict(RootCause.FAULTY_GPU, 0.9, ("h1",), (3,), ("Xid 79",), Action.EVICT, "why")
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.confidence = 0.1  # type: ignore[misc]
    assert verdict_from_dict(to_dict(v)) == v
    e = Evidence("h1", EvidenceKind.GPU_XID, 1.0, "Xid 79", Severity.CRITICAL, gpu=0, code=79)
    assert to_dict(e)["kind"] == "gpu_xid" and e.line() == "[h1 gpu0] gpu_xid: Xid 79"


def test_verdict_confidence_bounded():
    with pytest.raises(ValueError):
        Verdict(RootCause.UNKNOWN, 1.5)


def test_interruption_time_split():
    it = Interruption("j", 0, Verdict(RootCause.UNKNOWN, 0.3), failed_at=100.0, detected_at=101.5,
                      restarted_at=105.0, resumed_at=106.0, last_step=20, resumed_step=15, lost_work_s=2.0)
    assert (it.detection_s, it.restart_s, it.restore_s, it.lost_steps) == (1.5, 3.5, 1.0, 5)
    assert StepStats(0, "h", 0, 1, 0.0, 0.5, 100, 1.0).tokens_per_s == 200


def test_the_link_down_counter_is_one_name_for_the_agent_and_the_diagnosis():
    from agents.host import IB_COUNTERS
    from orchestrator.diagnose import candidate

    assert IB_LINK_DOWNED in IB_COUNTERS
    rise = Evidence("h1", EvidenceKind.HOST_LOG, 1.0, f"InfinibandErrors: mlx5_0/1 {IB_LINK_DOWNED} +1",
                    Severity.WARNING, attrs={"reason": Reason.IB_ERRORS.value, "counter": IB_LINK_DOWNED})
    assert candidate(rise)[0] == RootCause.NIC
    other = dataclasses.replace(rise, attrs={**rise.attrs, "counter": "symbol_error"})  # errors on a link still up
    assert candidate(other) is None
