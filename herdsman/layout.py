"""Where the processes of a job meet: the environment a trainer rank is started with and the files they share.

Controller, worker actors, trainer ranks and node agents all name these paths through this module, so the
contract is written once. Host-level files (the simulated GPU clocks, a maintenance notice, an embedded host's
kernel log) live in the node directory; everything a job writes (report streams, control files, flight-recorder
dumps, rank logs) lives under the job's own directory inside it, so a second job in the same run directory
never reads the first one's records.
"""

from __future__ import annotations

from pathlib import Path

# --- the environment of a trainer rank (besides torchrun's RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) ----
ENV_CONFIG = "HERDSMAN_CONFIG"  # the resolved configuration file of the job
ENV_ATTEMPT = "HERDSMAN_ATTEMPT"  # the attempt number (torchrun's TORCHELASTIC_RESTART_COUNT otherwise)
ENV_HOST = "HERDSMAN_HOST"  # the host name the controller knows this rank's node by
ENV_STATS_DIR = "HERDSMAN_STATS_DIR"  # where the rank appends its step and event records
ENV_CONTROL_DIR = "HERDSMAN_CONTROL_DIR"  # control files: checkpoint-now requests, dump requests, injected faults
ENV_FR_DIR = "HERDSMAN_FR_DIR"  # where the rank writes its flight-recorder dump
ENV_SIM_CLOCKS = "HERDSMAN_SIM_CLOCKS"  # a simulated-GPU agent's clock factors (simulated hosts only)
ENV_RESUME = "HERDSMAN_RESUME"  # "required": refuse to start from scratch when no checkpoint loads
ENV_CHECKPOINT_DIR = "HERDSMAN_CHECKPOINT_DIR"  # where the job keeps its checkpoints (a trainer of your own)
ENV_INPROCESS = "HERDSMAN_INPROCESS"  # "1": a rank that saw a peer fail waits for an order to rejoin (trainer/rejoin.py)
RESUME_REQUIRED = "required"

SIM_CLOCKS = "sim-clocks.json"
MAINTENANCE_NOTICE = "maintenance"


def node_dir(run_dir: str | Path, host: str) -> Path:
    """A host's own directory (node-local on a real cluster): host-level files and the jobs run on it."""
    return Path(run_dir).resolve() / "nodes" / host


def job_dir(run_dir: str | Path, host: str, job: str) -> Path:
    """What one job writes on one host."""
    return node_dir(run_dir, host) / "jobs" / job


def stats_dir(run_dir: str | Path, host: str, job: str) -> Path:
    return job_dir(run_dir, host, job) / "stats"


def control_dir(run_dir: str | Path, host: str, job: str) -> Path:
    return job_dir(run_dir, host, job) / "control"


def flight_recorder_dir(run_dir: str | Path, host: str, job: str) -> Path:
    return job_dir(run_dir, host, job) / "flight_recorder"


def rank_log(run_dir: str | Path, host: str, job: str, rank: int, attempt: int) -> Path:
    return job_dir(run_dir, host, job) / "logs" / f"rank{rank:05d}-attempt{attempt:04d}.log"


def stats_file(stats: Path, rank: int, attempt: int) -> Path:
    return Path(stats) / f"rank{rank:05d}-attempt{attempt:04d}.jsonl"


def rank0_streams(run_dir: str | Path, job: str) -> list[Path]:
    """Rank 0's report streams of every attempt of `job`, on every host (what a restarted controller reads)."""
    return sorted((Path(run_dir).resolve() / "nodes").glob(f"*/jobs/{job}/stats/rank00000-attempt*.jsonl"))


def rank_env(run_dir: str | Path, host: str, job: str, attempt: int, fr_buffer_size: int = 2000) -> dict[str, str]:
    """The Herdsman part of a rank's environment on `host` (herdsman/contract.py says what a trainer gets)."""
    fr = flight_recorder_dir(run_dir, host, job)
    return {ENV_ATTEMPT: str(attempt), ENV_HOST: host, ENV_STATS_DIR: str(stats_dir(run_dir, host, job)),
            ENV_CONTROL_DIR: str(control_dir(run_dir, host, job)), ENV_FR_DIR: str(fr),
            ENV_CHECKPOINT_DIR: str(checkpoint_dir(run_dir, job)),
            ENV_SIM_CLOCKS: str(node_dir(run_dir, host) / SIM_CLOCKS),
            # the flight recorder, on for any trainer: NCCL dumps it on a watchdog timeout, named by attempt and rank
            "TORCH_FR_BUFFER_SIZE": str(fr_buffer_size), "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
            "TORCH_FR_DUMP_TEMP_FILE": str(fr / f"attempt{attempt:04d}-rank")}


def checkpoint_dir(run_dir: str | Path, job: str) -> Path:
    return Path(run_dir).resolve() / "checkpoints" / job


def store_spool(run_dir: str | Path, job: str) -> Path:
    """Records the controller could not write before it stopped (the store was down); the next one writes them.
    Beside it, `<spool>.journal` (store-spool.journal): every record queued and not yet written, kept durable while
    the controller runs, so that one killed outright loses nothing either (orchestrator/store_writer.py)."""
    return Path(run_dir).resolve() / f"{job}.store-spool.jsonl"
