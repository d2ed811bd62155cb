"""Checkpoint cost: loop blocked per save (async) vs a synchronous DCP save, restore from memory vs disk, and the
step-time overhead at the chosen interval, all from the real trainer (gloo ranks) in one run.

    python -m bench.checkpoint [--model small] [--world 2] [--steps 24] [--every 4] [--out bench/results/checkpoint.json]

Goals (issue 5): blocked/sync <= 0.1 and step-time overhead <= 2%.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import tempfile
from pathlib import Path

from tabulate import tabulate

from tests.trainer_runs import launch, write_config
from trainer import faults

ROOT = Path(__file__).resolve().parent.parent


def _records(stats: Path, attempt: int = 0) -> list[dict]:
    out = []
    for f in sorted(stats.glob(f"rank00000-attempt{attempt:04d}.jsonl")):
        out += [json.loads(line) for line in f.read_text().splitlines()]
    return out


def _run(d: Path, world: int, attempt: int = 0, fail_at: int = 0, **trainer) -> list[dict]:
    d.mkdir(parents=True, exist_ok=True)
    cfg = write_config(d / "h.toml", d / "run", **trainer)
    if fail_at:  # end the run with a failure, as a real restart would follow one (the memory tier is kept)
        faults.request(d / "ctl", 0, "exception", "bench: end of attempt", at_step=fail_at)
    runs = launch(cfg, world, attempt, d / "stats", d / "ctl", hosts=[f"h{r}" for r in range(world)], timeout=1800)
    if fail_at:
        return _records(d / "stats", attempt)
    if any(r.returncode for r in runs):
        raise SystemExit(runs[0].stdout[-3000:])
    return _records(d / "stats", attempt)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--every", type=int, default=4, help="checkpoint interval in steps (the chosen interval)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "checkpoint.json"))
    a = p.parse_args()
    base = dict(model=a.model, steps=a.steps, seq_len=128, batch_size=2, keep_checkpoints=2, sdc_check_every=0)
    top = Path(tempfile.mkdtemp(prefix="herdsman-bench-ckpt-"))
    try:
        # warm-up steps are left out of the step times: the first ones pay for allocation and thread start
        def step_times(recs):
            return [r["step_time_s"] for r in recs if r["kind"] == "step" and r["step"] > 2]

        def blocked(recs):
            return [r["duration_s"] for r in recs if r.get("phase") == "checkpoint"]

        none = _run(top / "none", a.world, checkpoint_every=10**6, memory_tier=False, **base)
        sync = _run(top / "sync", a.world, checkpoint_every=a.every, checkpoint_async=False, memory_tier=False, **base)
        asyn = _run(top / "async", a.world, fail_at=a.steps, checkpoint_every=a.every, checkpoint_async=True,
                    memory_tier=True, **base)
        # restores of the async run's last checkpoint: from the memory tier, then from disk (page cache: an upper
        # bound on a real disk's speed) with the memory tier gone
        more = dict(base)
        mem = _run(top / "async", a.world, attempt=1, checkpoint_every=a.every, memory_tier=True, **more)
        shutil.rmtree(top / "async" / "run" / "memory")
        more["steps"] += 1
        disk = _run(top / "async", a.world, attempt=2, checkpoint_every=a.every, memory_tier=True, **more)

        def restore_s(recs, tier):
            msg = next(r["message"] for r in recs if r.get("phase") == "restored")
            m = re.search(rf"\({tier}, ([\d.]+) s\)", msg)
            if not m:
                raise SystemExit(f"expected a {tier} restore: {msg}")
            return float(m.group(1))

        t_none, t_sync, t_async = (statistics.mean(step_times(r)) for r in (none, sync, asyn))
        b_sync, b_async = statistics.median(blocked(sync)), statistics.median(blocked(asyn))
        per_step = lambda t, b: t + b / a.every  # noqa: E731 - a save's stall spread over its interval
        res = {
            "model": a.model, "world": a.world, "every_steps": a.every, "steps": a.steps,
            "step_s_no_checkpoint": t_none,
            "sync_blocked_s": b_sync, "async_blocked_s": b_async, "blocked_ratio": b_async / b_sync,
            "sync_step_overhead": per_step(t_sync, b_sync) / t_none - 1,
            "async_step_overhead": per_step(t_async, b_async) / t_none - 1,
            "restore_memory_s": restore_s(mem, "memory"), "restore_disk_s": restore_s(disk, "disk"),
            "checkpoint_bytes": sum(f.stat().st_size for f in (top / "async" / "run" / "checkpoints" / "t").glob(
                "step-*/*") if f.is_file()) // max(1, len(list((top / "async" / "run" / "checkpoints" / "t").glob(
                    "step-????????")))),
        }
    finally:
        shutil.rmtree(top, ignore_errors=True)
    rows = [
        ["loop blocked per save", f"{res['sync_blocked_s'] * 1e3:.1f} ms", f"{res['async_blocked_s'] * 1e3:.1f} ms",
         f"{res['blocked_ratio']:.3f} (goal <= 0.1)"],
        [f"step-time overhead, save every {a.every} steps", f"{100 * res['sync_step_overhead']:.1f}%",
         f"{100 * res['async_step_overhead']:.1f}%", "goal <= 2%"],
        ["restore", f"disk {res['restore_disk_s']:.3f} s", f"memory {res['restore_memory_s']:.3f} s",
         f"{res['restore_disk_s'] / res['restore_memory_s']:.1f}x"],
    ]
    print(f"model {a.model}, {a.world} gloo ranks, checkpoint {res['checkpoint_bytes'] / 2**20:.1f} MiB, "
          f"step {res['step_s_no_checkpoint'] * 1e3:.0f} ms without checkpoints")
    print(tabulate(rows, headers=["", "synchronous DCP", "Herdsman async + memory tier", "ratio"]))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
