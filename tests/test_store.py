import pytest

from herdsman.events import HostState, HostStatus, Interruption, Verdict
from herdsman.taxonomy import Action, RootCause
from orchestrator.store import Store, StoreError


def interruption(attempt=0, **kw):
    v = Verdict(RootCause.FAULTY_GPU, 0.95, ("h2",), (1,), ("Xid 79",), Action.EVICT, "hw")
    return Interruption("job", attempt, v, failed_at=10.0, detected_at=11.0, last_step=20, **kw)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'h.db'}"
    base = request.getfixturevalue("postgres_url")
    s = Store(base)  # each test starts from empty tables
    from orchestrator.store import Base
    Base.metadata.drop_all(s.engine)
    s.close()
    return base


def test_interruptions_persist_with_split_and_never_duplicate(url):
    s = Store(url)
    s.upsert_job("job", state="running", target_step=60)
    s.record_interruption(interruption())
    s.record_interruption(interruption(restarted_at=14.0, resumed_at=15.0, resumed_step=15, lost_work_s=1.5))
    s.close()
    again = Store(url)  # reopening loses nothing
    (it,) = again.interruptions("job")
    assert it.verdict.cause == RootCause.FAULTY_GPU and it.verdict.hosts == ("h2",)
    assert (it.detection_s, it.restart_s, it.restore_s, it.lost_steps, it.lost_work_s) == (1.0, 3.0, 1.0, 5, 1.5)
    assert again.job("job").target_step == 60


def test_host_states_and_history(url):
    s = Store(url)
    s.set_host_state(HostStatus("h1", HostState.HEALTHY, 1.0))
    s.set_host_state(HostStatus("h1", HostState.HEALTHY, 2.0))  # no change, no event
    s.set_host_state(HostStatus("h1", HostState.QUARANTINED, 3.0, "Xid 79"))
    assert s.hosts() == [HostStatus("h1", HostState.QUARANTINED, 3.0, "Xid 79")]
    assert [e.state for e in s.host_events("h1")] == [HostState.HEALTHY, HostState.QUARANTINED]


def test_bad_url_is_a_clear_error():
    with pytest.raises(StoreError, match="cannot open the store"):
        Store("nosuchdialect://x")
