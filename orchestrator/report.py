"""Postmortem numbers: a Table-5-style breakdown of interruptions, ETTR with its split, MTTF and MTTR.

One function computes the numbers (`summarize`), one prints them; the page, the metrics and the simulator use the
same split (README, "How it fits together").
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tabulate import tabulate

from herdsman.events import TIME_SPLIT, Interruption
from herdsman.secrets import redact_url
from herdsman.taxonomy import RootCause
from orchestrator.store import JobRecord, Store

if TYPE_CHECKING:
    from orchestrator.sim_result import SimResult


@dataclass(frozen=True)
class Summary:
    job: JobRecord
    interruptions: list[Interruption]
    wall_s: float
    split: dict[str, float]  # TIME_SPLIT's buckets (orchestrator/accounts.py), summing to wall_s

    @property
    def ettr(self) -> float:
        return self.split["productive"] / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def mttf_s(self) -> float | None:
        n = sum(1 for i in self.interruptions if not i.planned)
        return self.wall_s / n if n else None

    @property
    def badput(self) -> list[tuple[RootCause, float, float]]:
        return badput_by_cause(self.interruptions, self.wall_s)

    @property
    def mttr_s(self) -> float | None:
        done = [i for i in self.interruptions if i.restore_s is not None]
        if not done:
            return None
        return sum(i.detection_s + (i.restart_s or 0) + (i.restore_s or 0) for i in done) / len(done)


def summarize(store: Store, job: str) -> Summary:
    rec = store.job(job)
    if rec is None:
        from herdsman import HerdsmanError

        known = ", ".join(j.name for j in store.jobs()) or "none"
        raise HerdsmanError(f"no job named {job!r} in {redact_url(store.url)} (jobs: {known})")
    its = store.interruptions(job)
    split = stored_split(rec.accounts)
    if split is not None:  # the controller's time accounts as of its last write (the job's end, once it ended)
        return Summary(rec, its, sum(split.values()), split)
    wall = (rec.ended_at or time.time()) - rec.started_at
    return Summary(rec, its, wall, time_split(wall, rec.productive_s, rec.checkpoint_s,
                                              [(i.detection_s, i.restart_s, i.restore_s, i.lost_work_s) for i in its]))


def stored_split(accounts: str | None) -> dict[str, float] | None:
    try:
        split = json.loads(accounts or "null")["split"]
        return {k: float(split.get(k, 0.0)) for k in TIME_SPLIT}
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def time_split(wall_s: float, productive_s: float, checkpoint_s: float,
               interruptions: list[tuple[float, float | None, float | None, float]]) -> dict[str, float]:
    """The split of a job recorded before the time accounts (a store from an older release): kept step time,
    checkpoint stalls and each interruption's (detection, restart, restore, lost work); the rest is unexplained."""
    split = dict.fromkeys(TIME_SPLIT, 0.0)
    split["productive"], split["checkpoint"] = productive_s, checkpoint_s
    for detection, restart, restore, lost in interruptions:
        split["detection"] += detection
        split["restart"] += restart or 0.0
        split["restore"] += restore or 0.0
        split["lost_work"] += lost
    split["unexplained"] = max(0.0, wall_s - sum(split.values()))
    return split


def table5(interruptions: list[Interruption]) -> list[list[object]]:
    """Table 5 counts unexpected interruptions only; planned ones are reported beside it (`planned_note`)."""
    return table5_rows(Counter(i.verdict.cause for i in interruptions if not i.planned))


def cost_s(i: Interruption) -> float:
    """What one interruption cost the job: detection, restart, restore and the work done again."""
    return i.detection_s + (i.restart_s or 0.0) + (i.restore_s or 0.0) + i.lost_work_s


def badput_by_cause(interruptions: list[Interruption], wall_s: float) -> list[tuple[RootCause, float, float]]:
    """(cause, seconds, share of the wall time) per root cause, costliest first: how much ETTR each cause cost."""
    cost: Counter[RootCause] = Counter()
    for i in interruptions:
        cost[i.verdict.cause] += cost_s(i)
    return [(c, v, v / wall_s if wall_s > 0 else 0.0) for c, v in cost.most_common() if v > 0]


def planned_note(interruptions: list[Interruption]) -> str:
    n = sum(1 for i in interruptions if i.planned)
    return f"Unexpected interruptions only; {n} planned interruption(s) are not counted here, as in Table 5." if n else ""


