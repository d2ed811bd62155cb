"""Evidence from the flight recorder when a job fails or hangs: ask the stuck ranks for their buffers, collect
every rank's dump through the agents, and name the ranks that never joined the stuck collective."""

from __future__ import annotations

import time
from collections.abc import Callable

from agents.flight_recorder import analyse as analyse_fr
from herdsman.config import ControllerConfig
from herdsman.events import Evidence, EvidenceKind, Severity
from orchestrator.fleet import Fleet, Group
from orchestrator.ledger import JobLedger


def _pace(ledger: JobLedger, every: int) -> float | None:
    """The attempt's steady step interval of the kind now running (after a save step, or after the others)."""
    return ledger.longest_interval(every, every > 0 and ledger.last_step.get(ledger.attempt, 0) % every == 0)


def stalled(ledger: JobLedger, c: ControllerConfig, every: int, started_at: float, seen: float,
            now: float) -> float | None:
    """How long the current attempt has gone without a step, when that is a hang; else None.

    Before the ranks have loaded, the controller's clock counts from the launch (a start may take long); once
    rank 0 has restored, its first step has `hang_timeout_s` (a resumed attempt may hang on it). After it, the
    attempt's own pace sets the limit (`hang_factor` x its steady step interval, at least `hang_floor_s`, at most
    `hang_timeout_s`), and the silence is counted on rank 0's host's clock up to the latest report its agent wrote
    (`seen`): a report that is late (an agent restarting, a partition, a busy controller) is not a trainer that
    stopped; an agent that stays silent is the heartbeat check's business."""
    if not ledger.stepped():
        restored = ledger.restored.get(ledger.attempt)
        if restored is not None:  # ranks are up and loaded: the first step (often the hung one) has hang_timeout_s
            quiet = seen - restored[0]  # ... plus rank 0's load time again, for the slowest rank's load
            return quiet if quiet > c.hang_timeout_s + restored[1] else None
        return now - started_at if now - started_at > max(c.hang_timeout_s, c.startup_timeout_s) else None
    pace = _pace(ledger, every)
    limit = c.hang_timeout_s if pace is None else min(c.hang_timeout_s, max(c.hang_floor_s, c.hang_factor * pace))
    quiet = seen - ledger.last_progress()
    return quiet if quiet > limit else None


def suspected(ledger: JobLedger, c: ControllerConfig, every: int, seen: float) -> float | None:
    """How long the attempt has gone without a step, once that is long enough to look at the flight recorder
    (`hang_suspect_factor` x the pace `stalled` uses, at least `hang_suspect_s`); None before the attempt has a
    steady pace (until then only `stalled` decides)."""
    if c.hang_suspect_s <= 0 or not ledger.stepped():
        return None
    pace = _pace(ledger, every)
    if pace is None:
        return None
    quiet = seen - ledger.last_progress()
    return quiet if quiet > max(c.hang_suspect_s, c.hang_suspect_factor * pace) else None


def stuck_signature(fleet: Fleet, group: Group) -> tuple | None:
    """What the ranks' latest flight-recorder dumps show the group stuck on: per stuck collective, its process group,
    sequence number, the ranks that never joined it and where each of them is; None when no rank is missing from
    one (all at the same collective, or the dumps unreadable). Two equal signatures a while apart: nobody moved."""
    hosts = [h for h in group.hosts if fleet.has_agent(h)]
    summaries, refused, _ = fleet.flight_recorder(hosts, group.attempt, lambda _line: None)
    analysis = analyse_fr(summaries, group.world_size, refused)
    sig = tuple(sorted((s.pg, s.seq, s.missing, tuple(sorted(s.behind.items()))) for s in analysis.stuck if s.missing))
    return sig or None


def flight_recorder_evidence(fleet: Fleet, group: Group, asked: list[int], hang: bool,
                             wait_s: float, decide: Callable[[str], None],
                             blameless: frozenset[int] = frozenset()) -> list[Evidence]:
    """Collect this attempt's flight-recorder dumps from the agents (after asking live ranks for theirs) and
    turn the analysis into evidence naming the ranks that never joined the stuck collective.

    Only a rank still alive (or any rank, in a hang) is evidence: one that died never joined the next
    collective either, and its death is explained elsewhere."""
    if asked:
        decide(f"asked live ranks {asked} for their flight-recorder dumps")
    began = time.time()
    deadline = began + (wait_s if asked else 0.0)
    hosts = [h for h in group.hosts if fleet.has_agent(h)]
    while True:
        summaries, refused, silent = fleet.flight_recorder(hosts, group.attempt, decide)
        hosts = [h for h in hosts if h not in silent]  # not asked again
        have = {s.rank for s in summaries}
        if all(r in have for r in asked) or time.time() >= deadline or not hosts:
            break
        time.sleep(0.2)
    if asked:  # what the restart waited for (bench/mttr reads it): at most `wait_s`, less once every dump is in
        decide(f"flight-recorder dumps of attempt {group.attempt}: {len(have & set(asked))} of {len(asked)} asked "
               f"in {time.time() - began:.2f} s")
    if not summaries and not refused:
        return []
    now = time.time()
    try:
        out = [e for e in _lagging_evidence(summaries, refused, group, asked, hang, decide, now)
               if e.rank not in blameless]  # ranks that reported their own exception: explained
    except Exception as e:  # noqa: BLE001 -- a damaged dump must not break this poll, nor every later one
        decide(f"  flight recorder: analysis failed: {type(e).__name__}")
        out = [Evidence("", EvidenceKind.TRAINER_HANG, now, f"flight-recorder analysis failed: {type(e).__name__}",
                        Severity.WARNING, attrs={"analysis_failed": True})]
    for r in refused:
        out.append(Evidence("", EvidenceKind.TRAINER_HANG, now, f"refused flight-recorder dump: {r}",
                            Severity.WARNING, attrs={"refused": True}))
    return out


def _lagging_evidence(summaries: list, refused: list[str], group: Group, asked: list[int], hang: bool,
                      decide: Callable[[str], None], now: float) -> list[Evidence]:
    analysis = analyse_fr(summaries, group.world_size, refused)
    for line in analysis.lines():
        decide(f"  flight recorder: {line}")
    out = []
    for rank in analysis.lagging:
        if not (hang or rank in asked):
            continue
        out.append(Evidence(group.rank_hosts[rank], EvidenceKind.TRAINER_HANG, now,
                            f"rank {rank} never joined: " + "; ".join(s.line() for s in analysis.stuck),
                            Severity.WARNING, rank=rank, attrs={"lagging": list(analysis.lagging)}))
    return out
