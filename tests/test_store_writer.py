"""The controller's writes survive a store outage: retried with backoff, idempotent, spooled at shutdown."""

import json
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

CHILD = r'''
import sys, time
from pathlib import Path
from herdsman.events import HostState, HostStatus
from orchestrator.store import HostIncident, Store
from orchestrator.store_writer import StoreWriter
from tests.test_store_writer import Flaky, interruption

db, spool = sys.argv[1], Path(sys.argv[2])
flaky = Flaky(Store(f"sqlite:///{db}"))
w = StoreWriter(flaky, spool=spool, min_backoff_s=0.01, max_backoff_s=0.05)
w.upsert_job("job", state="running", target_step=60, attempt=0)  # these land before the outage
w.record_interruption(interruption(0, restarted_at=14.0))
w.set_host_state(HostStatus("h2", HostState.QUARANTINED, 3.0, "Xid 79"))
assert w.flush(10)
flaky.down.set()  # the store goes away, and the controller goes on recording
w.set_host_state(HostStatus("h2", HostState.HEALTHY, 30.0, "back"))
w.record_interruption(interruption(1))
w.record_interruption(interruption(1, restarted_at=44.0))  # the latest version of attempt 1's record
w.record_incident(HostIncident("h3", 40.0, "xid", "faulty_gpu", "job"))
w.upsert_job("job", attempt=1, last_step=20)
print("queued", flush=True)  # every call above has returned: the records are durable from here on
time.sleep(600)
'''


def test_a_controller_killed_during_an_outage_loses_no_record_and_doubles_none(store, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    db, spool = tmp_path / "h.db", tmp_path / "job.store-spool.jsonl"
    root = Path(__file__).resolve().parent.parent
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(db), str(spool)], cwd=root, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "queued"
    finally:
        os.kill(child.pid, signal.SIGKILL)  # as the OOM killer does: no close(), no spool
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL and not spool.exists()
    assert store.job("job").attempt == 0 and len(store.interruptions("job")) == 1  # the outage's records: not in

    counting = Flaky(store)  # up: counts the writes the next writer makes
    w2 = StoreWriter(counting, spool=spool)  # the job's next controller
    assert w2.flush(5)
    assert counting.calls == 4  # the 4 records still waiting, once each; nothing that had landed is written again
    job = store.job("job")
    assert (job.state, job.target_step, job.attempt, job.last_step) == ("running", 60, 1, 20)
    its = store.interruptions("job")
    assert [(i.attempt, i.restarted_at) for i in its] == [(0, 14.0), (1, 44.0)]
    assert [(h.state, h.since) for h in store.host_events("h2")] == [(HostState.QUARANTINED, 3.0),
                                                                     (HostState.HEALTHY, 30.0)]
    assert store.hosts()[0].state == HostState.HEALTHY
    assert [(i.host, i.kind) for i in store.incidents()] == [("h3", "xid")]
    journal = spool.with_suffix(".journal")
    assert journal.exists() and journal.read_text() == ""  # all written: the journal is empty again
    w2.close()
    assert not journal.exists() and not spool.exists()  # an orderly stop with nothing left leaves nothing


def test_the_journal_is_trimmed_as_records_land_and_rewritten_in_a_long_outage(store, tmp_path, monkeypatch):
    import orchestrator.store_writer

    monkeypatch.setattr(orchestrator.store_writer, "JOURNAL_SLACK", 20)
    spool = tmp_path / "job.store-spool.jsonl"
    journal = spool.with_suffix(".journal")
    flaky = Flaky(store)
    w = StoreWriter(flaky, spool=spool, min_backoff_s=0.01, max_backoff_s=0.02)
    w.upsert_job("job", state="running")
    assert w.flush(5) and journal.read_text() == ""  # written: nothing kept
    flaky.down.set()
    for step in range(200):  # a long outage: the job row is rewritten again and again
        w.upsert_job("job", last_step=step)
    lines = journal.read_text().splitlines()  # one durable line per call, rewritten to what waits as it grows
    assert 1 <= len(lines) <= 4 * 1 + 20 and json.loads(lines[-1])["arg"] == ["job", {"last_step": 199}]
    w.set_host_state(HostStatus("h1", HostState.QUARANTINED, 1.0, "x"))
    flaky.down.clear()
    assert w.flush(5) and journal.read_text() == ""
    assert store.job("job").last_step == 199
    w.close()
    assert not journal.exists()
