"""The controller's records reach the store through this writer, on its own thread, so a store outage (a SQLite
lock held by a backup, a PostgreSQL restart, a full disk) delays them and never stops the control loop.

Records are kept by key until written: the job row (fields merged), one interruption per (job, attempt) (the
latest version wins), host state changes in order. Every write is idempotent by that key, so a retry after a
lost commit cannot record anything twice. While the store fails, the writer retries with exponential backoff,
logs one loud line when it becomes degraded and one when it is back, and exports how many records wait. What
is still unwritten when the controller stops is spooled to a file next to the store and replayed by the next
writer of the same job, so nothing is lost even if the store never came back during the run.

A controller killed outright (SIGKILL, the OOM killer, a lost node) never reaches that spool, so every record is
also appended to a journal next to it (`<spool>.journal`, so as job- and run-dir-scoped as the spool) and fsync'd
before the call that queued it returns: no window in which a queued record exists only in memory. Once a record
is written a mark says so (not fsync'd: a lost mark only replays a write that landed); when the queue empties the
journal is truncated, and during a long outage it is rewritten to what still waits once it grows past a few
times that. The next writer of the job replays the spool, then the journal (records with a later mark skipped),
and rewrites the journal to what it took over before it forgets the spool. Replaying a write that did land is
harmless: Store.upsert_job sets fields, record_interruption updates the row of its (job, attempt),
set_host_state and record_incident add an event only if the same (host, state|kind, time) is not there; and the
journal replays in the order it was queued, so the latest version of each record is the one that stays. A
journal that cannot be written (a full disk) is logged once and the records are kept in memory as before.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

from herdsman.events import HostState, HostStatus, Interruption, interruption_from_dict, to_dict
from herdsman.secrets import write_private
from orchestrator.store import HostIncident, Store

log = logging.getLogger("herdsman.store")
Key = tuple[str, ...]


JOURNAL_SLACK = 1000
"""The journal is rewritten to what still waits once it holds this many lines more than 4x that."""


class StoreWriter:
    def __init__(self, store: Store, spool: Path | None = None, min_backoff_s: float = 0.5,
                 max_backoff_s: float = 30.0, clock: Callable[[], float] = time.time, journal: Path | None = None):
        self.store, self.spool = store, spool
        self.journal = journal if journal is not None or spool is None else Path(spool).with_suffix(".journal")
        self.min_backoff_s, self.max_backoff_s, self.clock = min_backoff_s, max_backoff_s, clock
        self._pending: OrderedDict[Key, tuple[str, Any]] = OrderedDict()
        self._cv = threading.Condition()
        self._stop = False
        self._flushing = False  # a batch is out of _pending but not yet confirmed written
        self._inflight: tuple[Key, tuple[str, Any], int] | None = None  # that batch and its journal number
        self._seq = 0  # journal numbers of the records queued by this writer
        self._seq_of: dict[Key, int] = {}  # the journal number of each pending record's latest version
        self._jfd: int | None = None
        self._jlines = 0
        self._journal_failing = False
        self.degraded_since: float | None = None
        self.last_error = ""
        self.failures = 0
        self.written = 0
        self._replaying = True  # what is replayed is journaled once, as a whole, afterwards
        self._replay()
        self._replaying = False
        self._thread = threading.Thread(target=self._run, name="herdsman-store-writer", daemon=True)
        self._thread.start()

    # --- what the controller records ----------------------------------------------------------------------
    def upsert_job(self, name: str, **fields: Any) -> None:
        with self._cv:
            key: Key = ("job", name)
            prev = self._pending.get(key)
            merged = {**prev[1][1], **fields} if prev else dict(fields)
            self._put(key, ("upsert_job", (name, merged)))

    def record_interruption(self, it: Interruption) -> None:
        self._put(_key("record_interruption", it), ("record_interruption", it))

    def set_host_state(self, status: HostStatus) -> None:
        self._put(_key("set_host_state", status), ("set_host_state", status))

    def record_incident(self, inc: HostIncident) -> None:
        self._put(_key("record_incident", inc), ("record_incident", inc))

    def _put(self, key: Key, op: tuple[str, Any]) -> None:
        with self._cv:
            self._pending[key] = op
            self._seq += 1
            self._seq_of[key] = self._seq
            if not self._replaying:
                self._append({"seq": self._seq, "op": op[0], "arg": _encode(*op)}, sync=True)
                if self._jlines > 4 * len(self._pending) + JOURNAL_SLACK:  # a long outage: versions pile up
                    self._rewrite_journal()
            self._cv.notify()

    # --- state ----------------------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        with self._cv:
            return len(self._pending) + (1 if self._flushing else 0)

    @property
    def degraded(self) -> bool:
        return self.degraded_since is not None

    def view(self) -> dict[str, Any]:
        return {"degraded": self.degraded, "degraded_since": self.degraded_since, "pending_writes": self.pending,
                "last_error": self.last_error, "failed_writes": self.failures}

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything recorded so far is written; False if the store did not take it in time."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            self._cv.notify()
            while self._pending or self._flushing:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.1))
        return True

    def close(self, timeout_s: float = 10.0) -> int:
        """Write what waits (for up to `timeout_s`), then stop. Returns how many records went to the spool."""
        self.flush(timeout_s)
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=max(1.0, timeout_s))
        with self._cv:
            left = list(self._pending.items())
            if self._inflight is not None:  # the writer thread did not stop in time: its record is not written
                left.insert(0, self._inflight[:2])
        spooled = self._write_spool(left) if left else True
        with self._cv:
            self._close_journal(remove=spooled)  # what it held is in the store or in the (durable) spool
        return len(left)

    # --- the writer thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        backoff = self.min_backoff_s
        while True:
            with self._cv:
                while not self._pending and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                key, op = next(iter(self._pending.items()))
                del self._pending[key]
                seq = self._seq_of.pop(key, 0)
                self._flushing = True
                self._inflight = (key, op, seq)
            try:
                self._apply(op)
            except Exception as e:  # StoreError above all; anything else is retried the same way
                with self._cv:
                    self._flushing = False
                    self._inflight = None
                    newer = self._pending.get(key)
                    if newer is None:
                        self._pending[key] = op
                        self._seq_of[key] = seq
                    elif op[0] == "upsert_job":  # the fields that failed, updated by the ones set since
                        self._pending[key] = ("upsert_job", (op[1][0], {**op[1][1], **newer[1][1]}))
                    # (a newer interruption record is the whole record: it supersedes this one)
                    self._pending.move_to_end(key, last=False)
                self._failed(e)
                with self._cv:
                    self._cv.wait_for(lambda: self._stop, timeout=backoff)
                backoff = min(self.max_backoff_s, backoff * 2)
                continue
            backoff = self.min_backoff_s
            with self._cv:
                self._flushing = False
                self._inflight = None
                self.written += 1
                self._landed(seq)
                self._cv.notify_all()
            if self.degraded_since is not None:
                log.warning("store is back after %.1f s; records written again (%d waiting)",
                            self.clock() - self.degraded_since, self.pending)
                self.degraded_since = None

    def _apply(self, op: tuple[str, Any]) -> None:
        kind, arg = op
        if kind == "upsert_job":
            name, fields = arg
            self.store.upsert_job(name, **fields)
        elif kind == "record_interruption":
            self.store.record_interruption(arg)
        elif kind == "record_incident":
            self.store.record_incident(arg)
        else:
            self.store.set_host_state(arg)

    def _failed(self, e: Exception) -> None:
        self.failures += 1
        self.last_error = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        if self.degraded_since is None:
            self.degraded_since = self.clock()
            log.error("STORE DEGRADED: %s; the controller keeps supervising and keeps %d record(s) to write "
                      "when the store is back", self.last_error, self.pending)

    # --- the journal: every queued record, durable before the call that queued it returns ---------------------
    def _append(self, entry: dict[str, Any], sync: bool) -> None:
        if self.journal is None:
            return
        try:
            line = (json.dumps(entry) + "\n").encode()
            if self._jfd is None:
                self._jfd = os.open(self.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.write(self._jfd, line)
            if sync:
                os.fsync(self._jfd)
            self._jlines += 1
            self._journal_failing = False
        except (OSError, TypeError, ValueError) as e:
            if not self._journal_failing:
                log.error("store journal %s not written (%s): queued records are kept in memory only until they "
                          "are written", self.journal, e)
            self._journal_failing = True

    def _landed(self, seq: int) -> None:
        """A record is in the store: truncate the journal if nothing else waits, else mark it (and compact)."""
        if self.journal is None or (self._jfd is None and not self._jlines):
            return
        try:
            if not self._pending:
                if self._jfd is None:
                    self._jfd = os.open(self.journal, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
                os.ftruncate(self._jfd, 0)  # not fsync'd: a truncation lost in a crash only replays landed writes
                self._jlines = 0
                return
        except OSError as e:
            log.error("store journal %s not truncated: %s", self.journal, e)
        self._append({"landed": seq}, sync=False)
        if self._jlines > 4 * len(self._pending) + JOURNAL_SLACK:
            self._rewrite_journal()

    def _rewrite_journal(self) -> None:
        """Replace the journal (atomically, fsync'd) with the records still waiting."""
        if self.journal is None:
            return
        items = [self._inflight] if self._inflight is not None else []
        items += [(k, op, self._seq_of.get(k, 0)) for k, op in self._pending.items()]
        try:
            lines = [json.dumps({"seq": seq, "op": op[0], "arg": _encode(*op)}) + "\n" for _, op, seq in items]
            write_private(self.journal, "".join(lines))
        except (OSError, TypeError, ValueError) as e:
            log.error("store journal %s not rewritten: %s", self.journal, e)
            return
        if self._jfd is not None:
            os.close(self._jfd)
            self._jfd = None
        self._jlines = len(lines)
        try:
            self._jfd = os.open(self.journal, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        except OSError as e:  # the next append tries again
            log.error("store journal %s not reopened: %s", self.journal, e)

    def _close_journal(self, remove: bool) -> None:
        if self._jfd is not None:
            os.close(self._jfd)
            self._jfd = None
        if remove and self.journal is not None:
            self.journal.unlink(missing_ok=True)

    def _read_journal(self) -> list[tuple[str, Any]]:
        assert self.journal is not None
        records: list[tuple[int, Key, str, Any]] = []
        landed: set[int] = set()
        for line in self.journal.read_text(errors="replace").splitlines():
            try:
                d = json.loads(line)
                if "landed" in d:
                    landed.add(int(d["landed"]))
                    continue
                kind, arg = d["op"], _decode(d["op"], d["arg"])
                records.append((int(d["seq"]), _key(kind, arg), kind, arg))
            except (ValueError, KeyError, TypeError, AttributeError) as e:  # a torn last line above all
                log.error("journaled record skipped (%s): %.200s", type(e).__name__, line)
        done: dict[Key, int] = {}  # a mark covers its record and every earlier version of the same key
        for seq, key, _, _ in records:
            if seq in landed:
                done[key] = max(done.get(key, 0), seq)
        return [(kind, arg) for seq, key, kind, arg in records if seq > done.get(key, 0)]

    # --- the spool: what a stopping controller could not write ----------------------------------------------
    def _write_spool(self, items: list[tuple[Key, tuple[str, Any]]]) -> bool:
        if self.spool is None:
            log.error("store unavailable at shutdown: %d record(s) not written%s", len(items),
                      f" (still in the journal {self.journal})" if self.journal is not None else "")
            return False
        try:
            write_private(self.spool, "".join(json.dumps({"op": kind, "arg": _encode(kind, arg)}) + "\n"
                                              for _, (kind, arg) in items))
        except (OSError, TypeError, ValueError) as e:
            log.error("store unavailable at shutdown and the spool %s not written (%s): %d record(s) left in the "
                      "journal %s", self.spool, e, len(items), self.journal)
            return False
        log.error("store unavailable at shutdown: %d record(s) spooled to %s; the next controller of this job "
                  "writes them", len(items), self.spool)
        return True

    def _replay(self) -> None:
        """Take over what an earlier writer of the job left: its spool (an orderly stop), then its journal (it was
        killed), in that order (a journal left beside a spool is the newer of the two)."""
        records: list[tuple[str, Any]] = []
        spooled = self.spool is not None and self.spool.exists()
        if spooled:
            assert self.spool is not None
            for line in self.spool.read_text(errors="replace").splitlines():
                try:
                    d = json.loads(line)
                    records.append((d["op"], _decode(d["op"], d["arg"])))
                except (ValueError, KeyError, TypeError, AttributeError) as e:
                    log.error("spooled record skipped (%s): %.200s", type(e).__name__, line)
        n_spool = len(records)
        if self.journal is not None and self.journal.exists():
            try:
                records += self._read_journal()
            except OSError as e:
                log.error("store journal %s unreadable (%s): the records it held are not replayed", self.journal, e)
        for kind, arg in records:
            if kind == "upsert_job":
                self.upsert_job(arg[0], **arg[1])
            else:
                self._put(_key(kind, arg), (kind, arg))
        if self.journal is not None and (records or self.journal.exists()):
            self._rewrite_journal()  # durable before the spool is let go
        if spooled:
            assert self.spool is not None
            self.spool.rename(self.spool.with_suffix(".replayed"))
            log.warning("replaying %d record(s) spooled while the store was down", n_spool)
        if len(records) > n_spool:
            log.warning("replaying %d record(s) journaled by a controller that stopped without closing its writer",
                        len(records) - n_spool)


def _key(kind: str, arg: Any) -> Key:
    """The key a record is kept (and written idempotently) by."""
    if kind == "upsert_job":
        return ("job", arg[0])
    if kind == "record_interruption":
        return ("interruption", arg.job, str(arg.attempt))
    if kind == "record_incident":
        return ("incident", arg.host, arg.kind, repr(arg.time))
    return ("host", arg.host, arg.state.value, repr(arg.since))


def _encode(kind: str, arg: Any) -> Any:
    if kind == "upsert_job":
        return [arg[0], arg[1]]
    return dataclasses.asdict(arg) if kind == "record_incident" else to_dict(arg)


def _decode(kind: str, arg: Any) -> Any:
    if kind == "upsert_job":
        return (str(arg[0]), dict(arg[1]))
    if kind == "record_interruption":
        return interruption_from_dict(arg)
    if kind == "record_incident":
        return HostIncident(str(arg["host"]), float(arg["time"]), str(arg["kind"]), str(arg.get("cause", "")),
                            str(arg.get("job", "")))
    if kind == "set_host_state":
        return HostStatus(str(arg["host"]), HostState(arg["state"]), float(arg["since"]), str(arg.get("reason", "")))
    raise ValueError(f"unknown spooled operation {kind!r}")
