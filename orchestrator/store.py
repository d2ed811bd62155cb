"""Durable records through SQLAlchemy: jobs, interruptions with their time split, and host states.

SQLite by default (a file in the run directory, in WAL mode so readers never block the controller's writes);
any SQLAlchemy URL works, PostgreSQL included. Opening a store migrates its schema to this version with Alembic
(orchestrator/migrations/): it never drops data, and a database from before migrations existed is upgraded in
place. Every failure is a StoreError of one line, with the URL's password hidden.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from sqlalchemy import JSON, Float, Integer, String, Text, UniqueConstraint, create_engine, event, func, inspect, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from herdsman import HerdsmanError
from herdsman.secrets import redact_url
from herdsman.events import HostState, HostStatus, Interruption, to_dict, verdict_from_dict


MIGRATIONS = Path(__file__).resolve().parent / "migrations"
BASELINE = "0001"  # the schema before migrations existed
SQLITE_BUSY_TIMEOUT_MS = 15000  # the writer waits out a checkpointing reader or a `sqlite3` shell this long
T = TypeVar("T")


class StoreError(HerdsmanError):
    pass


def _one_line(e: BaseException) -> str:
    """The driver's own message (e.g. sqlite3's 'attempt to write a readonly database'), without SQL or params."""
    orig = getattr(e, "orig", None) or e
    text = str(orig).strip().splitlines()
    return f"{type(orig).__name__}: {text[0] if text else ''}"[:300]


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    __tablename__ = "jobs"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    state: Mapped[str] = mapped_column(String(40))
    started_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    target_step: Mapped[int] = mapped_column(Integer, default=0)
    last_step: Mapped[int] = mapped_column(Integer, default=0)
    productive_s: Mapped[float] = mapped_column(Float, default=0.0)  # kept step time (recomputed steps once)
    checkpoint_s: Mapped[float] = mapped_column(Float, default=0.0)  # time the loop was blocked saving
    message: Mapped[str] = mapped_column(String(2000), default="")
    attempt: Mapped[int] = mapped_column(Integer, default=0)  # the current attempt (a restarted controller goes on)
    config: Mapped[str | None] = mapped_column(Text, nullable=True)  # as submitted, secrets left out
    accounts: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON: marks and split (accounts.py)


class InterruptionRow(Base):
    __tablename__ = "interruptions"
    __table_args__ = (UniqueConstraint("job", "attempt", name="uq_interruption_job_attempt"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job: Mapped[str] = mapped_column(String(200), index=True)
    attempt: Mapped[int] = mapped_column(Integer)  # the attempt that failed
    cause: Mapped[str] = mapped_column(String(64), index=True)
    verdict: Mapped[dict[str, Any]] = mapped_column(JSON)
    planned: Mapped[int] = mapped_column(Integer, default=0)
    failed_at: Mapped[float] = mapped_column(Float)
    detected_at: Mapped[float] = mapped_column(Float)
    restarted_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    resumed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_step: Mapped[int] = mapped_column(Integer, default=0)
    resumed_step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    lost_work_s: Mapped[float] = mapped_column(Float, default=0.0)


class HostRow(Base):
    __tablename__ = "hosts"
    host: Mapped[str] = mapped_column(String(200), primary_key=True)
    state: Mapped[str] = mapped_column(String(32))
    since: Mapped[float] = mapped_column(Float)
    reason: Mapped[str] = mapped_column(String(2000), default="")


class HostEventRow(Base):
    __tablename__ = "host_events"
    __table_args__ = (UniqueConstraint("host", "state", "time", name="uq_host_event"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    host: Mapped[str] = mapped_column(String(200), index=True)
    state: Mapped[str] = mapped_column(String(32))
    time: Mapped[float] = mapped_column(Float)
    reason: Mapped[str] = mapped_column(String(2000), default="")


class HostIncidentRow(Base):
    __tablename__ = "host_incidents"
    __table_args__ = (UniqueConstraint("host", "kind", "time", name="uq_host_incident"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    host: Mapped[str] = mapped_column(String(200), index=True)
    time: Mapped[float] = mapped_column(Float)
    kind: Mapped[str] = mapped_column(String(16))  # failure | precursor
    cause: Mapped[str] = mapped_column(String(64))
    job: Mapped[str] = mapped_column(String(200))


@dataclass(frozen=True)
class HostIncident:
    """A failure a verdict blamed on a host, or a precursor it showed: the lemon detector's record, kept across
    jobs."""

    host: str
    time: float
    kind: str  # "failure" | "precursor"
    cause: str = ""
    job: str = ""


@dataclass(frozen=True)
class JobRecord:
    name: str
    state: str
    started_at: float
    ended_at: float | None
    target_step: int
    last_step: int
    productive_s: float
    checkpoint_s: float
    message: str
    attempt: int = 0
    config: str | None = None
    accounts: str | None = None  # JSON, orchestrator/accounts.py


def _guarded(fn: Callable[..., T]) -> Callable[..., T]:
    """Database errors leave a Store method as one StoreError line naming the store (password hidden)."""

    @functools.wraps(fn)
    def wrapper(self: "Store", *args: Any, **kwargs: Any) -> T:
        try:
            return fn(self, *args, **kwargs)
        except SQLAlchemyError as e:
            raise StoreError(f"store {redact_url(self.url)}: {fn.__name__} failed: {_one_line(e)}") from None
    return wrapper


class Store:
    def __init__(self, url: str):
        self.url = url
        try:
            sqlite = make_url(url).get_backend_name() == "sqlite"
            self.engine = create_engine(url, future=True,
                                        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000} if sqlite else {})
            if sqlite:
                event.listen(self.engine, "connect", _sqlite_pragmas)
            migrate(self.engine)
        except (SQLAlchemyError, ValueError, ImportError, OSError) as e:
            raise StoreError(f"cannot open the store at {redact_url(url)}: {_one_line(e)}") from None
        except HerdsmanError as e:
            raise StoreError(f"cannot open the store at {redact_url(url)}: {e}") from None

    def _session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    # --- jobs ---------------------------------------------------------------------------------------------
    @_guarded
    def upsert_job(self, name: str, **fields: Any) -> None:
        with self._session() as s, s.begin():
            row = s.get(JobRow, name)
            if row is None:
                row = JobRow(name=name, state="created", started_at=time.time())
                s.add(row)
            for k, v in fields.items():
                setattr(row, k, v)

    @_guarded
    def job(self, name: str) -> JobRecord | None:
        with self._session() as s:
            row = s.get(JobRow, name)
            return None if row is None else _job(row)

    @_guarded
    def jobs(self) -> list[JobRecord]:
        with self._session() as s:
            return [_job(r) for r in s.scalars(select(JobRow).order_by(JobRow.started_at))]

    @_guarded
    def archive_job(self, name: str, archived: str) -> None:
        """Keep an ended job's records under another name, so that `name` can start afresh (`--new`)."""
        with self._session() as s, s.begin():
            row = s.get(JobRow, name)
            if row is None:
                return
            if s.get(JobRow, archived) is not None:
                raise StoreError(f"cannot archive job {name!r} as {archived!r}: that name is taken")
            s.add(JobRow(**{c.name: getattr(row, c.name) for c in JobRow.__table__.columns} | {"name": archived}))
            s.delete(row)
            for it in s.scalars(select(InterruptionRow).where(InterruptionRow.job == name)):
                it.job = archived

    # --- interruptions ------------------------------------------------------------------------------------
    @_guarded
    def record_interruption(self, it: Interruption) -> int:
        """Insert, or update the record of the same (job, attempt): a restarted controller never duplicates one."""
        with self._session() as s, s.begin():
            row = s.scalars(select(InterruptionRow).where(InterruptionRow.job == it.job,
                                                          InterruptionRow.attempt == it.attempt)).first()
            if row is None:
                row = InterruptionRow(job=it.job, attempt=it.attempt)
                s.add(row)
            row.cause, row.verdict, row.planned = it.verdict.cause.value, to_dict(it.verdict), int(it.planned)
            row.failed_at, row.detected_at = it.failed_at, it.detected_at
            row.restarted_at, row.resumed_at = it.restarted_at, it.resumed_at
            row.last_step, row.resumed_step, row.lost_work_s = it.last_step, it.resumed_step, it.lost_work_s
            s.flush()
            return row.id

    @_guarded
    def interruptions(self, job: str | None = None, since: float | None = None,
                      until: float | None = None) -> list[Interruption]:
        q = select(InterruptionRow).order_by(InterruptionRow.failed_at)
        if job is not None:
            q = q.where(InterruptionRow.job == job)
        if since is not None:
            q = q.where(InterruptionRow.failed_at >= since)
        if until is not None:
            q = q.where(InterruptionRow.failed_at <= until)
        with self._session() as s:
            return [_interruption(r) for r in s.scalars(q)]

    # --- hosts --------------------------------------------------------------------------------------------
    @_guarded
    def set_host_state(self, status: HostStatus) -> None:
        with self._session() as s, s.begin():
            row = s.get(HostRow, status.host)
            if row is not None and row.state == status.state.value:
                return
            if row is None:
                row = HostRow(host=status.host)
                s.add(row)
            row.state, row.since, row.reason = status.state.value, status.since, status.reason
            key = (HostEventRow.host == status.host, HostEventRow.state == status.state.value,
                   HostEventRow.time == status.since)
            if s.scalars(select(HostEventRow.id).where(*key)).first() is None:  # a retried write adds nothing
                s.add(HostEventRow(host=status.host, state=status.state.value, time=status.since,
                                   reason=status.reason))

    @_guarded
    def hosts(self) -> list[HostStatus]:
        with self._session() as s:
            return [HostStatus(r.host, HostState(r.state), r.since, r.reason)
                    for r in s.scalars(select(HostRow).order_by(HostRow.host))]

    @_guarded
    def host_events(self, host: str | None = None) -> Iterator[HostStatus]:
        q = select(HostEventRow).order_by(HostEventRow.time)
        if host is not None:
            q = q.where(HostEventRow.host == host)
        with self._session() as s:
            rows = list(s.scalars(q))
        return iter([HostStatus(r.host, HostState(r.state), r.time, r.reason) for r in rows])

    # --- each host's record across jobs ---------------------------------------------------------------------
    @_guarded
    def record_incident(self, inc: HostIncident) -> None:
        with self._session() as s, s.begin():
            key = (HostIncidentRow.host == inc.host, HostIncidentRow.kind == inc.kind, HostIncidentRow.time == inc.time)
            if s.scalars(select(HostIncidentRow.id).where(*key)).first() is None:  # a retried write adds nothing
                s.add(HostIncidentRow(host=inc.host, time=inc.time, kind=inc.kind, cause=inc.cause, job=inc.job))

    @_guarded
    def incidents(self, since: float | None = None) -> list[HostIncident]:
        q = select(HostIncidentRow).order_by(HostIncidentRow.time)
        if since is not None:
            q = q.where(HostIncidentRow.time >= since)
        with self._session() as s:
            return [HostIncident(r.host, r.time, r.kind, r.cause, r.job) for r in s.scalars(q)]

    @_guarded
    def hosts_first_seen(self) -> dict[str, float]:
        """When each host first entered the store's history (the start of its record)."""
        with self._session() as s:
            rows = s.execute(select(HostEventRow.host, func.min(HostEventRow.time)).group_by(HostEventRow.host))
            return {h: float(t) for h, t in rows}

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers (report, page) never block the controller's writes
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.close()


