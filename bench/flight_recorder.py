"""Flight-recorder analysis at scale: synthetic NCCL-format dumps (pickles with the fields torch writes) for 1K,
4K and 16K ranks, one rank stuck behind the others; Herdsman's analysis against torch's own analyser
(`python -m torch.distributed.flight_recorder.fr_trace`) on the same files, in the same run.

    python -m bench.flight_recorder [--ranks 1024 4096 16384] [--entries 20] [--peer-timeout 600]
"""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

from agents.flight_recorder import analyse, collect

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "nccl_trace_rank_"


def entry(rank: int, seq: int, record: int, size: int) -> dict:
    return {"frames": [], "record_id": record, "pg_id": 0, "process_group": ("0", "default_pg"),
            "thread_name": "pt_main_thread", "thread_id": "1", "collective_seq_id": seq, "p2p_seq_id": 0,
            "op_id": seq, "profiling_name": "nccl:all_reduce", "time_created_ns": 1_700_000_000_000_000_000 + seq,
            "input_sizes": [[size]], "input_dtypes": ["Float"], "output_sizes": [[size]], "output_dtypes": ["Float"],
            "state": "completed", "time_discovered_started_ns": None, "time_discovered_completed_ns": None,
            "retired": True, "timeout_ms": 600000, "is_p2p": False}


def write_dumps(d: Path, ranks: int, entries: int, stuck_rank: int) -> None:
    ranks_str = str(list(range(ranks)))
    pg_config = {"0": {"name": "0", "desc": "default_pg", "ranks": ranks_str}}
    for r in range(ranks):
        n = entries - 1 if r == stuck_rank else entries  # the stuck rank never enqueued the last collective
        es = [entry(r, s, s, 1 << 20) for s in range(1, n + 1)]
        if r != stuck_rank:
            es[-1]["state"] = "started"
        dump = {"version": "2.10", "pg_config": pg_config, "pg_status": {}, "comm_lib_version": "2.21.5",
                "entries": es}
        with open(d / f"{PREFIX}{r}", "wb") as f:
            pickle.dump(dump, f)


def run_ours(d: Path, ranks: int) -> tuple[float, str]:
    t0 = time.perf_counter()
    summaries, refused = collect([d])
    a = analyse(summaries, ranks, refused)
    return time.perf_counter() - t0, a.lines()[0]


def run_peer(d: Path, timeout: float) -> tuple[float | None, str]:
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-m", "torch.distributed.flight_recorder.fr_trace", str(d),
                            "--prefix", PREFIX], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    dt = time.perf_counter() - t0
    out = (r.stdout + r.stderr).strip().splitlines()
    status = "ok" if r.returncode == 0 else f"exit {r.returncode}"
    return dt, f"{status}: {out[-1][:100] if out else ''}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--entries", type=int, default=20, help="collectives per rank's buffer")
    p.add_argument("--peer-timeout", type=float, default=600)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "flight_recorder.json"))
    a = p.parse_args()
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch.distributed.flight_recorder.fr_trace"], check=True)
    startup = time.perf_counter() - t0
    print(f"torch fr_trace start-up (interpreter + imports), subtracted for the analysis-only ratio: {startup:.2f} s")
    rows, results = [], []
    for n in a.ranks:
        d = Path(tempfile.mkdtemp(prefix=f"fr-bench-{n}-"))
        try:
            t0 = time.perf_counter()
            write_dumps(d, n, a.entries, stuck_rank=n // 3)
            gen = time.perf_counter() - t0
            mb = sum(f.stat().st_size for f in d.iterdir()) / 2**20
            ours, finding = run_ours(d, n)
            peer, peer_msg = run_peer(d, a.peer_timeout)
            ratio = f"{peer / ours:.1f}x" if peer else "-"
            ratio_net = f"{max(0.0, peer - startup) / ours:.1f}x" if peer else "-"
            rows.append([n, f"{mb:.0f}", f"{ours:.2f}", "-" if peer is None else f"{peer:.2f}", ratio, ratio_net])
            results.append({"ranks": n, "entries": a.entries, "dump_mib": mb, "generate_s": gen, "herdsman_s": ours,
                            "herdsman_finding": finding, "torch_fr_trace_s": peer, "torch_fr_trace": peer_msg,
                            "torch_startup_s": startup})
            print(f"  {n} ranks: herdsman {ours:.2f} s ({finding[:90]}); torch fr_trace "
                  f"{'-' if peer is None else f'{peer:.2f} s'} ({peer_msg})", flush=True)
        finally:
            shutil.rmtree(d, ignore_errors=True)
    print(tabulate(rows, headers=["ranks", "dumps MiB", "herdsman s", "torch fr_trace s", "speed-up",
                                "speed-up w/o start-up"]))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"benchmark": "flight_recorder", "results": results, "time": time.time()},
                                      indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
