"""Diagnosis throughput and memory on a large mixed log: kernel syslog, NCCL stderr (INFO chatter and WARNs),
PyTorch tracebacks, torchrun summaries, nvidia-smi -q sections, with ~1% of records being failures.

Herdsman's shared engine (evidence/: RE2 rule set, record grouping) against the engine it replaced (per-line
Python `re` rules of agents/host_rules.toml + orchestrator/job_rules.toml, taken from git history), each in its own
process on one core, same file, same run. Memory is the process's peak RSS at two input sizes: flat means the
engine streams.

    python -m bench.diagnose [--mb 1024] [--legacy-mb 64] [--commit 501788f]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

ROOT = Path(__file__).resolve().parent.parent
LEGACY_COMMIT = "501788f"  # the last commit with the per-line engine
LEGACY_FILES = {"agents/host.py": "legacy_host.py", "agents/host_rules.toml": "host_rules.toml",
                "orchestrator/logparse.py": "legacy_logparse.py", "orchestrator/job_rules.toml": "job_rules.toml"}

BENIGN = [
    "{ts} {host} kernel: [{up}] IPv6: ADDRCONF(NETDEV_CHANGE): ib0: link becomes ready",
    "{ts} {host} systemd[1]: Started Session {n} of user root.",
    "{ts} {host} kernel: [{up}] audit: type=1400 audit({up}:{n}): apparmor=\"STATUS\" operation=\"profile_load\"",
    "{host}: [rank{rank}]: {host}:{n}:{n} [0] NCCL INFO Channel 00/32 : 0[0] -> 1[1] via P2P/CUMEM/read",
    "{host}: [rank{rank}]: {host}:{n}:{n} [0] NCCL INFO Connected all rings, use ring PXN 0 GDR 1",
    "{host}: [rank{rank}]: step {n} loss 2.{n} lr 3.0e-04 tokens/s 41234 mfu 0.41",
    "{ts} {host} kernel: [{up}] nvidia-nvlink: Nvlink Core is being initialized, major device number 511",
    "{ts} {host} kernel: [{up}] mlx5_core 0000:5e:00.0: E-Switch: cleanup",
]
SMI = ["GPU 00000000:{bus}:00.0", "    Product Name                          : NVIDIA H100 80GB HBM3",
       "    ECC Errors", "        Volatile", "            SRAM Correctable              : 0",
       "            SRAM Uncorrectable Parity     : 0", "            DRAM Correctable              : 0",
       "            DRAM Uncorrectable            : 0", "    Remapped Rows", "        Correctable Error                 : 0",
       "        Uncorrectable Error               : 0", "        Pending                           : No",
       "        Remapping Failure Occurred        : No", "    Temperature", "        GPU Current Temp                  : 41 C"]
FAILURES = [
    "{ts} {host} kernel: [{up}] NVRM: Xid (PCI:0000:{bus}:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.",
    "{ts} {host} kernel: [{up}] NVRM: Xid (PCI:0000:{bus}:00): 48, pid=3312, name=python, An uncorrectable double bit error",
    "{ts} {host} kernel: [{up}] EDAC MC0: 1 CE memory read error on CPU_SrcID#0_Ha#0_Chan#1_DIMM#0 (channel:1 slot:0)",
    "{host}: [rank{rank}]: {host}:{n}:{n} [0] NCCL WARN NET/IB : Got completion from peer 10.2.0.4<5002> with status=12 opcode=0 len=0 vendor err 129 (Recv)",
    "{host}: [rank{rank}]: [E1123 03:22:07.1 {n} ProcessGroupNCCL.cpp:1571] [PG 0 Rank {rank}] Watchdog caught collective operation timeout: WorkNCCL(SeqNum={n}, OpType=ALLREDUCE, NumelIn=1, NumelOut=1, Timeout(ms)=600000) ran for 600018 milliseconds before timing out.",
]
TRACEBACK = ["{host}: [rank{rank}]: Traceback (most recent call last):",
             "{host}: [rank{rank}]:   File \"/opt/train.py\", line 212, in <module>",
             "{host}: [rank{rank}]:     loss = model(batch)",
             "{host}: [rank{rank}]: KeyError: 'doc_ids'"]


def write_log(path: Path, mb: int, seed: int = 0) -> int:
    """A mixed log of about `mb` MiB; returns its size in bytes. Written by repeating a 4 MiB block of varied lines."""
    rnd = random.Random(seed)
    lines: list[str] = []
    size = 0
    while size < 4 << 20:
        host, rank, n = f"node-{rnd.randrange(512):03d}", rnd.randrange(4096), rnd.randrange(1 << 20)
        kw = dict(ts=f"Nov 23 {rnd.randrange(24):02d}:{rnd.randrange(60):02d}:{rnd.randrange(60):02d}", host=host,
                  up=f"{rnd.uniform(1, 9e5):.6f}", n=n, rank=rank, bus=f"{rnd.randrange(256):02x}")
        r = rnd.random()
        if r < 0.01:
            block = [rnd.choice(FAILURES)]
        elif r < 0.012:
            block = TRACEBACK
        elif r < 0.015:
            block = SMI
        else:
            block = [rnd.choice(BENIGN)]
        for t in block:
            line = t.format(**kw) + "\n"
            lines.append(line)
            size += len(line)
    chunk = "".join(lines).encode()
    written = 0
    with open(path, "wb") as f:
        while written < mb << 20:
            f.write(chunk)
            written += len(chunk)
    return written


def run_new(path: str) -> dict:
    from evidence.engine import iter_lines, scan

    t0 = time.perf_counter()
    with open(path, "rb") as f:
        s = scan(iter_lines(f))
    return {"seconds": time.perf_counter() - t0, "evidence": sum(s.counts.values()), "failures": len(s.failures),
            "records": s.records}


def _legacy_dir(commit: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix="herdsman-legacy-"))
    for src, dst in LEGACY_FILES.items():
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:{src}"], capture_output=True, text=True,
                              check=True).stdout
        text = (text.replace("from agents.host import load_rules, match_line", "from legacy_host import load_rules, match_line")
                .replace("from orchestrator.diagnose import RankFailure", "from herdsman.events import RankFailure"))
        (d / dst).write_text(text)
    return d


def run_legacy(path: str, legacy: str) -> dict:
    sys.path.insert(0, legacy)
    from legacy_logparse import parse  # noqa: E402  (the engine as it was, from git history)

    t0 = time.perf_counter()
    with open(path, "rb") as f:
        p = parse(line.decode("utf-8", errors="replace") for line in f)
    return {"seconds": time.perf_counter() - t0, "evidence": len(p.evidence), "failures": len(p.failures)}


def child(engine: str, path: str, legacy: str) -> None:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    out = run_new(path) if engine == "new" else run_legacy(path, legacy)
    out["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def measure(engine: str, path: Path, legacy: Path | None) -> dict:
    r = subprocess.run([sys.executable, "-m", "bench.diagnose", "--child", engine, "--file", str(path),
                        "--legacy-dir", str(legacy or "")], capture_output=True, text=True, cwd=ROOT, check=True)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["mb"] = path.stat().st_size / (1 << 20)
    out["mb_per_s"] = out["mb"] / out["seconds"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=1024, help="size of the big log (MiB)")
    ap.add_argument("--small-mb", type=int, default=64, help="size of the small log, for the memory comparison")
    ap.add_argument("--legacy-mb", type=int, default=64, help="size the old engine reads (it is slow)")
    ap.add_argument("--commit", default=LEGACY_COMMIT)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "diagnose.json"))
    ap.add_argument("--child", choices=["new", "legacy"], help=argparse.SUPPRESS)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    ap.add_argument("--legacy-dir", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.file, a.legacy_dir)
        return
    tmp = Path(tempfile.mkdtemp(prefix="herdsman-bench-diag-"))
    try:
        rows, results = [], []
        logs = {}
        for mb in sorted({a.small_mb, a.legacy_mb, a.mb}):
            logs[mb] = tmp / f"mixed-{mb}.log"
            write_log(logs[mb], mb)
        legacy = _legacy_dir(a.commit)
        plan = [("new", a.small_mb), ("new", a.mb), ("legacy", a.legacy_mb)]
        for engine, mb in plan:
            r = measure(engine, logs[mb], legacy)
            r["engine"] = "herdsman (evidence/, RE2)" if engine == "new" else f"per-line re ({a.commit})"
            results.append(r)
            rows.append((r["engine"], f"{r['mb']:.0f}", f"{r['seconds']:.1f}", f"{r['mb_per_s']:.1f}",
                         f"{r['max_rss_mb']:.0f}", r["evidence"], r["failures"]))
        new_big = results[1]
        old = results[2]
        print(tabulate(rows, headers=["engine", "MiB", "s", "MiB/s", "peak RSS MiB", "evidence", "failed ranks"]))
        ratio = new_big["mb_per_s"] / old["mb_per_s"]
        flat = new_big["max_rss_mb"] / results[0]["max_rss_mb"]
        print(f"\nthroughput: {ratio:.1f}x the old engine; peak memory at {a.mb} MiB is {flat:.2f}x that at "
              f"{a.small_mb} MiB")
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"results": results, "speedup": ratio, "memory_ratio": flat}, indent=2))
        print(f"wrote {a.out}")
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
