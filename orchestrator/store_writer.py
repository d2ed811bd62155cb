"""The controller's records reach the store through this writer, on its own thread, so a store outage (a SQLite
lock held by a backup, a PostgreSQL restart, a full disk) delays them and never stops the control loop.

Records are kept by key until written: the job row (fields merged), one interruption per (job, attempt) (the
latest version wins), host state changes in order. Every write is idempotent by that key, so a retry after a
lost commit cannot record anything twice. While the store fails, the writer retries with exponential backoff,
logs one loud line when it becomes degraded and one when it is back, and exports how many records wait. What
is still unwritten when the controller stops is spooled to a file next to the store and replayed by the next
writer of the same job, so nothing is lost even if the store never came back during the run.
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
from orchestrator.store import HostIncident, Store

log = logging.getLogger("herdsman.store")
Key = tuple[str, ...]


class StoreWriter:
    def __init__(self, store: Store, spool: Path | None = None, min_backoff_s: float = 0.5,
                 max_backoff_s: float = 30.0, clock: Callable[[], float] = time.time):
        self.store, self.spool = store, spool
        self.min_backoff_s, self.max_backoff_s, self.clock = min_backoff_s, max_backoff_s, clock
        self._pending: OrderedDict[Key, tuple[str, Any]] = OrderedDict()
        self._cv = threading.Condition()
        self._stop = False
        self._flushing = False  # a batch is out of _pending but not yet confirmed written
        self.degraded_since: float | None = None
        self.last_error = ""
        self.failures = 0
        self.written = 0
        self._replay_spool()
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
        self._put(("interruption", it.job, str(it.attempt)), ("record_interruption", it))

    def set_host_state(self, status: HostStatus) -> None:
        self._put(("host", status.host, status.state.value, repr(status.since)), ("set_host_state", status))

    def record_incident(self, inc: HostIncident) -> None:
        self._put(("incident", inc.host, inc.kind, repr(inc.time)), ("record_incident", inc))

    def _put(self, key: Key, op: tuple[str, Any]) -> None:
        with self._cv:
            self._pending[key] = op
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
        if left:
            self._write_spool(left)
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
                self._flushing = True
            try:
                self._apply(op)
            except Exception as e:  # StoreError above all; anything else is retried the same way
                with self._cv:
                    self._flushing = False
                    newer = self._pending.get(key)
                    if newer is None:
                        self._pending[key] = op
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
                self.written += 1
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

    # --- the spool: what a stopping controller could not write ----------------------------------------------
    def _write_spool(self, items: list[tuple[Key, tuple[str, Any]]]) -> None:
        if self.spool is None:
            log.error("store unavailable at shutdown: %d record(s) not written", len(items))
            return
        lines = [json.dumps({"op": kind, "arg": _encode(kind, arg)}) for _, (kind, arg) in items]
        tmp = self.spool.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, self.spool)
        log.error("store unavailable at shutdown: %d record(s) spooled to %s; the next controller of this job "
                  "writes them", len(items), self.spool)

    def _replay_spool(self) -> None:
        if self.spool is None or not self.spool.exists():
            return
        n = 0
        for line in self.spool.read_text().splitlines():
            try:
                d = json.loads(line)
                kind, arg = d["op"], _decode(d["op"], d["arg"])
            except (ValueError, KeyError, TypeError) as e:
                log.error("spooled record skipped (%s): %.200s", type(e).__name__, line)
                continue
            if kind == "upsert_job":
                self.upsert_job(arg[0], **arg[1])
            elif kind == "record_interruption":
                self.record_interruption(arg)
            elif kind == "record_incident":
                self.record_incident(arg)
            else:
                self.set_host_state(arg)
            n += 1
        self.spool.rename(self.spool.with_suffix(".replayed"))
        log.warning("replaying %d record(s) spooled while the store was down", n)


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
