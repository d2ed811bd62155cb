"""Evidence from the flight recorder when a job fails or hangs: ask the stuck ranks for their buffers, collect
every rank's dump through the agents, and name the ranks that never joined the stuck collective."""

from __future__ import annotations

import time
from typing import Any, Callable

import ray

from herdsman.events import Evidence, EvidenceKind, Severity
from agents.flight_recorder import analyse as analyse_fr
from orchestrator.workers import WorkerGroup


def flight_recorder_evidence(agents: dict[str, Any], group: WorkerGroup, asked: list[int], hang: bool,
                             wait_s: float, decide: Callable[[str], None]) -> list[Evidence]:
    """Collect this attempt's flight-recorder dumps from the agents (after asking live ranks for theirs) and
    turn the analysis into evidence naming the ranks that never joined the stuck collective.

    Only a rank still alive (or any rank, in a hang) is evidence: one that died never joined the next
    collective either, and its death is explained elsewhere."""
    if asked:
        decide(f"asked live ranks {asked} for their flight-recorder dumps")
    deadline = time.time() + (wait_s if asked else 0.0)
    hosts = [h for h in group.hosts if h in agents]
    while True:
        summaries, refused = [], []
        refs = {h: agents[h].flight_recorder.remote(group.attempt) for h in hosts}
        for h, ref in refs.items():
            try:
                s, r = ray.get(ref, timeout=5)
                summaries += s
                refused += r
            except Exception as e:
                decide(f"flight recorder of {h} unavailable: {type(e).__name__}")
                hosts.remove(h)  # not asked again
        have = {s.rank for s in summaries}
        if all(r in have for r in asked) or time.time() >= deadline:
            break
        time.sleep(0.2)
    if not summaries and not refused:
        return []
    analysis = analyse_fr(summaries, group.world_size, refused)
    for line in analysis.lines():
        decide(f"  flight recorder: {line}")
    now, out = time.time(), []
    for rank in analysis.lagging:
        if not (hang or rank in asked):
            continue
        out.append(Evidence(group.rank_hosts[rank], EvidenceKind.TRAINER_HANG, now,
                            f"rank {rank} never joined: " + "; ".join(s.line() for s in analysis.stuck),
                            Severity.WARNING, rank=rank, attrs={"lagging": list(analysis.lagging)}))
    for r in refused:
        out.append(Evidence("", EvidenceKind.TRAINER_HANG, now, f"refused flight-recorder dump: {r}",
                            Severity.WARNING, attrs={"refused": True}))
    return out
