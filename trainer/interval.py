"""How often to checkpoint: Young's and Daly's optimum from the measured save cost and the failure rate.

Each checkpoint costs the time the loop is blocked (delta); each failure costs, on average, half an interval of
recomputed work. Young (1974): tau = sqrt(2 * delta * M) for a mean time between failures M; Daly (2006) adds
the higher-order terms. The trainer prints the suggestion at start; the save cost and the start of the job are
kept in `<checkpoint root>/herdsman-stats.json` from one attempt to the next, so the observed failure rate
(attempts over elapsed time) replaces the prior once failures happen.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

STATS = "herdsman-stats.json"
# Llama 3 405B: 419 unexpected interruptions in 54 days on 16,384 GPUs (Table 5): one per GPU every ~5.8 years
GPU_MTTF_PRIOR_S = 54 * 86400 * 16384 / 419


def young_daly(delta_s: float, mttf_s: float) -> float:
    """Daly's optimum compute interval between checkpoints (seconds)."""
    if delta_s <= 0:
        return 0.0
    if delta_s >= 2 * mttf_s:
        return mttf_s
    x = math.sqrt(delta_s / (2 * mttf_s))
    return math.sqrt(2 * delta_s * mttf_s) * (1 + x / 3 + x * x / 9) - delta_s


def read_stats(root: Path) -> dict:
    try:
        d = json.loads((Path(root) / STATS).read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def record(root: Path, **values: float) -> None:
    """Rank 0, at a commit: merge running figures (EWMA of save cost and step time) into the stats file."""
    d = read_stats(root)
    d.setdefault("job_started_at", time.time())
    for k, v in values.items():
        d[k] = v if k not in d or k == "job_started_at" else 0.7 * float(d[k]) + 0.3 * v
    tmp = Path(root) / (STATS + ".part")
    tmp.write_text(json.dumps(d))
    os.replace(tmp, Path(root) / STATS)


def suggestion(root: Path, world_gpus: int, attempt: int, every_steps: int, interval_s: float) -> str:
    d = read_stats(root)
    started = float(d.get("job_started_at", 0) or 0)
    prior = GPU_MTTF_PRIOR_S / max(1, world_gpus)
    if attempt > 0 and started:
        mttf, source = max(1.0, (time.time() - started) / attempt), f"observed: {attempt} failure(s)"
    else:
        mttf, source = prior, f"Table 5 prior for {world_gpus} GPU(s)"
    now = f"every {every_steps} steps" + (f" or {interval_s:g} s" if interval_s else "")
    delta, step_s = d.get("save_blocked_s"), d.get("step_s")
    if not delta:
        return f"checkpoint interval: {now}; Young/Daly needs a measured save cost (after the first save)"
    tau = young_daly(float(delta), mttf)
    steps = f" (~{tau / float(step_s):,.0f} steps)" if step_s else ""
    return (f"checkpoint interval: {now}; Young/Daly suggests {tau:,.1f} s{steps} from a save that blocks "
            f"{float(delta):.3f} s and MTTF {mttf:,.0f} s ({source})")
