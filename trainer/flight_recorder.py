"""The trainer's side of the PyTorch flight recorder: write this rank's buffer as JSON, on failure or on request.

Gloo writes nothing by itself on a timeout and a rank stuck in a collective cannot run Python on its main
thread, so a small thread watches the control directory for `dump-rank{R}.request` and dumps from there (the
recorder is C++ and safe to read from another thread while the main one waits in a collective).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from trainer import control


def dump(fr_dir: Path | None, rank: int, attempt: int, backend: str) -> Path | None:
    if fr_dir is None:
        return None
    c10d = torch._C._distributed_c10d
    fn = getattr(c10d, "_dump_nccl_trace_json", None) if backend == "nccl" else None
    fn = fn or getattr(c10d, "_dump_fr_trace_json", None)
    if fn is None:
        return None
    try:
        data = fn(includeCollectives=True, onlyActive=False)
    except Exception:  # the recorder is disabled (buffer size 0) or not built in
        return None
    fr_dir.mkdir(parents=True, exist_ok=True)
    path = fr_dir / f"rank{rank:05d}-attempt{attempt:04d}.json"
    tmp = path.with_suffix(".part")
    tmp.write_bytes(data if isinstance(data, bytes) else str(data).encode())
    os.replace(tmp, path)  # readers never see half a dump
    return path


class DumpOnRequest:
    def __init__(self, control_dir: Path | None, fr_dir: Path | None, rank: int, attempt: int, backend: str,
                 interval_s: float = 0.25):
        self.args = (fr_dir, rank, attempt, backend)
        self.request = None if control_dir is None else control.dump_request_path(control_dir, rank)
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fr-dump-on-request", daemon=True)

    def start(self) -> "DumpOnRequest":
        if self.request is not None and self.args[0] is not None:
            # a request left by an earlier attempt (its rank was stopped before it answered) is not for us: answering
            # it would put a dump from before any hang where the controller looks for this attempt's
            self.request.unlink(missing_ok=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.request.unlink()  # type: ignore[union-attr]
            except FileNotFoundError:
                continue
            dump(*self.args)

    def stop(self) -> None:
        self._stop.set()