def migrate(engine: Any) -> None:
    """Bring the schema to this version's head. An unversioned database with tables is the baseline schema."""
    from alembic import command
    from alembic.config import Config
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    known = {r.revision for r in ScriptDirectory.from_config(cfg).walk_revisions()}
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        current = MigrationContext.configure(conn).get_current_revision()
        if current is not None and current not in known:
            raise HerdsmanError(f"its schema (revision {current}) is newer than this Herdsman knows "
                                f"({', '.join(sorted(known))}): upgrade Herdsman")
        try:
            if current is None and inspect(conn).has_table("jobs"):
                command.stamp(cfg, BASELINE)
            command.upgrade(cfg, "head")
        except CommandError as e:
            raise HerdsmanError(f"schema migration failed: {e}") from None


def schema_revision(engine: Any) -> str | None:
    from alembic.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _job(r: JobRow) -> JobRecord:
    return JobRecord(r.name, r.state, r.started_at, r.ended_at, r.target_step, r.last_step, r.productive_s,
                     r.checkpoint_s, r.message, r.attempt or 0, r.config, r.accounts)


def _interruption(r: InterruptionRow) -> Interruption:
    return Interruption(job=r.job, attempt=r.attempt, verdict=verdict_from_dict(r.verdict), failed_at=r.failed_at,
                        detected_at=r.detected_at, restarted_at=r.restarted_at, resumed_at=r.resumed_at,
                        last_step=r.last_step, resumed_step=r.resumed_step, lost_work_s=r.lost_work_s,
                        planned=bool(r.planned))
