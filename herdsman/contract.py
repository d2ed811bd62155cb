"""The contract for any trainer Herdsman supervises (`[trainer] entrypoint = "python -m my_train ..."`).

Herdsman starts every rank with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
plus HERDSMAN_ATTEMPT (0, 1, ... one per restart), HERDSMAN_CHECKPOINT_DIR (where the job keeps its checkpoints:
resume from the newest there), HERDSMAN_RESUME=required once a checkpoint was committed (never start from
scratch then), and the flight recorder switched on (TORCH_FR_BUFFER_SIZE, TORCH_NCCL_DUMP_ON_TIMEOUT and
TORCH_FR_DUMP_TEMP_FILE under the job's dump directory). In return the trainer reports, through `Reporter`:

    report = Reporter()                  # once, after init_process_group
    report.restored(step)                # where it starts from (0: from scratch)
    report.step(step, loss, seconds)     # after every step (rank 0's are what the controller counts)
    report.checkpoint(step)              # after a checkpoint is complete on disk (rank 0)

Outside Herdsman (no HERDSMAN_STATS_DIR) every call does nothing, so a script runs the same without it.
"""

from __future__ import annotations

import os
from pathlib import Path

from herdsman import layout
from herdsman.events import TrainerPhase
from herdsman.stats import StatsWriter

ENV_CHECKPOINT_DIR = layout.ENV_CHECKPOINT_DIR


def checkpoint_dir(default: str = "checkpoints") -> Path:
    """Where to keep and find checkpoints: Herdsman's for this job, or `default` outside Herdsman."""
    return Path(os.environ.get(ENV_CHECKPOINT_DIR) or default)


def resume_required() -> bool:
    return os.environ.get(layout.ENV_RESUME) == layout.RESUME_REQUIRED


class Reporter:
    def __init__(self) -> None:
        stats = os.environ.get(layout.ENV_STATS_DIR)
        self.rank = int(os.environ.get("RANK", 0))
        self._w = StatsWriter(Path(stats) if stats else None, self.rank,
                              os.environ.get(layout.ENV_HOST, ""), int(os.environ.get(layout.ENV_ATTEMPT, 0)),
                              gpu=int(os.environ.get("LOCAL_RANK", 0)))
        self._w.event(TrainerPhase.RENDEZVOUS)

    def restored(self, step: int, seconds: float = 0.0) -> None:
        self._w.event(TrainerPhase.RESTORED, step=step, duration_s=seconds)

    def step(self, step: int, loss: float, seconds: float, tokens: int = 0) -> None:
        self._w.step(step, seconds, tokens, loss)

    def checkpoint(self, step: int, blocked_s: float = 0.0) -> None:
        self._w.event(TrainerPhase.CHECKPOINT, step=step, duration_s=blocked_s)

    def finished(self, step: int) -> None:
        self._w.event(TrainerPhase.FINISHED, step=step)

    def failed(self, step: int, message: str) -> None:
        self._w.event(TrainerPhase.FAILED, step=step, message=message[-4000:])


__all__ = ["Reporter", "checkpoint_dir", "resume_required"]