def table5_rows(counts: Counter[RootCause]) -> list[list[object]]:
    """Component, category, cause, count, share: Table 5's columns, most frequent first."""
    total = sum(counts.values())
    rows = []
    for cause in sorted(counts, key=lambda c: (-counts[c], list(RootCause).index(c))):
        f = cause.facts
        rows.append([f.component, f.category, cause.value, counts[cause], f"{100 * counts[cause] / total:.1f}%"])
    return rows


def render_text(s: Summary) -> str:
    out = [f"Job {s.job.name}: {s.job.state}, step {s.job.last_step}/{s.job.target_step}, "
           f"wall {s.wall_s:.1f} s, {len(s.interruptions)} interruption(s)"]
    if s.job.message:
        out.append(f"  {s.job.message}")
    out.append("")
    out.append("Interruptions by root cause (Llama 3 Table 5 categories)")
    rows = table5(s.interruptions)
    out.append(tabulate(rows, headers=["Component", "Category", "RootCause", "Count", "%"]) if rows else "  none")
    if planned_note(s.interruptions):
        out.append(planned_note(s.interruptions))
    out.append("")
    out.append(f"Effective training time (ETTR): {100 * s.ettr:.1f}%")
    out.append(tabulate([[k, f"{v:.2f}", f"{100 * v / s.wall_s:.1f}%" if s.wall_s else "-"] for k, v in s.split.items()],
                        headers=["time", "seconds", "share"]))
    mttf, mttr = s.mttf_s, s.mttr_s
    out.append(f"MTTF: {'-' if mttf is None else f'{mttf:.1f} s'}   MTTR: {'-' if mttr is None else f'{mttr:.1f} s'}")
    if s.badput:
        out.append("")
        out.append("What each root cause cost (detection + restart + restore + work done again)")
        out.extend(f"  {c.facts.component} ({c.value}) cost {100 * share:.1f}% of this job's wall time ({v:.1f} s)"
                   for c, v, share in s.badput)
    if s.interruptions:
        out.append("")
        rows = []
        for i in s.interruptions:
            v = i.verdict
            rows.append([i.attempt, v.cause.value, f"{v.confidence:.2f}", ",".join(v.hosts) or "-",
                         f"{i.detection_s:.2f}", _f(i.restart_s), _f(i.restore_s), f"{i.lost_work_s:.2f}",
                         f"{i.last_step}->{'-' if i.resumed_step is None else i.resumed_step}",
                         v.evidence[0][:70] if v.evidence else ""])
        out.append(tabulate(rows, headers=["attempt", "cause", "conf", "hosts", "detect s", "restart s",
                                           "restore s", "lost s", "steps", "evidence"]))
    return "\n".join(out)


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def render_simulation(r: "SimResult") -> str:
    """A simulated run in the same shape as a real job's report."""
    c = r.cfg
    out = [f"Simulated {c.days:g} days on {c.gpus:,} GPUs ({c.gpus // c.gpus_per_host:,} hosts + {c.spare_hosts} "
           f"spares), seed {c.seed}: {len(r.interruptions)} interruptions ({len(r.unexpected)} unexpected, "
           f"{len(r.interruptions) - len(r.unexpected)} planned)", ""]
    out.append("Unexpected interruptions by root cause (Llama 3 Table 5 categories)")
    rows = table5_rows(r.by_cause)
    out.append(tabulate(rows, headers=["Component", "Category", "RootCause", "Count", "%"]) if rows else "  none")
    out.append("")
    out.append(f"Effective training time (ETTR): {100 * r.ettr:.2f}%")
    out.append(tabulate([[k, f"{v / 3600:.1f}", f"{100 * v / r.wall_s:.2f}%"] for k, v in r.split.items()],
                        headers=["time", "hours", "share"]))
    mttf, mttr = r.mttf_s, r.mttr_s
    out.append(f"MTTF: {'-' if mttf is None else f'{mttf / 3600:.2f} h'}   "
               f"MTTR: {'-' if mttr is None else f'{mttr / 60:.1f} min'}   spares used: {r.spares_used}   "
               f"waits for hosts: {r.waits_for_hosts}   human interventions: {r.human_interventions}")
    out.append(f"lemons: {r.lemons_flagged} hosts flagged, {r.lemons_found} of the {r.lemon_hosts} real ones")
    gpu_days = c.gpus * c.days
    out.append(f"simulated in {r.sim_wall_s:.2f} s ({gpu_days / max(r.sim_wall_s, 1e-9):,.0f} GPU-days/s); "
               f"policies {r.policy_us_per_event:.0f} us per interruption")
    return "\n".join(out)
