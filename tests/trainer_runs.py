"""Launch the trainer as N real processes (gloo), the way the worker group does, for tests and benchmarks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, run_dir: Path, **trainer: object) -> Path:
    trainer.setdefault("memory_dir", "{run_dir}/memory/{host}")  # not the machine's shared /dev/shm
    lines = [f'run_dir = "{run_dir}"', 'job = "t"', "[trainer]"] + [
        f"{k} = {json.dumps(v) if isinstance(v, bool) else repr(v)}" for k, v in trainer.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def launch(config: Path, world: int, attempt: int, stats_dir: Path, control_dir: Path | None = None,
           extra_env: dict[str, str] | None = None, timeout: float = 180,
           hosts: list[str] | None = None) -> list[subprocess.CompletedProcess]:
    procs = start(config, world, attempt, stats_dir, control_dir, extra_env, hosts)
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, ""))
    return out


def start(config: Path, world: int, attempt: int, stats_dir: Path, control_dir: Path | None = None,
          extra_env: dict[str, str] | None = None, hosts: list[str] | None = None) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "HERDSMAN_ATTEMPT": str(attempt),
               "HERDSMAN_HOST": hosts[rank] if hosts else "local", "HERDSMAN_STATS_DIR": str(stats_dir), "OMP_NUM_THREADS": "1",
               **(extra_env or {})}
        if control_dir is not None:
            env["HERDSMAN_CONTROL_DIR"] = str(control_dir)
        procs.append(subprocess.Popen([sys.executable, "-m", "trainer.train", "--config", str(config)], env=env,
                                      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def losses(stats_dir: Path, rank: int = 0) -> dict[int, float]:
    """step -> loss as reported by `rank`, later attempts overriding earlier ones."""
    out: dict[int, float] = {}
    for f in sorted(Path(stats_dir).glob(f"rank{rank:05d}-attempt*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            if r["kind"] == "step":
                out[r["step"]] = r["loss"]
    return out
