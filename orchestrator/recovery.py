"""What a restarted controller needs to carry on a job: read back from the store and the ranks' report streams.

The controller is a Ray actor with `max_restarts`; when its process dies, Ray runs its constructor again. The
store holds the job (its current attempt), every interruption with its verdict, and host states; rank 0's report
streams (`<run_dir>/nodes/<host>/jobs/<job>/stats/rank00000-attempt*.jsonl`, on the shared run directory) hold
every completed step and checkpoint. Folded into a JobLedger they give the same numbers the dead controller had,
so ETTR is not counted twice and the crash-loop guard and lemon detector remember what happened before.
`recover` only reads; the controller decides what to do with what it returns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from herdsman.layout import rank0_streams
from orchestrator.ledger import JobLedger
from orchestrator.store import JobRecord, Store

LIVE_STATES = ("scheduling", "running")


@dataclass
class Recovered:
    job: JobRecord
    ledger: JobLedger  # its attempt is the one the dead controller was running, or the next one if recorded
    attempt_recorded: bool  # the dead controller had already recorded the end of its current attempt


def recover(store: Store, job: str, run_dir: Path) -> Recovered | None:
    """The state of `job` if it was left unfinished by an earlier controller, else None."""
    rec = store.job(job)
    if rec is None or rec.state not in LIVE_STATES:
        return None
    ledger = JobLedger(job, rec.started_at, attempt=rec.attempt)
    if rec.accounts:  # the dead controller's own marks (rank 0's are read back from its streams below)
        try:
            ledger.load_marks(json.loads(rec.accounts))
        except (ValueError, TypeError, AttributeError):
            pass  # damaged: the legs they measured become unexplained time, nothing else is lost
    for path in rank0_streams(run_dir, job):
        ledger.fold_stream(path)
    interruptions = store.interruptions(job)
    recorded = any(i.attempt >= rec.attempt for i in interruptions)
    ledger.remember(interruptions)
    return Recovered(rec, ledger, recorded)
