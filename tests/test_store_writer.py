"""The controller's writes survive a store outage: retried with backoff, idempotent, spooled at shutdown."""

import logging
import threading
import time

import pytest

from herdsman.events import HostState, HostStatus, Interruption, Verdict
from herdsman.taxonomy import Action, RootCause
from orchestrator.store import Store, StoreError
from orchestrator.store_writer import StoreWriter


def interruption(attempt=0, **kw):
    v = Verdict(RootCause.FAULTY_GPU, 0.95, ("h2",), (1,), ("Xid 79",), Action.EVICT, "hw")
    return Interruption("job", attempt, v, failed_at=10.0, detected_at=11.0, last_step=20, **kw)


class Flaky:
    """A store that fails every call while `down` is set (as a locked or stopped database does)."""

    def __init__(self, store):
        self.store, self.down, self.calls = store, threading.Event(), 0

    def __getattr__(self, name):
        real = getattr(self.store, name)

        def call(*a, **kw):
            self.calls += 1
            if self.down.is_set():
                raise StoreError("store sqlite:///x: upsert_job failed: OperationalError: database is locked")
            return real(*a, **kw)
        return call


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'h.db'}")
    yield s
    s.close()


def test_an_outage_delays_records_and_loses_none(store, caplog):
    flaky = Flaky(store)
    flaky.down.set()
    w = StoreWriter(flaky, min_backoff_s=0.01, max_backoff_s=0.05)
    with caplog.at_level(logging.WARNING, logger="herdsman.store"):
        w.upsert_job("job", state="running", target_step=60)
        w.record_interruption(interruption())
        w.set_host_state(HostStatus("h2", HostState.QUARANTINED, 3.0, "Xid 79"))
        w.upsert_job("job", last_step=20)  # merged with the first, not replacing it
        w.record_interruption(interruption(restarted_at=14.0, resumed_at=15.0, resumed_step=15))
        assert not w.flush(0.3)
        assert w.degraded and w.pending == 3 and "database is locked" in w.last_error
        assert flaky.calls > 3  # it kept retrying
        flaky.down.clear()
        assert w.flush(5)
    assert not w.degraded and w.pending == 0
    job = store.job("job")
    assert (job.state, job.target_step, job.last_step) == ("running", 60, 20)
    (it,) = store.interruptions("job")
    assert it.resumed_step == 15  # the latest version of the record, once
    assert [h.state for h in store.host_events("h2")] == [HostState.QUARANTINED]
    text = caplog.text
    assert text.count("STORE DEGRADED") == 1 and "store is back" in text
    w.close()


def test_fields_set_during_a_failed_write_are_kept(store):
    flaky = Flaky(store)
    w = StoreWriter(flaky, min_backoff_s=0.01, max_backoff_s=0.02)
    flaky.down.set()
    w.upsert_job("job", state="running", attempt=1)
    time.sleep(0.05)  # the first write is being retried
    w.upsert_job("job", last_step=7)
    flaky.down.clear()
    assert w.flush(5)
    job = store.job("job")
    assert (job.state, job.attempt, job.last_step) == ("running", 1, 7)
    w.close()


def test_what_is_unwritten_at_shutdown_is_spooled_and_replayed(store, tmp_path):
    flaky = Flaky(store)
    flaky.down.set()
    spool = tmp_path / "job.store-spool.jsonl"
    w = StoreWriter(flaky, spool=spool, min_backoff_s=0.01, max_backoff_s=0.02)
    w.upsert_job("job", state="stopped", message="x")
    w.record_interruption(interruption(restarted_at=14.0))
    w.set_host_state(HostStatus("h2", HostState.QUARANTINED, 3.0, "Xid 79"))
    assert w.close(timeout_s=0.2) == 3 and spool.exists()
    assert store.job("job") is None
    w2 = StoreWriter(store, spool=spool)  # the next controller of the job, the store back
    assert w2.flush(5)
    assert store.job("job").state == "stopped"
    assert store.interruptions("job")[0].restarted_at == 14.0
    assert store.hosts() == [HostStatus("h2", HostState.QUARANTINED, 3.0, "Xid 79")]
    assert not spool.exists() and spool.with_suffix(".replayed").exists()
    w2.close()


def test_a_spool_with_damaged_lines_replays_the_rest(store, tmp_path):
    spool = tmp_path / "s.jsonl"
    spool.write_text('not json\n{"op": "set_host_state", "arg": {"host": "h1", "state": "nonsense"}}\n'
                     '{"op": "upsert_job", "arg": ["job", {"state": "running"}]}\n')
    w = StoreWriter(store, spool=spool)
    assert w.flush(5) and store.job("job").state == "running"
    w.close()
