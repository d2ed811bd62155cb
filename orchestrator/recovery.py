"""What a restarted controller needs to carry on a job: read back from the store and the ranks' report streams.

The controller is a Ray actor with `max_restarts`; when its process dies, Ray runs its constructor again. The
store holds the job (its current attempt, productive time), every interruption with its verdict and host states;
rank 0's report streams (`<run_dir>/nodes/<host>/stats/rank00000-attempt*.jsonl`, on the shared run directory)
hold every completed step and checkpoint. Together they rebuild the progress counters exactly, so ETTR is not
counted twice and the crash-loop guard and lemon detector remember what happened before the restart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from herdsman.events import Interruption, TrainerPhase
from orchestrator.store import JobRecord, Store

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
    for path in sorted((run_dir / "nodes").glob("*/stats/rank00000-attempt*.jsonl")):
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
