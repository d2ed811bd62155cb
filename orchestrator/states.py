"""The controller's states: each a small frozen class; `Controller._step(state)` returns the next one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from herdsman.events import EvidenceKind, Verdict

if TYPE_CHECKING:
    from orchestrator.workers import WorkerGroup


@dataclass(frozen=True)
class Scheduling:
    since: float


@dataclass(frozen=True)
class Running:
    group: WorkerGroup
    started_at: float


@dataclass(frozen=True)
class Failing:
    group: WorkerGroup
    since: float  # first sign of the failure
    hang: bool = False  # no progress while every rank lives


@dataclass(frozen=True)
class Draining:
    """Take hosts out after a fresh checkpoint: planned maintenance, or a GPU held down by heat."""

    group: WorkerGroup
    verdict: Verdict
    requested_at: float
    deadline: float


@dataclass(frozen=True)
class BackingOff:
    until: float


@dataclass(frozen=True)
class Finished:
    pass


@dataclass(frozen=True)
class Stopped:
    reason: str


TERMINAL = (Finished, Stopped)
# what the ranks of one attempt said about themselves: a later attempt's failure is not explained by it
ATTEMPT_EVIDENCE = (EvidenceKind.TRAINER_HANG, EvidenceKind.TRAINER_EXCEPTION, EvidenceKind.TRAINER_EXIT)
