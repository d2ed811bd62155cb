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
    drop_everything(s)
    return base


def drop_everything(s):
    from sqlalchemy import text

    from orchestrator.store import Base
    Base.metadata.drop_all(s.engine)
    with s.engine.begin() as c:
        c.execute(text("DROP TABLE IF EXISTS alembic_version"))
    s.close()


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


FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"


def old_database(url):
    """Load a database written by Herdsman before migrations existed (dumped from that version's store)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    pg = engine.dialect.name == "postgresql"
    sql = (FIXTURES / "store-v0.sql").read_text()
    if pg:  # what the old create_all made there: SERIAL keys
        sql = sql.replace("id INTEGER NOT NULL", "id SERIAL NOT NULL")
    with engine.begin() as c:
        for stmt in sql.split(";\n"):
            if stmt.strip() and stmt.strip() not in ("BEGIN TRANSACTION", "COMMIT"):
                c.execute(text(stmt))
        for table in ("host_events", "interruptions") if pg else ():
            c.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))"))
    engine.dispose()
    return url


def test_a_database_from_before_migrations_is_upgraded_in_place(url):
    from orchestrator.store import schema_revision

    s = Store(url)
    drop_everything(s)
    s = Store(old_database(url))
    assert schema_revision(s.engine) == "0005"
    job = s.job("llama3-demo")
    assert (job.state, job.last_step, job.attempt) == ("finished", 60, 2)
    (it,) = s.interruptions("llama3-demo")
    assert it.verdict.cause == RootCause.FAULTY_GPU and it.lost_work_s == 1.5
    # a job recorded before the time accounts: its split from what was kept, the rest unexplained
    from orchestrator.report import summarize

    split = summarize(s, "llama3-demo").split
    assert job.accounts is None and split["lost_work"] == 1.5 and split["unexplained"] > 0
    # the duplicate event an old controller wrote twice is gone, the history is otherwise whole
    assert [(e.state, e.since) for e in s.host_events("host-2")] == [(HostState.HEALTHY, 1.0),
                                                                     (HostState.QUARANTINED, 3.0)]
    s.set_host_state(HostStatus("host-2", HostState.HEALTHY, 9.0, "returned"))
    s.close()
    assert Store(url).hosts() == [HostStatus("host-2", HostState.HEALTHY, 9.0, "returned")]  # reopening: no-op


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(tmp_path):
    from sqlalchemy import text

    s = Store(f"sqlite:///{tmp_path / 'h.db'}")
    with s.engine.connect() as c:
        assert c.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert c.execute(text("PRAGMA busy_timeout")).scalar() >= 10000


def test_a_damaged_database_is_one_clear_line(tmp_path):
    bad = tmp_path / "h.db"
    bad.write_bytes(b"this is not a database" * 200)
    with pytest.raises(StoreError) as e:
        Store(f"sqlite:///{bad}")
    msg = str(e.value)
    assert "cannot open the store" in msg and "not a database" in msg and "\n" not in msg


def test_a_read_only_database_is_one_clear_line(tmp_path):
    path = tmp_path / "h.db"
    Store(f"sqlite:///{path}").close()
    ro = Store(f"sqlite:///file:{path}?mode=ro&uri=true")  # what a read-only mount or file mode gives
    with pytest.raises(StoreError) as e:
        ro.upsert_job("job", state="running")
    assert "\n" not in str(e.value) and "readonly" in str(e.value) and "upsert_job failed" in str(e.value)


def test_a_schema_newer_than_this_herdsman_is_refused(tmp_path):
    from sqlalchemy import text

    url = f"sqlite:///{tmp_path / 'h.db'}"
    s = Store(url)
    with s.engine.begin() as c:
        c.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    s.close()
    with pytest.raises(StoreError, match="newer than this Herdsman knows"):
        Store(url)


def test_errors_hide_the_password():
    with pytest.raises(StoreError) as e:
        Store("postgresql+psycopg://herdsman:s3cret-pw@127.0.0.1:1/db?connect_timeout=1")
    assert "s3cret-pw" not in str(e.value) and "***" in str(e.value)


def test_host_event_writes_are_idempotent(url):
    s = Store(url)
    st = HostStatus("h1", HostState.QUARANTINED, 3.0, "Xid 79")
    s.set_host_state(st)
    from sqlalchemy import update

    from orchestrator.store import HostRow
    with s.engine.begin() as c:  # as if the commit was lost after the event row landed: the retry adds nothing
        c.execute(update(HostRow).where(HostRow.host == "h1").values(state="healthy"))
    s.set_host_state(st)
    assert [e.state for e in s.host_events("h1")] == [HostState.QUARANTINED]


def test_an_ended_job_is_archived_under_another_name(url):
    s = Store(url)
    s.upsert_job("job", state="finished", target_step=60, config="job = 'job'\n")
    s.record_interruption(interruption())
    s.archive_job("job", "job@20261130-050000")
    assert s.job("job") is None and s.interruptions("job") == []
    old = s.job("job@20261130-050000")
    assert old.state == "finished" and old.config == "job = 'job'\n"
    assert [i.attempt for i in s.interruptions("job@20261130-050000")] == [0]
    s.upsert_job("job", state="scheduling")  # the name starts afresh
    with pytest.raises(StoreError, match="name is taken"):
        s.upsert_job("job", state="finished") or s.archive_job("job", "job@20261130-050000")
