"""The controller's states: each a small frozen class; `Controller._step(state)` returns the next one.

Every state derives from `State`; `TRANSITIONS` names the legal moves, and the controller refuses any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from herdsman.events import EvidenceKind, Verdict

if TYPE_CHECKING:
    from orchestrator.workers import WorkerGroup


class State:
    """A state of the control loop."""

    @property
    def name(self) -> str:
        return type(self).__name__.lower()


@dataclass(frozen=True)
class Scheduling(State):
    since: float


@dataclass(frozen=True)
class Running(State):
    group: WorkerGroup
    started_at: float


@dataclass(frozen=True)
class Failing(State):
    group: WorkerGroup
    since: float  # first sign of the failure
    hang: bool = False  # no progress while every rank lives


@dataclass(frozen=True)
class Draining(State):
    """Take hosts out after a fresh checkpoint: planned maintenance, or a GPU held down by heat."""

    group: WorkerGroup
    verdict: Verdict
    requested_at: float
    deadline: float


@dataclass(frozen=True)
class Stopping(State):
    """An operator's stop after a fresh checkpoint (`herdsman stop --drain`): the ranks save, then exit."""

    group: WorkerGroup
    reason: str
    requested_at: float
    deadline: float
    drained: Verdict | None = None  # a drain it took over: its hosts still go to their maintenance


@dataclass(frozen=True)
class BackingOff(State):
    until: float


@dataclass(frozen=True)
class Finished(State):
    pass


@dataclass(frozen=True)
class Stopped(State):
    reason: str


TERMINAL = (Finished, Stopped)

# state -> the states it may move to. An operator's stop can come in any live state (a drained stop while a
# drain saves waits for that save: Draining -> Stopping); an operator's restart only while Running (Running ->
# Scheduling): in the other states the loop restarts the job itself and the request is refused.
TRANSITIONS: dict[type[State], tuple[type[State], ...]] = {
    Scheduling: (Scheduling, Running, Stopped),
    Running: (Running, Failing, Draining, Finished, Scheduling, Stopping, Stopped),
    Stopping: (Stopping, Stopped),
    Failing: (Failing, BackingOff, Running, Stopped),  # Running: an in-process restart
    Draining: (Draining, Failing, Scheduling, Stopping, Stopped),
    BackingOff: (BackingOff, Scheduling, Stopped),
    Finished: (Finished,),
    Stopped: (Stopped,),
}


def legal(current: State, nxt: State) -> bool:
    return type(nxt) in TRANSITIONS[type(current)]
# what the ranks of one attempt said about themselves: a later attempt's failure is not explained by it
ATTEMPT_EVIDENCE = (EvidenceKind.TRAINER_HANG, EvidenceKind.TRAINER_EXCEPTION, EvidenceKind.TRAINER_EXIT)
