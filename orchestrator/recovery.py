"""What a restarted controller needs to carry on a job: read back from the store and the ranks' report streams.

The controller is a Ray actor with `max_restarts`; when its process dies, Ray runs its constructor again. The
store holds the job (its current attempt, productive time), every interruption with its verdict and host states;
rank 0's report streams (`<run_dir>/nodes/<host>/jobs/<job>/stats/rank00000-attempt*.jsonl`, on the shared run dir)
hold every completed step and checkpoint. Together they rebuild the progress counters exactly, so ETTR is not
counted twice and the crash-loop guard and lemon detector remember what happened before the restart.
`recover` reads it; `carry_on` puts it into the new controller.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from herdsman.layout import rank0_streams
from herdsman.events import HostState, Interruption, TrainerPhase, Verdict
from herdsman.taxonomy import Action, RootCause
from orchestrator.store import JobRecord, Store

if TYPE_CHECKING:
    from orchestrator.controller import Controller

LIVE_STATES = ("scheduling", "running")


@dataclass
class Recovered:
    job: JobRecord
    interruptions: list[Interruption]
    step_time: dict[int, tuple[int, float]] = field(default_factory=dict)  # step -> (attempt, seconds)
    last_step: dict[int, int] = field(default_factory=dict)  # attempt -> last completed step
    last_step_at: dict[int, float] = field(default_factory=dict)
    ckpt_at: dict[int, float] = field(default_factory=dict)  # step -> commit time
    ckpt_stall_s: float = 0.0
    resumed_at: dict[int, tuple[float, int]] = field(default_factory=dict)  # attempt -> (time, step)
    last_loss: float | None = None

    @property
    def interrupted_attempt_recorded(self) -> bool:
        """Whether the attempt that was current when the controller died already has its interruption stored
        (the controller died while handling a failure, before or after recording it)."""
        return any(i.attempt >= self.job.attempt for i in self.interruptions)


def recover(store: Store, job: str, run_dir: Path) -> Recovered | None:
    """The state of `job` if it was left unfinished by an earlier controller, else None."""
    rec = store.job(job)
    if rec is None or rec.state not in LIVE_STATES:
        return None
    r = Recovered(rec, store.interruptions(job))
    for path in rank0_streams(run_dir, job):
        _read_stream(path, r)
    return r


def _read_stream(path: Path, r: Recovered) -> None:
    try:
        lines = path.read_bytes().splitlines()
    except OSError:
        return
    for line in lines:
        try:
            d = json.loads(line)
            attempt, step, t = int(d["attempt"]), int(d["step"]), float(d["time"])
            if d.get("kind") == "step":
                prev = r.step_time.get(step)
                if prev is None or attempt >= prev[0]:
                    r.step_time[step] = (attempt, float(d["step_time_s"]))
                r.last_step[attempt] = max(r.last_step.get(attempt, 0), step)
                r.last_step_at[attempt] = max(r.last_step_at.get(attempt, 0.0), t)
                r.last_loss = float(d["loss"])
            elif d.get("kind") == "event":
                phase = TrainerPhase(d["phase"])
                if phase == TrainerPhase.CHECKPOINT:
                    r.ckpt_at[step] = t
                    r.ckpt_stall_s += float(d.get("duration_s", 0.0))
                elif phase == TrainerPhase.RESTORED:
                    r.resumed_at[attempt] = (t, step)
                    r.last_step[attempt] = max(r.last_step.get(attempt, 0), step)
        except (KeyError, TypeError, ValueError):
            continue  # a torn last line of a crashed rank


def carry_on(ctrl: Controller, r: Recovered) -> None:
    """A restarted controller (Ray's max_restarts) picks the job up where the dead one left it.

    The dead controller's rank actors died with it (Ray's ownership), so the attempt it ran is over: that is an
    interruption of its own, unless the dead one had already recorded the attempt's failure.
    """
    ctrl.started_at = r.job.started_at
    ctrl.step_time, ctrl.last_step, ctrl.last_step_at = r.step_time, r.last_step, r.last_step_at
    ctrl.ckpt_at, ctrl.ckpt_stall_s, ctrl.resumed_at = r.ckpt_at, r.ckpt_stall_s, r.resumed_at
    ctrl.last_loss = r.last_loss
    for it in r.interruptions:  # the crash-loop guard and the lemon detector remember
        ctrl.interruptions[it.attempt] = it
        ctrl.verdicts.append(it.verdict)
        ctrl.lemons.implicate(it.verdict, it.failed_at)
    ctrl.restarts = sum(1 for it in r.interruptions if not it.planned)
    ctrl.previous = sorted(h for h, st in ctrl.pool.status.items() if st.state == HostState.HEALTHY)
    if r.interrupted_attempt_recorded:
        last = max(r.interruptions, key=lambda it: it.attempt)
        ctrl.attempt = last.attempt + 1
        ctrl.pending = last if last.resumed_at is None else None
    else:
        now = time.time()
        lost = r.job.attempt
        verdict = Verdict(RootCause.UNKNOWN, 1.0, (), (), (
            f"herdsman controller restarted during attempt {lost}; the trainer ranks it owned ended with it",),
            Action.RESTART, "the controller itself failed (no host is blamed)")
        it = Interruption(ctrl.cfg.job, lost, verdict, r.last_step_at.get(lost, now), now,
                          last_step=r.last_step.get(lost, 0))
        ctrl.record(it)
        ctrl.verdicts.append(verdict)
        ctrl.restarts += 1
        ctrl.pending = it
        ctrl.attempt = lost + 1
    ctrl.records.upsert_job(ctrl.cfg.job, state="scheduling", attempt=ctrl.attempt)
    ctrl._decide(f"controller restarted: carrying on job {ctrl.cfg.job} at attempt {ctrl.attempt}, "
                 f"step {max(ctrl.step_time) if ctrl.step_time else 0}, {len(ctrl.verdicts)} verdict(s) so far, "
                 f"checkpoints up to step {max(ctrl.ckpt_at) if ctrl.ckpt_at else '-'}")
    # Ray re-ran only the constructor: serve and loop again without waiting for the launcher
    ctrl.start_api()
    ctrl.start()
