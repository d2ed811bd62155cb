"""Per-rank report stream to the local agent: one JSON object per line, appended and flushed per record.

A file per (rank, attempt) under the node's stats directory; the agent tails new lines on each sampling cycle.
A file survives the process that wrote it, so the last steps before a crash are never lost.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

from herdsman.events import StepStats, TrainerEvent, TrainerPhase, to_dict
from herdsman.layout import stats_file


class StatsWriter:
    def __init__(self, stats_dir: Path | None, rank: int, host: str, attempt: int, gpu: int | None = None):
        self.rank, self.host, self.attempt, self.gpu = rank, host, attempt, gpu
        self._f = None
        if stats_dir is not None:
            Path(stats_dir).mkdir(parents=True, exist_ok=True)
            self._f = open(stats_file(Path(stats_dir), rank, attempt), "a", buffering=1)

    def _write(self, kind: str, record: Any) -> None:
        if self._f is not None:
            self._f.write(json.dumps({"kind": kind, **to_dict(record)}) + "\n")

    def step(self, step: int, step_time_s: float, tokens: int, loss: float, compute_s: float = 0.0,
             data_s: float = 0.0) -> None:
        self._write("step", StepStats(self.rank, self.host, self.attempt, step, time.time(), step_time_s, tokens, loss,
                                      compute_s, data_s))

    def event(self, phase: TrainerPhase, step: int = 0, duration_s: float = 0.0, message: str = "",
              at: float | None = None) -> None:
        ev = TrainerEvent(self.rank, self.host, self.attempt, phase, time.time() if at is None else at, step,
                          duration_s, message, pid=os.getpid(), gpu=self.gpu)
        self._write("event", ev)
        if self._f is not None and phase in (TrainerPhase.FAILED, TrainerPhase.FINISHED):
            os.fsync(self._f.fileno())

    def close(self) -> None:
        """The attempt is over (a rank kept by an in-process restart writes the next one's file)."""
        if self._f is not None:
            self._f.close()
            self._f = None


class StatsTailer:
    """Reads the records appended since the last call, across all files of a stats directory."""

    def __init__(self, stats_dir: Path):
        self.stats_dir = Path(stats_dir)
        self._offsets: dict[Path, int] = {}

    def read_new(self) -> Iterator[dict[str, Any]]:
        if not self.stats_dir.is_dir():
            return
        for path in sorted(self.stats_dir.glob("*.jsonl")):
            off = self._offsets.get(path, 0)
            with open(path, "rb") as f:
                f.seek(off)
                data = f.read()
            end = data.rfind(b"\n") + 1  # a half-written last line waits for the next call
            self._offsets[path] = off + end
            for line in data[:end].splitlines():
                try:
                    yield json.loads(line)
                except ValueError:
                    continue  # a torn line after a crash: skip it, keep the rest
