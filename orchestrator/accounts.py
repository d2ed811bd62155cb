"""Every second of a job's wall time in one named bucket (herdsman.events.TIME_SPLIT), each measured where it
happens; what no measurement covers is `unexplained`, not folded into another bucket.

Rank 0 measures its side (orchestrator/ledger.py folds its records): when its process was up with imports done
(`started`), its process group formed (`rendezvous`), the model built and the checkpoint loaded (`restored`, with
the load's own seconds), every step (its start, its seconds, of them the data wait), every checkpoint stall, and
the wait for the last saves (`finished`). The controller measures its side: when each attempt began scheduling,
how long it waited for hosts, when it launched the processes, when a failure began and was decided, and when the
job ended. The buckets:

- productive: kept step time, without its data wait; data_loading: that wait;
- checkpoint: the loop blocked saving, and waiting for the last saves at the end;
- startup (the first attempt) or restart (every later one): scheduling and placement, process start, rendezvous,
  model build, the first step's lead-in; for a restart also teardown and backoff after the verdict;
- restore: loading the checkpoint an attempt resumed from;
- detection: first sign of a failure to the verdict; lost_work: steps done again, and the step in flight when an
  attempt failed;
- waiting_for_hosts: no placement possible (no spare); operator: a human holding the job (the simulator's paged
  failures; a real job that pages stops, and its wall time ends there);
- shutdown: the end of the last step (or the last saves) to the job's end.
"""

from __future__ import annotations

from herdsman.events import TIME_SPLIT
from orchestrator.ledger import JobLedger

# what the controller's current state is doing with the time since the last measured moment (a live view)
OPEN_BUCKET = {"running": "productive", "failing": "detection", "backingoff": "restart", "draining": "checkpoint",
               "stopping": "checkpoint"}


def _gap(a: float | None, b: float | None) -> float:
    return max(0.0, b - a) if a is not None and b is not None else 0.0


def account(led: JobLedger, now: float, state: str = "") -> dict[str, float]:
    """The job's wall time (started_at to its end, or `now` while it runs) split into TIME_SPLIT's buckets.

    `state` (the controller's, lowercased) names the bucket of the open tail of a live job: the time since the
    last measured moment, which no record covers yet."""
    split = dict.fromkeys(TIME_SPLIT, 0.0)
    m = led.marks
    ended = next(iter(sorted(m.get("ended", {}).values(), reverse=True)), None)
    end = ended if ended is not None else now
    wall = max(0.0, end - led.started_at)
    for step, (_, seconds) in led.step_time.items():
        data = led.step_data.get(step, 0.0)
        split["productive"] += seconds - data
        split["data_loading"] += data
    split["checkpoint"] += led.ckpt_stall_s + sum(wait for _, wait in led.finished.values())
    split["lost_work"] += led.redone_s
    last = led.started_at  # the latest moment measured so far
    for a in range(0, led.attempt + 1):
        bucket = "startup" if a == 0 else "restart"
        scheduled = led.started_at if a == 0 else m["scheduled"].get(a)
        waited = m["waited"].get(a, 0.0)
        split["waiting_for_hosts"] += waited
        it_before = led.interruptions.get(a - 1)
        if it_before is not None:  # teardown and backoff after the previous attempt's verdict (a drain's verdict
            # comes before its last steps and saves: from whichever was later)
            split[bucket] += _gap(max(it_before.detected_at, last), scheduled)
        # the attempt's way to its first step, each leg between two measured moments (a missing one is skipped:
        # the leg then runs from the moment before it)
        restored = led.restored.get(a)
        loaded_from = None if restored is None else restored[0] - restored[1]
        moments = [scheduled, m["launched"].get(a), led.started.get(a), led.rendezvous.get(a), loaded_from]
        known = [t for t in moments if t is not None]
        if known:
            split[bucket] += max(0.0, known[-1] - known[0] - waited)
            last = max(last, known[-1])
        if restored is not None:
            resumed = led.resumed_at.get(a, (0.0, 0))[1] > 0
            split["restore" if resumed else bucket] += restored[1]
            last = max(last, restored[0])
            split[bucket] += _gap(restored[0], led.first_step_start.get(a))
        stepped = led.last_step_at.get(a)
        it = led.interruptions.get(a)
        if it is not None:
            # the step in flight when it failed is lost work; a failure before the first step ends its start-up
            split["lost_work" if stepped is not None else bucket] += _gap(
                max(last, stepped or 0.0, led.finished.get(a, (0.0, 0.0))[0]), it.failed_at)
            # from the first sign to the verdict, less what was measured meanwhile (a rank may finish a step or
            # a drain its last saves after the first sign)
            since = max(it.failed_at, stepped or 0.0, led.finished.get(a, (0.0, 0.0))[0])
            split["detection"] += _gap(since, it.detected_at)
            last = max(last, it.detected_at, since)
        elif stepped is not None:
            last = max(last, stepped)
    fin = led.finished.get(led.attempt)
    if fin is not None:
        last = max(last, fin[0])
    if ended is not None:
        split["shutdown"] += _gap(last, ended)
    elif state in OPEN_BUCKET or state == "scheduling":
        if state == "running" and led.ckpt_at:  # a stall after the last step is counted already
            last = max(last, max(led.ckpt_at.values()))
        tail = _gap(last, now)
        split[OPEN_BUCKET.get(state, "startup" if led.attempt == 0 else "restart")] += tail
    split["unexplained"] = wall - sum(v for k, v in split.items() if k != "unexplained")
    return split


def ettr(split: dict[str, float]) -> float:
    wall = sum(split.values())
    return split["productive"] / wall if wall > 0 else 0.0
