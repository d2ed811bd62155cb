"""The job's ledger: what it has done and what it lost, kept in one place.

Steps (each counted once, in the attempt that kept it: steps recomputed after a restore replace the lost ones),
committed checkpoints and the time the loop was blocked saving them, restores, the current attempt, and each
interruption with its time split, completed as the next attempt reports in (rendezvous, restore). The controller
folds rank 0's live reports into it; a restarted controller folds the same records read back from rank 0's
report streams, so both arrive at the same numbers.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

from herdsman.events import (
    Interruption,
    StepStats,
    TrainerEvent,
    TrainerPhase,
    Verdict,
    step_stats_from_dict,
    trainer_event_from_dict,
)


# the controller's marks per attempt: when it began scheduling, seconds it waited for hosts (no placement), when its
# processes were launched, and when the job ended (under the attempt that was running)
MARKS = ("scheduled", "waited", "launched", "ended")
STEADY_STEPS = 50  # the step intervals an attempt's pace is judged on (hang detection)


@dataclass
class JobLedger:
    job: str
    started_at: float
    attempt: int = 0
    step_time: dict[int, tuple[int, float]] = field(default_factory=dict)  # step -> (attempt, seconds)
    last_step: dict[int, int] = field(default_factory=dict)  # attempt -> last completed step
    last_step_at: dict[int, float] = field(default_factory=dict)  # attempt -> when it completed
    ckpt_at: dict[int, float] = field(default_factory=dict)  # step -> commit time of its latest save
    ckpt_stall_s: float = 0.0
    resumed_at: dict[int, tuple[float, int]] = field(default_factory=dict)  # attempt -> (time, step restored)
    last_loss: float | None = None
    interruptions: dict[int, Interruption] = field(default_factory=dict)  # the failed attempt -> its record
    pending: Interruption | None = None  # the latest, until its restart and restore are known
    # what the time accounts (orchestrator/accounts.py) are made of: rank 0's side ...
    step_data: dict[int, float] = field(default_factory=dict)  # step -> data wait of the kept record
    redone_s: float = 0.0  # step time of records a later attempt replaced (work done twice)
    first_step_start: dict[int, float] = field(default_factory=dict)  # attempt -> when its first step began
    started: dict[int, float] = field(default_factory=dict)  # attempt -> rank 0 up, imports done
    rendezvous: dict[int, float] = field(default_factory=dict)  # attempt -> process group formed
    restored: dict[int, tuple[float, float]] = field(default_factory=dict)  # attempt -> (time, load seconds)
    finished: dict[int, tuple[float, float]] = field(default_factory=dict)  # attempt -> (time, last-save wait)
    recent_ends: dict[int, deque[tuple[int, float]]] = field(default_factory=dict)  # attempt -> (step, end) latest
    # ... and the controller's (kept in the store: rank 0's are read back from its streams)
    marks: dict[str, dict[int, float]] = field(default_factory=lambda: {k: {} for k in MARKS})

    # --- what rank 0 reports --------------------------------------------------------------------------------
    def step(self, st: StepStats) -> None:
        if st.rank != 0:
            return
        prev = self.step_time.get(st.step)
        if prev is None or st.attempt >= prev[0]:
            if prev is not None and st.attempt > prev[0]:
                self.redone_s += prev[1]
            self.step_time[st.step] = (st.attempt, st.step_time_s)
            self.step_data[st.step] = min(st.data_s, st.step_time_s)
        elif st.attempt < prev[0]:  # an older attempt's record read late: it is the one that was redone
            self.redone_s += st.step_time_s
        began = st.time - st.step_time_s
        self.first_step_start[st.attempt] = min(self.first_step_start.get(st.attempt, began), began)
        ends = self.recent_ends.setdefault(st.attempt, deque(maxlen=STEADY_STEPS + 1))
        if not ends or st.step > ends[-1][0]:
            ends.append((st.step, st.time))
        self.last_step[st.attempt] = max(self.last_step.get(st.attempt, 0), st.step)
        self.last_step_at[st.attempt] = max(self.last_step_at.get(st.attempt, 0.0), st.time)
        self.last_loss = st.loss

    def event(self, ev: TrainerEvent) -> Interruption | None:
        """Fold one event; returns the pending interruption when the event completed part of its split."""
        if ev.rank != 0:
            return None
        if ev.phase == TrainerPhase.CHECKPOINT:
            self.ckpt_at[ev.step] = ev.time
            self.ckpt_stall_s += ev.duration_s
        elif ev.phase == TrainerPhase.STARTED:
            self.started[ev.attempt] = ev.time
        elif ev.phase == TrainerPhase.FINISHED:
            self.finished[ev.attempt] = (ev.time, ev.duration_s)
        elif ev.phase == TrainerPhase.RENDEZVOUS:
            self.rendezvous[ev.attempt] = ev.time
            return self._complete(ev.attempt, restarted_at=ev.time)
        elif ev.phase == TrainerPhase.RESTORED:
            self.restored[ev.attempt] = (ev.time, ev.duration_s)
            self.resumed_at[ev.attempt] = (ev.time, ev.step)
            self.last_step[ev.attempt] = max(self.last_step.get(ev.attempt, 0), ev.step)
            return self._complete(ev.attempt, resumed_at=ev.time, resumed_step=ev.step)
        return None

    def fold(self, record: dict[str, Any]) -> None:
        """One line of a report stream (what the trainer's StatsWriter writes)."""
        if record.get("kind") == "step":
            self.step(step_stats_from_dict(record))
        elif record.get("kind") == "event":
            self.event(trainer_event_from_dict(record))

    def fold_stream(self, path: Path) -> None:
        try:
            lines = Path(path).read_bytes().splitlines()
        except OSError:
            return
        for line in lines:
            try:
                self.fold(json.loads(line))
            except (KeyError, TypeError, ValueError):
                continue  # the torn last line of a killed rank

    # --- the controller's marks ----------------------------------------------------------------------------
    def mark(self, kind: str, attempt: int, t: float, add: bool = False) -> None:
        """A moment (or, with `add`, seconds) the controller measured for an attempt: see MARKS."""
        book = self.marks.setdefault(kind, {})
        book[attempt] = book.get(attempt, 0.0) + t if add else t

    def marks_dict(self) -> dict[str, Any]:
        return {"marks": {k: {str(a): t for a, t in v.items()} for k, v in self.marks.items()}}

    def load_marks(self, d: dict[str, Any]) -> None:
        for k, v in (d.get("marks") or {}).items():
            if k in MARKS and isinstance(v, dict):
                self.marks[k] = {int(a): float(t) for a, t in v.items()}

    # --- interruptions ------------------------------------------------------------------------------------
    def interrupt(self, verdict: Verdict, failed_at: float, detected_at: float, planned: bool = False) -> Interruption:
        """The current attempt ended: record it, and the next attempt begins."""
        it = Interruption(self.job, self.attempt, verdict, failed_at, detected_at,
                          last_step=self.last_step.get(self.attempt, 0), planned=planned)
        self.interruptions[it.attempt] = it
        self.pending = it
        self.attempt += 1
        return it

    def _complete(self, attempt: int, **fields: Any) -> Interruption | None:
        p = self.pending
        if p is None or attempt != p.attempt + 1:
            return None
        p = replace(p, **fields)
        if p.resumed_step is not None:  # the work since the checkpoint it resumed from had to be done again
            ckpt = self.ckpt_at.get(p.resumed_step, 0.0)
            began = self.resumed_at.get(p.attempt, (self.started_at, 0))[0]
            p = replace(p, lost_work_s=max(0.0, p.failed_at - max(ckpt, began)))
        self.interruptions[p.attempt] = p
        self.pending = None if p.restarted_at is not None and p.resumed_at is not None else p
        return p

    def remember(self, interruptions: Iterable[Interruption]) -> None:
        """Interruptions recorded before (a restarted controller): the attempt goes on after the latest."""
        for it in interruptions:
            self.interruptions[it.attempt] = it
        if self.interruptions:
            last = self.interruptions[max(self.interruptions)]
            self.attempt = max(self.attempt, last.attempt + 1)
            self.pending = last if last.resumed_at is None else None

    # --- views --------------------------------------------------------------------------------------------
    @property
    def step_now(self) -> int:
        return max(self.step_time) if self.step_time else 0

    @property
    def productive_s(self) -> float:
        """Kept step time: each step once, in the attempt that kept it."""
        return sum(t for _, t in self.step_time.values())

    def longest_interval(self, every: int = 0, saving: bool = False) -> float | None:
        """How long the current attempt's steps take at most, from its last STEADY_STEPS (its first few, still
        warming up, left out): between two consecutive steps, the 90th percentile, or with `every` (the checkpoint
        interval in steps) only the intervals like the one now running — after a save step when `saving` (their
        longest: saves are few and vary), else after the others. None until there are enough."""
        ends = [(s, t) for s, t in self.recent_ends.get(self.attempt, ()) if s > self._first_step(self.attempt) + 5]
        gaps = [(b - a, s0) for (s0, a), (s1, b) in zip(ends, ends[1:]) if s1 == s0 + 1]
        if every > 0:
            gaps = [(g, s0) for g, s0 in gaps if (s0 % every == 0) == saving]
        if len(gaps) < (2 if saving else STEADY_STEPS // 5):
            return None
        xs = sorted(g for g, _ in gaps)
        return xs[-1] if saving else xs[int(0.9 * (len(xs) - 1))]

    def _first_step(self, attempt: int) -> int:
        began = self.resumed_at.get(attempt)
        return began[1] if began is not None else 0

    def progressed(self, attempt: int | None = None) -> bool:
        """The attempt committed work that survives it: a checkpoint past the step it started from (the
        simulator asks the same question of its clock)."""
        a = self.attempt if attempt is None else attempt
        began_at, began = self.resumed_at.get(a, (0.0, 0))
        return any(step > began and t >= began_at for step, t in self.ckpt_at.items())

    def stepped(self, attempt: int | None = None) -> bool:
        return (self.attempt if attempt is None else attempt) in self.last_step_at

    def last_progress(self, attempt: int | None = None) -> float:
        return self.last_step_at.get(self.attempt if attempt is None else attempt, 0.0)
